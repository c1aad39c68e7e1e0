#!/usr/bin/env python3
"""Encrypt to and decrypt from an emulated object store, against its own
plain upload and download of the same bytes.

For each store (`s3://` on moto's standalone server, `gs://` on
gcp-storage-emulator, both started here on loopback, real boto3 and
google-cloud-storage clients), each round runs, in this order and each in a
fresh subprocess (so peak RSS is the operation's own):

  upload     the SDK's own upload of every file of the model
             (boto3 `upload_file`, google-cloud-storage
             `upload_from_filename`: their multipart / resumable paths,
             with their default part / chunk sizes)
  upload_chunked  the same, with the part / chunk size tfx-encrypt's
             streamed writers use to keep the memory bound
             (`storage._aws.S3_WRITE_PART_SIZE` as boto3's
             `multipart_chunksize`, `storage._google.GCS_WRITE_CHUNK_SIZE`
             as the blob's `chunk_size`): the same requests, same memory
  encrypt    `tfx_encrypt.encrypt_model(model, STORE/pkg)` (default settings)
  download   the SDK's own download of every object of the plain upload
             (boto3 `download_file`, `download_to_filename`) into /dev/shm
  decrypt    `tfx_encrypt.decrypt_model(STORE/pkg, /dev/shm/...)`

and reports encrypt / upload, encrypt / upload_chunked and decrypt /
download per round, median and
min-max, plus peak RSS over the child's baseline (VmHWM - VmRSS before the
operation). The model is SavedModel-shaped (benchmarks/run.py's
`make_model`), read once so it sits in the page cache.

    .venv/bin/python benchmarks/object_store.py                 # 1 GiB, 3 rounds
    .venv/bin/python benchmarks/object_store.py --size-mib 256 --rounds 5 --stores s3

Writes bench-out/object_store.json and prints a Markdown table.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import run as bench  # noqa: E402  pylint: disable=g-import-not-at-top

OPS = ('upload', 'upload_chunked', 'encrypt', 'download', 'decrypt')

_CHILD = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
op, src, dst, key = sys.argv[2:6]

def status(k):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(k + ':'):
        return int(line.split()[1])

import tfx_encrypt as te
from tfx_encrypt import storage

def split(uri):
  scheme, rest = uri.split('://', 1)
  bucket, _, prefix = rest.partition('/')
  return scheme, bucket, prefix

def files_of(top):
  for r, _, names in os.walk(top):
    for n in names:
      p = os.path.join(r, n)
      yield p, os.path.relpath(p, top)

if op in ('upload', 'upload_chunked', 'download'):
  scheme = split(src if op == 'download' else dst)[0]
  if scheme == 's3':
    import boto3
    client = boto3.client('s3')
  else:
    from google.cloud import storage as gcs
    client = gcs.Client()
else:  # the SDK imported and its client made before the clock, as above
  remote = src if op == 'decrypt' else dst
  if remote.startswith('s3://'):
    storage._s3()  # pylint: disable=protected-access
  else:
    storage._gcs()  # pylint: disable=protected-access
base = status('VmRSS')
t = time.perf_counter()
if op in ('upload', 'upload_chunked'):
  scheme, bucket, prefix = split(dst)
  cfg, chunk = None, None
  if op == 'upload_chunked':
    from tfx_encrypt.storage import _aws, _google
    from boto3.s3.transfer import TransferConfig
    cfg = TransferConfig(multipart_chunksize=_aws.S3_WRITE_PART_SIZE)
    chunk = _google.GCS_WRITE_CHUNK_SIZE
  for path, rel in files_of(src):
    name = f'{prefix}/{rel}'
    if scheme == 's3':
      client.upload_file(path, bucket, name, Config=cfg)
    else:
      client.bucket(bucket).blob(name, chunk_size=chunk).upload_from_filename(
          path)
elif op == 'download':
  scheme, bucket, prefix = split(src)
  if scheme == 's3':
    pages = client.get_paginator('list_objects_v2').paginate(
        Bucket=bucket, Prefix=prefix + '/')
    names = [o['Key'] for p in pages for o in p.get('Contents', [])]
  else:
    names = [b.name for b in client.list_blobs(bucket, prefix=prefix + '/')]
  for name in names:
    out = os.path.join(dst, name[len(prefix) + 1:])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if scheme == 's3':
      client.download_file(bucket, name, out)
    else:
      client.bucket(bucket).blob(name).download_to_filename(out)
elif op == 'encrypt':
  te.encrypt_model(src, dst, recipients=[key])
else:
  te.decrypt_model(src, dst, identities=[key], allow_unsigned=True)
dt = time.perf_counter() - t
print(json.dumps({'seconds': dt, 'base_kib': base,
                  'peak_kib': status('VmHWM')}))
'''


def child(op, src, dst, key, env):
  r = subprocess.run([sys.executable, '-c', _CHILD, ROOT, op, src, dst, key],
                     capture_output=True, text=True, check=False, env=env)
  if r.returncode != 0:
    raise RuntimeError(f'{op} failed:\n{r.stderr[-3000:]}')
  return json.loads(r.stdout.strip().splitlines()[-1])


def _stores(names):
  # The emulators and their environment are the tests' fixtures
  # (tests/fakes/stores.py): the same servers the suite proves the
  # guarantees against. The GCS emulator runs unpatched here (no races).
  from tests.fakes import stores  # pylint: disable=g-import-not-at-top
  for name in names:
    if name == 's3':
      yield name, stores.S3Store()
    elif name == 'gs':
      yield name, stores.GcsStore(enforce_preconditions=False)
    elif name == 'gs-linear':
      # The same emulator with its resumable append made linear
      # (tests/fakes/gcs_emulator.py, _patch_linear_resumable): as GCS
      # itself, a chunk costs its own bytes, not everything before it.
      yield name, stores.GcsStore(enforce_preconditions=False,
                                  linear_resumable=True)
    else:
      raise SystemExit(f'unknown store {name!r} (s3, gs, gs-linear)')


def _spread(values):
  return statistics.median(values), min(values), max(values)


def run(model, key_pub, key, store_names, rounds, scratch, log=sys.stderr):
  res = {}
  for name, store in _stores(store_names):
    try:
      with store.applied():
        env = dict(os.environ)
        raw = {op: [] for op in OPS}
        for r in range(rounds):
          print(f'{name} round {r + 1}/{rounds}', file=log)
          base = store.new_base()
          dl = os.path.join(scratch, f'dl-{r}')
          dec = os.path.join(scratch, f'dec-{r}')
          try:
            bench.warm(model)
            raw['upload'].append(child('upload', model, f'{base}/plain',
                                       '-', env))
            raw['upload_chunked'].append(child(
                'upload_chunked', model, f'{base}/plain-chunked', '-', env))
            raw['encrypt'].append(child('encrypt', model, f'{base}/pkg',
                                        key_pub, env))
            raw['download'].append(child('download', f'{base}/plain', dl,
                                         '-', env))
            bench.rm(dl)
            raw['decrypt'].append(child('decrypt', f'{base}/pkg', dec, key,
                                        env))
          finally:
            bench.rm(dl, dec)
      secs = {op: [x['seconds'] for x in raw[op]] for op in OPS}
      res[name] = {
          'seconds': {op: _spread(secs[op]) for op in OPS},
          'encrypt_ratio': _spread([a / b for a, b in zip(
              secs['encrypt'], secs['upload'])]),
          'encrypt_chunked_ratio': _spread([a / b for a, b in zip(
              secs['encrypt'], secs['upload_chunked'])]),
          'decrypt_ratio': _spread([a / b for a, b in zip(
              secs['decrypt'], secs['download'])]),
          'peak_mib': {op: _spread([(x['peak_kib'] - x['base_kib']) / 1024
                                    for x in raw[op]]) for op in OPS},
          'raw': raw,
      }
    finally:
      store.close()
  return res


_LABELS = {'gs-linear': '`gs://`, the emulator\'s resumable append made '
                          'linear'}


def table(res, size_mib, rounds) -> str:
  lines = [
      f'{size_mib} MiB model, {rounds} interleaved rounds; ratios per round, '
      'median [min-max]; peak RSS over the child\'s baseline (median).', '',
      '| store | upload s | upload at the writer\'s chunk s | encrypt s '
      '| **encrypt / upload** | encrypt / upload at the same chunk '
      '| download s | decrypt s | **decrypt / download** | peak RSS MiB: '
      'upload, upload at the chunk, encrypt, download, decrypt |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|---|']
  for name, v in res.items():
    s, e, d, m = v['seconds'], v['encrypt_ratio'], v['decrypt_ratio'], \
        v['peak_mib']
    c = v['encrypt_chunked_ratio']
    lines.append(
        f'| {_LABELS.get(name, f"`{name}://`")} | {s["upload"][0]:.2f} | '
        f'{s["upload_chunked"][0]:.2f} | {s["encrypt"][0]:.2f} | '
        f'**{e[0]:.2f}** [{e[1]:.2f}–{e[2]:.2f}] | '
        f'{c[0]:.2f} [{c[1]:.2f}–{c[2]:.2f}] | {s["download"][0]:.2f} | '
        f'{s["decrypt"][0]:.2f} | **{d[0]:.2f}** [{d[1]:.2f}–{d[2]:.2f}] | '
        + ', '.join(f'{m[op][0]:.0f}' for op in OPS) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size-mib', type=int, default=1024)
  ap.add_argument('--shards', type=int, default=4)
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--stores', default='s3,gs,gs-linear')
  ap.add_argument('--out', default=os.path.join(ROOT, 'bench-out'))
  args = ap.parse_args(argv)
  from tfx_encrypt.keys import local  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  model = os.path.join(out, f'model-{args.size_mib}m-{args.shards}s')
  marker = os.path.join(out, f'.model-{args.size_mib}-{args.shards}')
  if not os.path.exists(marker):
    bench.rm(model)
    bench.make_model(model, args.size_mib, args.shards)
    open(marker, 'w').close()
  keys = os.path.join(out, 'keys')
  os.makedirs(keys, exist_ok=True)
  if not os.path.exists(os.path.join(keys, 'x.pub.pem')):
    local.keygen('x25519', os.path.join(keys, 'x'))
  scratch = tempfile.mkdtemp(prefix='tfxe-objbench-',
                             dir=bench._default_scratch(args.size_mib, out))  # pylint: disable=protected-access
  try:
    res = run(model, os.path.join(keys, 'x.pub.pem'),
              os.path.join(keys, 'x.key.pem'),
              [s for s in args.stores.split(',') if s], args.rounds, scratch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  with open(os.path.join(out, 'object_store.json'), 'w') as f:
    json.dump({'size_mib': args.size_mib, 'rounds': args.rounds,
               'stores': res}, f, indent=2)
  print(table(res, args.size_mib, args.rounds))
  return 0


if __name__ == '__main__':
  sys.exit(main())
