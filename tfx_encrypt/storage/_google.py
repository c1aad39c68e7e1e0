"""gs:// through google-cloud-storage: ifGenerationMatch=0 commits."""

import errno
import os
import threading
from typing import Dict, Optional

from tfx_encrypt import _text
from tfx_encrypt.storage._base import (
    Data, ObjectChangedError, ObjectExistsError, ObjectInfo, Writer,
    _ChunkedReader, _as_stream, _sdk_missing, _translating_method)


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


#: Chunk of streamed uploads (a multiple of 256 KiB): the memory one
#: writer holds.
GCS_WRITE_CHUNK_SIZE = 4 << 20


class _GcsWriter(Writer):
  """A create-only streamed upload: a resumable upload with
  `ifGenerationMatch=0`, finalised by `commit`. Until then no object
  exists; `abort` leaves the session unfinished (GCS drops it after a
  week) and can never finalise it."""

  def __init__(self, uri: str, bucket: str, key: str, size: int):
    self.uri, self._bucket, self._key, self._size = uri, bucket, key, size
    self._w = None
    self._written = 0

  def _writer(self):
    if self._w is None:
      # The client of the thread that writes (see _gcs).
      blob = _gcs().bucket(self._bucket).blob(self._key)
      self._w = _blob_writer_class()(
          blob, chunk_size=GCS_WRITE_CHUNK_SIZE, ignore_flush=True,
          if_generation_match=0)
    return self._w

  @_translating_method
  def write(self, data) -> None:
    mv = memoryview(data).cast('B')
    self._written += len(mv)
    if self._written > self._size:
      raise OSError(errno.EFBIG, 'more bytes than announced', self.uri)
    self._writer().write(bytes(mv))

  @_translating_method
  def commit(self) -> None:
    from google.api_core import exceptions as gexc  # pylint: disable=g-import-not-at-top
    if self._written != self._size:
      raise OSError(errno.EIO, f'{self._written} bytes written, {self._size} '
                    'announced', self.uri)
    from google.resumable_media import common  # pylint: disable=g-import-not-at-top
    exists = ObjectExistsError(f'{_text.printable(self.uri)} already exists '
                               '(another writer created it)')
    try:
      w = self._writer()
      w.finalize = True
      w.close()
    except gexc.PreconditionFailed:
      raise exists from None
    except common.InvalidResponse as e:  # the resumable upload's final PUT
      if getattr(getattr(e, 'response', None), 'status_code', None) == 412:
        raise exists from None
      raise
    finally:
      self.abort()

  def abort(self) -> None:
    w, self._w = self._w, None
    if w is not None and not w.closed:
      w.finalize = False
      try:
        w.close()
      except Exception:  # pylint: disable=broad-except
        pass


_BLOB_WRITER = []


def _blob_writer_class():
  """BlobWriter that finalises the upload only when told to.

  BlobWriter.close() uploads what is buffered and FINALISES the object,
  and io.IOBase runs close() when the writer is garbage-collected: a
  writer dropped after an error would publish a truncated object. This
  one closes its buffer first unless `finalize` was set by commit.
  """
  if not _BLOB_WRITER:
    from google.cloud.storage import fileio  # pylint: disable=g-import-not-at-top

    class _CommitOnlyBlobWriter(fileio.BlobWriter):
      finalize = False

      def close(self):
        if not self.finalize:
          self._buffer.close()  # close() then uploads nothing
        super().close()

    _BLOB_WRITER.append(_CommitOnlyBlobWriter)
  return _BLOB_WRITER[0]


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
