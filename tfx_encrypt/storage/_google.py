"""gs:// through google-cloud-storage: ifGenerationMatch=0 commits."""

import errno
import os
import threading
import time
from typing import Dict, Optional

from tfx_encrypt import _text
from tfx_encrypt.storage._base import (
    Data, ObjectChangedError, ObjectExistsError, ObjectInfo, Writer,
    _BufferFile, _ChunkedReader, _as_stream, _changed_since_read,
    _sdk_missing, _translating_method)


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

  def __init__(self, uri: str, bucket: str, key: str,
               version: Optional[str] = None):
    self._bucket, self._key = bucket, key
    b = _gcs().bucket(bucket).get_blob(key)
    if b is None:
      if version:
        raise ObjectChangedError(f'{_text.printable(uri)} was removed after '
                                 'it was listed')
      raise FileNotFoundError(errno.ENOENT, 'no such object', uri)
    if version and str(b.generation) != str(version):
      raise ObjectChangedError(f'{_text.printable(uri)} was replaced after '
                               'it was listed')
    # Pinned to the generation that was opened.
    self._generation = b.generation
    self.version = str(b.generation)
    self._blob = _gcs().bucket(bucket).blob(key, generation=b.generation)
    super().__init__(uri, int(b.size))

  def _fetch(self, start: int, end: int) -> bytes:
    from google.api_core import exceptions as gexc  # pylint: disable=g-import-not-at-top
    if end <= start:
      return b''
    try:
      data = self._blob.download_as_bytes(start=start, end=end - 1,
                                          checksum=None)
    except gexc.NotFound:
      raise ObjectChangedError(
          f'{_text.printable(self.uri)} was replaced or removed while it was '
          'being read; fetch a fresh copy') from None
    # Real GCS serves the pinned generation (or 404); a store that ignores
    # `generation=` still names what it served in x-goog-generation.
    served = self._blob._properties.get('generation')  # pylint: disable=protected-access
    # The download overwrote the blob's generation with that header (None
    # if absent): put the pin back for the next request.
    self._blob._properties['generation'] = self._generation  # pylint: disable=protected-access
    if served is not None and str(served) != str(self._generation):
      raise ObjectChangedError(
          f'{_text.printable(self.uri)} was replaced while it was being read; '
          'fetch a fresh copy')
    return data

  def check_unchanged(self) -> None:
    """After the last read: the object is still the generation opened.

    Real GCS enforces the pin on every ranged read; gcp-storage-emulator
    ignores `generation=` and names no generation in its answers, so this
    one metadata read is what catches a replacement there.
    """
    b = _gcs().bucket(self._bucket).get_blob(self._key)
    if b is None or str(b.generation) != str(self._generation):
      raise ObjectChangedError(
          f'{_text.printable(self.uri)} was replaced or removed while it was '
          'being read')


def _gcs_list_info(bucket: str, prefix: str) -> Dict[str, ObjectInfo]:
  out = {}
  for b in _gcs().list_blobs(bucket, prefix=prefix):
    out[b.name[len(prefix):]] = ObjectInfo(
        int(b.size or 0), None if b.generation is None else str(b.generation),
        b.updated.timestamp() if b.updated else 0.0)
  return out


#: Chunk of streamed uploads (a multiple of 256 KiB, as GCS requires of
#: every chunk but the last): the memory one writer holds, sent without a
#: copy. Objects of at most one chunk go in one request at commit.
GCS_WRITE_CHUNK_SIZE = 8 << 20


#: Pauses before retrying a chunk after a transient failure (then fail).
GCS_RETRY_PAUSES_S = (1.0, 2.0, 4.0, 8.0, 16.0)

_GCS_TRANSIENT = frozenset((408, 429, 500, 502, 503, 504))


