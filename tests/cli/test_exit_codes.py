"""Every exit code the README promises, produced by a real CLI run.

The codes are parsed from the README's "Every failure is one line on stderr
and a non-zero exit code" paragraph (or a table right below it), so the
README and this file cannot drift: a code listed there without a scenario
here fails, and so does a scenario whose code the README does not list.
Each scenario runs `python -m tfx_encrypt` in a subprocess with real keys
(`tfx-encrypt keygen`), real packages and real servers, and checks the exit
code and that the failure is exactly one `tfx-encrypt: error:` line.
"""

import os
import pathlib
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import _util
from tfx_encrypt import _fsutil

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / 'README.md'
ANCHOR = 'Every failure is one line on stderr and a non-zero exit code'
MiB = 1 << 20

# Codes that have a scenario below but that the README does not list yet.
# For the lead: 129/130/143 (signals) and 141 (closed stdout) are to be added
# to the README's exit-code list; remove each from this set when it is (the
# test below fails while a listed code is still in here).
AWAITING_README = frozenset()


def readme_exit_codes():
  """The exit codes of the README's exit-code paragraph (and table)."""
  text = README.read_text(encoding='utf-8')
  paragraphs = re.split(r'\n[ \t]*\n', text)
  [k] = [i for i, p in enumerate(paragraphs) if ANCHOR in p]
  block = paragraphs[k]
  if k + 1 < len(paragraphs) and paragraphs[k + 1].lstrip().startswith('|'):
    block += '\n' + paragraphs[k + 1]
  prose = ' '.join(l for l in block.splitlines()
                   if not l.lstrip().startswith('|'))
  prose = prose[prose.index(ANCHOR) + len(ANCHOR):]
  codes = set()
  # "...exit code: 2 usage, 3 unsupported format, ... (... exit 1)"
  codes.update(int(c) for c in re.findall(r'(?:^:|[,;]|\bexit)\s+(\d+)\b',
                                          prose))
  # | 141 | stdout closed ... |
  codes.update(int(c) for c in re.findall(r'^\s*\|\s*`?(\d+)`?\s*\|', block,
                                          re.MULTILINE))
  return codes


# --- helpers ------------------------------------------------------------------


def cli(*args, cwd=None, **kwargs):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
                        capture_output=True, text=True, cwd=cwd, env=env,
                        timeout=180, check=False, **kwargs)


def ok(*args):
  r = cli(*args)
  assert r.returncode == 0, r.stderr
  return r


def assert_error(r, code, match=''):
  """Exit `code`, and exactly one `tfx-encrypt: error:` line on stderr."""
  assert r.returncode == code, (r.returncode, r.stderr)
  lines = r.stderr.splitlines()
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith('tfx-encrypt: error: '), lines[0]
  assert match in lines[0]
  return lines[0]


def temp_entries(parent):
  """Hidden temporary siblings (and their lock files) left in `parent`."""
  return [n for n in os.listdir(parent) if _fsutil.TEMP_NAME_RE.match(n)]


class Workspace:
  """Keys from `tfx-encrypt keygen` and packages from `tfx-encrypt encrypt`."""

  def __init__(self, d: pathlib.Path):
    self.d = d
    for name, kind in (('r', 'x25519'), ('o', 'x25519'), ('s', 'ed25519')):
      ok('keygen', kind, d / name)
    self.model = _util.make_tree(d / 'model', {
        'saved_model.pb': 700,
        'variables/variables.index': 300,
        'variables/variables.data-00000-of-00001': 2 * MiB + 12345})
    self.signed = d / 'signed.pkg'
    ok('encrypt', self.model, self.signed, '-r', self.pub('r'),
       '--sign-with', self.key('s'))
    self.unsigned = d / 'unsigned.pkg'
    ok('encrypt', self.model, self.unsigned, '-r', self.pub('r'))

  def pub(self, name):
    return self.d / f'{name}.pub.pem'

  def key(self, name):
    return self.d / f'{name}.key.pem'

  def decrypt_args(self, out):
    return ['decrypt', self.signed, out, '-i', self.key('r'), '--trust',
            self.pub('s')]


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
  return Workspace(tmp_path_factory.mktemp('exit-codes'))


