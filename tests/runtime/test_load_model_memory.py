"""runtime.load_model's peak RSS stays within 1.1x plain TensorFlow's.

Issue 11: for a SavedModel with >= 200 MB of variables, loading the
encrypted package (verify, decrypt into memfds, load, first prediction)
must not peak above 1.1x `tf.saved_model.load` of the plain model plus the
same first prediction. Both are measured in this test, each in a fresh
subprocess (VmHWM is per process image; TensorFlow is imported and warmed
up before the baseline is read). The ratio is asserted on the whole
process's peak, as users see it, and on the load's own growth over that
baseline, which is the stricter of the two. A memory bound, not a timing:
timings are benchmarks (benchmarks/load_model.py), never tests.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.tfx, pytest.mark.slow]

# Four 4096 x 4096 float32 matrices: 256 MiB of variables in one shard, the
# hard case (almost all of TensorFlow's own work is the restore).
MAKE = r'''
import os, sys
os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'
import tensorflow as tf

class Chain(tf.Module):

  def __init__(self):
    super().__init__()
    self.ws = [tf.Variable(
        tf.random.stateless_normal([4096, 4096], seed=[i, 1]) * 0.02,
        name=f'w{i}') for i in range(4)]

  @tf.function(input_signature=[tf.TensorSpec([None, 4096], tf.float32)])
  def __call__(self, x):
    for w in self.ws:
      x = tf.nn.relu(tf.matmul(x, w))
    return {'y': tf.reduce_sum(x, axis=1)}

class Embedding(tf.Module):
  """One 200 MiB table read sparsely (tf.gather: ResourceGather), as a
  Keras Embedding is: TensorFlow copies a variable on its first sparse read
  unless it owns the variable's memory alone."""

  def __init__(self):
    super().__init__()
    self.table = tf.Variable(tf.random.stateless_normal(
        [102400, 512], seed=[3, 1]) * 0.02, name='table')

  @tf.function(input_signature=[tf.TensorSpec([None, 4096], tf.float32)])
  def __call__(self, x):
    ids = tf.cast(tf.abs(x[:, :16]) * 1000, tf.int32) % 102400
    return {'y': tf.reduce_sum(tf.gather(self.table, ids), axis=[1, 2])}

m = Chain() if sys.argv[2] == 'chain' else Embedding()
tf.saved_model.save(m, sys.argv[1], signatures={'serving_default': m.__call__})
'''

LOAD = r'''
import json, os, sys
os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'
mode, path, key = sys.argv[1:4]
import tensorflow as tf
from tfx_encrypt import runtime

def status(k):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(k + ':'):
        return int(line.split()[1])

x = tf.random.stateless_normal([4, 4096], seed=[1, 2])
tf.matmul(x, tf.ones([4096, 1]))  # the runtime warmed up, in both modes
base = status('VmRSS')
if mode == 'plain':
  m = tf.saved_model.load(path)
else:
  m = runtime.load_model(path, identities=[key], allow_unsigned=True)
y = m.signatures['serving_default'](x=x)['y'].numpy()
print(json.dumps({'base_kib': base, 'peak_kib': status('VmHWM'),
                  'y': [float(v) for v in y]}))
'''


def _run(args, **kwargs):
  r = subprocess.run([sys.executable, '-c'] + args, capture_output=True,
                     text=True, timeout=600,
                     env=dict(os.environ, PYTHONPATH=ROOT), **kwargs)
  assert r.returncode == 0, r.stderr[-4000:]
  return r.stdout


@pytest.mark.parametrize('kind', ['chain', 'embedding'])
def test_load_model_peak_rss_within_1_1x_plain(tmp_path, kind):
  import tfx_encrypt as te  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.keys import local  # pylint: disable=g-import-not-at-top
  model = tmp_path / 'model'
  _run([MAKE, str(model), kind])
  shard = model / 'variables' / 'variables.data-00000-of-00001'
  assert shard.stat().st_size >= 200 * 10**6
  key, pub = local.keygen('x25519', str(tmp_path / 'k'))
  te.encrypt_model(model, tmp_path / 'pkg', recipients=[pub])

  plain = json.loads(_run([LOAD, 'plain', str(model), key]).splitlines()[-1])
  ours = json.loads(
      _run([LOAD, 'load_model', str(tmp_path / 'pkg'), key]).splitlines()[-1])
  assert ours['y'] == plain['y']
  ratio = ours['peak_kib'] / plain['peak_kib']
  own = ((ours['peak_kib'] - ours['base_kib']) /
         (plain['peak_kib'] - plain['base_kib']))
  print(f'peak RSS {ours["peak_kib"] >> 10} vs {plain["peak_kib"] >> 10} MiB '
        f'({ratio:.3f}x); the load\'s own peak {own:.3f}x plain\'s')
  assert ratio <= 1.1, (ours, plain)
  assert own <= 1.1, (ours, plain)
