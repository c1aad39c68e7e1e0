"""Signals at random points of encrypt, decrypt, rotate and pull (real CLI).

What docs/SECURITY.md promises, checked on real processes:
- SIGINT, SIGTERM or SIGHUP while a command runs: it removes every
  temporary sibling it created and exits 130, 143 or 129 with one line on
  stderr; nothing appears at the output, so no plaintext is left anywhere
  under the output's parent. A signal that arrives after the output was
  published (atomically) lets the command finish: exit 0, output complete.
- SIGKILL cannot be handled: the stale sibling stays, and the next command
  writing into the same directory, or `tfx-encrypt clean`, removes it.

Each trial waits until the command has created its temporary sibling, then
sends the signal after a random delay within the command's measured run
time, so the signal lands anywhere from the first payload to the rename.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests._util import Keys, make_tree
from tfx_encrypt import _fsutil
from tfx_encrypt import package as pkg

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CLI = [sys.executable, '-m', 'tfx_encrypt']
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
TRIALS = 21  # per command: 7 of each signal
KILL_TRIALS = 4  # per command
MODEL_FILES = {
    'saved_model.pb': 3 << 20,
    'variables/variables.data-00000-of-00002': 90 << 20,
    'variables/variables.data-00001-of-00002': 60 << 20,
    'variables/variables.index': 4096,
}


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  base = tmp_path_factory.mktemp('signals')
  (base / 'keys').mkdir()
  keys = Keys(base / 'keys')
  model = make_tree(base / 'model', MODEL_FILES)
  bundle = str(base / 'in' / 'model.tfxe')
  os.makedirs(os.path.dirname(bundle))
  pkg.encrypt_model(model, bundle, recipients=[keys.pub('x')],
                    signer=keys.priv('ed'), bundle=True)
  return base, keys, model, bundle


@pytest.fixture(scope='module')
def small_bundle(world):
  # pull goes through HTTP and oras: a smaller artifact keeps 25 pulls short.
  base, keys, _, _ = world
  model = make_tree(base / 'small-model', {'saved_model.pb': 24 << 20})
  bundle = str(base / 'in' / 'small.tfxe')
  pkg.encrypt_model(model, bundle, recipients=[keys.pub('x')],
                    signer=keys.priv('ed'), bundle=True)
  return bundle


def _temps(parent):
  return [n for n in os.listdir(parent) if _fsutil.is_temp_name(n)]


def _timed_run(args, parent, output):
  """Run once to completion; seconds from its first sibling to its output.

  That is the window in which a signal must undo everything (the time
  after it, interpreter shutdown included, is not interesting here).
  """
  p = subprocess.Popen(CLI + args, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  while not _temps(parent) and p.poll() is None:
    time.sleep(0.0005)
  t0 = time.monotonic()
  while not os.path.lexists(output) and p.poll() is None:
    time.sleep(0.0005)
  window = time.monotonic() - t0
  _, err = p.communicate(timeout=300)
  assert p.returncode == 0, err
  return window


def _signal_trials(args, parent, output, check_output, seed):
  """TRIALS signalled runs; returns how many ended interrupted."""
  rng = random.Random(seed)
  # The median of three runs, so that one run slowed by the (shared)
  # machine does not stretch the window past most commands' commit point.
  runs = []
  for _ in range(3):
    runs.append(_timed_run(args, parent, output))
    _fsutil.remove_tree(output)
  window = sorted(runs)[1]
  interrupted = 0
  for t in range(TRIALS):
    sig = SIGNALS[t % len(SIGNALS)]
    before = sorted(os.listdir(parent))
    p = subprocess.Popen(CLI + args, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    while not _temps(parent) and p.poll() is None:
      time.sleep(0.0005)
    time.sleep(rng.uniform(0, window))
    try:
      p.send_signal(sig)
    except ProcessLookupError:
      pass
    _, err = p.communicate(timeout=300)
    what = f'trial {t} ({signal.Signals(sig).name}): exit {p.returncode}'
    assert _temps(parent) == [], what
    if p.returncode == 0:  # the signal came after the atomic publish
      check_output(output)
      _fsutil.remove_tree(output)
      # (decrypt also leaves nothing else: the xattr marks the tree)
    else:
      assert p.returncode == 128 + sig, f'{what}: {err}'
      lines = err.splitlines()
      assert len(lines) == 1 and lines[0].startswith(
          'tfx-encrypt: error: interrupted by'), f'{what}: {err}'
      assert not os.path.lexists(output), what
      interrupted += 1
    assert sorted(os.listdir(parent)) == before, what
  return interrupted


def _kill_trials(args, parent, output, check_output, seed,
                 no_plaintext_when_killed=False):
  """SIGKILL mid-run; the next command or `clean` sweeps the leftovers."""
  rng = random.Random(seed)
  stale_seen = 0
  for t in range(KILL_TRIALS):
    p = subprocess.Popen(CLI + args, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    while not _temps(parent) and p.poll() is None:
      time.sleep(0.0005)
    time.sleep(rng.uniform(0, 0.05))
    try:
      p.kill()
    except ProcessLookupError:
      pass
    p.communicate(timeout=300)
    stale = _temps(parent)
    if p.returncode == 0 or (not stale and os.path.lexists(output)):
      # It finished (or was killed after its atomic rename): complete.
      check_output(output)
      _fsutil.remove_tree(output)
      continue
    assert stale, f'kill trial {t}: SIGKILL left no sibling to sweep?'
    if no_plaintext_when_killed:
      # decrypt writes unlinked files (O_TMPFILE) and names them only at
      # the end: a killed decrypt leaves directories, never plaintext.
      for name in stale:
        for _, _, files in os.walk(os.path.join(parent, name)):
          assert files == [], f'kill trial {t}: plaintext left in {name}'
    stale_seen += 1
    if t % 2:
      r = subprocess.run(CLI + ['clean', parent], capture_output=True,
                         text=True, timeout=60)
      assert r.returncode == 0, r.stderr
      assert r.stdout.count('removed ') >= 1
      assert _temps(parent) == []
    else:  # the next command writing there sweeps first
      r = subprocess.run(CLI + args, capture_output=True, text=True,
                         timeout=300)
      assert r.returncode == 0, r.stderr
      assert _temps(parent) == []
      check_output(output)
      _fsutil.remove_tree(output)
  assert stale_seen >= KILL_TRIALS // 2


def _check_decrypted(model):
  def check(out):
    for rel, size in MODEL_FILES.items():
      assert os.path.getsize(os.path.join(out, *rel.split('/'))) == size
  return check


def _check_package(keys):
  def check(out):
    info = pkg.verify_package(out, trusted=[keys.pub('ed')])
    assert info.signature_verified and info.file_count >= 1
  return check


def _run_command(world, tmp_path, name, args_for, check):
  parent = str(tmp_path / 'parent')
  os.mkdir(parent)
  out_name = {'encrypt': 'pkg', 'decrypt': 'out', 'rotate': 'new.tfxe',
              'pull': 'pulled.tfxe'}[name]
  output = os.path.join(parent, out_name)
  args = args_for(output)
  interrupted = _signal_trials(args, parent, output, check, seed=name)
  # Most signals land before the publish; a run of bad luck is not likely.
  assert interrupted >= TRIALS // 3, f'only {interrupted} runs interrupted'
  _kill_trials(args, parent, output, check, seed=name + '-kill',
               no_plaintext_when_killed=name == 'decrypt')


def test_encrypt_signals(world, tmp_path):
  _, keys, model, _ = world
  _run_command(
      world, tmp_path, 'encrypt',
      lambda out: ['encrypt', model, out, '-r', keys.pub('x'),
                   '--sign-with', keys.priv('ed')],
      _check_package(keys))


def test_decrypt_signals(world, tmp_path):
  _, keys, model, bundle = world
  _run_command(
      world, tmp_path, 'decrypt',
      lambda out: ['decrypt', bundle, out, '-i', keys.priv('x'),
                   '--trust', keys.pub('ed')],
      _check_decrypted(model))


def test_rotate_signals(world, tmp_path):
  _, keys, _, bundle = world
  _run_command(
      world, tmp_path, 'rotate',
      lambda out: ['rotate', bundle, out, '-i', keys.priv('x'),
                   '-r', keys.pub('x2'), '--trust', keys.pub('ed'),
                   '--sign-with', keys.priv('ed')],
      _check_package(keys))


def test_pull_signals(world, small_bundle, tmp_path):
  from tests.distribution.test_oci import _running_registry  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.distribution import oci  # pylint: disable=g-import-not-at-top
  _, keys, _, _ = world
  bundle = small_bundle
  reg_dir = tmp_path / 'registry'
  reg_dir.mkdir()
  with _running_registry(reg_dir) as registry:
    ref = registry.ref('models/signals:1')
    oci.push_package(bundle, ref, insecure=True)
    _run_command(
        world, tmp_path, 'pull',
        lambda out: ['pull', ref, out, '--trust', keys.pub('ed'),
                     '--insecure'],
        _check_package(keys))
