"""A signal while a sealing pipeline winds down must not leave its writer
thread writing after the caller has moved on to abort the upload.

`_seal_stream` hands ciphertext to a writer thread; when the caller is
interrupted (KeyboardInterrupt, or a CLI signal's Interrupted) while it
waits for that thread, it used to return at once: the thread kept writing
into a remote upload the caller was aborting, and a writer that was
written to after its abort reopened an upload nothing would ever abort.
Now the caller waits for the thread (which drops what is still queued),
then raises; and every writer refuses writes after commit or abort.
"""

import os
import signal
import threading
import time

import pytest

from tfx_encrypt import errors
from tfx_encrypt import storage
from tfx_encrypt.format import streaming
from tfx_encrypt.package import _streams

SEGMENTS = _streams.PIPELINE_MIN_SEGMENTS + 2


def test_an_interrupt_while_waiting_for_the_writer_waits_for_it():
  sc = streaming.StreamCipher.new(streaming.AES256_GCM_HKDF_1MB,
                                  os.urandom(32), b'aad')
  size = SEGMENTS * streaming.PLAINTEXT_SEGMENT_SIZE - 100
  writes = []
  last = threading.Event()
  release = threading.Event()
  state = {}

  class Out:

    def write(self, mv):
      writes.append(len(mv))
      if len(writes) == SEGMENTS + 1:  # the stream header, then segments
        last.set()
        release.wait(10)

  def interrupt():
    last.wait(10)
    time.sleep(0.3)  # the caller is now waiting for the writer thread
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    release.set()

  def read_segment(i, mv):
    del i
    mv[:] = b'\0' * len(mv)

  t = threading.Thread(target=interrupt)
  t.start()
  try:
    with pytest.raises(KeyboardInterrupt):
      try:
        _streams._seal_stream(read_segment, size, sc, Out(), 'blake3', None,  # pylint: disable=protected-access
                              pipeline=True)
      finally:
        state['released_before_return'] = release.is_set()
  finally:
    release.set()
    t.join()
  assert state['released_before_return']
  n = len(writes)
  time.sleep(0.2)
  assert len(writes) == n  # nothing written after it returned


@pytest.mark.parametrize('store_name', ['s3', 'gs'])
@pytest.mark.parametrize('end', ['abort', 'commit'])
def test_writers_refuse_writes_after_abort_or_commit(request, store_name, end):
  store = request.getfixturevalue(f'{store_name}_store')
  uri = storage.join(store.new_base(), 'obj')
  size = 20 << 20
  w = storage.open_writer(uri, size)
  w.write(b'x' * (size - 1))
  if end == 'abort':
    w.abort()
  else:
    w.write(b'y')
    w.commit()
  with pytest.raises((OSError, errors.TfxEncryptError)):
    w.write(b'z' * (9 << 20))
  if end == 'abort':
    assert not storage.exists(uri)
  else:
    with storage.open_reader(uri) as r:
      assert r.size == size
