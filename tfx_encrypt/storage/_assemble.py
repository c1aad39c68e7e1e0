"""Objects assembled from part objects on the store, server-side.

BeamEncryptPusher's workers share no filesystem with the driver: each one
writes the ciphertext of its segment range as a part object, and the driver
joins the parts into the payload objects without a byte of them passing
through it (docs/OBJECT_STORES.md, "Beam without a shared filesystem"):

* `s3://`: a multipart upload whose parts are server-side copies of the
  part objects (`UploadPartCopy`), completed with `If-None-Match: *` when
  create-only. S3's limits: every part but the last at least 5 MiB
  (:data:`S3_MIN_PART`), at most 5 GiB each, at most 10,000 parts.
* `gs://`: `compose`, at most 32 sources per call (:data:`GCS_MAX_COMPOSE`),
  so more parts are composed in a tree of intermediate objects (deleted
  afterwards); the last call carries `ifGenerationMatch=0` when
  create-only. Sources and destination must be in one bucket.

:func:`part_limits` tells a writer how to cut its parts for a store.
"""

import dataclasses
from typing import List, Optional, Sequence

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.storage._base import (
    ObjectExistsError, Reader, _translating, is_remote, split)


#: S3: every part but the last must be at least this large.
S3_MIN_PART = 5 << 20


#: S3: largest part (a larger source would need ranged copies).
S3_MAX_PART = 5 << 30


#: S3: most parts in one multipart upload.
S3_MAX_PARTS = 10000


#: GCS: most source objects in one compose request.
GCS_MAX_COMPOSE = 32


@dataclasses.dataclass(frozen=True)
class PartLimits:
  """How a store lets an object be assembled from parts."""
  min_part: int  # every part but the last at least this many bytes
  max_part: Optional[int]  # None: no limit
  max_parts: Optional[int]  # None: no limit (GCS composes in a tree)


def part_limits(uri: str) -> PartLimits:
  """The limits :func:`assemble` has for objects at `uri` (s3:// or gs://)."""
  s, _, _ = split(uri)
  if s == 's3':
    return PartLimits(S3_MIN_PART, S3_MAX_PART, S3_MAX_PARTS)
  return PartLimits(0, None, None)


def object_version(reader: Reader) -> str:
  """The version a remote reader is pinned to (S3 ETag, GCS generation)."""
  etag = getattr(reader, '_etag', None)
  if etag is not None:
    return f'etag:{etag}'
  generation = getattr(reader, '_generation', None)
  if generation is None and getattr(reader, '_blob', None) is not None:
    generation = reader._blob.generation  # pylint: disable=protected-access
  if generation is not None:
    return f'generation:{generation}'
  raise errors.UsageError(
      f'{_text.printable(reader.uri)} is not an object on s3:// or gs://')


@_translating
def assemble(uri: str, parts: Sequence[str], *, scratch: str,
             create_only: bool = True) -> None:
  """Write the object `uri` as the concatenation of the objects `parts`.

  Server-side: no byte of the parts is read here. `scratch` is a prefix
  this call may write intermediate objects under (GCS composition trees);
  it deletes them before returning. The parts are left in place: the
  caller created them and deletes them.

  Raises:
    ObjectExistsError: `create_only` and `uri` exists (another writer);
      nothing was written at `uri`.
    UsageError: the parts are not on the same store (and, for gs://, the
      same bucket) as `uri`, or break the store's part limits.
  """
  if not parts:
    raise errors.UsageError('nothing to assemble')
  s, bucket, key = split(uri)
  where = []
  for p in list(parts) + [scratch]:
    ps, pb, pk = split(p)
    if ps != s or (s == 'gs' and pb != bucket):
      raise errors.UsageError(
          f'{_text.printable(p)} is not in {s}://{bucket}: parts are '
          'assembled server-side, within one store (one bucket on gs://)')
    where.append((pb, pk))
  scratch_key = where.pop()[1]
  if s == 's3':
    _s3_assemble(uri, bucket, key, where, create_only)
  else:
    _gcs_assemble(uri, bucket, key, [k for _, k in where], scratch_key,
                  create_only)


