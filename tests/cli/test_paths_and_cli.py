"""Encrypt-side path safety, and the CLI contract (exit codes, one-line errors)."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tests import _util

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


def _encrypt_fails(tmp_path, keys, src, match):
  with pytest.raises(errors.UnsafePathError, match=match):
    te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  assert not os.path.exists(tmp_path / 'p')
  assert _util.leftovers(tmp_path, 'p') == []


def test_symlink_to_file_refused(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'a': 10})
  (tmp_path / 'secret').write_text('outside')
  os.symlink(tmp_path / 'secret', tmp_path / 'm' / 'link')
  _encrypt_fails(tmp_path, keys, src, 'symbolic link')


def test_symlink_to_dir_refused(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'a': 10})
  os.makedirs(tmp_path / 'outside')
  os.symlink(tmp_path / 'outside', tmp_path / 'm' / 'dirlink')
  _encrypt_fails(tmp_path, keys, src, 'symbolic link')


def test_fifo_refused(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'a': 10})
  os.mkfifo(tmp_path / 'm' / 'fifo')
  _encrypt_fails(tmp_path, keys, src, 'not a regular file')


def test_socket_refused(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'a': 10})
  s = socket.socket(socket.AF_UNIX)
  try:
    s.bind(str(tmp_path / 'm' / 'sock'))
    _encrypt_fails(tmp_path, keys, src, 'not a regular file')
  finally:
    s.close()


def test_case_collision_refused(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'Model.pb': 1, 'model.pb': 2})
  _encrypt_fails(tmp_path, keys, src, 'same name ignoring case')


def test_non_nfc_name_refused(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'cafe\u0301.txt': 1})
  _encrypt_fails(tmp_path, keys, src, 'NFC')


def test_backslash_name_refused(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'a\\..\\b': 1})
  _encrypt_fails(tmp_path, keys, src, 'backslash')


# --- CLI ----------------------------------------------------------------------

def cli(*args, cwd=None):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
                        capture_output=True, text=True, cwd=cwd, env=env,
                        timeout=120)


def test_cli_keygen_modes_and_contract(tmp_path):
  for kind in ('rsa', 'x25519', 'ed25519', 'ecdsa-p256'):
    r = cli('keygen', kind, tmp_path / kind)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / f'{kind}.key.pem').st_mode) == 0o600
    assert (tmp_path / f'{kind}.pub.pem').read_text().startswith(
        '-----BEGIN PUBLIC KEY-----')
  r = cli('keygen', 'x25519', tmp_path / 'x25519')
  assert r.returncode != 0 and 'already exists' in r.stderr


def test_cli_end_to_end_and_errors(tmp_path):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 100,
                                         'variables/variables.index': 10})
  for name, kind in (('r', 'x25519'), ('s', 'ed25519'), ('o', 'x25519'),
                     ('t', 'ed25519')):
    assert cli('keygen', kind, tmp_path / name).returncode == 0
  r = cli('encrypt', src, tmp_path / 'pkg.tfxe', '--recipient',
          tmp_path / 'r.pub.pem', '--sign-with', tmp_path / 's.key.pem',
          '--context', 'model=taxi', '--context', 'version=3', '--bundle',
          '--cipher', 'chacha20-poly1305')
  assert r.returncode == 0, r.stderr
  r = cli('inspect', tmp_path / 'pkg.tfxe', '--json')
  assert r.returncode == 0, r.stderr
  info = json.loads(r.stdout)
  assert info['context'] == {'model': 'taxi', 'version': '3'}
  assert info['cipher'] == 'chacha20-poly1305' and info['bundle']
  assert info['signer'].startswith('sha256:')
  r = cli('inspect', tmp_path / 'pkg.tfxe')
  assert 'recipients:' in r.stdout and 'x25519-hpke' in r.stdout

  def fails(code, *args, match):
    r = cli(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error: ')
    assert match in lines[0]
    assert 'Traceback' not in r.stderr

  out = tmp_path / 'out'
  fails(2, 'decrypt', tmp_path / 'pkg.tfxe', out, '--identity',
        tmp_path / 'r.key.pem', match='--allow-unsigned')
  fails(5, 'decrypt', tmp_path / 'pkg.tfxe', out, '--identity',
        tmp_path / 'o.key.pem', '--trust', tmp_path / 's.pub.pem',
        match='none of the identities')
  fails(6, 'decrypt', tmp_path / 'pkg.tfxe', out, '--identity',
        tmp_path / 'r.key.pem', '--allow-unsigned', '--trust',
        tmp_path / 't.pub.pem', match='not among the trusted keys')
  fails(3, 'inspect', tmp_path / 'r.pub.pem', match='not a tfx-encrypt package')
  fails(2, 'encrypt', tmp_path / 'nope', tmp_path / 'p2', '--recipient',
        tmp_path / 'r.pub.pem', match='does not exist')
  fails(2, 'encrypt', src, tmp_path / 'p3', '--recipient',
        tmp_path / 'missing.pem', match='does not exist')
  fails(2, 'encrypt', src, tmp_path / 'p4', '--recipient', 'nokms://x',
        match='no key backend')
  assert not out.exists()
  r = cli('decrypt', tmp_path / 'pkg.tfxe', out, '--identity',
          tmp_path / 'r.key.pem', '--trust', tmp_path / 's.pub.pem')
  assert r.returncode == 0, r.stderr
  assert _util.read_tree(out) == _util.read_tree(src)
  fails(2, 'decrypt', tmp_path / 'pkg.tfxe', out, '--identity',
        tmp_path / 'r.key.pem', '--trust', tmp_path / 's.pub.pem',
        match='already exists')
  r = cli('decrypt', tmp_path / 'pkg.tfxe', out, '--identity',
          tmp_path / 'r.key.pem', '--trust', tmp_path / 's.pub.pem', '--force')
  assert r.returncode == 0, r.stderr
  r = cli('verify', tmp_path / 'pkg.tfxe', '--trust', tmp_path / 's.pub.pem')
  assert r.returncode == 0 and r.stdout.startswith('OK'), r.stderr
  # Tamper: exit code 4, one line.
  data = bytearray((tmp_path / 'pkg.tfxe').read_bytes())
  data[-5] ^= 0x40
  (tmp_path / 'bad.tfxe').write_bytes(bytes(data))
  fails(4, 'decrypt', tmp_path / 'bad.tfxe', tmp_path / 'out2', '--identity',
        tmp_path / 'r.key.pem', '--trust', tmp_path / 's.pub.pem',
        match='failed authentication')
  assert not (tmp_path / 'out2').exists()


def test_cli_rewrap_and_rotate(tmp_path):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 100})
  for name, kind in (('a', 'x25519'), ('b', 'rsa'), ('s', 'ed25519')):
    assert cli('keygen', kind, tmp_path / name).returncode == 0
  assert cli('encrypt', src, tmp_path / 'p', '-r', tmp_path / 'a.pub.pem',
             '--sign-with', tmp_path / 's.key.pem').returncode == 0
  r = cli('rewrap', tmp_path / 'p', '-i', tmp_path / 'a.key.pem',
          '--add-recipient', tmp_path / 'b.pub.pem', '--remove-recipient',
          tmp_path / 'a.pub.pem', '--sign-with', tmp_path / 's.key.pem',
          '--trust', tmp_path / 's.pub.pem')
  assert r.returncode == 0, r.stderr
  r = cli('rotate', tmp_path / 'p', tmp_path / 'q', '-i',
          tmp_path / 'b.key.pem', '-r', tmp_path / 'a.pub.pem', '--trust',
          tmp_path / 's.pub.pem', '--sign-with', tmp_path / 's.key.pem')
  assert r.returncode == 0, r.stderr
  r = cli('decrypt', tmp_path / 'q', tmp_path / 'o', '-i',
          tmp_path / 'a.key.pem', '--trust', tmp_path / 's.pub.pem')
  assert r.returncode == 0, r.stderr
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(src)


def test_cli_progress_bar_on_a_terminal(tmp_path):
  """Large models get a progress bar when stderr is a terminal (a pty)."""
  import pty
  src = _util.make_tree(tmp_path / 'm', {'variables/data': 70 << 20,
                                         'saved_model.pb': 100})
  assert cli('keygen', 'x25519', tmp_path / 'k').returncode == 0
  master, slave = pty.openpty()
  env = dict(os.environ, PYTHONPATH=ROOT, COLUMNS='80')
  p = subprocess.Popen(
      [sys.executable, '-m', 'tfx_encrypt', 'encrypt', str(src),
       str(tmp_path / 'p'), '-r', str(tmp_path / 'k.pub.pem')],
      stdout=subprocess.PIPE, stderr=slave, env=env)
  os.close(slave)
  out = b''
  while True:
    try:
      chunk = os.read(master, 4096)
    except OSError:  # EIO: the child closed the pty
      break
    if not chunk:
      break
    out += chunk
  assert p.wait(timeout=120) == 0
  os.close(master)
  assert b'encrypting' in out and b'100%' in out, out[-500:]
  # Not a terminal: no bar.
  r = cli('encrypt', src, tmp_path / 'q', '-r', tmp_path / 'k.pub.pem')
  assert r.returncode == 0 and 'encrypting' not in r.stderr


@pytest.mark.parametrize('args', [
    ['decrypt', 'pkg', 'out'],                     # missing --identity
    ['encrypt', 'a', 'b', '-r', 'k', '--cipher', 'rot13'],  # bad choice
    ['keygen'],                                    # missing argument
    ['nosuch'],                                    # unknown command
])
def test_cli_usage_errors_are_one_line(args):
  r = cli(*args)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith('tfx-encrypt: error: ') and '--help' in lines[0]
  assert r.stdout == ''


def test_cli_help_and_version_exit_zero():
  r = cli('--help')
  assert r.returncode == 0 and 'encrypt' in r.stdout and r.stderr == ''
  r = cli('--version')
  assert r.returncode == 0 and 'tfx-encrypt' in r.stdout
