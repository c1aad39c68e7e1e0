"""Benchmark: Beam fan-out (DirectRunner, N worker processes) vs in-process.

Encrypts a synthetic model (one large variables shard plus a few small files)
with `tfx_encrypt.package.encrypt_model` (the single-process path, which uses
a thread pool) and with the BeamEncryptPusher fan-out
(`beam_executor.encrypt_model_with_beam`) on DirectRunner multi-processing,
checks that both packages decrypt to the same bytes, and prints the timings.

    python -m pipelines.beam_benchmark --size-mb 512 --workers 2

Beam timings include starting the worker processes; the "empty model" row
shows that fixed cost, so the difference is the part that scales.
"""

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, Optional, Sequence


def _make_model(root: str, size_mb: int) -> str:
  model = os.path.join(root, 'model')
  os.makedirs(os.path.join(model, 'variables'), exist_ok=True)
  chunk = os.urandom(1 << 20)
  with open(os.path.join(model, 'variables',
                         'variables.data-00000-of-00001'), 'wb') as f:
    for i in range(size_mb):
      f.write(chunk[i % 7:] + chunk[:i % 7])
  for name, n in (('saved_model.pb', 40_000), ('fingerprint.pb', 60),
                  ('variables/variables.index', 900)):
    with open(os.path.join(model, name), 'wb') as f:
      f.write(os.urandom(n))
  return model


def run(workdir: str, size_mb: int = 256, workers: int = 2,
        segment_mb: int = 32) -> Dict[str, Any]:
  """Runs the benchmark under `workdir`; returns timings."""
  # pylint: disable=g-import-not-at-top
  import apache_beam as beam
  from tfx_encrypt import package as package_lib
  from tfx_encrypt.components.encrypt_pusher import beam_executor
  from tfx_encrypt.keys import local as local_keys
  # pylint: enable=g-import-not-at-top

  workdir = os.path.abspath(workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  model = _make_model(workdir, size_mb)
  tiny = os.path.join(workdir, 'tiny')
  os.makedirs(tiny)
  with open(os.path.join(tiny, 'saved_model.pb'), 'wb') as f:
    f.write(b'x')
  identity, recipient = local_keys.keygen('x25519',
                                          os.path.join(workdir, 'r'))
  args = [f'--direct_num_workers={workers}',
          '--direct_running_mode=multi_processing']

  def beam_encrypt(src, out):
    stats = beam_executor.BeamStats()
    t = time.monotonic()
    beam_executor.encrypt_model_with_beam(
        src, out, recipients=[recipient], worker_identity=identity,
        segment_bytes=segment_mb << 20, stats=stats,
        make_pipeline=lambda: beam.Pipeline(argv=args))
    return time.monotonic() - t, stats

  t = time.monotonic()
  package_lib.encrypt_model(model, os.path.join(workdir, 'single'),
                            recipients=[recipient])
  single = time.monotonic() - t
  empty, _ = beam_encrypt(tiny, os.path.join(workdir, 'beam-empty'))
  fanned, stats = beam_encrypt(model, os.path.join(workdir, 'beam'))

  outs = {}
  for name in ('single', 'beam'):
    out = os.path.join(workdir, f'decrypted-{name}')
    info = package_lib.decrypt_model(os.path.join(workdir, name), out,
                                     identities=[identity],
                                     allow_unsigned=True)
    outs[name] = info.fingerprint
  shutil.rmtree(os.path.join(workdir, 'decrypted-single'))
  shutil.rmtree(os.path.join(workdir, 'decrypted-beam'))
  mb = size_mb + 0.1
  return {
      'model_mb': size_mb,
      'cpu_count': os.cpu_count(),
      'single_process_s': round(single, 2),
      'single_process_mb_s': round(mb / single, 1),
      'beam_workers': workers,
      'beam_work_items': stats.work_items,
      'beam_worker_pids': len(stats.worker_pids),
      'beam_s': round(fanned, 2),
      'beam_mb_s': round(mb / fanned, 1),
      'beam_empty_model_s': round(empty, 2),
      'beam_minus_startup_mb_s': round(mb / max(fanned - empty, 1e-3), 1),
      'same_fingerprint': outs['single'] == outs['beam'],
  }


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='bench-out/beam')
  parser.add_argument('--size-mb', type=int, default=256)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--segment-mb', type=int, default=32)
  args = parser.parse_args(argv)
  result = run(args.workdir, args.size_mb, args.workers, args.segment_mb)
  print(json.dumps(result, indent=2))
  shutil.rmtree(args.workdir, ignore_errors=True)
  return 0 if result['same_fingerprint'] else 1


if __name__ == '__main__':
  sys.exit(main())
