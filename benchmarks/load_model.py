#!/usr/bin/env python3
"""runtime.load_model against plain TensorFlow: first prediction and peak RSS.

Every figure is a ratio to plain `tf.saved_model.load` of the same
SavedModel, measured in the same round: each round runs every mode once, in
a fresh subprocess each (TensorFlow imported and warmed up before the clock
starts, for every mode alike), in an order that rotates from round to round.
The median and the spread (min-max) of the per-round ratios are reported.

    .venv/bin/python benchmarks/load_model.py            # both models, 5 rounds
    .venv/bin/python benchmarks/load_model.py --models chain --rounds 7

Models (each >= 200 MB of variables, in one data shard):
  keras   a tf_keras functional model as a TFX Trainer exports it
          (model.save(..., save_format='tf')): Embedding(102400 x 512),
          pooling, three Dense layers; 200 MiB of variables
  chain   a tf.Module of four 4096 x 4096 matrices (256 MiB) chained by
          matmuls: a tiny graph, so TensorFlow's own work is almost only the
          restore and there is little graph loading to hide decryption
          behind (the hard case)

Modes:
  plain        tf.saved_model.load(dir) + first prediction (the baseline)
  load_model   runtime.load_model(package) + first prediction (default hash)
  sha256       the same, package made with --hash sha256
  memfd_v2     the second design, kept for the profile: every file, the
               variables shard too, decrypted into memfds, then TensorFlow's
               own restore reads the shard from there (load_model with the
               in-place restore switched off)
  ram_v1       the first design, kept for the profile: iter_decrypted_files
               into TensorFlow's ram:// filesystem, then tf.saved_model.load
  decrypt_only for the profile: verify, unwrap, decrypt and check both
               digests of every file (load_model's threads), into no sink
  memfd_only   the same into load_model's memfds (no TensorFlow load)

Peak RSS is VmHWM of the child (absolute, as TensorFlow's ~0.5 GB runtime is
part of what a user pays) and VmHWM minus VmRSS before the load (the load's
own memory). Writes bench-out/load_model.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ('plain', 'load_model', 'sha256', 'memfd_v2', 'ram_v1',
         'decrypt_only', 'memfd_only')
MODELS = ('keras', 'chain')

_MAKE_KERAS = r'''
import os, sys
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import tensorflow as tf
import tf_keras as keras
out = sys.argv[1]
ids = keras.Input(shape=(16,), dtype='int64', name='ids')
x = keras.layers.Embedding(102400, 512, name='emb')(ids)
x = keras.layers.GlobalAveragePooling1D()(x)
x = keras.layers.Dense(256, activation='relu')(x)
x = keras.layers.Dense(64, activation='relu')(x)
y = keras.layers.Dense(1, activation='sigmoid', name='score')(x)
model = keras.Model(ids, y)
model.compile(optimizer='adam', loss='binary_crossentropy')
model.save(out, save_format='tf')
'''

_MAKE_CHAIN = r'''
import os, sys
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import tensorflow as tf
out, n = sys.argv[1], 4

class Chain(tf.Module):

  def __init__(self):
    super().__init__()
    self.ws = [tf.Variable(
        tf.random.stateless_normal([4096, 4096], seed=[i, 1]) * 0.02,
        name=f'w{i}') for i in range(n)]

  @tf.function(input_signature=[tf.TensorSpec([None, 4096], tf.float32)])
  def __call__(self, x):
    for w in self.ws:
      x = tf.nn.relu(tf.matmul(x, w))
    return {'y': tf.reduce_sum(x, axis=1)}

m = Chain()
tf.saved_model.save(m, out, signatures={'serving_default': m.__call__})
'''

_CHILD = r'''
import json, os, sys, time, uuid, warnings
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
warnings.filterwarnings('ignore')
sys.path.insert(0, sys.argv[1])
mode, path, key, model_kind = sys.argv[2:6]
import tensorflow as tf
from tfx_encrypt import package as package_lib
from tfx_encrypt import runtime

def status(k):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(k + ':'):
        return int(line.split()[1])

phases = {}
def timed(mod, name, label):
  fn = getattr(mod, name)
  def wrapper(*a, **kw):
    t = time.perf_counter()
    try:
      return fn(*a, **kw)
    finally:
      phases[label] = phases.get(label, 0.0) + time.perf_counter() - t
  setattr(mod, name, wrapper)

if model_kind == 'keras':
  inputs = {'ids': tf.reshape(tf.range(128, dtype=tf.int64), [8, 16])}
else:
  inputs = {'x': tf.random.stateless_normal([8, 4096], seed=[1, 2])}
x = tf.random.stateless_normal([8, 4096], seed=[1, 2])
tf.matmul(x, tf.ones([4096, 1]))  # the TF runtime warmed up for every mode
if mode == 'memfd_v2':
  from tfx_encrypt.runtime import _restore
  _restore.plan = lambda *args, **kwargs: None
if mode in ('load_model', 'sha256', 'memfd_v2'):
  from tfx_encrypt.runtime import _restore
  timed(package_lib, '_open_authenticated', 'verify+unwrap')
  timed(package_lib, '_run_parallel', 'decrypt+check')
  timed(tf.saved_model, 'load', 'tf.saved_model.load (graph)')
  timed(tf.train.Checkpoint, 'read', 'TensorFlow restore')
  timed(_restore.Plan, 'allocate', 'allocate variables')
  timed(_restore.Plan, 'restore', 'restore in place')
base = status('VmRSS')
t0 = time.perf_counter()
if mode == 'plain':
  m = tf.saved_model.load(path)
elif mode == 'ram_v1':  # the previous load_model, verbatim in substance
  root = f'ram://tfx-encrypt/{uuid.uuid4().hex}'
  it = package_lib.iter_decrypted_files(path, identities=[key],
                                        allow_unsigned=True)
  while True:
    t = time.perf_counter()
    try:
      relpath, data = next(it)
    except StopIteration:
      break
    t1 = time.perf_counter()
    p = root + '/' + relpath
    tf.io.gfile.makedirs(os.path.dirname(p))
    with tf.io.gfile.GFile(p, 'wb') as f:
      f.write(data)
    del data
    t2 = time.perf_counter()
    phases['decrypt+check to bytes'] = phases.get(
        'decrypt+check to bytes', 0.0) + t1 - t
    phases['GFile write to ram://'] = phases.get(
        'GFile write to ram://', 0.0) + t2 - t1
  t = time.perf_counter()
  m = tf.saved_model.load(root)
  phases['tf.saved_model.load'] = time.perf_counter() - t
  tf.io.gfile.rmtree(root)
elif mode in ('decrypt_only', 'memfd_only'):
  from tfx_encrypt import _fsutil
  from tfx_encrypt.runtime import _memfiles
  src, h, keys, entries, dirs, _ = package_lib._open_authenticated(
      path, [key], [], True)
  with _memfiles.MemoryTree(dirs) as tree:
    def one(i):
      if mode == 'decrypt_only':
        sink = lambda mv: None
      else:
        fd = tree.create(entries[i].path)
        sink = lambda mv: _fsutil.write_all(fd, mv)
      package_lib._decrypt_payload(src, h, keys, i, entries[i], sink)
    package_lib._run_parallel(
        one, sorted(range(len(entries)), key=lambda i: -entries[i].size),
        package_lib.default_workers())
  m = None
else:
  m = runtime.load_model(path, identities=[key], allow_unsigned=True)
t1 = time.perf_counter()
if m is not None:
  out = m.signatures['serving_default'](**inputs)
  y = next(iter(out.values())).numpy()
else:
  y = tf.zeros([1]).numpy()
t2 = time.perf_counter()
phases['first prediction'] = t2 - t1
print(json.dumps({'seconds': t2 - t0, 'load_seconds': t1 - t0,
                  'phases': phases, 'base_kib': base,
                  'peak_kib': status('VmHWM'), 'y0': float(y.ravel()[0])}))
'''


def _median_spread(values):
  return statistics.median(values), min(values), max(values)


def prepare(out, model_kind):
  """The SavedModel, its packages (default hash and sha256) and a key."""
  import tfx_encrypt as te  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.keys import local  # pylint: disable=g-import-not-at-top
  model = os.path.join(out, f'savedmodel-{model_kind}')
  if not os.path.exists(os.path.join(model, 'saved_model.pb')):
    make = _MAKE_KERAS if model_kind == 'keras' else _MAKE_CHAIN
    subprocess.run([sys.executable, '-c', make, model], check=True,
                   capture_output=True)
  keys = os.path.join(out, 'keys')
  os.makedirs(keys, exist_ok=True)
  if not os.path.exists(os.path.join(keys, 'x.pub.pem')):
    local.keygen('x25519', os.path.join(keys, 'x'))
  pub, key = os.path.join(keys, 'x.pub.pem'), os.path.join(keys, 'x.key.pem')
  pkgs = {}
  for mode, kw in (('load_model', {}), ('sha256', {'hash_alg': 'sha256'})):
    p = f'{model}.{mode}.pkg'
    te.encrypt_model(model, p, recipients=[pub], force=True, **kw)
    pkgs[mode] = p
  for mode in ('memfd_v2', 'ram_v1', 'decrypt_only', 'memfd_only'):
    pkgs[mode] = pkgs['load_model']
  pkgs['plain'] = model
  for p in set(pkgs.values()):  # warm page cache for every input alike
    for r, _, files in os.walk(p):
      for f in files:
        with open(os.path.join(r, f), 'rb') as fh:
          while fh.read(8 << 20):
            pass
  return model, pkgs, key


def run_child(mode, path, key, model_kind):
  r = subprocess.run(
      [sys.executable, '-c', _CHILD, ROOT, mode, path, key, model_kind],
      capture_output=True, text=True, check=False)
  if r.returncode != 0:
    raise RuntimeError(f'{mode} failed:\n{r.stderr[-3000:]}')
  return json.loads(r.stdout.strip().splitlines()[-1])


def run(out, model_kind='keras', rounds=5, modes=MODES, log=sys.stderr):
  """Interleaved rounds; returns the result dict (also written as JSON)."""
  model, pkgs, key = prepare(out, model_kind)
  var_bytes = sum(os.path.getsize(os.path.join(model, 'variables', f))
                  for f in os.listdir(os.path.join(model, 'variables')))
  raw = {m: [] for m in modes}
  for r in range(rounds):
    order = list(modes[r % len(modes):]) + list(modes[:r % len(modes)])
    print(f'load_model ({model_kind}) round {r + 1}/{rounds}: '
          f'{", ".join(order)}', file=log)
    for mode in order:
      raw[mode].append(run_child(mode, pkgs[mode], key, model_kind))
  with open('/proc/loadavg') as f:
    load_after = f.read().split()[:3]
  res = {'model': model_kind, 'variables_bytes': var_bytes,
         'rounds': rounds, 'loadavg_after': load_after, 'modes': {}}
  plain = raw['plain']
  for mode in modes:
    runs = raw[mode]
    t_ratio = [a['seconds'] / b['seconds'] for a, b in zip(runs, plain)]
    m_ratio = [a['peak_kib'] / b['peak_kib'] for a, b in zip(runs, plain)]
    d_ratio = [(a['peak_kib'] - a['base_kib']) / (b['peak_kib'] - b['base_kib'])
               for a, b in zip(runs, plain)]
    phases = {}
    for k in runs[0]['phases']:
      phases[k] = statistics.median(x['phases'].get(k, 0.0) for x in runs)
    res['modes'][mode] = {
        'seconds': _median_spread([x['seconds'] for x in runs]),
        'time_ratio': _median_spread(t_ratio),
        'peak_mib': _median_spread([x['peak_kib'] / 1024 for x in runs]),
        'peak_ratio': _median_spread(m_ratio),
        'load_peak_mib': _median_spread(
            [(x['peak_kib'] - x['base_kib']) / 1024 for x in runs]),
        'load_peak_ratio': _median_spread(d_ratio),
        'phases_median': phases,
        'raw': runs,
    }
  with open(os.path.join(out, f'load_model-{model_kind}.json'), 'w') as f:
    json.dump(res, f, indent=2)
  return res


def table(res) -> str:
  lines = [
      f'SavedModel `{res["model"]}`: {res["variables_bytes"] / (1 << 20):.0f} '
      f'MiB of variables in one shard; {res["rounds"]} interleaved rounds, one '
      f'subprocess per '
      f'run; ratios per round to plain, median [min-max]; load average after: '
      f'{" ".join(res["loadavg_after"])}.', '',
      '| mode | to first prediction, s | × plain | peak RSS, MiB | × plain '
      '| load\'s own peak, MiB | × plain |',
      '|---|---:|---:|---:|---:|---:|---:|']
  for mode, v in res['modes'].items():
    s, t, p, pr, lp, lr = (v['seconds'], v['time_ratio'], v['peak_mib'],
                           v['peak_ratio'], v['load_peak_mib'],
                           v['load_peak_ratio'])
    lines.append(
        f'| {mode} | {s[0]:.3f} | **{t[0]:.2f}** [{t[1]:.2f}–{t[2]:.2f}] | '
        f'{p[0]:.0f} | **{pr[0]:.3f}** [{pr[1]:.3f}–{pr[2]:.3f}] | '
        f'{lp[0]:.0f} | {lr[0]:.2f} [{lr[1]:.2f}–{lr[2]:.2f}] |')
  lines += ['', 'Where the time goes (median seconds per phase):', '']
  for mode, v in res['modes'].items():
    if v['phases_median']:
      lines.append(f'* {mode}: ' + ', '.join(
          f'{k} {s:.3f}' for k, s in v['phases_median'].items()))
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--models', default=','.join(MODELS))
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--modes', default=','.join(MODES))
  ap.add_argument('--out', default=os.path.join(ROOT, 'bench-out'))
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  modes = tuple(m for m in args.modes.split(',') if m)
  if 'plain' not in modes:
    modes = ('plain',) + modes
  for kind in filter(None, args.models.split(',')):
    res = run(os.path.abspath(args.out), kind, args.rounds, modes)
    print(table(res) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
