"""Peak RSS stays independent of model size (issue: <= 64 MiB over baseline
for a 2 GiB model), measured in a fresh subprocess."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r'''
import json, os, sys
import tfx_encrypt as te
from tfx_encrypt.keys import local

work = sys.argv[1]
GiB = 1 << 30
m = os.path.join(work, 'm', 'variables')
os.makedirs(m)
# Sparse files: reading them costs no disk I/O, so the test measures us.
for i in range(2):
  with open(os.path.join(m, f'variables.data-0000{i}-of-00002'), 'wb') as f:
    f.truncate(GiB)
with open(os.path.join(work, 'm', 'saved_model.pb'), 'wb') as f:
  f.write(os.urandom(1000))
pub = local.keygen('x25519', os.path.join(work, 'k'))[1]
priv = os.path.join(work, 'k.key.pem')

def status(key):
  # VmHWM (peak RSS of this process image) is reset by exec, unlike
  # ru_maxrss, which inherits the parent's peak across fork+exec.
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(key + ':'):
        return int(line.split()[1])

def rss_kib():
  return status('VmRSS')

# Warm up code paths (imports, thread pool, buffers) on a tiny model.
os.makedirs(os.path.join(work, 'w'))
with open(os.path.join(work, 'w', 'saved_model.pb'), 'wb') as f:
  f.write(b'x' * 3000000)
te.encrypt_model(os.path.join(work, 'w'), os.path.join(work, 'wp'), recipients=[pub])
te.decrypt_model(os.path.join(work, 'wp'), os.path.join(work, 'wo'),
                 identities=[priv], allow_unsigned=True)
base = rss_kib()
te.encrypt_model(os.path.join(work, 'm'), os.path.join(work, 'p'), recipients=[pub])
after_enc = status('VmHWM')
te.decrypt_model(os.path.join(work, 'p'), os.path.join(work, 'o'),
                 identities=[priv], allow_unsigned=True)
peak = status('VmHWM')
print(json.dumps({'base_kib': base, 'peak_after_encrypt_kib': after_enc,
                  'peak_kib': peak}))
'''


@pytest.mark.slow
def test_peak_rss_independent_of_model_size(tmp_path):
  r = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path)],
                     capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, PYTHONPATH=ROOT))
  assert r.returncode == 0, r.stderr
  res = json.loads(r.stdout.strip().splitlines()[-1])
  delta_mib = (res['peak_kib'] - res['base_kib']) / 1024
  print('peak RSS over baseline: %.1f MiB' % delta_mib, res)
  assert delta_mib <= 64, res
  # The decrypted 2 GiB really was produced.
  out = tmp_path / 'o' / 'variables'
  assert sum(os.path.getsize(out / n) for n in os.listdir(out)) == 2 << 30
