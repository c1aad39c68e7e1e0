"""gs:// through google-cloud-storage: ifGenerationMatch=0 commits."""

import errno
import os
import threading

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.storage._base import (
    Data, ObjectExistsError, _ChunkedReader, _as_stream, _sdk_missing)


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