def _free_loopback_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# --- scenarios: one per exit code -----------------------------------------------


def exit_1(ws, tmp_path, request):
  del request  # unused
  # lineage: a real (empty) ML Metadata SQLite store matches nothing.
  store = tmp_path / 'metadata.sqlite'
  code = ('import sys\n'
          'from ml_metadata.metadata_store import metadata_store\n'
          'from ml_metadata.proto import metadata_store_pb2 as pb\n'
          'c = pb.ConnectionConfig()\n'
          'c.sqlite.filename_uri = sys.argv[1]\n'
          'c.sqlite.connection_mode = pb.SqliteMetadataSourceConfig.'
          'READWRITE_OPENCREATE\n'
          'metadata_store.MetadataStore(c)\n')
  subprocess.run([sys.executable, '-c', code, str(store)], check=True,
                 capture_output=True, timeout=120)
  r = cli('lineage', '--mlmd-sqlite', store, '--key-id', 'sha256:' + '0' * 64)
  assert_error(r, 1, 'no EncryptedModel matches')
  assert r.stdout == ''
  # serve-sync --once: a version signed by an untrusted key fails; it is
  # reported once, on stdout, as the other actions are.
  source = tmp_path / 'push'
  source.mkdir()
  ok('encrypt', ws.model, source / '1700000001', '-r', ws.pub('r'),
     '--sign-with', ws.key('s'))
  ok('keygen', 'ed25519', tmp_path / 'evil')
  ok('encrypt', ws.model, source / '1700000002', '-r', ws.pub('r'),
     '--sign-with', tmp_path / 'evil.key.pem')
  r = cli('serve-sync', source, tmp_path / 'serving', '-i', ws.key('r'),
          '--trust', ws.pub('s'), '--once')
  assert r.returncode == 1, r.stderr
  assert r.stderr == ''
  lines = r.stdout.splitlines()
  assert lines[0].startswith('failed 1700000002: UntrustedSignerError: ')
  assert lines[1].startswith('installed 1700000001 into ')


def exit_2(ws, tmp_path, request):
  del request  # unused
  assert_error(cli('encrypt', ws.model, tmp_path / 'p', '--no-such-option'),
               2, '--no-such-option')
  assert_error(cli('decrypt', ws.signed, tmp_path / 'o', '-i', ws.key('r')),
               2, '--allow-unsigned')


def exit_3(ws, tmp_path, request):
  del request  # unused
  assert_error(cli('inspect', ws.pub('r')), 3)
  # A package of a format version this reader does not know.
  newer = tmp_path / 'newer.tfxe'
  ok('encrypt', ws.model, newer, '-r', ws.pub('r'), '--bundle')
  data = bytearray(newer.read_bytes())
  data[7] ^= 0x02  # the version byte
  newer.write_bytes(bytes(data))
  assert_error(cli('inspect', newer), 3)


def exit_4(ws, tmp_path, request):
  del request  # unused
  pkg = tmp_path / 'flipped.tfxe'
  ok('encrypt', ws.model, pkg, '-r', ws.pub('r'), '--sign-with', ws.key('s'),
     '--bundle')
  data = bytearray(pkg.read_bytes())
  data[-1000] ^= 0x01  # inside the last payload
  pkg.write_bytes(bytes(data))
  out = tmp_path / 'o'
  assert_error(cli('decrypt', pkg, out, '-i', ws.key('r'), '--trust',
                   ws.pub('s')), 4)
  assert not out.exists() and temp_entries(tmp_path) == []


def exit_5(ws, tmp_path, request):
  del request  # unused
  out = tmp_path / 'o'
  assert_error(cli('decrypt', ws.signed, out, '-i', ws.key('o'), '--trust',
                   ws.pub('s')), 5)
  assert not out.exists()


def exit_6(ws, tmp_path, request):
  del request  # unused
  out = tmp_path / 'o'
  assert_error(cli('decrypt', ws.unsigned, out, '-i', ws.key('r'), '--trust',
                   ws.pub('s')), 6)
  assert_error(cli('verify', ws.unsigned, '--trust', ws.pub('s')), 6)
  assert not out.exists()


