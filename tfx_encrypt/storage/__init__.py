"""One storage layer for packages: local paths, `file://`, `gs://`, `s3://`.

A few verbs, the same for every store (docs/OBJECT_STORES.md):

* :func:`open_reader` (`uri`) -> :class:`Reader`: the object's `size`, and
  ranged reads (`read_into(buf, offset)`), pinned to the version that was
  opened (S3 `If-Match: <etag>`, GCS `generation=`), so an object replaced
  while it is read is an error, never a mix of two versions. Memory is one
  chunk (:data:`CHUNK_SIZE`) per reader.
* :func:`exists`, :func:`list_names` (every object under a prefix),
  :func:`list_objects` (the same, with each object's size, version and
  change time), :func:`delete` (missing is fine).
* :func:`open_writer` (`uri`, `size`) -> :class:`Writer`: a streamed
  create-only upload (S3 multipart / GCS resumable) that exists only once
  committed; memory is one part per writer.
* :func:`put` (payload objects: may replace) and :func:`put_create_only`
  (the commit point: fails with :class:`ObjectExistsError` if the object
  exists; S3 `If-None-Match: *` on PutObject, GCS `ifGenerationMatch=0`, a
  local `link(2)` of a complete temporary file).
* :func:`put_if_unchanged` (`uri`, `data`, `version`): replace an object
  only if it is still the version that was read (a Reader's `version`;
  S3 `If-Match: <etag>`, GCS `ifGenerationMatch=<generation>`), else
  :class:`ObjectChangedError` and nothing is written: rewrap's commit.

The cloud SDKs are the official ones (boto3 in the `[aws]` extra,
google-cloud-storage in `[gcp]`), imported only when a `s3://` or `gs://`
URI is used: the core stays free of TensorFlow and cloud SDKs
(docs/ARCHITECTURE.md, "Storage").
"""

from tfx_encrypt.storage._base import (  # noqa: F401
    CHUNK_SIZE, REMOTE_SCHEMES, Data, ObjectChangedError, ObjectExistsError,
    ObjectInfo, Reader, ReaderFile, Writer, is_dir_marker, is_remote, join,
    local_path, scheme_of, split)
from tfx_encrypt.storage._verbs import (  # noqa: F401
    delete, exists, list_names, list_objects, list_sizes, open_reader,
    open_writer, put, put_create_only, put_if_unchanged, reset_clients)
# The clients, for tests that prepare buckets on the emulators.
from tfx_encrypt.storage._google import _gcs  # noqa: F401  pylint: disable=unused-import
from tfx_encrypt.storage._aws import _s3  # noqa: F401  pylint: disable=unused-import
from tfx_encrypt.storage._aws import S3_MULTIPART_THRESHOLD, S3_PART_SIZE  # noqa: F401
