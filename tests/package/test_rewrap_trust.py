"""rewrap and rotate verify before they sign: no signature laundering.

A package signed by a key that is not trusted, or not signed at all, must
never come out of `rewrap --sign-with` / `rotate --sign-with` carrying the
publisher's signature. Refusals happen before any key call (no identity
unwrap, no KMS request) and leave the package byte-for-byte unchanged.
"""

import hashlib
import logging
import os
import subprocess
import sys

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt.keys import local
from tests import _util

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = {'saved_model.pb': 700, 'variables/variables.index': 50,
         'variables/variables.data-00000-of-00001': 70_000}


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  return _util.make_tree(tmp_path_factory.mktemp('model') / 'm', MODEL)


def _make(tmp_path, keys, model, signer, bundle, name='p'):
  path = tmp_path / (name + '.tfxe' if bundle else name)
  te.encrypt_model(model, path, recipients=[keys.pub('x')],
                   signer=keys.priv(signer) if signer else None, bundle=bundle)
  return path


def _digest(path):
  """SHA-256 over a bundle, or over every name and byte of a directory."""
  h = hashlib.sha256()
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      h.update(f.read())
    return h.hexdigest()
  for d, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      p = os.path.join(d, name)
      h.update(os.path.relpath(p, path).encode() + b'\0')
      with open(p, 'rb') as f:
        h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


class Unchanged:
  """Asserts a package and its parent directory are exactly as before."""

  def __init__(self, pkg):
    self.pkg = pkg
    self.parent = os.path.dirname(pkg)
    self.digest = _digest(pkg)
    self.names = sorted(os.listdir(self.parent))

  def check(self):
    assert _digest(self.pkg) == self.digest
    # No output (rotate), no temporary sibling, no lock file.
    assert sorted(os.listdir(self.parent)) == self.names


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
                        capture_output=True, text=True, env=env, check=False)


def _cli_fails(code, match, *args):
  r = _cli(*args)
  assert r.returncode == code, (r.returncode, r.stderr)
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error: '), lines
  assert match in lines[0], lines[0]
  return lines[0]


FORMS = pytest.mark.parametrize('bundle', [False, True],
                                ids=['directory', 'bundle'])


# --- Python API ---------------------------------------------------------------

@FORMS
def test_api_refuses_untrusted_signer(tmp_path, keys, model, bundle):
  pkg = _make(tmp_path, keys, model, 'evil', bundle)
  same = Unchanged(pkg)
  for kw in ({'trusted': [keys.pub('ed')]},
             {'allow_unsigned': True},  # signed, so allow_unsigned is moot
             {'trusted': [keys.pub('ed')], 'allow_unsigned': True,
              'resign_unsigned': True}):
    ident = _util.CountingKey(keys.priv('x'))
    with pytest.raises(errors.UntrustedSignerError):
      te.rewrap_package(pkg, identities=[ident], add_recipients=[keys.pub('x2')],
                        signer=keys.priv('ed'), **kw)
    with pytest.raises(errors.UntrustedSignerError):
      te.rotate_package(pkg, tmp_path / 'rotated', identities=[ident],
                        recipients=[keys.pub('x2')], signer=keys.priv('ed'),
                        **kw)
    assert ident.calls == 0  # refused before any key call
    same.check()


