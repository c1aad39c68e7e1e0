"""s3:// through boto3: ranged reads, If-None-Match: * commits."""

import errno
import threading
from typing import BinaryIO, Dict, Optional

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.storage._base import (
    Data, ObjectChangedError, ObjectExistsError, ObjectInfo, Writer,
    _BufferFile, _ChunkedReader, _as_stream, _changed_since_read,
    _sdk_missing, _translating_method)


_clients = {}
_clients_lock = threading.Lock()


def _s3():
  with _clients_lock:
    c = _clients.get('s3')
    if c is None:
      try:
        import boto3  # pylint: disable=g-import-not-at-top
      except ImportError:
        raise _sdk_missing('s3', 'boto3') from None
      # The default chain: AWS_ENDPOINT_URL (MinIO, moto), credentials,
      # region, as every AWS tool reads them.
      c = _clients['s3'] = boto3.session.Session().client('s3')
    return c


def _s3_code(e) -> str:
  return str(getattr(e, 'response', {}).get('Error', {}).get('Code', ''))


class _S3Reader(_ChunkedReader):

  def __init__(self, uri: str, bucket: str, key: str,
               version: Optional[str] = None):
    import botocore.exceptions  # pylint: disable=g-import-not-at-top
    self._client, self._bucket, self._key = _s3(), bucket, key
    kw = {'IfMatch': version} if version else {}
    try:
      head = self._client.head_object(Bucket=bucket, Key=key, **kw)
    except botocore.exceptions.ClientError as e:
      code = _s3_code(e)
      if version and code in ('PreconditionFailed', '412', '404',
                              'NoSuchKey', 'NotFound'):
        raise ObjectChangedError(
            f'{_text.printable(uri)} was replaced or removed after it was '
            'listed') from None
      if code in ('404', 'NoSuchKey', 'NotFound'):
        raise FileNotFoundError(errno.ENOENT, 'no such object', uri) from None
      raise
    self._etag = head['ETag']
    self.version = self._etag
    if version and self._etag != version:  # a store that ignores If-Match
      raise ObjectChangedError(f'{_text.printable(uri)} was replaced after '
                               'it was listed')
    super().__init__(uri, int(head['ContentLength']))

  def _get(self, start: int, end: int):
    import botocore.exceptions  # pylint: disable=g-import-not-at-top
    try:
      return self._client.get_object(Bucket=self._bucket, Key=self._key,
                                     Range=f'bytes={start}-{end - 1}',
                                     IfMatch=self._etag)
    except botocore.exceptions.ClientError as e:
      if _s3_code(e) in ('PreconditionFailed', '412', 'NoSuchKey', '404'):
        raise ObjectChangedError(
            f'{_text.printable(self.uri)} was replaced or removed while it '
            'was being read; fetch a fresh copy') from None
      raise

  def _fetch(self, start: int, end: int) -> bytes:
    if end <= start:
      return b''
    with self._get(start, end)['Body'] as body:
      return body.read()

  def _fetch_into(self, start: int, end: int, out: memoryview) -> int:
    if end <= start:
      return 0
    got = 0
    body = self._get(start, end)['Body']
    try:
      for piece in body.iter_chunks(1 << 20):
        n = len(piece)
        if got + n > len(out):
          return got + n  # longer than asked: the caller refuses it
        out[got:got + n] = piece
        got += n
    finally:
      body.close()
    return got


def _s3_put(bucket: str, key: str, data: Data, create_only: bool,
            uri: str) -> None:
  import botocore.exceptions  # pylint: disable=g-import-not-at-top
  c = _s3()
  stream, size = _as_stream(data)
  if not create_only:
    # Managed (multipart above its threshold) upload, bounded memory.
    c.upload_fileobj(stream, bucket, key)
    return
  try:
    if size > S3_MULTIPART_THRESHOLD:
      _s3_multipart_create_only(c, bucket, key, stream, size)
    else:
      c.put_object(Bucket=bucket, Key=key, Body=stream, ContentLength=size,
                   IfNoneMatch='*')
  except botocore.exceptions.ClientError as e:
    # 412: it exists; 409: a concurrent conditional write of the same key
    # is in progress (S3 then lets exactly one of them win).
    if _s3_code(e) in ('PreconditionFailed', '412',
                       'ConditionalRequestConflict', '409'):
      raise ObjectExistsError(f'{_text.printable(uri)} already exists '
                              '(another writer created it)') from None
    raise


