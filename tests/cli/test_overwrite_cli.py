"""The destructive cases of docs/SECURITY.md §1, through the real CLI.

Each case: nothing is deleted or changed (the whole tree under the test
directory is compared, bytes included), one error line, exit 2.
"""

import hashlib
import os
import subprocess
import sys

import pytest

from tests._util import Keys, make_tree
from tfx_encrypt import package as pkg

CLI = [sys.executable, '-m', 'tfx_encrypt']


def _snapshot(root):
  """{relpath: sha256 or 'dir' or 'link->target'} of everything under root."""
  out = {}
  for dirpath, dirs, files in os.walk(root):
    for d in dirs:
      p = os.path.join(dirpath, d)
      out[os.path.relpath(p, root)] = (
          'link->' + os.readlink(p) if os.path.islink(p) else 'dir')
    for f in files:
      p = os.path.join(dirpath, f)
      if os.path.islink(p):
        out[os.path.relpath(p, root)] = 'link->' + os.readlink(p)
      else:
        with open(p, 'rb') as fh:
          out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


@pytest.fixture
def ws(tmp_path, monkeypatch):
  home = tmp_path / 'home'
  work = home / 'work'
  work.mkdir(parents=True)
  monkeypatch.setenv('HOME', str(home))
  (work / 'keys').mkdir()
  keys = Keys(work / 'keys')
  make_tree(work / 'm', {'saved_model.pb': 1000,
                         'variables/variables.data-00000-of-00001': 5000})
  pkg.encrypt_model(str(work / 'm'), str(work / 'x.tfxe'),
                    recipients=[keys.pub('x')], signer=keys.priv('ed'),
                    bundle=True)
  pkg.encrypt_model(str(work / 'm'), str(work / 'pkgdir'),
                    recipients=[keys.pub('x')], signer=keys.priv('ed'))
  (work / 'mine').mkdir()
  (work / 'mine' / 'notes.txt').write_text('precious')
  (work / 'report.pdf').write_bytes(b'%PDF precious')
  os.symlink(work / 'pkgdir', work / 'link-to-pkg')
  return tmp_path, work, keys


def _run(args, cwd):
  return subprocess.run(CLI + [str(a) for a in args], cwd=cwd,
                        capture_output=True, text=True, timeout=120)


def _cases(work, keys):
  dec = ['-i', keys.priv('x'), '--trust', keys.pub('ed')]
  enc = ['-r', keys.pub('x')]
  return {
      'encrypt source onto itself': ['encrypt', 'm', 'm', *enc, '--force'],
      'encrypt into the current directory': ['encrypt', 'm', '.', *enc,
                                             '--force'],
      'encrypt onto a parent of the source': ['encrypt', 'm/variables',
                                              'm', *enc, '--force',
                                              '--any-dir'],
      'encrypt inside the source': ['encrypt', 'm', 'm/pkg', *enc],
      'encrypt onto $HOME': ['encrypt', 'm', str(work.parent), *enc,
                             '--force'],
      'encrypt onto /': ['encrypt', 'm', '/', *enc, '--force'],
      'encrypt onto a user directory': ['encrypt', 'm', 'mine', *enc,
                                        '--force'],
      'encrypt onto a user file': ['encrypt', 'm', 'report.pdf', *enc,
                                   '--bundle', '--force'],
      'encrypt through a symlink': ['encrypt', 'm', 'link-to-pkg', *enc,
                                    '--force'],
      'decrypt into the current directory': ['decrypt', 'x.tfxe', '.', *dec,
                                             '--force'],
      'decrypt onto the package': ['decrypt', 'pkgdir', 'pkgdir', *dec,
                                   '--force'],
      'decrypt onto a user directory': ['decrypt', 'x.tfxe', 'mine', *dec,
                                        '--force'],
      'decrypt onto the source model': ['decrypt', 'x.tfxe', 'm', *dec,
                                        '--force'],
      'decrypt onto the parent': ['decrypt', 'x.tfxe', '..', *dec, '--force'],
      'rotate onto its source': ['rotate', 'x.tfxe', 'x.tfxe', *dec, '-r',
                                 keys.pub('x2'), '--force'],
      'rotate onto a user file': ['rotate', 'x.tfxe', 'report.pdf', *dec,
                                  '-r', keys.pub('x2'), '--force'],
  }


def test_force_never_destroys_what_tfx_encrypt_did_not_make(ws):
  root, work, keys = ws
  for name, args in _cases(work, keys).items():
    before = _snapshot(root)
    r = _run(args, work)
    assert r.returncode == 2, (name, r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error:'), (
        name, r.stderr)
    assert '.tfxe-' not in r.stderr, (name, r.stderr)
    assert _snapshot(root) == before, name


def test_pull_force_never_replaces_a_user_file(ws):
  # The refusal comes before any registry request (none runs here).
  root, work, keys = ws
  before = _snapshot(root)
  r = _run(['pull', '127.0.0.1:9/models/x:1', 'report.pdf', '--trust',
            keys.pub('ed'), '--insecure', '--force'], work)
  assert r.returncode == 2, r.stderr
  assert 'will not replace' in r.stderr and len(r.stderr.splitlines()) == 1
  assert _snapshot(root) == before


def test_force_does_replace_its_own_outputs(ws):
  _, work, keys = ws
  dec = ['-i', keys.priv('x'), '--trust', keys.pub('ed')]
  for args in (
      ['encrypt', 'm', 'pkgdir', '-r', keys.pub('x2'), '--force'],
      ['encrypt', 'm', 'x.tfxe', '-r', keys.pub('x'), '--bundle', '--force',
       '--sign-with', keys.priv('ed')],
      ['decrypt', 'x.tfxe', 'out', *dec],
      ['decrypt', 'x.tfxe', 'out', *dec, '--force'],  # its own tree
      ['rotate', 'x.tfxe', 'pkgdir', *dec, '-r', keys.pub('x'), '--force',
       '--sign-with', keys.priv('ed'), '--directory']):
    r = _run(args, work)
    assert r.returncode == 0, (args, r.stderr)
  assert sorted(os.listdir(work / 'out')) == ['saved_model.pb', 'variables']
  assert not [n for n in os.listdir(work) if '.tfxe-' in n]


def test_keygen_force_replaces_only_pem_key_files(ws):
  root, work, _ = ws
  (work / 'notes.key.pem').write_text('my notes, not a key')
  before = _snapshot(root)
  r = _run(['keygen', 'x25519', 'notes', '--force'], work)
  assert r.returncode == 2 and 'not a PEM key file' in r.stderr, r.stderr
  assert len(r.stderr.splitlines()) == 1
  assert _snapshot(root) == before
  r = _run(['keygen', 'x25519', 'fresh'], work)
  assert r.returncode == 0, r.stderr
  old = (work / 'fresh.key.pem').read_bytes()
  r = _run(['keygen', 'x25519', 'fresh', '--force'], work)
  assert r.returncode == 0, r.stderr
  assert (work / 'fresh.key.pem').read_bytes() != old
  assert not [n for n in os.listdir(work) if '.tfxe-' in n]
