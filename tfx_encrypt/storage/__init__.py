"""One storage layer for packages: local paths, `file://`, `gs://`, `s3://`.

A few verbs, the same for every store (docs/OBJECT_STORES.md):

* :func:`open_reader` (`uri`) -> :class:`Reader`: the object's `size`, and
  ranged reads (`read_into(buf, offset)`), pinned to the version that was
  opened (S3 `If-Match: <etag>`, GCS `generation=`), so an object replaced
  while it is read is an error, never a mix of two versions. Memory is one
  chunk (:data:`CHUNK_SIZE`) per reader.
* :func:`exists`, :func:`list_names` (every object under a prefix),
  :func:`delete` (missing is fine).
* :func:`put` (payload objects: may replace) and :func:`put_create_only`
  (the commit point: fails with :class:`ObjectExistsError` if the object
  exists; S3 `If-None-Match: *` on PutObject, GCS `ifGenerationMatch=0`, a
  local `link(2)` of a complete temporary file).

The cloud SDKs are the official ones (boto3 in the `[aws]` extra,
google-cloud-storage in `[gcp]`), imported only when a `s3://` or `gs://`
URI is used: the core stays free of TensorFlow and cloud SDKs
(docs/ARCHITECTURE.md, "Storage").
"""

import errno
import io
import os
import re
import stat
import threading
from typing import BinaryIO, Dict, List, Tuple, Union

from tfx_encrypt import _text
from tfx_encrypt import errors

#: Bytes fetched per ranged request (and held per open reader).
CHUNK_SIZE = 4 << 20

#: Remote schemes this layer reaches, and the extra that brings each SDK.
REMOTE_SCHEMES = {'s3': 'aws', 'gs': 'gcp'}

_SCHEME_RE = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')

Data = Union[bytes, bytearray, memoryview, BinaryIO]


class ObjectExistsError(errors.OutputExistsError):
  """A create-only write found the object already there (another writer)."""


def scheme_of(uri: str) -> str:
  """'' for a plain path, else the lower-case URI scheme."""
  m = _SCHEME_RE.match(uri)
  return m.group(1).lower() if m else ''


def is_remote(uri) -> bool:
  """True for `s3://` and `gs://` URIs (not for paths or `file://`)."""
  return isinstance(uri, str) and scheme_of(uri) in REMOTE_SCHEMES


def local_path(uri: str) -> str:
  return uri[len('file://'):] if uri.startswith('file://') else uri


def join(base: str, *parts: str) -> str:
  """`base/part/...` with exactly one `/` between parts (URIs or paths)."""
  if not is_remote(base):
    return os.path.join(base, *parts)
  out = base.rstrip('/')
  for p in parts:
    out += '/' + p.strip('/')
  return out


def split(uri: str) -> Tuple[str, str, str]:
  """(scheme, bucket, key) of a remote URI."""
  s = scheme_of(uri)
  if s not in REMOTE_SCHEMES:
    raise errors.UsageError(f'{_text.printable(uri)} is not a s3:// or gs:// '
                            'URI')
  rest = uri[len(s) + 3:]
  bucket, _, key = rest.partition('/')
  if not bucket:
    raise errors.UsageError(f'{_text.printable(uri)} names no bucket')
  return s, bucket, key


class Reader:
  """Ranged reads of one object (or local file); close it when done."""

  size: int = 0
  uri: str = ''

  def read_into(self, buf, offset: int) -> int:
    """Fill `buf` from `offset`; fewer bytes only at the end of the object."""
    raise NotImplementedError

  def read_range(self, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    n = self.read_into(buf, offset)
    return bytes(buf[:n])

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class ReaderFile(io.RawIOBase):
  """A read-only, seekable binary file over a :class:`Reader`."""

  def __init__(self, reader: Reader):
    super().__init__()
    self._r, self._pos = reader, 0

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    n = self._r.read_into(b, self._pos)
    self._pos += n
    return n

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos,
            io.SEEK_END: self._r.size}[whence]
    self._pos = base + offset
    return self._pos

  def tell(self) -> int:
    return self._pos