#: Create-only objects above this size go by multipart upload (PutObject
#: stops at 5 GiB); the precondition is on CompleteMultipartUpload.
S3_MULTIPART_THRESHOLD = 64 << 20


#: Part size of those uploads (memory: one part; S3 allows 10,000 parts).
S3_PART_SIZE = 16 << 20


def _s3_multipart_create_only(c, bucket: str, key: str, stream: BinaryIO,
                              size: int) -> None:
  part_size = max(S3_PART_SIZE, -(-size // 10000))
  upload_id = c.create_multipart_upload(Bucket=bucket, Key=key)['UploadId']
  try:
    parts = []
    done = 0
    while done < size:
      body = stream.read(min(part_size, size - done))
      if not body:
        raise errors.UsageError(f'{bucket}/{key}: the source shrank while '
                                'it was being uploaded')
      r = c.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                        PartNumber=len(parts) + 1, Body=body)
      parts.append({'PartNumber': len(parts) + 1, 'ETag': r['ETag']})
      done += len(body)
    c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                MultipartUpload={'Parts': parts},
                                IfNoneMatch='*')
  except BaseException:
    try:
      c.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception:  # pylint: disable=broad-except
      pass  # a lifecycle rule removes abandoned uploads
    raise


def _s3_list(bucket: str, prefix: str) -> Dict[str, int]:
  pages = _s3().get_paginator('list_objects_v2').paginate(
      Bucket=bucket, Prefix=prefix)
  return {o['Key'][len(prefix):]: int(o['Size']) for p in pages
          for o in p.get('Contents', ())}


def _s3_list_info(bucket: str, prefix: str) -> Dict[str, ObjectInfo]:
  pages = _s3().get_paginator('list_objects_v2').paginate(
      Bucket=bucket, Prefix=prefix)
  out = {}
  for p in pages:
    for o in p.get('Contents', ()):
      lm = o.get('LastModified')
      out[o['Key'][len(prefix):]] = ObjectInfo(
          int(o['Size']), o.get('ETag'), lm.timestamp() if lm else 0.0)
  return out


#: Part size of streamed create-only uploads (S3's minimum, 5 MiB: the
#: memory one writer holds); larger when 10,000 parts would not suffice.
S3_WRITE_PART_SIZE = 5 << 20


