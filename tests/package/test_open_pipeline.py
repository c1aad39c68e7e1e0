"""The threaded pipeline that opens a large payload (package/_streams.py).

A payload of at least PIPELINE_MIN_SEGMENTS segments is read, its
ciphertext hashed and decrypted on one thread, its plaintext hashed on a
second, and handed to the sink on the caller's: the result must be the same
bytes, in order, and every failure (a tampered segment, a wrong ciphertext
or plaintext digest, a failing sink) must surface in the caller, stop every
thread of the pipeline and leave no output.
"""

import os
import threading

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt import package as package_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.package import _streams
from tests import _util

SEGMENTS = package_lib.PIPELINE_MIN_SEGMENTS + 3
SIZE = SEGMENTS * streaming.PLAINTEXT_SEGMENT_SIZE - 12345


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(params=['blake3', 'sha256'])
def pkg(request, tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {
      'saved_model.pb': 100,
      'variables/variables.data-00000-of-00001': SIZE})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')],
                   hash_alg=request.param)
  return src, tmp_path / 'p'


def _pipeline_threads():
  return [t for t in threading.enumerate() if t.name.startswith('tfxe-open')]


def _shard_payload(pkg_dir):
  payloads = pkg_dir / 'payload'
  return max(payloads.iterdir(), key=lambda p: p.stat().st_size)


def test_pipeline_decrypts_the_same_bytes(pkg, keys, tmp_path):
  src, p = pkg
  used = []
  real = _streams._open_pipelined  # pylint: disable=protected-access

  def spy(*args, **kwargs):
    used.append(True)
    return real(*args, **kwargs)

  _streams._open_pipelined = spy  # pylint: disable=protected-access
  try:
    te.decrypt_model(p, tmp_path / 'out', identities=[keys.priv('x')],
                     allow_unsigned=True)
  finally:
    _streams._open_pipelined = real  # pylint: disable=protected-access
  assert used == [True]
  assert _util.read_tree(tmp_path / 'out') == _util.read_tree(src)
  assert _pipeline_threads() == []


@pytest.mark.parametrize('where', ['first', 'middle', 'last'])
def test_tampered_segment_stops_the_pipeline(pkg, keys, tmp_path, where):
  _, p = pkg
  shard = _shard_payload(p)
  data = bytearray(shard.read_bytes())
  seg = {'first': 0, 'middle': SEGMENTS // 2, 'last': SEGMENTS - 1}[where]
  off, ln = streaming.ciphertext_segment(seg, len(data))
  data[off + ln // 2] ^= 0x40
  shard.write_bytes(bytes(data))
  with pytest.raises(errors.TamperedPackageError):
    te.decrypt_model(p, tmp_path / 'out', identities=[keys.priv('x')],
                     allow_unsigned=True)
  assert not os.path.exists(tmp_path / 'out')
  assert [n for n in os.listdir(tmp_path) if n.startswith('.out')] == []
  assert _pipeline_threads() == []


def test_failing_sink_stops_the_pipeline(pkg, keys):
  _, p = pkg
  src, h, dk, entries, _, _ = package_lib._open_authenticated(  # pylint: disable=protected-access
      p, [keys.priv('x')], [], True)
  i = max(range(len(entries)), key=lambda j: entries[j].size)
  got = []

  def sink(mv):
    got.append(len(mv))
    if len(got) == 3:
      raise OSError(28, 'No space left on device')

  with pytest.raises(OSError, match='No space'):
    _streams._decrypt_payload(src, h, dk, i, entries[i], sink)  # pylint: disable=protected-access
  assert len(got) == 3
  assert _pipeline_threads() == []


def test_plaintext_digest_checked_after_the_pipeline(pkg, keys):
  """A file table digest that does not match what the pipeline decrypted."""
  _, p = pkg
  src, h, dk, entries, _, _ = package_lib._open_authenticated(  # pylint: disable=protected-access
      p, [keys.priv('x')], [], True)
  i = max(range(len(entries)), key=lambda j: entries[j].size)
  e = entries[i]
  wrong = type(e)(e.path, e.size, '00' * 32)
  with pytest.raises(errors.TamperedPackageError, match='plaintext digest'):
    _streams._decrypt_payload(src, h, dk, i, wrong, lambda mv: None)  # pylint: disable=protected-access
  assert _pipeline_threads() == []
