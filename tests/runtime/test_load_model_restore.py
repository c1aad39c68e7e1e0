"""load_model restores variables straight from the decrypted shard
(`runtime/_restore.py`), bit for bit what TensorFlow's restore gives, and
falls back to TensorFlow's restore for checkpoints it does not handle."""

import logging
import os

import numpy as np
import pytest

import tfx_encrypt as te
from tests import _util

pytestmark = pytest.mark.tfx

tf = pytest.importorskip('tensorflow')

from tfx_encrypt import errors  # noqa: E402  pylint: disable=g-import-not-at-top
from tfx_encrypt import runtime  # noqa: E402  pylint: disable=g-import-not-at-top
from tfx_encrypt.runtime import _restore  # noqa: E402  pylint: disable=g-import-not-at-top

_IN_PLACE = 'variables restored in place'
_BY_TF = 'variables restored by TensorFlow'


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


class _Mixed(tf.Module):
  """Every numeric dtype restored in place, odd sizes (so entries do not
  start at aligned offsets in the shard), nesting, a shared variable and an
  empty one."""

  def __init__(self):
    super().__init__()
    rng = np.random.default_rng(3)
    self.f32 = tf.Variable(rng.standard_normal([257, 129]).astype('float32'))
    self.i64 = tf.Variable(rng.integers(-2**62, 2**62, [1001]))
    self.f64 = tf.Variable(np.float64(np.pi))
    self.f16 = tf.Variable(rng.standard_normal([33]).astype('float16'))
    self.u8 = tf.Variable(rng.integers(0, 255, [7, 3], dtype='uint8'))
    self.i8 = tf.Variable(rng.integers(-128, 127, [5], dtype='int8'))
    self.u16 = tf.Variable(rng.integers(0, 65535, [9], dtype='uint16'))
    self.c64 = tf.Variable((rng.standard_normal([6]) +
                            1j * rng.standard_normal([6])).astype('complex64'))
    self.empty = tf.Variable(tf.zeros([0, 4]))
    self.layers = [tf.Variable(rng.standard_normal([300]).astype('float32'))
                   for _ in range(3)]
    self.by_name = {'a': self.layers[1],  # the same variable, twice
                    'emb': tf.Variable(rng.standard_normal(
                        [4096, 64]).astype('float32'))}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
  def __call__(self, ids):
    row = tf.gather(self.by_name['emb'], ids)  # a sparse read
    return {'y': tf.reduce_sum(row, axis=1) + tf.reduce_sum(self.f32)
                 + tf.cast(tf.reduce_sum(self.i64 % 7), tf.float32)
                 + tf.reduce_sum(self.layers[1])}


def _values(module):
  out = {}
  for name in ('f32', 'i64', 'f64', 'f16', 'u8', 'i8', 'u16', 'c64', 'empty'):
    out[name] = getattr(module, name).numpy()
  for i, v in enumerate(module.layers):
    out[f'layers{i}'] = v.numpy()
  out['emb'] = module.by_name['emb'].numpy()
  return out


def _save(module, path):
  tf.saved_model.save(module, str(path),
                      signatures={'serving_default': module.__call__})
  return str(path)


def _load(tmp_path, keys, model, caplog):
  pkg = tmp_path / 'pkg'
  te.encrypt_model(model, pkg, recipients=[keys.pub('x')],
                   signer=keys.priv('ed'))
  with caplog.at_level(logging.DEBUG, logger='tfx_encrypt.runtime'):
    return runtime.load_model(pkg, identities=[keys.priv('x')],
                              trusted=[keys.pub('ed')])


def _assert_same(got, want):
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    assert got[k].tobytes() == want[k].tobytes(), k


def test_every_variable_restored_in_place_bit_for_bit(tmp_path, keys,
                                                      caplog):
  model = _save(_Mixed(), tmp_path / 'model')
  plain = tf.saved_model.load(model)
  got = _load(tmp_path, keys, model, caplog)
  assert _IN_PLACE in caplog.text and _BY_TF not in caplog.text
  _assert_same(_values(got), _values(plain))
  assert got.layers[1] is got.by_name['a']  # still one variable
  ids = tf.constant([0, 5, 4095])
  want = plain.signatures['serving_default'](ids=ids)['y'].numpy()
  assert (got.signatures['serving_default'](ids=ids)['y'].numpy() ==
          want).all()
  # The variables are ordinary ones: they can be written, and the write
  # reaches neither the package nor another load.
  got.f32.assign_add(tf.ones_like(got.f32))
  (tmp_path / 'again').mkdir()
  again = _load(tmp_path / 'again', keys, model, caplog)
  assert (again.f32.numpy() == plain.f32.numpy()).all()


