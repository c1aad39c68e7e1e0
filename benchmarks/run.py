#!/usr/bin/env python3
"""Benchmarks: tfx-encrypt against `cp -r`, `tar | age` and the naive pattern.

Every figure is a ratio to a baseline measured in the same run on the same
input (absolute times on shared machines drift). Rounds are interleaved and
the median is reported. Usage:

    make bench                                   # 1 GiB model, 5 rounds
    .venv/bin/python benchmarks/run.py --size-mib 512 --rounds 5
    .venv/bin/python benchmarks/run.py --only cp,encrypt,decrypt

`encrypt` and `decrypt` use the defaults (BLAKE3); `sha256` is the same with
--hash sha256. Each operation's ratio is taken to the `cp -r` of its own
round, and the median and min-max of those ratios are reported.

Writes bench-out/results.json and prints a Markdown table for
docs/BENCHMARKS.md.
"""

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tfx_encrypt as te  # noqa: E402  pylint: disable=g-import-not-at-top
from tfx_encrypt.keys import local  # noqa: E402

MiB = 1 << 20


def make_model(path, size_mib, shards):
  """A SavedModel-shaped directory: graph, index, N variable shards, assets."""
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(os.path.join(path, 'variables'))
  os.makedirs(os.path.join(path, 'assets'))
  shard = size_mib * MiB // shards
  for i in range(shards):
    with open(os.path.join(path, 'variables',
                           f'variables.data-{i:05d}-of-{shards:05d}'), 'wb') as f:
      left = shard
      while left:
        n = min(left, 8 * MiB)
        f.write(os.urandom(n))
        left -= n
  for name, n in (('saved_model.pb', 300_000), ('fingerprint.pb', 60),
                  ('variables/variables.index', 4_000),
                  ('assets/vocab.txt', 50_000)):
    with open(os.path.join(path, name), 'wb') as f:
      f.write(os.urandom(n))


def _default_scratch(size_mib, out):
  try:
    st = os.statvfs('/dev/shm')
    if st.f_bavail * st.f_frsize > 4 * size_mib * MiB:
      return '/dev/shm'
  except OSError:
    pass
  return out


def warm(path):
  for root, _, files in os.walk(path):
    for f in files:
      with open(os.path.join(root, f), 'rb') as fh:
        while fh.read(8 * MiB):
          pass


def rm(*paths):
  for p in paths:
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p)
    elif os.path.lexists(p):
      os.remove(p)


def timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def naive_encrypt(model_dir, public_key_path, output_dir):
  """The founding article's sample, verbatim in substance (the anti-pattern).

  Whole files in memory, one nonce for every file, pickle container. Used
  only as a baseline here; its output is never read back.
  """
  import hashlib  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import padding  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # pylint: disable=g-import-not-at-top
  aes_key = AESGCM.generate_key(bit_length=256)
  aesgcm = AESGCM(aes_key)
  nonce = os.urandom(12)
  with open(public_key_path, 'rb') as f:
    pubkey = serialization.load_pem_public_key(f.read())
  encrypted_files = {}
  for root, _, files in os.walk(model_dir):
    for file in files:
      file_path = os.path.join(root, file)
      with open(file_path, 'rb') as f:
        data = f.read()
      encrypted_data = aesgcm.encrypt(nonce, data, None)
      rel_path = os.path.relpath(file_path, model_dir)
      encrypted_files[rel_path] = {'data': encrypted_data,
                                   'hash': hashlib.sha256(data).hexdigest()}
  encrypted_aes_key = pubkey.encrypt(aes_key, padding.OAEP(
      mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(),
      label=None))
  package = {'nonce': nonce, 'encrypted_key': encrypted_aes_key,
             'files': encrypted_files, 'algorithm': 'AES-256-GCM + RSA-OAEP'}
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, 'encrypted_model.pkg'), 'wb') as f:
    pickle.dump(package, f)


_RSS_CHILD = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
def status(key):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(key + ':'):
        return int(line.split()[1])
def rss():
  return status('VmRSS')
import tfx_encrypt as te
from benchmarks import run as b
kind, a, c, d = sys.argv[2:6]
base = rss()
t = time.perf_counter()
if kind == 'naive':
  b.naive_encrypt(a, c, d)
elif kind == 'encrypt':
  te.encrypt_model(a, d, recipients=[c])
elif kind == 'encrypt_sha256':
  te.encrypt_model(a, d, recipients=[c], hash_alg='sha256')
else:
  te.decrypt_model(a, d, identities=[c], allow_unsigned=True)
