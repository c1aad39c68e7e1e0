"""CLI: strict key roles, passphrase-protected keys, `-i -` (keys from stdin).

Everything runs the real CLI in a subprocess (`python -m tfx_encrypt`) on
real keys; the passphrase prompts run on a real pseudo-terminal (`pty`).
"""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tests import _util
from tfx_encrypt import package as package_lib
from tfx_encrypt.keys import local

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PASSPHRASE = 'correct horse battery'


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=ROOT)
  for name in (local.PASSPHRASE_ENV, local.PASSPHRASE_ENV_ENV,
               local.PASSPHRASE_FILE_ENV):
    env.pop(name, None)
  env.update(extra)
  return env


def cli(*args, cwd=None, stdin=subprocess.DEVNULL, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
      capture_output=True, text=True, cwd=cwd, stdin=stdin,
      env=env or _env(), timeout=120)


def ok(r):
  assert r.returncode == 0, r.stderr
  return r


def one_line_error(r, code, *fragments):
  """The run failed with `code` and one line on stderr naming `fragments`."""
  assert r.returncode == code, (r.returncode, r.stderr)
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith('tfx-encrypt: error: '), lines
  for f in fragments:
    assert f in lines[0], (f, lines[0])
  assert 'Traceback' not in r.stderr
  return lines[0]


class Workspace:
  """Keys made with `tfx-encrypt keygen` (relative names, as typed) and a
  signed package, in one directory used as the working directory."""

  def __init__(self, d):
    self.dir = str(d)
    for name, kind in (('ops', 'x25519'), ('other', 'x25519'),
                       ('rel', 'ed25519'), ('ecs', 'ecdsa-p256')):
      ok(cli('keygen', kind, name, cwd=self.dir))
    _util.make_tree(os.path.join(self.dir, 'model'),
                    {'saved_model.pb': 5000, 'variables/v.index': 10})
    ok(cli('encrypt', 'model', 'signed.tfxe', '--bundle', '-r', 'ops.pub.pem',
           '--sign-with', 'rel.key.pem', cwd=self.dir))

  def path(self, name):
    return os.path.join(self.dir, name)

  def run(self, *args, **kwargs):
    return cli(*args, cwd=self.dir, **kwargs)


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
  return Workspace(tmp_path_factory.mktemp('ws'))


# --- roles -------------------------------------------------------------------------

def test_private_key_as_recipient_is_refused(ws):
  one_line_error(
      ws.run('encrypt', 'model', 'p1', '--recipient', 'ops.key.pem'), 2,
      '--recipient ops.key.pem is an X25519 private key',
      'a recipient must be a public key: pass ops.pub.pem '
      '(tfx-encrypt keygen writes both)')
  assert not os.path.lexists(ws.path('p1'))


def test_private_key_as_trust_is_refused(ws):
  one_line_error(
      ws.run('verify', 'signed.tfxe', '--trust', 'rel.key.pem'), 2,
      '--trust rel.key.pem is an Ed25519 private key',
      'a trust anchor must be a public key: pass rel.pub.pem')
  one_line_error(
      ws.run('decrypt', 'signed.tfxe', 'o', '-i', 'ops.key.pem', '--trust',
             'rel.key.pem'), 2, '--trust rel.key.pem')
  assert not os.path.lexists(ws.path('o'))


def test_public_key_as_identity_is_refused(ws):
  one_line_error(
      ws.run('decrypt', 'signed.tfxe', 'o', '--identity', 'ops.pub.pem',
             '--trust', 'rel.pub.pem'), 2,
      '--identity ops.pub.pem is an X25519 public key',
      'an identity must be a private key: pass ops.key.pem')
  assert not os.path.lexists(ws.path('o'))


def test_public_key_as_signer_is_refused(ws):
  one_line_error(
      ws.run('encrypt', 'model', 'p2', '-r', 'ops.pub.pem', '--sign-with',
             'ecs.pub.pem'), 2,
      '--sign-with ecs.pub.pem is an ECDSA P-256 public key',
      'a signer must be a private key: pass ecs.key.pem')
  assert not os.path.lexists(ws.path('p2'))