def exit_7(ws, tmp_path, request):
  del request  # unused
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 10})
  (tmp_path / 'secret').write_text('outside the model')
  os.symlink(tmp_path / 'secret', tmp_path / 'm' / 'link')
  out = tmp_path / 'p'
  assert_error(cli('encrypt', src, out, '-r', ws.pub('r')), 7,
               'symbolic link')
  assert not out.exists() and temp_entries(tmp_path) == []


def exit_8(ws, tmp_path, request):
  # A key that moto's real KMS server does not have (NotFoundException).
  aws = request.getfixturevalue('aws')
  aws.create_key()  # the account exists and answers
  missing = ('aws-kms://arn:aws:kms:us-east-1:123456789012:key/'
             '00000000-0000-4000-8000-000000000000')
  out = tmp_path / 'p'
  assert_error(cli('encrypt', ws.model, out, '-r', missing), 8)
  assert not out.exists() and temp_entries(tmp_path) == []


def exit_9(ws, tmp_path, request):
  """EFBIG half way through writing a decrypted file (RLIMIT_FSIZE, with
  SIGXFSZ ignored, as a full disk would fail it). The error names the
  destination the user gave, never the hidden temporary sibling."""
  del request  # unused

  def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, MiB))

  out = tmp_path / 'restored'
  line = assert_error(cli(*ws.decrypt_args(out), preexec_fn=limit_file_size),
                      9, 'File too large')
  big = out / 'variables' / 'variables.data-00000-of-00001'
  assert f'({big})' in line
  assert '.tfxe-' not in line
  assert not out.exists() and temp_entries(tmp_path) == []


def exit_10(ws, tmp_path, request):
  del ws, request  # unused
  bundle = tmp_path / 'b.tfxe'
  port = _free_loopback_port()  # nothing listens there: refused
  ok('keygen', 'x25519', tmp_path / 'k')
  ok('encrypt', _util.make_tree(tmp_path / 'm', {'saved_model.pb': 10}),
     bundle, '-r', tmp_path / 'k.pub.pem', '--bundle')
  assert_error(cli('push', bundle, f'127.0.0.1:{port}/models/m:1',
                   '--insecure'), 10, 'cannot reach registry')
  out = tmp_path / 'pulled.tfxe'
  assert_error(cli('pull', f'127.0.0.1:{port}/models/m:1', out, '--insecure',
                   '--allow-unsigned'), 10, 'cannot reach registry')
  assert not out.exists()


def exit_11(ws, tmp_path, request):
  """The same trusted publisher's package, but not the one the consumer's
  policy asks for: another model, or an older version."""
  del request  # unused
  pkg = tmp_path / 'taxi.pkg'
  ok('encrypt', ws.model, pkg, '-r', ws.pub('r'), '--sign-with', ws.key('s'),
     '--context', 'model=taxi', '--context', 'version=7')
  out = tmp_path / 'o'
  args = ['decrypt', pkg, out, '-i', ws.key('r'), '--trust', ws.pub('s')]
  assert_error(cli(*args, '--require-context', 'model=fraud'), 11,
               "refused by the consumer policy: context key 'model' is "
               "'taxi'; the policy requires 'fraud'")
  assert_error(cli(*args, '--min-version', '8'), 11,
               "context key 'version' is '7'; the policy requires a version "
               '>= 8')
  assert_error(cli('verify', pkg, '--trust', ws.pub('s'), '--min-version',
                   '8'), 11)
  assert not out.exists() and temp_entries(tmp_path) == []


