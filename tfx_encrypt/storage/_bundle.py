"""A bundle streamed onto a store, with no local staging.

A bundle is its header followed by the payload streams (FORMAT.md §2), but
the header (digests, MAC, signature) is known only once every payload is
sealed. :func:`open_bundle_writer` takes the payload bytes as they are
sealed, in order, and the header at the end (`commit(header)`), and writes
the one object `uri` create-only, holding a bounded amount in memory and
nothing on the local disk (docs/OBJECT_STORES.md, "Encrypting from and to
a store"):

* `s3://`: one multipart upload. Parts 2..n are the payload bytes after
  the first :data:`S3_HELD_BACK` (5 MiB, S3's minimum for a part other
  than the last), uploaded as they fill (one part uploading in the
  background while the next fills); those first bytes are held in memory,
  and at commit part 1 is header + them, so every part but the last is at
  least 5 MiB. `CompleteMultipartUpload` with `If-None-Match: *` is the
  commit point. A bundle of at most 5 MiB of payload is one PutObject with
  `If-None-Match: *`. Any failure aborts the upload: nothing was visible.
* `gs://`: the payload bytes stream into the temporary object
  `URI/payload/00000000` (a create-only resumable upload: an incomplete
  package, which `tfx-encrypt clean URI` recognises and removes if a
  SIGKILL leaves it), the header into a hidden temporary sibling
  `PARENT/.NAME.tfxe-bundle-TOKEN`; then `URI` is composed from the two
  with `ifGenerationMatch=0` (`_assemble.assemble`): the commit point.
  The temporaries are deleted after it, or on any failure.
"""

import concurrent.futures
import logging
import os
import threading
from typing import List, Optional, Sequence

from tfx_encrypt import _signals
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.storage import _assemble
from tfx_encrypt.storage._base import (
    ObjectChangedError, ObjectExistsError, _BufferFile, _changed_since_read,
    _translating, _translating_method, join, split)


#: S3: payload bytes held back in memory for part 1 (header + them): S3's
#: minimum size of a part that is not the last.
S3_HELD_BACK = _assemble.S3_MIN_PART


_MIB = 1 << 20


class BundleWriter:
  """The payload bytes of a bundle, in order (`write`), then its header
  (`commit`): the object `uri` is created, create-only, by `commit`
  (:class:`ObjectExistsError` if it exists). `abort` leaves nothing."""

  uri: str = ''

  def _over(self) -> errors.UsageError:
    return errors.UsageError(f'{_text.printable(self.uri)}: the upload is '
                             'over')

  def write(self, data) -> None:
    raise NotImplementedError

  def commit(self, header: bytes) -> None:
    raise NotImplementedError

  def abort(self) -> None:
    raise NotImplementedError


def open_bundle_writer(uri: str, payload_size: int) -> BundleWriter:
  """A create-only bundle upload to `uri` (s3:// or gs://) whose payload
  streams total `payload_size` bytes."""
  s, bucket, key = split(uri)
  if not key:
    raise errors.UsageError(f'{_text.printable(uri)} names no object')
  if s == 's3':
    return _S3BundleWriter(uri, bucket, key, payload_size)
  return _GcsBundleWriter(uri, payload_size)


def _exists(uri: str) -> ObjectExistsError:
  return ObjectExistsError(f'{_text.printable(uri)} already exists '
                           '(another writer created it)')


