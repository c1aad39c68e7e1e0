"""Objects assembled from part objects on the store, server-side.

BeamEncryptPusher's workers share no filesystem with the driver: each one
writes the ciphertext of its segment range as a part object, and the driver
joins the parts into the payload objects without a byte of them passing
through it (docs/OBJECT_STORES.md, "Beam without a shared filesystem"):

* `s3://`: a multipart upload whose parts are server-side copies of the
  part objects (`UploadPartCopy`), completed with `If-None-Match: *` when
  create-only. S3's limits: every part but the last at least 5 MiB
  (:data:`S3_MIN_PART`), at most 5 GiB each, at most 10,000 parts. An
  object that starts with bytes the caller holds (a bundle's header,
  `head=`) and joins parts shorter than 5 MiB is planned by
  :func:`plan_multipart`: ranges of the parts are copied server-side, and
  what must be joined to reach 5 MiB (the head, a part's short tail and
  the start of the next) is uploaded by this process, one part of less
  than 10 MiB at a time.
* `gs://`: `compose`, at most 32 sources per call (:data:`GCS_MAX_COMPOSE`),
  so more parts are composed in a tree of intermediate objects (deleted
  afterwards); the last call carries `ifGenerationMatch=0` when
  create-only. Sources and destination must be in one bucket. A `head` is
  written as a temporary object first (GCS has no part size limit).

:func:`part_limits` tells a writer how to cut its parts for a store.
"""

import dataclasses
from typing import Collection, List, Optional, Sequence, Tuple

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.storage._base import (
    ObjectExistsError, _BufferFile, _translating, is_remote, split)


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


@dataclasses.dataclass(frozen=True)
class Piece:
  """Bytes `[start, end)` of source `source` (an index into the sources
  :func:`plan_multipart` was given)."""
  source: int
  start: int
  end: int

  @property
  def size(self) -> int:
    return self.end - self.start


@dataclasses.dataclass(frozen=True)
class PlannedPart:
  """One part of a multipart upload: either `copy`, a range of one object
  copied server-side (`UploadPartCopy`), or `join`, pieces (of bytes this
  process holds, or of objects it fetches) that it uploads, in order."""
  copy: Optional[Piece] = None
  join: Tuple[Piece, ...] = ()

  @property
  def size(self) -> int:
    return self.copy.size if self.copy else sum(p.size for p in self.join)