def exit_141(ws, tmp_path, request):
  """stdout's reader goes away (`| head -c1`): quiet, 141, no traceback."""
  del request  # unused
  # inspect --json prints ~75 KB here: more than a pipe buffer holds, so the
  # writer is still writing when the reader goes.
  pkg = tmp_path / 'chatty.pkg'
  context = [f'--context={f"k{i:03d}".ljust(128, "k")}={"v" * 1024}'
             for i in range(64)]  # the most a package may carry
  ok('encrypt', ws.model, pkg, '-r', ws.pub('r'), *context)
  assert len(cli('inspect', '--json', pkg).stdout) > 70_000
  # With PYTHONUNBUFFERED=1, stdout is a TextIOWrapper straight over the
  # file: the kernel's short write (64 KiB, then the reader is gone) is taken
  # as success and the rest silently dropped, so there is no EPIPE to see and
  # the exit status is 0. The default (buffered) stdout retries and gets it.
  for unbuffered, want in (('', {141}), ('1', {0, 141})):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop('PYTHONUNBUFFERED', None)
    if unbuffered:
      env['PYTHONUNBUFFERED'] = unbuffered
    p = subprocess.Popen(
        [sys.executable, '-m', 'tfx_encrypt', 'inspect', '--json', str(pkg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=env)
    assert p.stdout.read(1) == b'{'  # head -c1
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) in want, (unbuffered, err)
    assert err == b'', unbuffered
  # Also when stdout is closed before anything is written, --help included.
  for args in (['inspect', str(pkg)], ['--help'], ['inspect', '--help']):
    r, w = os.pipe()
    os.close(r)
    try:
      proc = subprocess.run(
          [sys.executable, '-m', 'tfx_encrypt', *args], stdout=w,
          stderr=subprocess.PIPE, timeout=120, check=False,
          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
      os.close(w)
    assert (proc.returncode, proc.stderr) == (141, b''), args


@pytest.fixture(scope='module')
def big_model(tmp_path_factory):
  """~300 MB (sparse): big enough to be caught in the middle of encrypt."""
  d = tmp_path_factory.mktemp('big')
  model = _util.make_tree(d / 'm', {'saved_model.pb': 700})
  os.makedirs(d / 'm' / 'variables')
  with open(d / 'm' / 'variables' / 'variables.data-00000-of-00001',
            'wb') as f:
    f.truncate(300 * MiB)
  return model


def _interrupted(signum):

  def scenario(ws, tmp_path, request):
    model = request.getfixturevalue('big_model')
    parent = tmp_path / 'out'
    parent.mkdir()
    out = parent / 'p'
    p = subprocess.Popen(
        [sys.executable, '-m', 'tfx_encrypt', 'encrypt', model, str(out),
         '-r', str(ws.pub('r'))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
      deadline = time.monotonic() + 60
      while time.monotonic() < deadline and p.poll() is None and not [
          n for n in temp_entries(parent) if not n.endswith('.lock')]:
        time.sleep(0.005)
      assert p.poll() is None, 'encrypt ended before it could be interrupted'
      p.send_signal(signum)
      _, err = p.communicate(timeout=120)
    finally:
      if p.poll() is None:
        p.kill()
        p.wait()
    assert_error(subprocess.CompletedProcess(p.args, p.returncode, '', err),
                 128 + signum, signal.Signals(signum).name)
    assert not out.exists()
    assert temp_entries(parent) == []

  return scenario


SCENARIOS = {
    1: exit_1, 2: exit_2, 3: exit_3, 4: exit_4, 5: exit_5, 6: exit_6,
    7: exit_7, 8: exit_8, 9: exit_9, 10: exit_10, 11: exit_11,
    141: exit_141,
    128 + signal.SIGHUP: _interrupted(signal.SIGHUP),    # 129
    128 + signal.SIGINT: _interrupted(signal.SIGINT),    # 130
    128 + signal.SIGTERM: _interrupted(signal.SIGTERM),  # 143
}


# --- tests ----------------------------------------------------------------------


def test_readme_lists_the_exit_codes():
  codes = readme_exit_codes()
  assert set(range(1, 12)) <= codes, codes  # the parser still finds them


def test_every_readme_exit_code_has_a_scenario():
  missing = sorted(readme_exit_codes() - set(SCENARIOS))
  assert missing == [], (
      f'README lists exit codes {missing} that tests/cli/test_exit_codes.py has '
      'no scenario for: add one to SCENARIOS')


def test_every_scenario_exit_code_is_in_the_readme():
  codes = readme_exit_codes()
  listed_but_awaiting = sorted(codes & AWAITING_README)
  assert listed_but_awaiting == [], (
      f'README now lists {listed_but_awaiting}: remove them from '
      'AWAITING_README')
  undocumented = sorted(set(SCENARIOS) - codes - AWAITING_README)
  assert undocumented == [], (
      f'exit codes {undocumented} have a scenario but are not in the README')


@pytest.mark.parametrize('code', sorted(SCENARIOS))
def test_exit_code(code, ws, tmp_path, request):
  SCENARIOS[code](ws, tmp_path, request)
