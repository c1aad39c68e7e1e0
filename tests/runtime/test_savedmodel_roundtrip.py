"""Real SavedModels: save, encrypt, decrypt, load, identical predictions."""

import os

import pytest

import tfx_encrypt as te
from tests import _util

pytestmark = pytest.mark.tfx

tf = pytest.importorskip('tensorflow')


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


class _Model(tf.Module):

  def __init__(self):
    super().__init__()
    tf.random.set_seed(7)
    # ~4 MiB of variables, so the shard spans several 1 MiB segments.
    self.w1 = tf.Variable(tf.random.normal([64, 16384]), name='w1')
    self.w2 = tf.Variable(tf.random.normal([16384, 3]), name='w2')
    self.b = tf.Variable(tf.zeros([3]), name='b')

  @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32)])
  def __call__(self, x):
    return tf.nn.softmax(tf.matmul(tf.nn.relu(tf.matmul(x, self.w1)), self.w2)
                         + self.b)


@pytest.fixture(scope='module')
def saved_model(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('sm') / 'model')
  m = _Model()
  tf.saved_model.save(m, d, signatures={'serving_default': m.__call__})
  return d


@pytest.mark.parametrize('bundle', [False, True], ids=['dir', 'bundle'])
def test_savedmodel_round_trip_identical_predictions(tmp_path, keys,
                                                     saved_model, bundle):
  assert os.path.exists(os.path.join(saved_model, 'saved_model.pb'))
  x = tf.random.stateless_normal([5, 64], seed=[1, 2])
  want = tf.saved_model.load(saved_model).signatures['serving_default'](x=x)
  pkg = tmp_path / ('m.tfxe' if bundle else 'm')
  info = te.encrypt_model(saved_model, pkg, recipients=[keys.pub('x')],
                          signer=keys.priv('ed'), bundle=bundle,
                          context={'model_name': 'demo', 'model_version': '1'})
  assert info.file_count >= 3
  out = tmp_path / 'restored'
  te.decrypt_model(pkg, out, identities=[keys.priv('x')],
                   trusted=[keys.pub('ed')])
  got = tf.saved_model.load(str(out)).signatures['serving_default'](x=x)
  assert set(got) == set(want)
  for k in want:
    assert (got[k].numpy() == want[k].numpy()).all()


def test_runtime_load_model_in_memory(tmp_path, keys, saved_model):
  from tfx_encrypt import errors
  from tfx_encrypt import runtime
  x = tf.random.stateless_normal([3, 64], seed=[3, 4])
  want = tf.saved_model.load(saved_model).signatures['serving_default'](x=x)
  te.encrypt_model(saved_model, tmp_path / 'p', recipients=[keys.pub('x')],
                   signer=keys.priv('ed'))
  before = set(os.listdir(tmp_path))
  m = runtime.load_model(tmp_path / 'p', identities=[keys.priv('x')],
                         trusted=[keys.pub('ed')])
  got = m.signatures['serving_default'](x=x)
  for k in want:
    assert (got[k].numpy() == want[k].numpy()).all()
  assert set(os.listdir(tmp_path)) == before  # nothing written to disk
  assert not tf.io.gfile.exists('ram://tfx-encrypt') or not tf.io.gfile.listdir(
      'ram://tfx-encrypt')
  with pytest.raises(errors.UntrustedSignerError):
    runtime.load_model(tmp_path / 'p', identities=[keys.priv('x')],
                       trusted=[keys.pub('evil')])


def _memfds():
  """This process's descriptors that are load_model's memory files (after
  the thread that frees them on success is done)."""
  import threading  # pylint: disable=g-import-not-at-top
  for t in threading.enumerate():
    if t.name == 'tfxe-free-memfds':
      t.join()
  out = []
  for n in os.listdir('/proc/self/fd'):
    try:
      if os.readlink(f'/proc/self/fd/{n}').startswith('/memfd:tfx-encrypt'):
        out.append(n)
    except OSError:
      pass
  return out


def _link_dirs():
  from tfx_encrypt import _fsutil
  with _fsutil._LIVE.lock:  # pylint: disable=protected-access
    return [t for t in _fsutil._LIVE.temps if 'tfx-encrypt-model' in t]  # pylint: disable=protected-access


def test_runtime_load_model_sees_only_verified_files(tmp_path, keys,
                                                     saved_model,
                                                     monkeypatch):
  """The graph loads from verified files while the variables shard is still
  being decrypted; the shard is linked only once its digests passed; every
  memfd and the link directory are gone afterwards, on success and when a
  shard is tampered with."""
  from tfx_encrypt import errors
  from tfx_encrypt import runtime
  te.encrypt_model(saved_model, tmp_path / 'p', recipients=[keys.pub('x')],
                   signer=keys.priv('ed'))
  seen = []
  real_load = tf.saved_model.load

  def spy(path, *args, **kwargs):
    opts = kwargs.get('options')
    seen.append((sorted(os.listdir(os.path.join(path, 'variables'))),
                 bool(opts and opts.experimental_skip_checkpoint)))
    for name in os.listdir(path):  # links into this process's memfds only
      link = os.path.join(path, name)
      if os.path.islink(link):
        assert os.readlink(link).startswith('/proc/self/fd/'), link
    return real_load(path, *args, **kwargs)

  monkeypatch.setattr(tf.saved_model, 'load', spy)
  x = tf.random.stateless_normal([3, 64], seed=[5, 6])
  want = real_load(saved_model).signatures['serving_default'](x=x)
  m = runtime.load_model(tmp_path / 'p', identities=[keys.priv('x')],
                         trusted=[keys.pub('ed')])
  got = m.signatures['serving_default'](x=x)
  for k in want:
    assert (got[k].numpy() == want[k].numpy()).all()
  # One load, without the checkpoint, before the shard was linked.
  assert seen == [(['variables.index'], True)], seen
  assert _memfds() == [] and _link_dirs() == []

  # A modified variables shard: refused, nothing left behind.
  payloads = tmp_path / 'p' / 'payload'
  shard = max(payloads.iterdir(), key=lambda p: p.stat().st_size)
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 1
  shard.write_bytes(bytes(data))
  seen.clear()
  with pytest.raises(errors.TamperedPackageError):
    runtime.load_model(tmp_path / 'p', identities=[keys.priv('x')],
                       trusted=[keys.pub('ed')])
  assert all('variables.data-00000-of-00001' not in s[0] for s in seen), seen
  assert _memfds() == [] and _link_dirs() == []