@pytest.mark.parametrize('args, fragment', [
    (['encrypt', 'model', 'p3', '-r', 'rel.pub.pem'],
     '--recipient rel.pub.pem is an Ed25519 public key, a signing key'),
    (['encrypt', 'model', 'p3', '--key-group', 'ops.pub.pem',
      '--key-group', 'other.key.pem', '--threshold', '2'],
     '--key-group other.key.pem is an X25519 private key'),
    (['verify', 'signed.tfxe', '--trust', 'ops.pub.pem'],
     '--trust ops.pub.pem is an X25519 public key, an encryption key'),
    (['encrypt', 'model', 'p3', '-r', 'ops.pub.pem', '--sign-with',
      'ops.key.pem'], '--sign-with ops.key.pem is an X25519 private key'),
    (['rewrap', 'signed.tfxe', '-i', 'ops.key.pem', '--trust', 'rel.pub.pem',
      '--sign-with', 'rel.key.pem', '--add-recipient', 'other.key.pem'],
     '--add-recipient other.key.pem is an X25519 private key'),
    (['rotate', 'signed.tfxe', 'p3', '-i', 'ops.key.pem', '--trust',
      'rel.pub.pem', '-r', 'other.key.pem'],
     '--recipient other.key.pem'),
    (['rotate', 'signed.tfxe', 'p3', '-i', 'ops.pub.pem', '--trust',
      'rel.pub.pem', '-r', 'other.pub.pem'],
     '--identity ops.pub.pem'),
    (['serve-sync', 'src', 'serving', '-i', 'ops.pub.pem', '--trust',
      'rel.pub.pem', '--once'], '--identity ops.pub.pem'),
    (['serve-sync', 'src', 'serving', '-i', 'ops.key.pem', '--trust',
      'rel.key.pem', '--once'], '--trust rel.key.pem'),
    (['encrypt', 'model', 'p3', '-r', '-'], '--recipient -: only an identity'),
])
def test_every_command_refuses_wrong_roles(ws, args, fragment):
  os.makedirs(ws.path('src'), exist_ok=True)
  before = open(ws.path('signed.tfxe'), 'rb').read()
  one_line_error(ws.run(*args), 2, fragment)
  assert not os.path.lexists(ws.path('p3'))
  assert not os.path.lexists(ws.path('serving'))
  assert open(ws.path('signed.tfxe'), 'rb').read() == before


def test_messages_name_keys_as_typed_next_to_their_ids(ws):
  ops_id = local.LocalKey(ws.path('other.pub.pem')).key_id
  one_line_error(
      ws.run('decrypt', 'signed.tfxe', 'o', '-i', 'other.key.pem', '--trust',
             'rel.pub.pem'), 5,
      f'none of the identities (other.key.pem ({ops_id}))')
  ecs_id = local.LocalKey(ws.path('ecs.pub.pem')).key_id
  one_line_error(
      ws.run('verify', 'signed.tfxe', '--trust', 'ecs.pub.pem'), 6,
      f'not among the trusted keys (ecs.pub.pem ({ecs_id}))')


# --- passphrase-protected keys ---------------------------------------------------------

@pytest.fixture(scope='module')
def pw_file(tmp_path_factory):
  p = tmp_path_factory.mktemp('pw') / 'passphrase.txt'
  p.write_text(PASSPHRASE + '\n')
  return str(p)


