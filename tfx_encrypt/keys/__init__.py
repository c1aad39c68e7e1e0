"""Key backends, chosen by key URI.

Built-in schemes are listed in `_BUILTIN`. Third parties add a scheme by
declaring an entry point in the group ``tfx_encrypt.key_backends`` whose name
is the URI scheme and whose value is a :class:`KeyBackend` subclass, e.g.::

    [options.entry_points]
    tfx_encrypt.key_backends =
        mykms = my_package.backend:MyKmsBackend

Cloud SDKs are imported lazily by their backend module, so resolving a local
key never imports boto3, google-cloud-kms, hvac, azure or pkcs11.
"""

import functools
import importlib
import re
import sys
from typing import Dict, List, Sequence, Tuple

from tfx_encrypt import errors
from tfx_encrypt.keys.base import KeyBackend, Stanza, WrapContext, spki_key_id  # pylint: disable=unused-import

ENTRY_POINT_GROUP = 'tfx_encrypt.key_backends'

# scheme -> "module:Class". Modules are imported only when the scheme is used.
_BUILTIN: Dict[str, str] = {
    'file': 'tfx_encrypt.keys.local:LocalKey',
    'aws-kms': 'tfx_encrypt.keys.aws_kms:AwsKmsKey',
    'gcp-kms': 'tfx_encrypt.keys.gcp_kms:GcpKmsKey',
    'hcvault': 'tfx_encrypt.keys.vault:VaultKey',
    'azure-kv': 'tfx_encrypt.keys.azure_kv:AzureKeyVaultKey',
    'pkcs11': 'tfx_encrypt.keys.pkcs11:Pkcs11Key',
}

_SCHEME_RE = re.compile(r'^([a-z][a-z0-9+.-]*):')


def uri_scheme(uri: str) -> str:
  """The scheme of a key URI; a bare filesystem path counts as 'file'."""
  if not isinstance(uri, str) or not uri:
    raise errors.InvalidKeyUriError('a key URI must be a non-empty string')
  m = _SCHEME_RE.match(uri)
  if not m:
    return 'file'
  scheme = m.group(1)
  # "C:" style drive letters are not an issue on POSIX; treat one-letter
  # schemes as paths anyway to be safe.
  return 'file' if len(scheme) == 1 else scheme


def _entry_point_backends() -> Dict[str, str]:
  """Scheme -> target from installed entry points.

  Scanning distributions costs ~10 ms, so the result is cached per sys.path
  (which is what decides the installed distributions).
  """
  return _scan_entry_points(tuple(sys.path))


@functools.lru_cache(maxsize=4)
def _scan_entry_points(path: Tuple[str, ...]) -> Dict[str, str]:
  del path  # the cache key
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    eps = metadata.entry_points()
    group = (eps.select(group=ENTRY_POINT_GROUP)
             if hasattr(eps, 'select') else eps.get(ENTRY_POINT_GROUP, []))
  except Exception:  # pylint: disable=broad-except
    return {}
  return {ep.name: ep.value for ep in group}


def available_schemes() -> List[str]:
  return sorted(set(_BUILTIN) | set(_entry_point_backends()))


def backend_class(scheme: str):
  # Built-in schemes cannot be overridden by a third-party entry point.
  target = _BUILTIN.get(scheme) or _entry_point_backends().get(scheme)
  if target is None:
    raise errors.InvalidKeyUriError(
        f'no key backend handles the scheme {scheme!r}; known schemes: '
        f'{", ".join(available_schemes())}. Install the backend package '
        f'that provides it (entry point group {ENTRY_POINT_GROUP!r}).')
  module_name, _, attr = target.partition(':')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    extra = {'aws-kms': 'aws', 'gcp-kms': 'gcp', 'hcvault': 'vault',
             'azure-kv': 'azure', 'pkcs11': 'pkcs11'}.get(scheme)
    hint = (f"pip install 'tfx-encrypt[{extra}]'" if extra else
            'install the package that provides it')
    raise errors.InvalidKeyUriError(
        f'the {scheme!r} key backend is not available ({e.name or e} is not '
        f'installed): {hint}') from e
  cls = getattr(module, attr, None)
  if not (isinstance(cls, type) and issubclass(cls, KeyBackend)):
    raise errors.InvalidKeyUriError(
        f'{target} (backend for {scheme!r}) is not a KeyBackend subclass')
  return cls


def resolve(uri: str) -> KeyBackend:
  """Return the backend object for a key URI."""
  return backend_class(uri_scheme(uri))(uri)


def resolve_all(uris: Sequence[str]) -> List[KeyBackend]:
  return [resolve(u) for u in uris]
