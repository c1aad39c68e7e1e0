"""Encrypt, decrypt, inspect, verify, rewrap and rotate model packages.

The only code that reads or writes package files. A short public face over
modules that each serve one part of docs/FORMAT.md:

* :mod:`.envelope`: keys: recipients, unwrapping, key groups, signing
  (§5, §7, §7.1, §8);
* :mod:`.layout`: files on disk: directory and bundle forms, the source
  model, publication (§2, §9);
* :mod:`._streams`: payload stream workers, digests, the file table
  (§6, §9);
* :mod:`.operations`: the verbs (§10).

The byte format itself is :mod:`tfx_encrypt.format`; keys come from
:mod:`tfx_encrypt.keys`.
"""

from tfx_encrypt.package._streams import (  # noqa: F401
    PIPELINE_MIN_SEGMENTS, Progress, default_workers, seal_segment_range,
    start_payload)
from tfx_encrypt.package.envelope import (  # noqa: F401
    RESERVED_CONTEXT_PREFIX, SHARE_GROUP_KEY, SHARE_SIZE, Envelope, KeyLike,
    open_key_groups, prepare_envelope, resolve_keys, resolve_signer,
    seal_header, share_context, split_key, unwrap_data_key)
from tfx_encrypt.package.layout import (  # noqa: F401
    BUNDLE_SUFFIX, HEADER_NAME, MODEL_MARKER_NAMES, MODEL_MARKER_SUFFIXES,
    PAYLOAD_DIR, bundle_directory_package, finish_package, payload_name,
    scan_model, start_package)
from tfx_encrypt.package.operations import (  # noqa: F401
    PackageInfo, decrypt_model, encrypt_model, inspect_package,
    iter_decrypted_files, rewrap_package, rotate_package, verify_package)

# Building blocks of tfx_encrypt's own upper layers (runtime.load_model
# decrypts into memory with them); not a public API.
from tfx_encrypt.package._streams import _decrypt_payload, _run_parallel  # noqa: F401,E501  pylint: disable=unused-import
from tfx_encrypt.package.layout import _Source  # noqa: F401  pylint: disable=unused-import
from tfx_encrypt.package.operations import _open_authenticated  # noqa: F401  pylint: disable=unused-import