def test_keygen_passphrase_file_then_decrypt_via_env_and_file(ws, pw_file):
  r = ok(ws.run('keygen', 'x25519', 'locked', '--passphrase',
                '--passphrase-file', pw_file))
  assert 'passphrase-protected' in r.stdout and PASSPHRASE not in r.stdout
  with open(ws.path('locked.key.pem')) as f:
    assert f.readline().startswith('-----BEGIN ENCRYPTED PRIVATE KEY')
  ok(ws.run('encrypt', 'model', 'locked.tfxe', '--bundle', '-r',
            'locked.pub.pem', '--sign-with', 'rel.key.pem'))
  common = ['decrypt', 'locked.tfxe', '-i', 'locked.key.pem', '--trust',
            'rel.pub.pem']
  ok(ws.run(*common[:2], 'o-env', *common[2:],
            env=_env(TFXE_KEY_PASSPHRASE=PASSPHRASE)))
  ok(ws.run(*common[:2], 'o-file', *common[2:],
            env=_env(TFXE_KEY_PASSPHRASE_FILE=pw_file)))
  ok(ws.run(*common[:2], 'o-indirect', *common[2:],
            env=_env(TFXE_KEY_PASSPHRASE_ENV='VAULT_INJECTED',
                     VAULT_INJECTED=PASSPHRASE)))
  tree = _util.read_tree(ws.path('model'))
  for out in ('o-env', 'o-file', 'o-indirect'):
    assert _util.read_tree(ws.path(out)) == tree


def test_keygen_passphrase_from_env(ws):
  ok(ws.run('keygen', 'ed25519', 'locked-signer', '--passphrase',
            env=_env(TFXE_KEY_PASSPHRASE='s1gner pass')))
  ok(ws.run('encrypt', 'model', 'by-locked.tfxe', '-r', 'ops.pub.pem',
            '--sign-with', 'locked-signer.key.pem',
            env=_env(TFXE_KEY_PASSPHRASE='s1gner pass')))
  ok(ws.run('verify', 'by-locked.tfxe', '--trust', 'locked-signer.pub.pem'))
  one_line_error(
      ws.run('encrypt', 'model', 'by-locked2.tfxe', '-r', 'ops.pub.pem',
             '--sign-with', 'locked-signer.key.pem'), 2,
      "private key 'locked-signer.key.pem' is encrypted and no passphrase is "
      'available', 'TFXE_KEY_PASSPHRASE')


def test_wrong_or_missing_passphrase_is_one_line_exit_2(ws, pw_file):
  if not os.path.exists(ws.path('locked2.key.pem')):
    ok(ws.run('keygen', 'x25519', 'locked2', '--passphrase-file', pw_file))
  ok(ws.run('encrypt', 'model', 'locked2.tfxe', '-r', 'locked2.pub.pem'))
  common = ['decrypt', 'locked2.tfxe', 'o-wrong', '-i', 'locked2.key.pem',
            '--allow-unsigned']
  line = one_line_error(ws.run(*common, env=_env(TFXE_KEY_PASSPHRASE='nope!')),
                        2, 'wrong passphrase', 'TFXE_KEY_PASSPHRASE')
  assert 'nope!' not in line
  one_line_error(ws.run(*common), 2, 'no passphrase is available')
  assert not os.path.lexists(ws.path('o-wrong'))


def test_keygen_passphrase_without_a_terminal_is_refused(ws):
  one_line_error(ws.run('keygen', 'x25519', 'no-tty', '--passphrase'), 2,
                 'no terminal to ask on', '--passphrase-file',
                 'TFXE_KEY_PASSPHRASE')
  assert not os.path.lexists(ws.path('no-tty.key.pem'))
  assert not os.path.lexists(ws.path('no-tty.pub.pem'))


def _run_on_tty(args, answers, cwd, env, timeout=120):
  """Run the CLI on a fresh pseudo-terminal (its controlling tty).

  answers: [(prompt text, line to type)], typed in order once each prompt
  shows. Returns (exit code, everything the terminal showed).
  """
  argv = [sys.executable, '-m', 'tfx_encrypt', *map(str, args)]
  pid, fd = pty.fork()
  if pid == 0:  # child: stdin, stdout and stderr are the pty
    try:
      os.chdir(cwd)
      os.execve(argv[0], argv, env)
    finally:
      os._exit(127)  # pylint: disable=protected-access
  shown, pending = b'', list(answers)
  deadline = time.monotonic() + timeout
  try:
    while True:
      ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
      if not ready:
        raise AssertionError(f'timed out; the terminal showed {shown!r}')
      try:
        chunk = os.read(fd, 4096)
      except OSError:  # EIO: the child closed the terminal
        break
      if not chunk:
        break
      shown += chunk
      while pending and pending[0][0].encode() in shown:
        prompt, answer = pending.pop(0)
        shown = shown.replace(prompt.encode(), b'<' + prompt.encode() + b'>', 1)
        os.write(fd, answer.encode() + b'\r')
  finally:
    _, status = os.waitpid(pid, 0)
    os.close(fd)
  return os.waitstatus_to_exitcode(status), shown.decode(errors='replace')


