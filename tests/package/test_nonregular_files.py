"""Only regular files are read from a package (docs/FORMAT.md §2).

The header, a bundle and every payload file are opened with O_NONBLOCK |
O_NOFOLLOW | O_CLOEXEC and checked with fstat before any read: a FIFO, a
device, a socket, a directory or a link is UnsafePathError (exit 7), and a
FIFO never makes a command hang waiting for a writer. Commands run in a
subprocess with a timeout, so a regression fails instead of hanging.
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tests import _util

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 60
UNSAFE = errors.UnsafePathError.exit_code


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def pkg(tmp_path_factory, keys):
  d = tmp_path_factory.mktemp('pkg')
  src = _util.make_tree(d / 'm', {'saved_model.pb': 100, 'variables/v': 5000})
  te.encrypt_model(src, d / 'p', recipients=[keys.pub('x')],
                   signer=keys.priv('ed'))
  return d / 'p'


def cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
                        capture_output=True, text=True, env=env,
                        timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def assert_refused(r, match=None):
  assert r.returncode == UNSAFE, (r.returncode, r.stdout, r.stderr)
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error: '), (
      r.stderr)
  if match:
    assert match in lines[0], lines[0]


def all_commands(path, keys, out):
  """inspect, verify and decrypt of `path`: each must be refused."""
  return [('inspect', path),
          ('verify', path, '--trust', keys.pub('ed')),
          ('decrypt', path, out, '--identity', keys.priv('x'), '--trust',
           keys.pub('ed'))]


def _copy(pkg, dst):
  shutil.copytree(pkg, dst)
  return dst


def test_fifo_header_does_not_hang(tmp_path, pkg, keys):
  p = _copy(pkg, tmp_path / 'p')
  os.unlink(p / 'tfxe.header')
  os.mkfifo(p / 'tfxe.header')
  for args in all_commands(p, keys, tmp_path / 'o'):
    assert_refused(cli(*args), 'is not a regular file')
  assert not os.path.exists(tmp_path / 'o')


def test_fifo_bundle_does_not_hang(tmp_path, keys):
  os.mkfifo(tmp_path / 'p.tfxe')
  for args in all_commands(tmp_path / 'p.tfxe', keys, tmp_path / 'o'):
    assert_refused(cli(*args), 'neither a regular file')


def test_fifo_payload_does_not_hang(tmp_path, pkg, keys):
  p = _copy(pkg, tmp_path / 'p')
  os.unlink(p / 'payload' / '00000000')
  os.mkfifo(p / 'payload' / '00000000')
  for args in all_commands(p, keys, tmp_path / 'o'):
    assert_refused(cli(*args), 'not a regular file')
  assert not os.path.exists(tmp_path / 'o')


@pytest.mark.parametrize('kind', ['dir', 'symlink', 'socket', 'devnull'])
def test_other_non_regular_headers(tmp_path, pkg, keys, kind):
  p = _copy(pkg, tmp_path / 'p')
  h = p / 'tfxe.header'
  real = tmp_path / 'real.header'
  os.rename(h, real)
  s = None
  if kind == 'dir':
    os.mkdir(h)
  elif kind == 'symlink':
    os.symlink(real, h)
  elif kind == 'devnull':
    os.symlink('/dev/null', h)
  else:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(h))
  try:
    for args in all_commands(p, keys, tmp_path / 'o'):
      assert_refused(cli(*args))
  finally:
    if s is not None:
      s.close()


def test_payload_dir_not_a_directory(tmp_path, pkg, keys):
  p = _copy(pkg, tmp_path / 'p')
  shutil.rmtree(p / 'payload')
  (p / 'payload').write_bytes(b'x')
  assert_refused(cli('inspect', p), 'is not a directory')


_RACE = r'''
import os, sys
sys.path.insert(0, {root!r})
from tfx_encrypt import errors, package
src = package._Source({pkg!r})
p = os.path.join({pkg!r}, 'payload', '00000000')
os.unlink(p)
{swap}
try:
  src.open_payload(0)
except errors.TfxEncryptError as e:
  print(type(e).__name__, e)
  sys.exit(0)
print('opened')
sys.exit(1)
'''


@pytest.mark.parametrize('swap,expect', [
    ("os.mkfifo(p)", 'UnsafePathError'),
    ("os.symlink('/dev/zero', p)", 'UnsafePathError'),
    ("open(p, 'wb').write(b'short')", 'TamperedPackageError'),
])
def test_payload_swapped_after_the_check(tmp_path, pkg, swap, expect):
  """open_payload checks again what it opens (fstat of the descriptor)."""
  p = _copy(pkg, tmp_path / 'p')
  r = subprocess.run(
      [sys.executable, '-c', _RACE.format(root=ROOT, pkg=str(p), swap=swap)],
      capture_output=True, text=True, timeout=TIMEOUT)
  assert r.returncode == 0, r.stdout + r.stderr
  assert r.stdout.startswith(expect), r.stdout


def test_regular_package_still_reads(tmp_path, pkg, keys):
  """Control: the same commands on the untouched package succeed."""
  for args in all_commands(pkg, keys, tmp_path / 'o'):
    r = cli(*args)
    assert r.returncode == 0, r.stderr
  bundle = tmp_path / 'p.tfxe'
  te.encrypt_model(_util.make_tree(tmp_path / 'm', {'saved_model.pb': 10}),
                   bundle, recipients=[keys.pub('x')], bundle=True,
                   signer=keys.priv('ed'))
  for args in all_commands(bundle, keys, tmp_path / 'o2'):
    r = cli(*args)
    assert r.returncode == 0, r.stderr
