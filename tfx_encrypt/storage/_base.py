"""What every store shares: URIs, readers, errors."""

import errno
import io
import os
import re
import dataclasses
import threading
from typing import BinaryIO, Optional, Tuple, Union

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


class ObjectChangedError(errors.TamperedPackageError):
  """An object was replaced or removed since it was listed or opened: a
  pinned read refuses to mix two versions."""


def _changed_since_read(uri: str) -> ObjectChangedError:
  """What a replacement conditional on the version read raises when that
  version is gone (put_if_unchanged, a bundle's rewrite)."""
  return ObjectChangedError(f'{_text.printable(uri)} was replaced or '
                            'removed since it was read; it was not '
                            'overwritten')


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
  """One listed object: its size, the version it was listed at (S3 ETag,
  GCS generation; None locally) and its last change (seconds since the
  epoch; 0 if the store did not say)."""
  size: int
  version: Optional[str] = None
  mtime: float = 0.0


def is_dir_marker(name: str, size: int) -> bool:
  """A zero-byte object named like a directory (`''` for the prefix
  itself, or ending in `/`): what `tf.io.gfile.makedirs`, the consoles and
  `gsutil` create for "folders". It holds nothing; readers skip it."""
  return size == 0 and (name == '' or name.endswith('/'))


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
  #: The version opened (S3 ETag, GCS generation; locally the file's
  #: identity `dev:ino:size:mtime_ns`): what :func:`put_if_unchanged`
  #: takes to replace exactly what was read.
  version: Optional[str] = None

  def read_into(self, buf, offset: int) -> int:
    """Fill `buf` from `offset`; fewer bytes only at the end of the object."""
    raise NotImplementedError

  def read_range(self, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    n = self.read_into(buf, offset)
    return bytes(buf[:n])

  def check_unchanged(self) -> None:
    """Raise ObjectChangedError if the object is no longer the version
    opened (where the store itself does not enforce the pin)."""

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class Writer:
  """A streamed upload of one object of a known size (create-only).

  `write(data)` copies what it is given (callers reuse their buffers);
  `commit()` publishes the object, refusing an existing one
  (:class:`ObjectExistsError`); `abort()` drops it (nothing is published).
  Memory: one part (S3) or chunk (GCS) per writer.
  """

  uri: str = ''

  def write(self, data) -> None:
    raise NotImplementedError

  def commit(self) -> None:
    raise NotImplementedError

  def abort(self) -> None:
    pass


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


class _BufferFile(io.RawIOBase):
  """A seekable read-only file over memoryviews, one after the other (an
  upload body that is not copied: a part buffer; a bundle's first part,
  its header then the payload bytes held back)."""

  def __init__(self, *views: memoryview):
    super().__init__()
    self._views = [v for v in views if len(v)]
    self._len = sum(len(v) for v in self._views)
    self._pos = 0

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    out = memoryview(b).cast('B')
    got, base = 0, 0
    for v in self._views:
      if got == len(out):
        break
      end = base + len(v)
      if self._pos < end:
        i = self._pos - base
        k = min(len(out) - got, len(v) - i)
        out[got:got + k] = v[i:i + k]
        got += k
        self._pos += k
      base = end
    return got

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos,
            io.SEEK_END: self._len}[whence]
    self._pos = base + offset
    return self._pos

  def tell(self) -> int:
    return self._pos

  def __len__(self) -> int:
    return self._len


class _ChunkedReader(Reader):
  """A remote object read through ranged requests of CHUNK_SIZE bytes."""

  def __init__(self, uri: str, size: int):
    self.uri, self.size = uri, size
    self._chunk_start = -1
    self._chunk = b''
    self._buf = None  # one chunk, reused
    self._lock = threading.Lock()

  def _fetch(self, start: int, end: int) -> bytes:
    """Bytes [start, end) of the pinned object version."""
    raise NotImplementedError

  def _fetch_into(self, start: int, end: int, out: memoryview) -> int:
    """Bytes [start, end) into `out`; returns how many came. Stores that
    can stream override it, so no chunk-sized object is allocated per
    request (with threads, glibc keeps such blocks: RSS would grow)."""
    data = self._fetch(start, end)
    n = min(len(data), len(out))
    out[:n] = data[:n]
    return len(data)

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
          if self._buf is None:
            self._buf = bytearray(min(CHUNK_SIZE, self.size))
          self._chunk_start, self._chunk = -1, b''
          try:
            came = self._fetch_into(start, end,
                                    memoryview(self._buf)[:end - start])
          except Exception as e:  # pylint: disable=broad-except
            mapped = _as_os_error(e, self.uri)
            if mapped is e:
              raise
            raise mapped from e
          if came != end - start:
            raise errors.TamperedPackageError(
                f'{_text.printable(self.uri)} changed or was truncated while '
                'it was being read; fetch a fresh copy')
          self._chunk_start = start
          self._chunk = memoryview(self._buf)[:end - start]
        i = pos - self._chunk_start
        n = min(len(mv) - got, len(self._chunk) - i)
        mv[got:got + n] = self._chunk[i:i + n]
        got += n
    return got

  def close(self) -> None:
    self._chunk = b''
    self._chunk_start = -1
    self._buf = None


def _as_stream(data: Data) -> Tuple[BinaryIO, int]:
  """A seekable binary stream over `data`, and its length from here on."""
  if isinstance(data, (bytes, bytearray, memoryview)):
    return io.BytesIO(bytes(data)), len(data)
  pos = data.tell()
  end = data.seek(0, io.SEEK_END)
  data.seek(pos)
  return data, end - pos


def _sdk_missing(scheme: str, module: str) -> errors.UsageError:
  return errors.UsageError(
      f'{scheme}:// needs {module}: pip install '
      f"'tfx-encrypt[{REMOTE_SCHEMES[scheme]}]'")


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


def _translating_method(fn):
  """The same for a method of an object with a `uri` (writers)."""
  import functools  # pylint: disable=g-import-not-at-top

  @functools.wraps(fn)
  def wrapper(self, *args, **kwargs):
    try:
      return fn(self, *args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      mapped = _as_os_error(e, self.uri)
      if mapped is e:
        raise
      raise mapped from e
  return wrapper
