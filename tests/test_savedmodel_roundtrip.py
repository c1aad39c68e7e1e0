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
