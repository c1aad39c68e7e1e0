"""The verbs, by scheme; SDK errors become one-line OSErrors."""

import os
from typing import Dict, List, Optional
from tfx_encrypt import errors
from tfx_encrypt.storage._base import (
    Data, ObjectInfo, Reader, Writer, _translating, is_remote, local_path,
    split)
from tfx_encrypt.storage._local import (
    _LocalReader, _local_list, _local_list_info, _local_put,
    _local_put_if_unchanged)
from tfx_encrypt.storage._aws import (
    _S3Reader, _S3Writer, _clients, _clients_lock, _s3, _s3_exists, _s3_list,
    _s3_list_info, _s3_put, _s3_put_if_match)
from tfx_encrypt.storage._google import (
    _GcsReader, _GcsWriter, _gcs, _gcs_list_info, _gcs_put, _generation,
    _gcs_put_if_generation)


@_translating
def open_reader(uri: str, version: Optional[str] = None) -> Reader:
  """Open an object (or a local regular file) for ranged reads.

  `version` (from :func:`list_objects`) pins the reader to the version
  that was listed: if the object was replaced or removed since, this (or a
  later read) raises ObjectChangedError instead of reading the new one.

  Raises:
    FileNotFoundError: no such object or file.
    UnsafePathError: a local path that is a link or not a regular file.
  """
  uri = os.fspath(uri)
  if not is_remote(uri):
    return _LocalReader(local_path(uri))
  s, bucket, key = split(uri)
  if s == 's3':
    return _S3Reader(uri, bucket, key, version)
  return _GcsReader(uri, bucket, key, version)


@_translating
def open_writer(uri: str, size: int) -> Writer:
  """A create-only streamed upload of `size` bytes to a `s3://` / `gs://`
  object (docs/OBJECT_STORES.md): nothing exists before `commit()`, which
  raises ObjectExistsError if the object exists; `abort()` drops it."""
  uri = os.fspath(uri)
  if not is_remote(uri):
    raise errors.UsageError('open_writer writes s3:// and gs:// objects only')
  s, bucket, key = split(uri)
  if s == 's3':
    return _S3Writer(uri, bucket, key, size)
  return _GcsWriter(uri, bucket, key, size)


@_translating
def list_objects(prefix_uri: str) -> Dict[str, ObjectInfo]:
  """{name relative to `prefix_uri/`: ObjectInfo} of every object under it,
  in one listing: sizes, versions (to pin readers to) and change times."""
  if not is_remote(prefix_uri):
    return _local_list_info(local_path(prefix_uri))
  s, bucket, key = split(prefix_uri)
  prefix = key.rstrip('/') + '/' if key.strip('/') else ''
  if s == 's3':
    return _s3_list_info(bucket, prefix)
  return _gcs_list_info(bucket, prefix)


@_translating
def exists(uri: str) -> bool:
  """True if the object (or local file or directory) exists."""
  if not is_remote(uri):
    return os.path.lexists(local_path(uri))
  s, bucket, key = split(uri)
  if s == 's3':
    return _s3_exists(bucket, key)
  return _gcs().bucket(bucket).blob(key).exists()


@_translating
def list_sizes(prefix_uri: str) -> Dict[str, int]:
  """{name relative to `prefix_uri/`: size} of every object under it."""
  if not is_remote(prefix_uri):
    return _local_list(local_path(prefix_uri))
  s, bucket, key = split(prefix_uri)
  prefix = key.rstrip('/') + '/' if key.strip('/') else ''
  if s == 's3':
    return _s3_list(bucket, prefix)
  return {b.name[len(prefix):]: int(b.size)
          for b in _gcs().list_blobs(bucket, prefix=prefix)}


def list_names(prefix_uri: str) -> List[str]:
  """Every object under `prefix_uri/` (recursively), relative, sorted."""
  return sorted(list_sizes(prefix_uri))


@_translating
def put(uri: str, data: Data) -> None:
  """Write an object (replacing one that exists): payload objects."""
  _put(uri, data, create_only=False)


@_translating
def put_create_only(uri: str, data: Data) -> None:
  """Write an object only if it does not exist: the commit point.

  Raises:
    ObjectExistsError: it exists (or another writer created it meanwhile);
      nothing was changed.
  """
  _put(uri, data, create_only=True)


@_translating
def put_if_unchanged(uri: str, data: Data, version: str) -> Optional[str]:
  """Replace an object only if it is still `version`: a commit point that
  replaces (rewrap's header; docs/OBJECT_STORES.md).

  `version` is what was read: a :class:`Reader`'s `version` (or, on a
  store, :func:`list_objects`'). S3: PutObject with `If-Match: <ETag>`;
  GCS: an upload with `ifGenerationMatch=<generation>`; both atomic on the
  store. Locally: the complete new file is swapped in (RENAME_EXCHANGE)
  and swapped back if the one it displaced was not `version`. Returns the
  new version (None if the store did not say).

  Raises:
    ObjectChangedError: the object was replaced or removed since (or
      another conditional write of it is in progress); it was not
      overwritten.
  """
  uri = os.fspath(uri)
  if not version:
    raise errors.UsageError(f'put_if_unchanged({uri!r}): no version given '
                            '(it never replaces unconditionally)')
  if not is_remote(uri):
    return _local_put_if_unchanged(local_path(uri), data, version)
  s, bucket, key = split(uri)
  if s == 's3':
    return _s3_put_if_match(bucket, key, data, version, uri)
  return _gcs_put_if_generation(bucket, key, data, version, uri)


def _put(uri: str, data: Data, create_only: bool) -> None:
  uri = os.fspath(uri)
  if not is_remote(uri):
    _local_put(local_path(uri), data, create_only)
    return
  s, bucket, key = split(uri)
  if s == 's3':
    _s3_put(bucket, key, data, create_only, uri)
  else:
    _gcs_put(bucket, key, data, create_only, uri)


@_translating
def delete(uri: str) -> None:
  """Remove an object (or local file); a missing one is fine."""
  if not is_remote(uri):
    try:
      os.unlink(local_path(uri))
    except FileNotFoundError:
      pass
    return
  s, bucket, key = split(uri)
  if s == 's3':
    _s3().delete_object(Bucket=bucket, Key=key)
    return
  from google.api_core import exceptions as gexc  # pylint: disable=g-import-not-at-top
  try:
    _gcs().bucket(bucket).blob(key).delete()
  except gexc.NotFound:
    pass


def reset_clients() -> None:
  """Forget cached SDK clients (after the environment changed: tests)."""
  with _clients_lock:
    _clients.clear()
    _generation[0] += 1