def test_tty_prompts_for_keygen_and_decrypt(ws):
  secret = 'typed on a tty 42'
  code, shown = _run_on_tty(
      ['keygen', 'x25519', 'tty-key', '--passphrase'],
      [('Passphrase for the new private key', secret),
       ('Repeat for confirmation', secret)], ws.dir, _env())
  assert code == 0, shown
  assert secret not in shown  # hidden input: never echoed
  ok(ws.run('encrypt', 'model', 'tty.tfxe', '-r', 'tty-key.pub.pem'))
  code, shown = _run_on_tty(
      ['decrypt', 'tty.tfxe', 'o-tty', '-i', 'tty-key.key.pem',
       '--allow-unsigned'],
      [("Passphrase for 'tty-key.key.pem'", secret)], ws.dir, _env())
  assert code == 0, shown
  assert secret not in shown and 'decrypted 2 files' in shown
  assert _util.read_tree(ws.path('o-tty')) == _util.read_tree(ws.path('model'))
  # A wrong answer is one line and exit 2.
  code, shown = _run_on_tty(
      ['decrypt', 'tty.tfxe', 'o-tty2', '-i', 'tty-key.key.pem',
       '--allow-unsigned'],
      [("Passphrase for 'tty-key.key.pem'", 'wrong')], ws.dir, _env())
  assert code == 2, shown
  assert 'wrong passphrase' in shown and 'the prompt' in shown
  assert not os.path.lexists(ws.path('o-tty2'))


# --- -i - : the identity piped in on stdin --------------------------------------------

def test_identity_from_stdin(ws):
  with open(ws.path('ops.key.pem'), 'rb') as key:
    ok(ws.run('decrypt', 'signed.tfxe', 'o-stdin', '-i', '-', '--trust',
              'rel.pub.pem', stdin=key))
  assert _util.read_tree(ws.path('o-stdin')) == _util.read_tree(
      ws.path('model'))
  with open(ws.path('ops.key.pem'), 'rb') as key:  # the alias spelling
    ok(ws.run('decrypt', 'signed.tfxe', 'o-stdin2', '--identity-file', '-',
              '--trust', 'rel.pub.pem', stdin=key))


def test_identity_from_stdin_in_messages(ws):
  other_id = local.LocalKey(ws.path('other.pub.pem')).key_id
  with open(ws.path('other.key.pem'), 'rb') as key:
    one_line_error(
        ws.run('decrypt', 'signed.tfxe', 'o', '-i', '-', '--trust',
               'rel.pub.pem', stdin=key), 5,
        f'none of the identities (- (stdin, {other_id}))')
  with open(ws.path('ops.pub.pem'), 'rb') as key:
    one_line_error(
        ws.run('decrypt', 'signed.tfxe', 'o', '-i', '-', '--trust',
               'rel.pub.pem', stdin=key), 2, '--identity - (standard input) '
        'is not a PEM private key')
  one_line_error(
      ws.run('decrypt', 'signed.tfxe', 'o', '-i', '-', '--trust',
             'rel.pub.pem'), 2, 'standard input (-) is empty')
  assert not os.path.lexists(ws.path('o'))


def test_identity_from_stdin_refuses_a_terminal(ws):
  code, shown = _run_on_tty(
      ['decrypt', 'signed.tfxe', 'o', '-i', '-', '--trust', 'rel.pub.pem'],
      [], ws.dir, _env())
  assert code == 2, shown
  lines = shown.strip().splitlines()
  assert len(lines) == 1 and 'is a terminal; pipe the key' in lines[0]