class _ChunkedReader(Reader):
  """A remote object read through ranged requests of CHUNK_SIZE bytes."""

  def __init__(self, uri: str, size: int):
    self.uri, self.size = uri, size
    self._chunk_start = -1
    self._chunk = b''
    self._lock = threading.Lock()

  def _fetch(self, start: int, end: int) -> bytes:
    """Bytes [start, end) of the pinned object version."""
    raise NotImplementedError

  def read_into(self, buf, offset: int) -> int:
    mv = memoryview(buf).cast('B')
    got = 0
    with self._lock:
      while got < len(mv) and offset + got < self.size:
        pos = offset + got
        if not (self._chunk_start <= pos <
                self._chunk_start + len(self._chunk)):
          start = pos
          end = min(self.size, start + max(CHUNK_SIZE, 0))
          try:
            data = self._fetch(start, end)
          except Exception as e:  # pylint: disable=broad-except
            mapped = _as_os_error(e, self.uri)
            if mapped is e:
              raise
            raise mapped from e
          if len(data) != end - start:
            raise errors.TamperedPackageError(
                f'{_text.printable(self.uri)} changed or was truncated while '
                'it was being read; fetch a fresh copy')
          self._chunk_start, self._chunk = start, data
        i = pos - self._chunk_start
        n = min(len(mv) - got, len(self._chunk) - i)
        mv[got:got + n] = self._chunk[i:i + n]
        got += n
    return got

  def close(self) -> None:
    self._chunk = b''
    self._chunk_start = -1


# --- local ------------------------------------------------------------------

_READ_FLAGS = (os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0) |
               getattr(os, 'O_CLOEXEC', 0) | getattr(os, 'O_NONBLOCK', 0))


class _LocalReader(Reader):

  def __init__(self, path: str):
    self.uri = path
    try:
      self._fd = os.open(path, _READ_FLAGS)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise errors.UnsafePathError(
            f'{_text.printable(path)} is a symbolic link; links are never '
            'followed') from None
      raise
    st = os.fstat(self._fd)
    if not stat.S_ISREG(st.st_mode):
      os.close(self._fd)
      raise errors.UnsafePathError(
          f'{_text.printable(path)} is not a regular file; only regular '
          'files are read')
    os.set_blocking(self._fd, True)
    self.size = st.st_size

  def read_into(self, buf, offset: int) -> int:
    mv = memoryview(buf).cast('B')
    got = 0
    while got < len(mv):
      n = os.preadv(self._fd, [mv[got:]], offset + got)
      if n == 0:
        break
      got += n
    return got

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1


def _as_stream(data: Data) -> Tuple[BinaryIO, int]:
  """A seekable binary stream over `data`, and its length from here on."""
  if isinstance(data, (bytes, bytearray, memoryview)):
    return io.BytesIO(bytes(data)), len(data)
  pos = data.tell()
  end = data.seek(0, io.SEEK_END)
  data.seek(pos)
  return data, end - pos


def _local_put(path: str, data: Data, create_only: bool) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{os.path.basename(path)}.tfxe-put-'
                     f'{os.getpid()}-{threading.get_ident()}')
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
               getattr(os, 'O_CLOEXEC', 0), 0o644)
  try:
    with os.fdopen(fd, 'wb') as f:
      src, _ = _as_stream(data)
      while True:
        b = src.read(CHUNK_SIZE)
        if not b:
          break
        f.write(b)
      f.flush()
      os.fsync(f.fileno())
    if create_only:
      try:
        os.link(tmp, path)  # atomic create-if-absent, complete content
      except FileExistsError:
        raise ObjectExistsError(
            f'{_text.printable(path)} already exists') from None
    else:
      os.replace(tmp, path)
  finally:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass


def _local_list(prefix: str) -> Dict[str, int]:
  root = prefix.rstrip('/')
  if not os.path.isdir(root):
    return {}
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      p = os.path.join(dirpath, n)
      out[os.path.relpath(p, root).replace(os.sep, '/')] = os.lstat(
          p).st_size
  return out


# --- S3 (boto3) ---------------------------------------------------------------

_clients = {}
_clients_lock = threading.Lock()


def _sdk_missing(scheme: str, module: str) -> errors.UsageError:
  return errors.UsageError(
      f'{scheme}:// needs {module}: pip install '
      f"'tfx-encrypt[{REMOTE_SCHEMES[scheme]}]'")


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


# --- GCS (google-cloud-storage) ---------------------------------------------


_per_thread = threading.local()
_generation = [0]  # bumped by reset_clients


def _gcs():
  # One client per thread (it goes with the thread): its HTTP session is
  # not documented thread-safe. boto3's clients are, and are shared.
  c = getattr(_per_thread, 'gcs', None)
  if c is not None and _per_thread.generation == _generation[0]:
    return c
  import warnings  # pylint: disable=g-import-not-at-top
  try:
    with warnings.catch_warnings():
      # google-api-core warns on every start-up under Python 3.10, the
      # version TFX 1.16 needs; not a message for tfx-encrypt's users.
      warnings.filterwarnings('ignore', category=FutureWarning,
                              module=r'google\.')
      from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise _sdk_missing('gs', 'google-cloud-storage') from None
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    # The client talks to the emulator anonymously.
    from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top
    c = gcs.Client(project=os.environ.get('GOOGLE_CLOUD_PROJECT', 'test'),
                   credentials=AnonymousCredentials())
  else:
    c = gcs.Client()
  _per_thread.gcs, _per_thread.generation = c, _generation[0]
  return c