def _s3_assemble(uri: str, bucket: str, key: str, parts, create_only: bool
                 ) -> None:
  import botocore.exceptions  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.storage._aws import _s3, _s3_code  # pylint: disable=g-import-not-at-top
  if len(parts) > S3_MAX_PARTS:
    raise errors.UsageError(
        f'{_text.printable(uri)}: {len(parts)} parts; S3 allows '
        f'{S3_MAX_PARTS}')
  c = _s3()
  upload_id = c.create_multipart_upload(Bucket=bucket, Key=key)['UploadId']
  try:
    done = []
    for n, (pb, pk) in enumerate(parts, 1):
      r = c.upload_part_copy(Bucket=bucket, Key=key, UploadId=upload_id,
                             PartNumber=n,
                             CopySource={'Bucket': pb, 'Key': pk})
      done.append({'PartNumber': n, 'ETag': r['CopyPartResult']['ETag']})
    kw = {'IfNoneMatch': '*'} if create_only else {}
    try:
      c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                  MultipartUpload={'Parts': done}, **kw)
    except botocore.exceptions.ClientError as e:
      if _s3_code(e) in ('PreconditionFailed', '412',
                         'ConditionalRequestConflict', '409'):
        raise ObjectExistsError(f'{_text.printable(uri)} already exists '
                                '(another writer created it)') from None
      if _s3_code(e) == 'EntityTooSmall':
        raise errors.UsageError(
            f'{_text.printable(uri)}: a part other than the last is smaller '
            f'than S3\'s {S3_MIN_PART >> 20} MiB minimum') from None
      raise
  except BaseException:
    try:
      c.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception:  # pylint: disable=broad-except
      pass  # a lifecycle rule removes abandoned uploads
    raise


def _gcs_assemble(uri: str, bucket: str, key: str, parts: List[str],
                  scratch: str, create_only: bool) -> None:
  from google.api_core import exceptions as gexc  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.storage._google import _gcs  # pylint: disable=g-import-not-at-top
  b = _gcs().bucket(bucket)
  made: List[str] = []
  try:
    level = 0
    keys = list(parts)
    while len(keys) > GCS_MAX_COMPOSE:  # a tree: 32 sources per call
      nxt = []
      for j in range(0, len(keys), GCS_MAX_COMPOSE):
        group = keys[j:j + GCS_MAX_COMPOSE]
        if len(group) == 1:
          nxt.append(group[0])
          continue
        name = f'{scratch.rstrip("/")}/compose-{level:02d}-{j // GCS_MAX_COMPOSE:06d}'
        made.append(name)
        b.blob(name).compose([b.blob(k) for k in group])
        nxt.append(name)
      keys = nxt
      level += 1
    kw = {'if_generation_match': 0} if create_only else {}
    try:
      b.blob(key).compose([b.blob(k) for k in keys], **kw)
    except gexc.PreconditionFailed:
      raise ObjectExistsError(f'{_text.printable(uri)} already exists '
                              '(another writer created it)') from None
  finally:
    for name in made:
      try:
        b.blob(name).delete()
      except gexc.NotFound:
        pass


def delete_objects(uris: Sequence[str]) -> List[str]:
  """Delete the objects `uris` (missing ones are fine); return those that
  could not be deleted (the caller reports them), never raising."""
  from tfx_encrypt.storage._verbs import delete  # pylint: disable=g-import-not-at-top
  failed = []
  for u in uris:
    try:
      delete(u)
    except Exception:  # pylint: disable=broad-except
      failed.append(u)
  return failed


def check_remote(uri: str, what: str) -> None:
  if not is_remote(uri):
    raise errors.UsageError(
        f'{what} {_text.printable(uri)} is not on an object store (s3:// or '
        'gs://)')