@FORMS
def test_api_refuses_to_sign_an_unsigned_package(tmp_path, keys, model, bundle):
  pkg = _make(tmp_path, keys, model, None, bundle)
  same = Unchanged(pkg)
  ident = _util.CountingKey(keys.priv('x'))
  with pytest.raises(errors.UsageError, match='resign-unsigned'):
    te.rewrap_package(pkg, identities=[ident], add_recipients=[keys.pub('x2')],
                      signer=keys.priv('ed'), allow_unsigned=True)
  with pytest.raises(errors.UsageError, match='resign-unsigned'):
    te.rotate_package(pkg, tmp_path / 'rotated', identities=[ident],
                      recipients=[keys.pub('x2')], signer=keys.priv('ed'),
                      allow_unsigned=True)
  # Trusting someone does not make an unsigned package signed either.
  with pytest.raises(errors.UntrustedSignerError, match='not signed'):
    te.rewrap_package(pkg, identities=[ident], add_recipients=[keys.pub('x2')],
                      signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert ident.calls == 0
  same.check()


def test_api_fails_closed_by_default(tmp_path, keys, model):
  pkg = _make(tmp_path, keys, model, None, False)
  same = Unchanged(pkg)
  ident = _util.CountingKey(keys.priv('x'))
  with pytest.raises(errors.UsageError, match='say whom you trust'):
    te.rewrap_package(pkg, identities=[ident], add_recipients=[keys.pub('x2')])
  with pytest.raises(errors.UsageError, match='say whom you trust'):
    te.rotate_package(pkg, tmp_path / 'rotated', identities=[ident],
                      recipients=[keys.pub('x2')])
  assert ident.calls == 0
  same.check()


def _defaults(fn):
  """{parameter: default AST node or None} of an ast.FunctionDef."""
  a = fn.args
  pos = a.posonlyargs + a.args
  out = {x.arg: None for x in pos + a.kwonlyargs}
  for x, d in zip(pos[len(pos) - len(a.defaults):], a.defaults):
    out[x.arg] = d
  for x, d in zip(a.kwonlyargs, a.kw_defaults):
    out[x.arg] = d
  return out


def test_every_public_function_fails_closed_by_default():
  """allow_unsigned / resign_unsigned default to False everywhere in the API
  (read from the source, so TensorFlow and oras need not be imported)."""
  import ast
  import pathlib
  checked = set()
  for path in sorted(pathlib.Path(ROOT, 'tfx_encrypt').rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      if node.name.startswith('_'):
        continue
      for name, default in _defaults(node).items():
        if name in ('allow_unsigned', 'resign_unsigned') and default:
          where = f'{path.name}:{node.name}({name})'
          assert isinstance(default, ast.Constant), where
          assert default.value is False, where
          checked.add(f'{path.name}:{node.name}')
  for want in ('operations.py:rewrap_package', 'operations.py:rotate_package',
               'operations.py:decrypt_model', 'operations.py:verify_package',
               'operations.py:iter_decrypted_files', '__init__.py:load_model',
               'serving.py:sync_serving', 'oci.py:pull_package'):
    assert want in checked, (want, sorted(checked))


@FORMS
def test_api_resign_unsigned_logs_a_warning(tmp_path, keys, model, bundle,
                                            caplog):
  pkg = _make(tmp_path, keys, model, None, bundle)
  caplog.set_level(logging.WARNING, logger='tfx_encrypt.package')
  info = te.rewrap_package(pkg, identities=[keys.priv('x')],
                           add_recipients=[keys.pub('x2')],
                           signer=keys.priv('ed'), allow_unsigned=True,
                           resign_unsigned=True)
  assert info.signer and info.signature_verified
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert warnings[0].getMessage().startswith(
      're-signing an UNSIGNED package with ')
  assert info.signer in warnings[0].getMessage()
  te.verify_package(pkg, trusted=[keys.pub('ed')])
  caplog.clear()
  rotated = te.rotate_package(
      pkg, tmp_path / 'rotated', identities=[keys.priv('x2')],
      recipients=[keys.pub('rsa')], trusted=[keys.pub('ed')],
      signer=keys.priv('ec'))  # trusted and signed now: no warning
  assert rotated.signature_verified
  assert not [r for r in caplog.records if r.levelno == logging.WARNING]
  unsigned = _make(tmp_path, keys, model, None, bundle, name='u')
  info = te.rotate_package(unsigned, tmp_path / 'u2',
                           identities=[keys.priv('x')],
                           recipients=[keys.pub('x2')], signer=keys.priv('ed'),
                           allow_unsigned=True, resign_unsigned=True)
  assert info.signature_verified
  assert any(r.getMessage().startswith('re-signing an UNSIGNED package with ')
             for r in caplog.records)


def test_api_unsigned_stays_unsigned_without_signer(tmp_path, keys, model):
  pkg = _make(tmp_path, keys, model, None, False)
  info = te.rewrap_package(pkg, identities=[keys.priv('x')],
                           add_recipients=[keys.pub('x2')], allow_unsigned=True)
  assert info.signer is None
  te.decrypt_model(pkg, tmp_path / 'o', identities=[keys.priv('x2')],
                   allow_unsigned=True)
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)


@FORMS
def test_api_trusted_signed_package_rewraps(tmp_path, keys, model, bundle):
  pkg = _make(tmp_path, keys, model, 'ed', bundle)
  ident = _util.CountingKey(keys.priv('x'))
  info = te.rewrap_package(pkg, identities=[ident],
                           add_recipients=[keys.pub('x2')],
                           remove_recipients=[keys.pub('x')],
                           signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert ident.calls == 1 and info.signature_verified
  te.decrypt_model(pkg, tmp_path / 'o', identities=[keys.priv('x2')],
                   trusted=[keys.pub('ed')])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)


# --- CLI ----------------------------------------------------------------------

@FORMS
def test_cli_refuses_untrusted_signer(tmp_path, keys, model, bundle):
  pkg = _make(tmp_path, keys, model, 'evil', bundle)
  same = Unchanged(pkg)
  rewrap = ['rewrap', pkg, '-i', keys.priv('x'), '--add-recipient',
            keys.pub('x2'), '--sign-with', keys.priv('ed')]
  rotate = ['rotate', pkg, tmp_path / 'rotated', '-i', keys.priv('x'), '-r',
            keys.pub('x2'), '--sign-with', keys.priv('ed')]
  for cmd in (rewrap, rotate):
    _cli_fails(6, 'not among the trusted keys', *cmd, '--trust',
               keys.pub('ed'))
    # --allow-unsigned does not let a signature by an unknown key through.
    _cli_fails(6, 'no trusted key was given', *cmd, '--allow-unsigned')
    _cli_fails(6, 'not among the trusted keys', *cmd, '--trust',
               keys.pub('ed'), '--allow-unsigned', '--resign-unsigned')
    same.check()


@FORMS
def test_cli_refuses_to_sign_an_unsigned_package(tmp_path, keys, model, bundle):
  pkg = _make(tmp_path, keys, model, None, bundle)
  same = Unchanged(pkg)
  _cli_fails(2, '--resign-unsigned', 'rewrap', pkg, '-i', keys.priv('x'),
             '--add-recipient', keys.pub('x2'), '--sign-with', keys.priv('ed'),
             '--allow-unsigned')
  _cli_fails(2, '--resign-unsigned', 'rotate', pkg, tmp_path / 'rotated', '-i',
             keys.priv('x'), '-r', keys.pub('x2'), '--sign-with',
             keys.priv('ed'), '--allow-unsigned')
  _cli_fails(6, 'not signed', 'rewrap', pkg, '-i', keys.priv('x'),
             '--add-recipient', keys.pub('x2'), '--sign-with', keys.priv('ed'),
             '--trust', keys.pub('ed'))
  same.check()


def test_cli_rewrap_needs_a_trust_choice(tmp_path, keys, model):
  pkg = _make(tmp_path, keys, model, 'ed', False)
  same = Unchanged(pkg)
  _cli_fails(2, 'say whom you trust: --trust PUBLISHER_PUBLIC_KEY, or '
             '--allow-unsigned', 'rewrap', pkg, '-i', keys.priv('x'),
             '--add-recipient', keys.pub('x2'), '--sign-with', keys.priv('ed'))
  same.check()


@FORMS
def test_cli_resign_unsigned_warns_once(tmp_path, keys, model, bundle):
  pkg = _make(tmp_path, keys, model, None, bundle)
  signer_id = te.inspect_package(
      _make(tmp_path, keys, model, 'ed', bundle, name='ref')).signer
  r = _cli('rewrap', pkg, '-i', keys.priv('x'), '--add-recipient',
           keys.pub('x2'), '--sign-with', keys.priv('ed'), '--allow-unsigned',
           '--resign-unsigned')
  assert r.returncode == 0, r.stderr
  lines = r.stderr.splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(
      'tfx-encrypt: warning: re-signing an UNSIGNED package with ')
  assert signer_id in lines[0] and keys.priv('ed') in lines[0]
  assert te.verify_package(pkg, trusted=[keys.pub('ed')]).signature_verified
  unsigned = _make(tmp_path, keys, model, None, bundle, name='u')
  r = _cli('rotate', unsigned, tmp_path / 'rotated', '-i', keys.priv('x'),
           '-r', keys.pub('x2'), '--sign-with', keys.priv('ed'),
           '--allow-unsigned', '--resign-unsigned')
  assert r.returncode == 0, r.stderr
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and 're-signing an UNSIGNED package with ' in lines[0]
  te.decrypt_model(tmp_path / 'rotated', tmp_path / 'o',
                   identities=[keys.priv('x2')], trusted=[keys.pub('ed')])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)