class _S3Writer(Writer):
  """A create-only streamed upload: one PutObject (`If-None-Match: *`) for
  an object of at most one part, else a multipart upload whose
  CompleteMultipartUpload carries `If-None-Match: *`. Abort removes the
  parts; nothing is ever visible before `commit`."""

  def __init__(self, uri: str, bucket: str, key: str, size: int):
    self.uri, self._bucket, self._key, self._size = uri, bucket, key, size
    mib = 1 << 20
    self._part = max(S3_WRITE_PART_SIZE,
                     -(-(-(-size // 10000)) // mib) * mib)
    # One part buffer, reused (not reallocated per part: see
    # _ChunkedReader._fetch_into), sent without a copy.
    self._buf = bytearray(min(self._part, size))
    self._fill = 0
    self._parts = []
    self._upload_id = None
    self._written = 0
    self._closed = False  # committed or aborted: never reopened

  def _over(self) -> errors.UsageError:
    return errors.UsageError(f'{_text.printable(self.uri)}: the upload is '
                             'over (committed or aborted)')

  def _body(self):
    return _BufferFile(memoryview(self._buf)[:self._fill])

  def _flush(self) -> None:
    if self._closed:
      raise self._over()
    c = _s3()
    if self._upload_id is None:
      self._upload_id = c.create_multipart_upload(
          Bucket=self._bucket, Key=self._key)['UploadId']
    n = len(self._parts) + 1
    r = c.upload_part(Bucket=self._bucket, Key=self._key,
                      UploadId=self._upload_id, PartNumber=n,
                      Body=self._body(), ContentLength=self._fill)
    self._fill = 0
    self._parts.append({'PartNumber': n, 'ETag': r['ETag']})

  @_translating_method
  def write(self, data) -> None:
    if self._closed:
      raise self._over()
    mv = memoryview(data).cast('B')
    self._written += len(mv)
    if self._written > self._size:
      raise errors.UsageError(f'{_text.printable(self.uri)}: more bytes '
                              'than announced')
    copied = self._written - len(mv)  # object offset of mv[0]
    while len(mv):
      take = min(len(mv), len(self._buf) - self._fill)
      self._buf[self._fill:self._fill + take] = mv[:take]
      self._fill += take
      copied += take
      mv = mv[take:]
      # Full, and more bytes to come (in this write or a later one): a
      # part. The last part is sent by commit.
      if self._fill == len(self._buf) and copied < self._size:
        self._flush()

  @_translating_method
  def commit(self) -> None:
    import botocore.exceptions  # pylint: disable=g-import-not-at-top
    if self._closed:
      raise self._over()
    if self._written != self._size:
      raise errors.UsageError(f'{_text.printable(self.uri)}: '
                              f'{self._written} bytes written, '
                              f'{self._size} announced')
    c = _s3()
    try:
      if self._upload_id is None:
        c.put_object(Bucket=self._bucket, Key=self._key, Body=self._body(),
                     ContentLength=self._fill, IfNoneMatch='*')
      else:
        if self._fill:
          self._flush()
        c.complete_multipart_upload(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
            MultipartUpload={'Parts': self._parts}, IfNoneMatch='*')
        self._upload_id = None
    except botocore.exceptions.ClientError as e:
      if _s3_code(e) in ('PreconditionFailed', '412',
                         'ConditionalRequestConflict', '409'):
        raise ObjectExistsError(f'{_text.printable(self.uri)} already '
                                'exists (another writer created it)') from None
      raise
    finally:
      self._closed = True
      self._buf, self._fill = bytearray(), 0

  def abort(self) -> None:
    self._closed = True
    self._buf, self._fill = bytearray(), 0
    if self._upload_id is not None:
      upload_id, self._upload_id = self._upload_id, None
      try:
        _s3().abort_multipart_upload(Bucket=self._bucket, Key=self._key,
                                     UploadId=upload_id)
      except Exception:  # pylint: disable=broad-except
        pass  # a lifecycle rule removes abandoned uploads


def _s3_exists(bucket: str, key: str) -> bool:
  import botocore.exceptions  # pylint: disable=g-import-not-at-top
  try:
    _s3().head_object(Bucket=bucket, Key=key)
    return True
  except botocore.exceptions.ClientError as e:
    if _s3_code(e) in ('404', 'NoSuchKey', 'NotFound'):
      return False
    raise


#: PutObject's limit; a conditional replacement is one PutObject.
_S3_PUT_LIMIT = 5 << 30


def _s3_put_if_match(bucket: str, key: str, data: Data, etag: str,
                     uri: str) -> str:
  """Replace an object only if its ETag is still `etag`: PutObject with
  `If-Match` (S3 conditional writes). Returns the new ETag.

  Raises:
    ObjectChangedError: the object was replaced (412), removed (404), or
      another conditional write of it is in progress (409); nothing was
      written.
  """
  import botocore.exceptions  # pylint: disable=g-import-not-at-top
  stream, size = _as_stream(data)
  if size > _S3_PUT_LIMIT:
    raise errors.UsageError(f'{_text.printable(uri)}: a conditional '
                            'replacement is one PutObject (at most 5 GiB)')
  try:
    r = _s3().put_object(Bucket=bucket, Key=key, Body=stream,
                         ContentLength=size, IfMatch=etag)
  except botocore.exceptions.ClientError as e:
    if _s3_code(e) in ('PreconditionFailed', '412', 'NoSuchKey', '404',
                       'NotFound', 'ConditionalRequestConflict', '409'):
      raise _changed_since_read(uri) from None
    raise
  return r.get('ETag')
