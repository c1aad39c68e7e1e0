"""s3:// through boto3: ranged reads, If-None-Match: * commits."""

import errno
import threading
from typing import BinaryIO, Dict

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.storage._base import (
    Data, ObjectExistsError, _ChunkedReader, _as_stream, _sdk_missing)


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

  def __init__(self, uri: str, bucket: str, key: str):
    import botocore.exceptions  # pylint: disable=g-import-not-at-top
    self._client, self._bucket, self._key = _s3(), bucket, key
    try:
      head = self._client.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as e:
      if _s3_code(e) in ('404', 'NoSuchKey', 'NotFound'):
        raise FileNotFoundError(errno.ENOENT, 'no such object', uri) from None
      raise
    self._etag = head['ETag']
    super().__init__(uri, int(head['ContentLength']))

  def _fetch(self, start: int, end: int) -> bytes:
    import botocore.exceptions  # pylint: disable=g-import-not-at-top
    if end <= start:
      return b''
    try:
      r = self._client.get_object(Bucket=self._bucket, Key=self._key,
                                  Range=f'bytes={start}-{end - 1}',
                                  IfMatch=self._etag)
    except botocore.exceptions.ClientError as e:
      if _s3_code(e) in ('PreconditionFailed', '412', 'NoSuchKey', '404'):
        raise errors.TamperedPackageError(
            f'{_text.printable(self.uri)} was replaced or removed while it '
            'was being read; fetch a fresh copy') from None
      raise
    with r['Body'] as body:
      return body.read()


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


def _s3_exists(bucket: str, key: str) -> bool:
  import botocore.exceptions  # pylint: disable=g-import-not-at-top
  try:
    _s3().head_object(Bucket=bucket, Key=key)
    return True
  except botocore.exceptions.ClientError as e:
    if _s3_code(e) in ('404', 'NoSuchKey', 'NotFound'):
      return False
    raise