@FORMS
def test_cli_trusted_signed_package_rewraps(tmp_path, keys, model, bundle):
  pkg = _make(tmp_path, keys, model, 'ed', bundle)
  r = _cli('rewrap', pkg, '-i', keys.priv('x'), '--add-recipient',
           keys.pub('x2'), '--remove-recipient', keys.pub('x'), '--sign-with',
           keys.priv('ed'), '--trust', keys.pub('ed'))
  assert r.returncode == 0, r.stderr
  assert r.stderr == ''
  te.decrypt_model(pkg, tmp_path / 'o', identities=[keys.priv('x2')],
                   trusted=[keys.pub('ed')])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)


# --- no KMS request for a refused package (moto behind a counting proxy) -----

@pytest.mark.integration
@pytest.mark.usefixtures('fast_retry')
def test_cli_refusals_make_no_kms_request(aws, tmp_path, keys, model):
  kms = aws.create_key()
  signed = tmp_path / 'evil.tfxe'
  te.encrypt_model(model, signed, recipients=[kms], signer=keys.priv('evil'),
                   bundle=True)
  unsigned = tmp_path / 'unsigned'
  te.encrypt_model(model, unsigned, recipients=[kms])
  same = [Unchanged(signed), Unchanged(unsigned)]
  aws.proxy.reset()
  for cmd in (['rewrap', signed, '-i', kms, '--add-recipient', keys.pub('x2')],
              ['rotate', signed, tmp_path / 'r1', '-i', kms, '-r',
               keys.pub('x2')]):
    _cli_fails(6, 'not among the trusted keys', *cmd, '--sign-with',
               keys.priv('ed'), '--trust', keys.pub('ed'))
  for cmd in (['rewrap', unsigned, '-i', kms, '--add-recipient',
               keys.pub('x2')],
              ['rotate', unsigned, tmp_path / 'r2', '-i', kms, '-r',
               keys.pub('x2')]):
    _cli_fails(2, '--resign-unsigned', *cmd, '--sign-with', keys.priv('ed'),
               '--allow-unsigned')
  assert aws.counts() == {}
  for s in same:
    s.check()
  # The same package with a trusted publisher: exactly one Decrypt.
  r = _cli('rewrap', unsigned, '-i', kms, '--add-recipient', keys.pub('x2'),
           '--allow-unsigned')
  assert r.returncode == 0, r.stderr
  assert aws.counts() == {'Decrypt': 1}