class _GcsReader(_ChunkedReader):

  def __init__(self, uri: str, bucket: str, key: str):
    b = _gcs().bucket(bucket).get_blob(key)
    if b is None:
      raise FileNotFoundError(errno.ENOENT, 'no such object', uri)
    # Pinned to the generation that was opened.
    self._blob = _gcs().bucket(bucket).blob(key, generation=b.generation)
    super().__init__(uri, int(b.size))

  def _fetch(self, start: int, end: int) -> bytes:
    from google.api_core import exceptions as gexc  # pylint: disable=g-import-not-at-top
    if end <= start:
      return b''
    try:
      return self._blob.download_as_bytes(start=start, end=end - 1,
                                          checksum=None)
    except gexc.NotFound:
      raise errors.TamperedPackageError(
          f'{_text.printable(self.uri)} was replaced or removed while it was '
          'being read; fetch a fresh copy') from None


def _gcs_put(bucket: str, key: str, data: Data, create_only: bool,
             uri: str) -> None:
  from google.api_core import exceptions as gexc  # pylint: disable=g-import-not-at-top
  blob = _gcs().bucket(bucket).blob(key, chunk_size=8 << 20)
  stream, size = _as_stream(data)
  kw = {'if_generation_match': 0} if create_only else {}
  try:
    blob.upload_from_file(stream, size=size, rewind=False, **kw)
  except gexc.PreconditionFailed:
    raise ObjectExistsError(f'{_text.printable(uri)} already exists '
                            '(another writer created it)') from None


# --- SDK errors as OSError ---------------------------------------------------

_DENIED = {'AccessDenied', '403', 'Forbidden', 'InvalidAccessKeyId',
           'SignatureDoesNotMatch', 'ExpiredToken', 'AllAccessDisabled'}
_MISSING = {'NoSuchBucket', 'NoSuchKey', '404', 'NotFound'}


def _as_os_error(e: BaseException, uri: str) -> BaseException:
  """An SDK's error (botocore, google-api-core/auth) as the OSError the
  CLI reports in one line (exit 9), naming the URI; others unchanged."""
  if isinstance(e, (errors.TfxEncryptError, OSError)):
    return e
  mod = type(e).__module__ or ''
  if not mod.startswith(('botocore', 'boto3', 'google.', 's3transfer')):
    return e
  code = ''
  resp = getattr(e, 'response', None)
  if isinstance(resp, dict):
    code = str(resp.get('Error', {}).get('Code', ''))
  status = str(getattr(e, 'code', '') or '')
  name = type(e).__name__
  msg = f'{name}{": " + code if code else ""}: {e}'
  if code in _DENIED or status in ('401', '403') or name in (
      'Forbidden', 'Unauthorized', 'NoCredentialsError',
      'DefaultCredentialsError', 'RefreshError'):
    return PermissionError(errno.EACCES, f'access denied ({msg})', uri)
  if code in _MISSING or status == '404' or name == 'NotFound':
    return FileNotFoundError(errno.ENOENT, f'not found ({msg})', uri)
  if name in ('EndpointConnectionError', 'ConnectTimeoutError',
              'ReadTimeoutError', 'ConnectionClosedError', 'TransportError',
              'ServiceUnavailable', 'RetryError'):
    return ConnectionError(errno.ECONNREFUSED,
                           f'object store unreachable ({msg})', uri)
  return OSError(errno.EIO, f'object store error ({msg})', uri)


def _translating(fn):
  """Decorate a verb taking the URI first: SDK errors become OSError."""
  import functools  # pylint: disable=g-import-not-at-top

  @functools.wraps(fn)
  def wrapper(uri, *args, **kwargs):
    try:
      return fn(uri, *args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      mapped = _as_os_error(e, os.fspath(uri))
      if mapped is e:
        raise
      raise mapped from e
  return wrapper


# --- the verbs ---------------------------------------------------------------


@_translating
def open_reader(uri: str) -> Reader:
  """Open an object (or a local regular file) for ranged reads.

  Raises:
    FileNotFoundError: no such object or file.
    UnsafePathError: a local path that is a link or not a regular file.
  """
  uri = os.fspath(uri)
  if not is_remote(uri):
    return _LocalReader(local_path(uri))
  s, bucket, key = split(uri)
  if s == 's3':
    return _S3Reader(uri, bucket, key)
  return _GcsReader(uri, bucket, key)


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