dt = time.perf_counter() - t
print(json.dumps({'seconds': dt, 'base_kib': base,
                  'peak_kib': status('VmHWM')}))
'''


def rss_run(kind, a, c, d):
  r = subprocess.run([sys.executable, '-c', _RSS_CHILD, ROOT, kind, a, c, d],
                     capture_output=True, text=True, check=True)
  res = json.loads(r.stdout.strip().splitlines()[-1])
  return res['seconds'], (res['peak_kib'] - res['base_kib']) / 1024


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size-mib', type=int, default=1024)
  ap.add_argument('--shards', type=int, default=4)
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--out', default=os.path.join(ROOT, 'bench-out'),
                  help='where the input model, keys and results.json live')
  ap.add_argument('--scratch', default=None,
                  help='where every operation writes its output (default: '
                  '/dev/shm if it has room, else --out). A tmpfs takes disk '
                  'writeback, which made cp -r swing 0.3-1.3 s, out of the '
                  'measurement: all tools then pay the same page-cache '
                  'copy, and the ratios compare their CPU work.')
  ap.add_argument('--only', default='',
                  help='comma list of: cp,encrypt,decrypt,sha256,naive,age,'
                  'rewrap,rss')
  args = ap.parse_args(argv)
  only = set(filter(None, args.only.split(',')))
  want = lambda k: not only or k in only or k == 'cp'  # noqa: E731

  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  model = os.path.join(out, f'model-{args.size_mib}m-{args.shards}s')
  if not os.path.exists(os.path.join(out, f'.model-{args.size_mib}-{args.shards}')):
    rm(model)
    make_model(model, args.size_mib, args.shards)
    open(os.path.join(out, f'.model-{args.size_mib}-{args.shards}'), 'w').close()
  keys = os.path.join(out, 'keys')
  os.makedirs(keys, exist_ok=True)
  for name, kind in (('x', 'x25519'), ('rsa', 'rsa'), ('x2', 'x25519')):
    if not os.path.exists(os.path.join(keys, f'{name}.pub.pem')):
      local.keygen(kind, os.path.join(keys, name))
  xpub, xkey = os.path.join(keys, 'x.pub.pem'), os.path.join(keys, 'x.key.pem')
  rsapub = os.path.join(keys, 'rsa.pub.pem')
  age = shutil.which('age')
  if age:
    agekey = os.path.join(keys, 'age.key')
    if not os.path.exists(agekey):
      subprocess.run(['age-keygen', '-o', agekey], check=True,
                     capture_output=True)
    agepub = subprocess.run(['age-keygen', '-y', agekey], check=True,
                            capture_output=True, text=True).stdout.strip()

  t = {k: [] for k in ('cp', 'encrypt', 'decrypt', 'encrypt_sha256',
                       'decrypt_sha256', 'naive_encrypt', 'age_encrypt',
                       'age_decrypt', 'rewrap')}
  scratch = args.scratch or _default_scratch(args.size_mib, out)
  scratch = os.path.join(scratch, f'tfxe-bench-{os.getpid()}')
  os.makedirs(scratch, exist_ok=True)
  atexit.register(shutil.rmtree, scratch, True)  # also when a step fails
  p = lambda n: os.path.join(scratch, n)  # noqa: E731
  warm(model)
  for r in range(args.rounds):
    print(f'round {r + 1}/{args.rounds}', file=sys.stderr)
    rm(p('cp'))
    subprocess.run(['sync'], check=False)
    t['cp'].append(timed(lambda: subprocess.run(
        ['cp', '-r', model, p('cp')], check=True)))
    rm(p('cp'))
    if want('encrypt') or want('decrypt') or want('rewrap'):
      rm(p('pkg'), p('dec'))
      subprocess.run(['sync'], check=False)
      t['encrypt'].append(timed(lambda: te.encrypt_model(
          model, p('pkg'), recipients=[xpub])))
      subprocess.run(['sync'], check=False)
      t['decrypt'].append(timed(lambda: te.decrypt_model(
          p('pkg'), p('dec'), identities=[xkey], allow_unsigned=True)))
      rm(p('dec'))
      if want('rewrap'):
        t['rewrap'].append(timed(lambda: te.rewrap_package(
            p('pkg'), identities=[xkey], add_recipients=[rsapub],
            allow_unsigned=True)))
      rm(p('pkg'))
    if want('sha256'):
      subprocess.run(['sync'], check=False)
      t['encrypt_sha256'].append(timed(lambda: te.encrypt_model(
          model, p('pkgb'), recipients=[xpub], hash_alg='sha256')))
      subprocess.run(['sync'], check=False)
      t['decrypt_sha256'].append(timed(lambda: te.decrypt_model(
          p('pkgb'), p('decb'), identities=[xkey], allow_unsigned=True)))
      rm(p('pkgb'), p('decb'))
    if want('naive'):
      subprocess.run(['sync'], check=False)
      t['naive_encrypt'].append(timed(lambda: naive_encrypt(
          model, rsapub, p('naive'))))
      rm(p('naive'))
    if age and want('age'):
      subprocess.run(['sync'], check=False)
      t['age_encrypt'].append(timed(lambda: subprocess.run(
          f'tar -C {model} -cf - . | age -r {agepub} > {p("m.age")}',
          shell=True, check=True)))
      os.makedirs(p('agedec'))
      subprocess.run(['sync'], check=False)
      t['age_decrypt'].append(timed(lambda: subprocess.run(
          f'age -d -i {agekey} {p("m.age")} | tar -C {p("agedec")} -xf -',
          shell=True, check=True)))
      rm(p('m.age'), p('agedec'))

  med = {k: statistics.median(v) for k, v in t.items() if v}
  best = {k: min(v) for k, v in t.items() if v}
  cp = med['cp']
  rows = [(k, v, v / cp) for k, v in med.items()]
  # Each round's time over the cp -r of the same round: median, min, max.
  per_round = {k: [a / b for a, b in zip(v, t['cp'])] for k, v in t.items()
               if v}
  spread = {k: (statistics.median(v), min(v), max(v))
            for k, v in per_round.items()}
  rss = {}
  if want('rss'):
    rm(p('pkg'), p('dec'), p('naive'))
    rss['encrypt'] = rss_run('encrypt', model, xpub, p('pkg'))
    rss['decrypt'] = rss_run('decrypt', p('pkg'), xkey, p('dec'))
    rm(p('pkg'), p('dec'))
    rss['encrypt_sha256'] = rss_run('encrypt_sha256', model, xpub, p('pkg'))
    rss['decrypt_sha256'] = rss_run('decrypt', p('pkg'), xkey, p('dec'))
    rss['naive_encrypt'] = rss_run('naive', model, rsapub, p('naive'))
    rm(p('pkg'), p('dec'), p('naive'))
  result = {
      'size_mib': args.size_mib, 'shards': args.shards, 'rounds': args.rounds,
      'machine': {'cpus': os.cpu_count(), 'python': platform.python_version(),
                  'platform': platform.platform()},
      'scratch': os.path.dirname(scratch),
      'median_seconds': med, 'ratio_to_cp': {k: v / cp for k, v in med.items()},
      'per_round_ratio_to_cp': {k: {'median': m, 'min': lo, 'max': hi}
                                for k, (m, lo, hi) in spread.items()},
      'best_seconds': best,
      'best_ratio_to_cp': {k: v / best['cp'] for k, v in best.items()},
      'all_seconds': t,
      'peak_rss_over_baseline_mib': {k: v[1] for k, v in rss.items()},
  }
  if 'rewrap' in med and 'encrypt' in med:
    result['rewrap_fraction_of_encrypt'] = med['rewrap'] / med['encrypt']
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=2)
  shutil.rmtree(scratch, ignore_errors=True)
  print(f'\nInput: {args.size_mib} MiB SavedModel-shaped directory, '
        f'{args.shards} variable shards, page cache warm; outputs to '
        f'{os.path.dirname(scratch)}; median and best of {args.rounds} '
        f'interleaved rounds; {os.cpu_count()} CPUs.\n')
  with open('/proc/loadavg') as f:
    print(f'Load average at the end: {" ".join(f.read().split()[:3])}.\n')
  print('| operation | median s | × cp -r, per round: median [min–max] | '
        'best s | × cp -r (best) |')
  print('|---|---:|---:|---:|---:|')
  for k, v, ratio in rows:
    m, lo, hi = spread[k]
    print(f'| {k} | {v:.3f} | {m:.2f} [{lo:.2f}–{hi:.2f}] | {best[k]:.3f} | '
          f'{best[k] / best["cp"]:.2f} |')
  if 'rewrap_fraction_of_encrypt' in result:
    print(f'\nrewrap / full encryption: '
          f'{100 * result["rewrap_fraction_of_encrypt"]:.3f} %')
  for k, (secs, mib) in rss.items():
    print(f'peak RSS over baseline, {k}: {mib:.1f} MiB ({secs:.2f} s)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