def s3_part_size(payload_size: int) -> int:
  """Size of parts 2..n for a bundle with `payload_size` payload bytes:
  the streamed writers' part size (`_aws.S3_WRITE_PART_SIZE`), larger (in
  whole MiB) when S3's 10,000 parts would not suffice."""
  from tfx_encrypt.storage._aws import S3_WRITE_PART_SIZE  # pylint: disable=g-import-not-at-top
  rest = max(0, payload_size - S3_HELD_BACK)
  need = -(-rest // (_assemble.S3_MAX_PARTS - 1))
  return max(S3_WRITE_PART_SIZE, S3_HELD_BACK, -(-need // _MIB) * _MIB)


class _S3BundleWriter(BundleWriter):
  """One multipart upload; part 1 (header + the first S3_HELD_BACK payload
  bytes) is uploaded last, then CompleteMultipartUpload with
  `If-None-Match: *`. Memory: the held-back bytes and two part buffers
  (one filling, one uploading)."""

  def __init__(self, uri: str, bucket: str, key: str, payload_size: int):
    self.uri, self._bucket, self._key = uri, bucket, key
    self._size = payload_size
    self._held = bytearray(min(S3_HELD_BACK, payload_size))
    self._held_fill = 0
    self._part = s3_part_size(payload_size)
    self._bufs: List[bytearray] = []  # at most two, made when needed
    self._cur = 0  # index of the buffer filling
    self._fill = 0
    self._parts = []  # {'PartNumber', 'ETag'} of parts 2..n, in order
    self._parts_lock = threading.Lock()
    self._upload_id: Optional[str] = None
    self._pending: Optional[concurrent.futures.Future] = None
    self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._written = 0
    self._closed = False

  def _client(self):
    from tfx_encrypt.storage._aws import _s3  # pylint: disable=g-import-not-at-top
    return _s3()

  def _upload(self, number: int, view: memoryview) -> dict:
    r = self._client().upload_part(
        Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
        PartNumber=number, Body=_BufferFile(view), ContentLength=len(view))
    return {'PartNumber': number, 'ETag': r['ETag']}

  def _wait(self) -> None:
    fut, self._pending = self._pending, None
    if fut is not None:
      part = fut.result()
      with self._parts_lock:
        self._parts.append(part)

  def _flush(self) -> None:
    """Hand the filled buffer to the upload thread (after the previous
    upload, which used the other buffer, has finished)."""
    if self._closed:  # aborted meanwhile: never open another upload
      raise self._over()
    if self._upload_id is None:
      self._upload_id = self._client().create_multipart_upload(
          Bucket=self._bucket, Key=self._key)['UploadId']
      self._pool = concurrent.futures.ThreadPoolExecutor(
          1, thread_name_prefix='tfxe-bundle-upload')
    self._wait()
    number = 2 + len(self._parts)
    view = memoryview(self._bufs[self._cur])[:self._fill]
    self._pending = self._pool.submit(self._upload, number, view)
    self._cur, self._fill = 1 - self._cur, 0

  @_translating_method
  def write(self, data) -> None:
    if self._closed:
      raise self._over()
    mv = memoryview(data).cast('B')
    if self._written + len(mv) > self._size:
      raise errors.UsageError(f'{_text.printable(self.uri)}: more bytes '
                              'than announced')
    self._written += len(mv)
    if self._held_fill < len(self._held):
      take = min(len(mv), len(self._held) - self._held_fill)
      self._held[self._held_fill:self._held_fill + take] = mv[:take]
      self._held_fill += take
      mv = mv[take:]
    while len(mv):
      if self._closed:
        raise self._over()
      if not self._bufs:
        self._bufs = [bytearray(min(self._part, self._size - S3_HELD_BACK))
                      for _ in range(2)]
      buf = self._bufs[self._cur]
      take = min(len(mv), len(buf) - self._fill)
      buf[self._fill:self._fill + take] = mv[:take]
      self._fill += take
      mv = mv[take:]
      # Full, and more bytes follow (here or in a later write): upload it.
      # A full buffer holding the very last bytes is the last part, which
      # commit uploads.
      if self._fill == len(buf) and (len(mv) or self._written < self._size):
        self._flush()

  @_translating_method
  def commit(self, header: bytes) -> None:
    import botocore.exceptions  # pylint: disable=g-import-not-at-top
    if self._written != self._size:
      raise errors.UsageError(f'{_text.printable(self.uri)}: '
                              f'{self._written} payload bytes written, '
                              f'{self._size} announced')
    if self._closed:
      raise self._over()
    held = memoryview(self._held)[:self._held_fill]
    if self._upload_id is None and not self._fill:
      # All of it fits one part: one create-only PutObject.
      from tfx_encrypt.storage._verbs import put_create_only  # pylint: disable=g-import-not-at-top
      try:
        with _signals.deferred():  # the commit point: done, or not at all
          put_create_only(self.uri, _BufferFile(memoryview(header), held))
          _signals.mark_committed()
      finally:
        self._release()
      return
    try:
      if self._fill:
        self._flush()  # the last part: any size
      self._wait()
      first = self._client().upload_part(
          Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
          PartNumber=1, Body=_BufferFile(memoryview(header), held),
          ContentLength=len(header) + len(held))
      with self._parts_lock:
        parts = [{'PartNumber': 1, 'ETag': first['ETag']}] + self._parts
      try:
        with _signals.deferred():  # the commit point: done, or not at all
          self._client().complete_multipart_upload(
              Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
              MultipartUpload={'Parts': parts}, IfNoneMatch='*')
          self._upload_id = None  # completed: nothing to abort
          _signals.mark_committed()
      except botocore.exceptions.ClientError as e:
        from tfx_encrypt.storage._aws import _s3_code  # pylint: disable=g-import-not-at-top
        if _s3_code(e) in ('PreconditionFailed', '412',
                           'ConditionalRequestConflict', '409'):
          raise _exists(self.uri) from None
        raise
    finally:
      self.abort()

  def _release(self) -> None:
    self._closed = True
    self._held, self._held_fill = bytearray(), 0
    self._bufs, self._fill = [], 0

  def abort(self) -> None:
    """Drop the upload: wait for the part in flight (a part that lands
    after AbortMultipartUpload could outlive it), then abort."""
    fut, self._pending = self._pending, None
    if fut is not None:
      try:
        fut.result()
      except BaseException:  # pylint: disable=broad-except
        pass
    pool, self._pool = self._pool, None
    if pool is not None:
      pool.shutdown(wait=True)
    self._release()
    if self._upload_id is not None:
      upload_id, self._upload_id = self._upload_id, None
      try:
        self._client().abort_multipart_upload(
            Bucket=self._bucket, Key=self._key, UploadId=upload_id)
      except Exception:  # pylint: disable=broad-except
        pass  # a lifecycle rule removes abandoned uploads


def temp_payload_uri(uri: str) -> str:
  """GCS: where the payload streams of a bundle at `uri` are staged, as one
  object: `URI/payload/00000000`, what an incomplete directory-form
  package at `uri` holds (`tfx-encrypt clean URI` removes it after a
  SIGKILL; readers report `uri` as incomplete meanwhile)."""
  return join(uri, 'payload', '%08d' % 0)


def temp_header_uri(uri: str) -> str:
  """GCS: a hidden temporary sibling for the header, named like every
  tfx-encrypt temporary (`.NAME.tfxe-KIND-TOKEN`)."""
  parent, _, name = uri.rstrip('/').rpartition('/')
  return f'{parent}/.{name[:120]}.tfxe-bundle-{os.urandom(8).hex()}'


class _GcsBundleWriter(BundleWriter):
  """Payload streams into `URI/payload/00000000` (create-only resumable
  upload), the header into a hidden sibling, then one compose with
  `ifGenerationMatch=0` (or, with `replace`, `ifGenerationMatch=<replace>`:
  a bundle's rewrite, which raises ObjectChangedError, not
  ObjectExistsError); the temporaries are deleted either way. Memory: one
  upload chunk (`_google.GCS_WRITE_CHUNK_SIZE`)."""

  def __init__(self, uri: str, payload_size: int,
               replace: Optional[str] = None):
    from tfx_encrypt.storage._verbs import open_writer  # pylint: disable=g-import-not-at-top
    self.uri, self._replace = uri, replace
    self._payload_uri = temp_payload_uri(uri)
    self._header_uri = temp_header_uri(uri)
    self._w = open_writer(self._payload_uri, payload_size)
    self._made: List[str] = []  # temporaries this writer created
    self._size, self._written = payload_size, 0
    self._done = False

  def write(self, data) -> None:
    if self._done:
      raise self._over()
    n = memoryview(data).nbytes
    if self._written + n > self._size:
      raise errors.UsageError(f'{_text.printable(self.uri)}: more bytes '
                              'than announced')
    self._written += n
    self._w.write(data)

  @_translating_method
  def commit(self, header: bytes) -> None:
    from tfx_encrypt.storage._verbs import put_create_only  # pylint: disable=g-import-not-at-top
    if self._done:
      raise self._over()
    try:
      try:
        with _signals.deferred():  # created, then recorded as ours
          self._w.commit()
          self._made.append(self._payload_uri)
      except ObjectExistsError:
        busy = (f'{_text.printable(self._payload_uri)} already exists: '
                f'another writer is writing {_text.printable(self.uri)} (or a '
                'killed one left it: "tfx-encrypt clean '
                f'{_text.printable(self.uri)}")')
        if self._replace is not None:
          raise ObjectChangedError(busy + '; it was not overwritten') from None
        raise ObjectExistsError(busy) from None
      with _signals.deferred():
        put_create_only(self._header_uri, header)
        self._made.append(self._header_uri)
      with _signals.deferred():  # the commit point: done, or not at all
        self._compose()
        self._done = True
        _signals.mark_committed()
    finally:
      self.abort()

  def _compose(self) -> None:
    if self._replace is None:
      try:
        _assemble.assemble(self.uri, [self._header_uri, self._payload_uri],
                           scratch=self._header_uri + '.compose',
                           create_only=True)
      except ObjectExistsError:
        raise _exists(self.uri) from None
      return
    from google.api_core import exceptions as gexc  # pylint: disable=g-import-not-at-top
    from tfx_encrypt.storage._google import _gcs  # pylint: disable=g-import-not-at-top
    _, bucket, key = split(self.uri)
    b = _gcs().bucket(bucket)
    try:
      b.blob(key).compose(
          [b.blob(split(u)[2]) for u in (self._header_uri, self._payload_uri)],
          if_generation_match=int(self._replace))
    except (gexc.PreconditionFailed, gexc.NotFound):
      raise _changed_since_read(self.uri) from None

  def abort(self) -> None:
    """Drop the upload and delete the temporaries this writer created."""
    self._done = True
    self._w.abort()
    made, self._made = self._made, []
    with _signals.deferred():
      left = _assemble.delete_objects(made)
    for u in left:
      logging.warning('Could not remove the temporary object %s; remove it '
                      'yourself', _text.printable(u))


# --- rewrap of a bundle in place ---------------------------------------------


#: A bundle whose payload bytes are fewer than this is rewritten in one
#: conditional request, header + payload held in memory (S3: the
#: smallest part a multipart upload allows before its last).
REWRITE_IN_MEMORY_BELOW = _assemble.S3_MIN_PART


@_translating
def rewrite_bundle_header(uri: str, header: bytes, old_header_len: int,
                          version: str) -> None:
  """Replace the bundle object `uri` by `header` followed by its own bytes
  from `old_header_len` on (its payload streams, unchanged), only if it is
  still `version` (what rewrap read and verified: S3 ETag, GCS
  generation): rewrap's commit for a bundle on a store
  (docs/OBJECT_STORES.md, "Rewrap in place").

  * Payload under :data:`REWRITE_IN_MEMORY_BELOW`: read (pinned) into
    memory, one conditional write (`put_if_unchanged`).
  * `s3://`: one multipart upload to `uri`: part 1 is the header and the
    first payload bytes to reach 5 MiB (ranged GETs with `If-Match`), the
    rest `UploadPartCopy` of the object's own ranges
    (`x-amz-copy-source-if-match`); the ETag is checked once more, then
    `CompleteMultipartUpload` with `If-Match`. Aborted on any failure.
  * `gs://`: `compose` takes whole objects, so the payload bytes are
    streamed (pinned by generation) into the temporary `URI/payload/00000000`,
    the header into a hidden sibling (`temp_header_uri`), and `uri` is
    composed from the two with `ifGenerationMatch=<version>`; both
    temporaries are deleted after it, or on any failure.

  Raises:
    ObjectChangedError: `uri` is no longer `version` (or another rewrite
      of it is running); it was not overwritten.
  """
  s, bucket, key = split(uri)
  if not version:
    raise errors.UsageError(f'{_text.printable(uri)}: no version to replace')
  if s == 's3':
    _s3_rewrite(uri, bucket, key, header, old_header_len, version)
  else:
    _gcs_rewrite(uri, header, old_header_len, version)


def _rewrite_in_memory(uri: str, header: bytes, old_header_len: int,
                       size: int, version: str) -> None:
  from tfx_encrypt.storage._verbs import open_reader, put_if_unchanged  # pylint: disable=g-import-not-at-top
  buf = bytearray(len(header) + size - old_header_len)
  buf[:len(header)] = header
  with open_reader(uri, version=version) as r:
    if r.read_into(memoryview(buf)[len(header):], old_header_len) != (
        size - old_header_len):
      raise _changed_since_read(uri)
    r.check_unchanged()
  with _signals.deferred():  # the commit point: done, or not at all
    put_if_unchanged(uri, buf, version)
    _signals.mark_committed()


def _s3_rewrite(uri: str, bucket: str, key: str, header: bytes,
                old_header_len: int, version: str) -> None:
  import botocore.exceptions  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.storage._aws import _s3, _s3_code  # pylint: disable=g-import-not-at-top
  c = _s3()
  gone = ('PreconditionFailed', '412', 'NoSuchKey', '404', 'NotFound',
          'ConditionalRequestConflict', '409')
  try:
    size = int(c.head_object(Bucket=bucket, Key=key,
                             IfMatch=version)['ContentLength'])
  except botocore.exceptions.ClientError as e:
    if _s3_code(e) in gone:
      raise _changed_since_read(uri) from None
    raise
  payload = size - old_header_len
  if payload < 0:
    raise _changed_since_read(uri)
  if payload < REWRITE_IN_MEMORY_BELOW:
    _rewrite_in_memory(uri, header, old_header_len, size, version)
    return
  plan = _assemble.plan_multipart([len(header), payload], local={0})
  upload_id = c.create_multipart_upload(Bucket=bucket, Key=key)['UploadId']
  try:
    try:
      done = _assemble.s3_upload_plan(
          c, bucket, key, upload_id, plan, header,
          [None, _assemble.S3Source(bucket, key, version, old_header_len)])
    except botocore.exceptions.ClientError as e:  # a copy
      if _s3_code(e) in gone:
        raise _changed_since_read(uri) from None
      raise
    except errors.TfxEncryptError:  # a read: replaced or removed
      raise _changed_since_read(uri) from None
    # S3 refuses the copies and the completion if the object is no longer
    # `version`; a store that ignores x-amz-copy-source-if-match and If-Match
    # on CompleteMultipartUpload (moto 5.2.5, read in its source) is caught
    # here, up to the one request that follows.
    try:
      if c.head_object(Bucket=bucket, Key=key)['ETag'] != version:
        raise _changed_since_read(uri)
    except botocore.exceptions.ClientError as e:
      if _s3_code(e) in gone:
        raise _changed_since_read(uri) from None
      raise
    try:
      with _signals.deferred():  # the commit point: done, or not at all
        c.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id,
            MultipartUpload={'Parts': done}, IfMatch=version)
        upload_id = None  # completed: nothing to abort
        _signals.mark_committed()
    except botocore.exceptions.ClientError as e:
      if _s3_code(e) in gone:
        raise _changed_since_read(uri) from None
      raise
  except BaseException:
    if upload_id is not None:
      with _signals.deferred():
        try:
          c.abort_multipart_upload(Bucket=bucket, Key=key,
                                   UploadId=upload_id)
        except Exception:  # pylint: disable=broad-except
          pass  # a lifecycle rule removes abandoned uploads
    raise


def _gcs_rewrite(uri: str, header: bytes, old_header_len: int,
                 version: str) -> None:
  from tfx_encrypt.storage._base import CHUNK_SIZE  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.storage._verbs import open_reader  # pylint: disable=g-import-not-at-top
  try:
    reader = open_reader(uri, version=version)
  except FileNotFoundError:
    raise _changed_since_read(uri) from None
  try:
    size = reader.size
    payload = size - old_header_len
    if payload < 0:
      raise _changed_since_read(uri)
    if payload < REWRITE_IN_MEMORY_BELOW:
      _rewrite_in_memory(uri, header, old_header_len, size, version)
      return
    # The bundle encrypt's writer, replacing generation `version` only.
    w = _GcsBundleWriter(uri, payload, replace=version)
    try:
      buf = bytearray(min(CHUNK_SIZE, payload))
      off = old_header_len
      while off < size:
        n = reader.read_into(buf, off)
        if n <= 0:
          raise _changed_since_read(uri)
        w.write(memoryview(buf)[:n])
        off += n
      reader.check_unchanged()
    except BaseException:
      w.abort()
      raise
    w.commit(header)
  finally:
    reader.close()