def test_encrypted_identity_from_stdin(ws, pw_file):
  if not os.path.exists(ws.path('locked3.key.pem')):
    ok(ws.run('keygen', 'x25519', 'locked3', '--passphrase-file', pw_file))
  ok(ws.run('encrypt', 'model', 'locked3.tfxe', '-r', 'locked3.pub.pem'))
  with open(ws.path('locked3.key.pem'), 'rb') as key:
    ok(ws.run('decrypt', 'locked3.tfxe', 'o-locked3', '-i', '-',
              '--allow-unsigned', stdin=key,
              env=_env(TFXE_KEY_PASSPHRASE_FILE=pw_file)))


def test_rewrap_and_rotate_with_identity_from_stdin(ws, tmp_path):
  pkg = str(tmp_path / 'p.tfxe')
  ok(cli('encrypt', ws.path('model'), pkg, '--bundle', '-r',
         ws.path('ops.pub.pem'), '--sign-with', ws.path('rel.key.pem')))
  with open(ws.path('ops.key.pem'), 'rb') as key:
    ok(cli('rewrap', pkg, '-i', '-', '--trust', ws.path('rel.pub.pem'),
           '--sign-with', ws.path('rel.key.pem'), '--add-recipient',
           ws.path('other.pub.pem'), stdin=key))
  with open(ws.path('other.key.pem'), 'rb') as key:
    ok(cli('rotate', pkg, tmp_path / 'r.tfxe', '-i', '-', '--trust',
           ws.path('rel.pub.pem'), '-r', ws.path('ops.pub.pem'),
           '--sign-with', ws.path('rel.key.pem'), stdin=key))
  with open(ws.path('ops.key.pem'), 'rb') as key:
    ok(cli('decrypt', tmp_path / 'r.tfxe', tmp_path / 'o', '-i', '-',
           '--trust', ws.path('rel.pub.pem'), stdin=key))
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(ws.path('model'))


def test_serve_sync_with_identity_from_stdin(ws, tmp_path):
  source = tmp_path / 'pushed'
  source.mkdir()
  for version in ('1700000001', '1700000002'):
    package_lib.encrypt_model(ws.path('model'), source / version,
                              recipients=[ws.path('ops.pub.pem')],
                              signer=ws.path('rel.key.pem'))
  with open(ws.path('ops.key.pem'), 'rb') as key:
    r = ok(cli('serve-sync', source, tmp_path / 'serving', '-i', '-',
               '--trust', ws.path('rel.pub.pem'), '--once', stdin=key))
  assert r.stdout.count('installed ') == 2
  assert {'1700000001', '1700000002'} <= set(os.listdir(tmp_path / 'serving'))


def test_serve_sync_interval_keeps_the_stdin_identity(ws, tmp_path):
  """stdin is read once; later syncs still decrypt with the piped key."""
  source, serving_base = tmp_path / 'pushed', tmp_path / 'serving'
  source.mkdir()

  def push(version):
    package_lib.encrypt_model(ws.path('model'), source / version,
                              recipients=[ws.path('ops.pub.pem')],
                              signer=ws.path('rel.key.pem'))

  def wait_for(version):
    deadline = time.monotonic() + 60
    while not (serving_base / version).is_dir():
      assert p.poll() is None, p.communicate()
      assert time.monotonic() < deadline, f'{version} never installed'
      time.sleep(0.05)

  push('1700000001')
  with open(ws.path('ops.key.pem'), 'rb') as key:
    p = subprocess.Popen(
        [sys.executable, '-m', 'tfx_encrypt', 'serve-sync', str(source),
         str(serving_base), '-i', '-', '--trust', ws.path('rel.pub.pem'),
         '--interval', '0.1'], stdin=key, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=_env())
  try:
    wait_for('1700000001')
    push('1700000002')  # decrypted by a later sync, with the same key
    wait_for('1700000002')
  finally:
    p.terminate()
    out, err = p.communicate(timeout=60)
  assert 'installed 1700000002' in out, (out, err)
  assert 'failed' not in out, out
  assert not [line for line in err.splitlines() if 'SIGTERM' not in line], err