def plan_multipart(sizes: Sequence[int], local: Collection[int] = (), *,
                   min_part: int = S3_MIN_PART, max_part: int = S3_MAX_PART,
                   max_parts: int = S3_MAX_PARTS) -> List[PlannedPart]:
  """The parts of one object that is the concatenation of sources of
  `sizes` bytes, in order. Sources whose index is in `local` are bytes the
  caller holds (never copied); the others are objects on the store.

  Every part but the last is at least `min_part` and at most `max_part`
  bytes; there are at most `max_parts`. An object source is copied
  server-side wherever it can be; only what cannot (local bytes, a source
  shorter than `min_part`, and the start of the next source needed to
  bring them to `min_part`, or all of it when what would be left of it is
  too short to copy) is joined, into parts of at least `min_part` and
  less than `2 * min_part` bytes but the last: whoever runs the plan holds
  less than `2 * min_part` bytes of it at a time (plus its local sources),
  and fetches less than `2 * min_part` bytes per short source.

  Raises:
    UsageError: more than `max_parts` parts would be needed.
  """
  if not (0 < min_part and 2 * min_part <= max_part):
    raise ValueError('need 0 < min_part and 2 * min_part <= max_part')
  local = frozenset(local)
  nonempty = [i for i, n in enumerate(sizes) if n > 0]
  last = nonempty[-1] if nonempty else -1
  parts: List[PlannedPart] = []
  pending: List[Piece] = []
  pending_bytes = 0

  def add(piece: Piece) -> None:
    nonlocal pending_bytes
    pending.append(piece)
    pending_bytes += piece.size
    if pending_bytes >= min_part:
      parts.append(PlannedPart(join=tuple(pending)))
      pending.clear()
      pending_bytes = 0

  for i in nonempty:
    n = int(sizes[i])
    pos = 0
    if i in local:
      while pos < n:
        take = min(n - pos, min_part - pending_bytes)
        add(Piece(i, pos, pos + take))
        pos += take
      continue
    if pending_bytes:  # fill the pending part up to min_part from here
      need = min_part - pending_bytes
      # Leave a tail only if it can be copied: else it would be joined
      # to the next source in turn, and so on (a cascade through sources
      # of exactly min_part bytes: every byte through this process). So
      # a joined part is at least min_part and less than 2 * min_part.
      # (The last source may leave a short tail: the last part.)
      take = (need if n - need >= min_part or (i == last and n >= min_part)
              else n)
      add(Piece(i, 0, take))
      pos = take
      if pending_bytes:  # (take == n: the part is still short)
        continue
    rest = n - pos
    if not rest:
      continue
    if rest >= min_part or i == last:
      # > max_part: `count` even pieces, each > max_part / 2 >= min_part.
      count = -(-rest // max_part)
      cuts = [pos + rest * k // count for k in range(count + 1)]
      parts += [PlannedPart(copy=Piece(i, a, b))
                for a, b in zip(cuts, cuts[1:])]
    else:
      add(Piece(i, pos, n))  # < min_part: it waits for the next source
  if pending:
    parts.append(PlannedPart(join=tuple(pending)))
  if len(parts) > max_parts:
    raise errors.UsageError(
        f'{len(parts)} parts; S3 allows {max_parts} in one object')
  return parts


@_translating
def assemble(uri: str, parts: Sequence[str], *, scratch: str,
             create_only: bool = True, head: Optional[bytes] = None) -> None:
  """Write the object `uri` as `head` (bytes, optional) followed by the
  concatenation of the objects `parts`.

  Server-side: without `head`, no byte of the parts is read here (on S3,
  parts that break its limits are refused). With `head` (a bundle: its
  header, then the payloads' parts), on S3 this process uploads the head
  and fetches what must be joined to it or between parts to reach S3's
  5 MiB part minimum (:func:`plan_multipart`), holding one part of less
  than 10 MiB at a time; on GCS the head is a temporary object under `scratch`.
  `scratch` is a prefix this call may write intermediate objects under; it
  deletes them before returning. The parts are left in place: the caller
  created them and deletes them.

  Raises:
    ObjectExistsError: `create_only` and `uri` exists (another writer);
      nothing was written at `uri`.
    UsageError: the parts are not on the same store (and, for gs://, the
      same bucket) as `uri`, or break the store's part limits.
  """
  if not parts and not head:
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
    _s3_assemble(uri, bucket, key, where, create_only, head)
  else:
    _gcs_assemble(uri, bucket, key, [k for _, k in where], scratch_key,
                  create_only, head)


def _s3_assemble(uri: str, bucket: str, key: str, parts, create_only: bool,
                 head: Optional[bytes]) -> None:
  import botocore.exceptions  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.storage._aws import _s3, _s3_code  # pylint: disable=g-import-not-at-top
  c = _s3()
  # Every part object as it is now (size, ETag): each copy and fetch is
  # pinned to it, so a part replaced meanwhile fails the assembly.
  sources: List[Optional[S3Source]] = [None]  # 0: `head`, held here
  sizes = [len(head or b'')]
  for pb, pk in parts:
    h = c.head_object(Bucket=pb, Key=pk)
    sources.append(S3Source(pb, pk, h['ETag']))
    sizes.append(int(h['ContentLength']))
  plan = plan_multipart(sizes, local={0})
  if head is None and any(p.join for p in plan):
    raise errors.UsageError(
        f'{_text.printable(uri)}: a part other than the last is smaller '
        f'than S3\'s {S3_MIN_PART >> 20} MiB minimum')
  upload_id = c.create_multipart_upload(Bucket=bucket, Key=key)['UploadId']
  try:
    done = s3_upload_plan(c, bucket, key, upload_id, plan, head, sources)
    # S3 honours x-amz-copy-source-if-match on UploadPartCopy; a store that
    # ignores it (moto 5.2.5, measured) is caught here: every copied object
    # must still be the version looked at, before anything is published.
    for i in sorted({p.copy.source for p in plan if p.copy}):
      src = sources[i]
      if c.head_object(Bucket=src.bucket, Key=src.key)['ETag'] != src.etag:
        raise errors.TfxEncryptError(
            f's3://{src.bucket}/{_text.printable(src.key)} was replaced '
            'while it was being assembled')
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


@dataclasses.dataclass(frozen=True)
class S3Source:
  """An object version a plan reads: its bytes from `offset` on are the
  source's bytes 0, 1, ... (`offset`: a bundle's payload after its header)."""
  bucket: str
  key: str
  etag: str
  offset: int = 0


def s3_upload_plan(c, bucket: str, key: str, upload_id: str,
                   plan: Sequence[PlannedPart], head: Optional[bytes],
                   sources: Sequence[Optional[S3Source]]) -> List[dict]:
  """Upload the parts of `plan` (:func:`plan_multipart`) into the open
  multipart upload: a `copy` part by `UploadPartCopy` of its source's
  range pinned to the ETag (`CopySourceIfMatch`), a `join` part from
  `head` (source 0, bytes this process holds) and ranged reads pinned to
  the ETag, in one reused buffer. Returns the parts for
  CompleteMultipartUpload. A source no longer its ETag fails: botocore's
  ClientError from a copy, errors.TfxEncryptError from a read."""
  done = []
  joined = [p.size for p in plan if not p.copy]
  buf = bytearray(max(joined)) if joined else None  # reused
  for n, part in enumerate(plan, 1):
    if part.copy:
      src = sources[part.copy.source]
      a, b = src.offset + part.copy.start, src.offset + part.copy.end
      r = c.upload_part_copy(
          Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n,
          CopySource={'Bucket': src.bucket, 'Key': src.key},
          CopySourceIfMatch=src.etag, CopySourceRange=f'bytes={a}-{b - 1}')
      etag_out = r['CopyPartResult']['ETag']
    else:
      view = memoryview(buf)
      at = 0
      for piece in part.join:
        out = view[at:at + piece.size]
        if piece.source == 0:
          out[:] = memoryview(head)[piece.start:piece.end]
        else:
          src = sources[piece.source]
          _s3_fetch_into(c, src.bucket, src.key, src.etag,
                         src.offset + piece.start, src.offset + piece.end,
                         out)
        at += piece.size
      r = c.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                        PartNumber=n, Body=_BufferFile(view[:at]),
                        ContentLength=at)
      etag_out = r['ETag']
    done.append({'PartNumber': n, 'ETag': etag_out})
  return done


def _s3_fetch_into(c, bucket: str, key: str, etag: str, start: int, end: int,
                   out: memoryview) -> None:
  """Bytes `[start, end)` of the object version `etag` into `out`."""
  import botocore.exceptions  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.storage._aws import _s3_code  # pylint: disable=g-import-not-at-top
  try:
    body = c.get_object(Bucket=bucket, Key=key, IfMatch=etag,
                        Range=f'bytes={start}-{end - 1}')['Body']
  except botocore.exceptions.ClientError as e:
    if _s3_code(e) in ('PreconditionFailed', '412', 'NoSuchKey', '404'):
      raise errors.TfxEncryptError(
          f's3://{bucket}/{_text.printable(key)} was replaced or removed '
          'while it was being assembled') from None
    raise
  got = 0
  try:
    for piece in body.iter_chunks(1 << 20):
      if got + len(piece) > len(out):
        break
      out[got:got + len(piece)] = piece
      got += len(piece)
    else:
      if got == len(out):
        return
  finally:
    body.close()
  raise errors.TfxEncryptError(
      f's3://{bucket}/{_text.printable(key)}: bytes {start}-{end - 1} did '
      'not come back as asked (changed while it was being assembled)')


def _gcs_assemble(uri: str, bucket: str, key: str, parts: List[str],
                  scratch: str, create_only: bool,
                  head: Optional[bytes]) -> None:
  from google.api_core import exceptions as gexc  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.storage._google import _gcs  # pylint: disable=g-import-not-at-top
  b = _gcs().bucket(bucket)
  made: List[str] = []
  try:
    level = 0
    keys = list(parts)
    if head is not None:
      name = f'{scratch.rstrip("/")}/head'
      made.append(name)
      b.blob(name).upload_from_string(bytes(head),
                                      content_type='application/octet-stream')
      keys.insert(0, name)
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