class _WithTable(tf.Module):
  """A checkpoint with numeric values that are not variables (a mutable
  table's keys and values): planned, then refused by the object matching."""

  def __init__(self):
    super().__init__()
    self.w = tf.Variable(tf.range(1000, dtype=tf.float32))
    self.empty = tf.Variable(tf.zeros([0, 4]))  # written back as no bytes
    self.table = tf.lookup.experimental.MutableHashTable(
        tf.int64, tf.int64, default_value=-1)
    self.table.insert(tf.constant([3, 4], tf.int64),
                      tf.constant([1, 2], tf.int64))

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
  def __call__(self, k):
    return {'y': tf.cast(self.table.lookup(k), tf.float32) +
                 tf.reduce_sum(self.w)}


class _WithBool(tf.Module):
  """A dtype not restored in place (bool): planned as TensorFlow's."""

  def __init__(self):
    super().__init__()
    self.w = tf.Variable(tf.range(100, dtype=tf.float32))
    self.flags = tf.Variable([True, False, True])

  @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
  def __call__(self, x):
    return {'y': tf.reduce_sum(self.w) * x +
                 tf.reduce_sum(tf.cast(self.flags, tf.float32))}


@pytest.mark.parametrize('make, arg, how', [
    (_WithTable, tf.constant([3, 9], tf.int64), _BY_TF),  # planned, refused
    (_WithBool, tf.constant(2.0), None),  # not planned at all
], ids=['table', 'bool'])
def test_other_checkpoints_fall_back_to_tensorflows_restore(
    tmp_path, keys, caplog, make, arg, how):
  model = _save(make(), tmp_path / 'model')
  plain = tf.saved_model.load(model)
  got = _load(tmp_path, keys, model, caplog)
  assert _IN_PLACE not in caplog.text
  if how:
    assert how in caplog.text
  name = next(iter(plain.signatures['serving_default'].structured_input_signature[1]))
  want = plain.signatures['serving_default'](**{name: arg})['y'].numpy()
  assert (got.signatures['serving_default'](**{name: arg})['y'].numpy() ==
          want).all()
  assert (got.w.numpy() == plain.w.numpy()).all()


def test_tampered_shard_is_refused_before_any_variable_is_assigned(
    tmp_path, keys, monkeypatch):
  model = _save(_Mixed(), tmp_path / 'model')
  pkg = tmp_path / 'pkg'
  te.encrypt_model(model, pkg, recipients=[keys.pub('x')],
                   signer=keys.priv('ed'))
  shard = max((pkg / 'payload').iterdir(), key=lambda p: p.stat().st_size)
  data = bytearray(shard.read_bytes())
  data[-100] ^= 1  # the last segment: everything before it decrypts fine
  shard.write_bytes(bytes(data))
  restored, allocated = [], []
  real_allocate = _restore.Plan.allocate

  def allocate(self):  # proves the in-place path was the one taken
    allocated.append(self)
    real_allocate(self)
  monkeypatch.setattr(_restore.Plan, 'allocate', allocate)
  monkeypatch.setattr(_restore.Plan, 'restore',
                      lambda self, root: restored.append(root))
  with pytest.raises(errors.TamperedPackageError):
    runtime.load_model(pkg, identities=[keys.priv('x')],
                       trusted=[keys.pub('ed')])
  assert len(allocated) == 1 and restored == []


def test_index_reader_agrees_with_tensorflow(tmp_path):
  model = _save(_Mixed(), tmp_path / 'model')
  prefix = os.path.join(model, 'variables', 'variables')
  with open(prefix + '.index', 'rb') as f:
    index = f.read()
  header, entries = _restore.read_index(index)
  assert header.num_shards == 1 and header.endianness == 0
  reader = tf.train.load_checkpoint(prefix)
  shapes, dtypes = (reader.get_variable_to_shape_map(),
                    reader.get_variable_to_dtype_map())
  assert set(entries) == set(shapes)
  for key, e in entries.items():
    assert [d.size for d in e.shape.dim] == shapes[key], key
    assert tf.dtypes.as_dtype(e.dtype) == dtypes[key], key
  shard = prefix + '.data-00000-of-00001'
  size = os.path.getsize(shard)
  plan = _restore.plan(index, {'variables/variables.data-00000-of-00001':
                               size})
  assert plan is not None and plan.shard_names == [
      'variables/variables.data-00000-of-00001']
  # Anything unexpected in the index or the shard sizes: no plan, no crash.
  assert _restore.plan(index, {'variables/variables.data-00000-of-00001':
                               size + 1}) is None
  assert _restore.plan(index, {'other': size}) is None
  for bad in (index[:-1], index[:20], b'\0' * len(index),
              index[:-8] + b'\1' * 8):
    assert _restore.plan(bad, {'variables/variables.data-00000-of-00001':
                               size}) is None
  for i in range(0, len(index), 7):  # any flipped byte: a plan or None
    bad = index[:i] + bytes([index[i] ^ 0xff]) + index[i + 1:]
    _restore.plan(bad, {'variables/variables.data-00000-of-00001': size})