class _GcsWriter(Writer):
  """A create-only streamed upload: a resumable-upload session opened with
  `ifGenerationMatch=0`, fed one chunk at a time from one reused buffer.

  GCS finalises the object when its last byte arrives, and then only if
  no live object has the name (412 otherwise); the last chunk is sent only
  by `commit`, so no object can appear before it. `abort` cancels the
  session. An object of at most one chunk is one multipart request at
  commit, with the same precondition.
  """

  def __init__(self, uri: str, bucket: str, key: str, size: int):
    self.uri, self._bucket, self._key, self._size = uri, bucket, key, size
    self._buf = bytearray(min(GCS_WRITE_CHUNK_SIZE, size))
    self._fill = 0
    self._base = 0  # object offset of the buffer's first byte
    self._sent = 0  # bytes the session has persisted
    self._session = None
    self._written = 0
    self._closed = False  # committed or aborted: never reopened

  def _over(self) -> OSError:
    return OSError(errno.EIO, 'the upload is over (committed or aborted)',
                   self.uri)

  def _exists(self) -> ObjectExistsError:
    return ObjectExistsError(f'{_text.printable(self.uri)} already exists '
                             '(another writer created it)')

  def _http(self):
    import requests  # pylint: disable=g-import-not-at-top
    # The session URL is itself the credential for the upload: a plain
    # session, one per writer (requests sessions are per thread).
    if self._session is None:
      from google.api_core import exceptions as gexc  # pylint: disable=g-import-not-at-top
      blob = _gcs().bucket(self._bucket).blob(self._key)
      try:
        url = blob.create_resumable_upload_session(
            content_type='application/octet-stream', size=self._size,
            if_generation_match=0)
      except gexc.PreconditionFailed:
        raise self._exists() from None
      self._session = (url, requests.Session())
    return self._session

  def _send(self, last: bool) -> None:
    """Send the buffer from `_sent` on. GCS may persist less than it was
    sent (it answers 308 with the Range it kept): resend the rest. A
    transient failure (connection error, 408, 429, 5xx) is retried after a
    pause (:data:`GCS_RETRY_PAUSES_S`), first asking GCS how much it kept
    (an empty PUT, `Content-Range: bytes */N`), as the resumable protocol
    prescribes: the whole chunk is still in the buffer."""
    import requests  # pylint: disable=g-import-not-at-top
    if self._closed:
      raise self._over()
    url, http = self._http()
    view = memoryview(self._buf)[:self._fill]
    start = self._base
    pauses = list(GCS_RETRY_PAUSES_S)
    query = False
    total = str(self._size) if last else '*'
    for _ in range(16 + len(pauses)):
      off = self._sent - start
      body = _BufferFile(view[off:]) if not query else _BufferFile(view[:0])
      end = self._sent + len(body)
      try:
        r = http.put(
            url, data=body if len(body) else b'',  # not chunked when empty
            timeout=(60, 600), headers={'Content-Range': (
                f'bytes {self._sent}-{end - 1}/{total}' if len(body)
                else f'bytes */{total}')})
        failure = None if r.status_code not in _GCS_TRANSIENT else (
            f'HTTP {r.status_code}')
      except requests.RequestException as e:
        # Not the SDK's message: it names the session URL, a credential.
        r, failure = None, type(e).__name__
      if failure is not None:
        if not pauses:
          raise ConnectionError(errno.ECONNABORTED, 'object store '
                                f'unreachable ({failure})', self.uri)
        time.sleep(pauses.pop(0))
        query = True  # how much did it keep?
        continue
      query = False
      if r.status_code in (200, 201):
        if not last:
          raise OSError(errno.EIO, 'the store finalised the object before '
                        'its last chunk', self.uri)
        self._sent = start + len(view)
        return
      if r.status_code == 412:
        raise self._exists()
      if r.status_code != 308:
        raise OSError(errno.EIO, f'upload failed: HTTP {r.status_code} '
                      f'{_text.printable(r.text[:200])}', self.uri)
      kept = r.headers.get('Range')  # "bytes=0-N": what it persisted
      self._sent = int(kept.rsplit('-', 1)[1]) + 1 if kept else 0
      if self._sent < start or self._sent > start + len(view):
        raise OSError(errno.EIO, 'the store kept bytes outside the chunk '
                      'sent', self.uri)
      if self._sent == start + len(view) and not last:
        return
    raise OSError(errno.EIO, 'the store keeps refusing the chunk', self.uri)

  @_translating_method
  def write(self, data) -> None:
    if self._closed:
      raise self._over()
    mv = memoryview(data).cast('B')
    self._written += len(mv)
    if self._written > self._size:
      raise OSError(errno.EFBIG, 'more bytes than announced', self.uri)
    while len(mv):
      take = min(len(mv), len(self._buf) - self._fill)
      self._buf[self._fill:self._fill + take] = mv[:take]
      self._fill += take
      mv = mv[take:]
      if self._fill == len(self._buf) and (
          self._base + self._fill < self._size):
        # Full, and more to come: never the last chunk.
        self._send(last=False)
        self._base += self._fill
        self._fill = 0

  @_translating_method
  def commit(self) -> None:
    if self._closed:
      raise self._over()
    if self._written != self._size:
      raise OSError(errno.EIO, f'{self._written} bytes written, {self._size} '
                    'announced', self.uri)
    try:
      if self._session is None:  # one chunk at most: one request
        _gcs_put(self._bucket, self._key,
                 bytes(memoryview(self._buf)[:self._fill]), True, self.uri)
      else:
        self._send(last=True)
        _, http = self._session
        self._session = None  # finalised: nothing to cancel
        http.close()
    finally:
      self.abort()

  def abort(self) -> None:
    self._closed = True
    self._buf, self._fill = bytearray(), 0
    session, self._session = self._session, None
    if session is not None:
      url, http = session
      try:  # cancel the session (GCS answers 499)
        http.delete(url, timeout=30)
      except Exception:  # pylint: disable=broad-except
        pass  # GCS drops unfinished sessions after a week
      http.close()


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


def _gcs_put_if_generation(bucket: str, key: str, data: Data,
                           generation: str, uri: str) -> str:
  """Replace an object only if it is still generation `generation`: an
  upload with `ifGenerationMatch=<generation>`. Returns the new generation.

  Raises:
    ObjectChangedError: the object is another generation or was removed
      (412); nothing was written.
  """
  from google.api_core import exceptions as gexc  # pylint: disable=g-import-not-at-top
  gen = int(generation)
  if gen <= 0:  # 0 would mean "create only if absent"
    raise ValueError(f'not an object generation: {generation!r}')
  blob = _gcs().bucket(bucket).blob(key, chunk_size=8 << 20)
  stream, size = _as_stream(data)
  try:
    blob.upload_from_file(stream, size=size, rewind=False,
                          if_generation_match=gen)
  except gexc.PreconditionFailed:
    raise _changed_since_read(uri) from None
  return None if blob.generation is None else str(blob.generation)
