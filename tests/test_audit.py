"""The audit trail (tfx_encrypt/audit.py; docs/SECURITY.md §8).

Real commands (`python -m tfx_encrypt` in subprocesses) with keys made by
`tfx-encrypt keygen`, one of them passphrase-protected, a real registry
(Debian `docker-registry` over TLS with htpasswd, as tests/distribution/test_oci_auth.py
runs it) and a real UDP socket for syslog. Checked: every command emits
exactly one event with the right fields (serve-sync one per action), the
file's hash chain verifies and `audit verify` refuses (exit 4, one line) an
edited, deleted, inserted or reordered event and a cut last line, several
processes appending at once keep one valid chain, and no event of a full
run holds a byte of key material, a passphrase, a PIN, a registry password
or a model file name.
"""

import base64
import hashlib
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives import serialization

from tests import _util
from tests.distribution import test_oci_auth as oci_auth
from tfx_encrypt import audit
from tfx_encrypt import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
MiB = 1 << 20
PASSPHRASE = 'Passphrase-TESTONLY-9c1e'
PIN = 'PIN-TESTONLY-4711'
MODEL_FILES = {'saved_model.pb': 700,
               'variables/variables.index': 300,
               'variables/secret_layer_weights.data-00000-of-00001': 300_000,
               'assets/vocabulary-internal-name.txt': 50}


def _env(log=None, **extra):
  env = {k: v for k, v in os.environ.items()
         if k not in (audit.ENV, 'TFXE_KEY_PASSPHRASE',
                      'TFXE_REGISTRY_PASSWORD')}
  env['PYTHONPATH'] = str(ROOT)
  if log is not None:
    env[audit.ENV] = str(log)
  env.update(extra)
  return env


def cli(*args, log=None, stdin=None, env=None, **kwargs):
  return subprocess.run(
      [sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
      capture_output=True, text=True, input=stdin, timeout=180, check=False,
      env=_env(log) if env is None else env, **kwargs)


def read_events(log):
  with open(log, 'rb') as f:
    return [json.loads(line) for line in f]


def key_id_of(stderr_or_stdout):
  return stderr_or_stdout.split('key id ')[-1].split()[0]


# --- a full run ---------------------------------------------------------------


class Run:
  """Commands run one after the other against one audit log."""

  def __init__(self, d: pathlib.Path):
    self.d = d
    self.log = d / 'audit.jsonl'
    self.steps = []  # (name, [events it added])
    self.secrets = []  # bytes that must appear in no event

  def __call__(self, name, code, *args, stdin=None, extra_env=None,
               expect=1):
    before = len(read_events(self.log)) if self.log.exists() else 0
    env = _env(self.log, **(extra_env or {}))
    r = cli(*args, stdin=stdin, env=env, cwd=self.d)
    assert (r.returncode != 0 if code is None else r.returncode == code), (
        name, r.returncode, r.stderr)
    added = read_events(self.log)[before:]
    assert len(added) == expect, (name, added)
    self.steps.append((name, added))
    return r, (added[0] if expect == 1 else added)


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
  return oci_auth.Pki(tmp_path_factory.mktemp('pki'))


@pytest.fixture(scope='module')
def registry(tmp_path_factory, pki):
  running = oci_auth._registry  # pylint: disable=protected-access
  with running(tmp_path_factory.mktemp('registry'), pki) as r:
    yield r


def _pem_secrets(path, passphrase=None):
  """Every form of a private key file's secret: PEM body lines, the whole
  body, the raw private key (bytes, hex, base64)."""
  data = pathlib.Path(path).read_bytes()
  lines = [l for l in data.splitlines() if l and not l.startswith(b'-----')]
  out = [l for l in lines if len(l) >= 16] + [b''.join(lines)]
  key = serialization.load_pem_private_key(data, password=passphrase)
  try:
    raw = key.private_bytes(serialization.Encoding.Raw,
                            serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
  except ValueError:  # RSA / EC: the DER of the unencrypted key
    raw = key.private_bytes(serialization.Encoding.DER,
                            serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
  out += [raw, raw.hex().encode(), base64.b64encode(raw),
          base64.urlsafe_b64encode(raw).rstrip(b'=')]
  return out


@pytest.fixture(scope='module')
def full_run(tmp_path_factory, registry, pki):
  d = tmp_path_factory.mktemp('audit-run')
  run = Run(d)
  model = _util.make_tree(d / 'model', MODEL_FILES)
  pp = {'TFXE_KEY_PASSPHRASE': PASSPHRASE}

  # Keys.
  r, e = run('keygen', 0, 'keygen', 'x25519', d / 'r')
  run.r_id = key_id_of(r.stdout)
  r, _ = run('keygen', 0, 'keygen', 'x25519', d / 'r2')
  run.r2_id = key_id_of(r.stdout)
  r, _ = run('keygen', 0, 'keygen', 'ed25519', d / 's', '--passphrase',
             extra_env=pp)
  run.s_id = key_id_of(r.stdout)
  assert b'ENCRYPTED' in (d / 's.key.pem').read_bytes()
  run('pubkey', 0, 'pubkey', d / 's.key.pem', extra_env=pp)
  run.secrets += _pem_secrets(d / 'r.key.pem') + _pem_secrets(
      d / 'r2.key.pem') + _pem_secrets(d / 's.key.pem', PASSPHRASE.encode())
  run.secrets += [PASSPHRASE.encode(), PIN.encode(),
                  oci_auth.PASSWORD.encode(), b'argv-password-55']
  run.secrets += [os.path.basename(n).encode() for n in MODEL_FILES
                  if n != 'saved_model.pb']

  # The package verbs.
  pkg = d / 'm.pkg'
  sign = ['--sign-with', d / 's.key.pem']
  trust = ['--trust', d / 's.pub.pem']
  run('encrypt', 0, 'encrypt', model, pkg, '-r', d / 'r.pub.pem', *sign,
      '--context', 'model=taxi', extra_env=pp)
  run('inspect', 0, 'inspect', pkg)
  run('verify', 0, 'verify', pkg, *trust)
  run('decrypt', 0, 'decrypt', pkg, d / 'plain', '-i', d / 'r.key.pem',
      *trust)
  run('decrypt-no-key', 5, 'decrypt', pkg, d / 'x', '-i', d / 'r2.key.pem',
      *trust)
  run('rewrap', 0, 'rewrap', pkg, '-i', d / 'r.key.pem', *trust,
      '--add-recipient', d / 'r2.pub.pem', *sign, extra_env=pp)
  run('rotate', 0, 'rotate', pkg, d / 'm2.tfxe', '-i', d / 'r2.key.pem',
      '-r', d / 'r2.pub.pem', *trust, *sign, '--bundle', extra_env=pp)
  tampered = d / 'tampered.tfxe'
  data = bytearray((d / 'm2.tfxe').read_bytes())
  data[-1000] ^= 1
  tampered.write_bytes(bytes(data))
  run('decrypt-tampered', 4, 'decrypt', tampered, d / 'x', '-i',
      d / 'r2.key.pem', *trust)
  # A PKCS#11 URI with its PIN in it (no token needed to refuse it).
  uri = (f'pkcs11:token=audit;object=k?module-path={d}/no-such-module.so'
         f'&pin-value={PIN}')
  run('decrypt-pkcs11', None, 'decrypt', pkg, d / 'x', '-i', uri, *trust)
  run('encrypt-pkcs11', None, 'encrypt', model, d / 'x.pkg', '-r', uri)

  # Registry: basic auth over TLS, the password on stdin.
  ref = registry.ref('audit/taxi:1')
  auth = ['--ca-file', pki.ca_file, '-u', oci_auth.USER]
  run('push', 0, 'push', d / 'm2.tfxe', ref, *auth, '--password-stdin',
      stdin=oci_auth.PASSWORD + '\n')
  run('pull', 0, 'pull', ref, d / 'pulled.tfxe', '--trust', d / 's.pub.pem',
      *auth, extra_env={'TFXE_REGISTRY_PASSWORD': oci_auth.PASSWORD})
  run('pull-argv-password', 2, 'pull', ref, d / 'x.tfxe', *trust, *auth,
      '--password', 'argv-password-55')

  # serve-sync: one event per action, none for the command as a whole.
  push = d / 'push'
  push.mkdir()
  run('encrypt', 0, 'encrypt', model, push / '1', '-r', d / 'r.pub.pem',
      *sign, extra_env=pp)
  run('encrypt', 0, 'encrypt', model, push / '2', '-r', d / 'r.pub.pem')
  sync = ['serve-sync', push, d / 'serving', '-i', d / 'r.key.pem', *trust,
          '--once']
  run('serve-sync-1', 1, *sync, expect=2)  # 2 failed, 1 installed
  run('encrypt', 0, 'encrypt', model, push / '3', '-r', d / 'r.pub.pem',
      *sign, extra_env=pp)
  run('serve-sync-2', 0, *sync, '--keep', '1', expect=2)  # 3 in, 1 out
  run('serve-sync-usage', 2, 'serve-sync', push, d / 'serving', '-i',
      d / 'r.key.pem', *trust)  # neither --once nor --interval

  # The rest: clean, a click usage error; --help and audit are no events.
  run('clean', 0, 'clean', d)
  run('usage', 2, 'verify', pkg, '--no-such-option')
  run('help', 0, 'encrypt', '--help', expect=0)
  run('audit-verify', 0, 'audit', 'verify', run.log, expect=0)
  run.pkg, run.ref = pkg, ref
  return run


def _step(run, name):
  [events] = [ev for n, ev in run.steps if n == name]
  return events[0] if len(events) == 1 else events


def test_every_command_emits_one_event_with_its_facts(full_run):
  run = full_run
  everything = [e for _, evs in run.steps for e in evs]
  for e in everything:
    assert e['v'] == 1 and e['uid'] == os.geteuid()
    assert e['host'] == socket.gethostname() and e['pid'] > 0
    assert e['time'].endswith('Z') and e['tool'].startswith('tfx-encrypt/')
  assert [e['key_id'] for e in everything if e['action'] == 'keygen'] == [
      run.r_id, run.r2_id, run.s_id]
  assert _step(run, 'pubkey')['key_id'] == run.s_id

  enc = run.steps[4][1][0]
  assert enc['action'] == 'encrypt' and enc['outcome'] == 'ok'
  assert enc['exit_code'] == 0 and enc['error'] is None
  assert enc['package'] == str(run.pkg)
  assert enc['recipients'] == [run.r_id]
  assert enc['signer'] == run.s_id and enc['signer_verified'] is True
  pid = enc['package_id']
  assert len(pid) == 32 and enc['fingerprint'].startswith('sha256:')

  ins = _step(run, 'inspect')
  assert (ins['action'], ins['package_id'], ins['signer']) == (
      'inspect', pid, run.s_id)
  assert ins['signer_verified'] is False  # inspect verifies nothing
  for name in ('verify', 'decrypt'):
    e = _step(run, name)
    assert (e['action'], e['outcome'], e['package_id']) == (name, 'ok', pid)
    assert e['signer_verified'] is True
    assert e['fingerprint'] == enc['fingerprint']

  # Failures: the class, the exit code and what the header says.
  e = _step(run, 'decrypt-no-key')
  assert (e['action'], e['outcome'], e['error'], e['exit_code']) == (
      'decrypt', 'error', 'NoMatchingKeyError', 5)
  assert e['package_id'] == pid and e['signer_verified'] is False
  e = _step(run, 'decrypt-tampered')
  assert (e['error'], e['exit_code']) == ('TamperedPackageError', 4)
  for name in ('decrypt-pkcs11', 'encrypt-pkcs11'):
    e = _step(run, name)
    assert e['outcome'] == 'error' and e['exit_code'] in (2, 5, 8), e

  rw = _step(run, 'rewrap')
  assert rw['package_id'] == pid and rw['recipients'] == [run.r_id, run.r2_id]
  assert rw['source']['recipients'] == [run.r_id]
  assert rw['signer_verified'] is True
  ro = _step(run, 'rotate')
  assert ro['source']['package_id'] == pid and ro['package_id'] != pid
  assert ro['recipients'] == [run.r2_id]
  assert ro['package'] == str(run.d / 'm2.tfxe')

  push, pull = _step(run, 'push'), _step(run, 'pull')
  assert push['ref'] == pull['ref'] == run.ref
  assert push['manifest_digest'] == pull['manifest_digest']
  assert push['manifest_digest'].startswith('sha256:')
  assert push['package_id'] == pull['package_id'] == ro['package_id']
  assert push['signer_verified'] is False and pull['signer_verified'] is True
  e = _step(run, 'pull-argv-password')
  assert (e['action'], e['exit_code'], e['error']) == ('pull', 2, 'UsageError')

  fail, inst = _step(run, 'serve-sync-1')
  assert (fail['action'], fail['outcome'], fail['error'], fail['version']) == (
      'serve-sync.fail', 'error', 'UntrustedSignerError', '2')
  assert (inst['action'], inst['outcome'], inst['version']) == (
      'serve-sync.install', 'ok', '1')
  assert inst['signer'] == run.s_id and inst['signer_verified'] is True
  assert inst['package'] == str(run.d / 'push' / '1')
  inst3, rem1 = _step(run, 'serve-sync-2')
  assert (inst3['action'], inst3['version']) == ('serve-sync.install', '3')
  assert (rem1['action'], rem1['version']) == ('serve-sync.remove', '1')
  assert rem1['package_id'] == inst['package_id']
  e = _step(run, 'serve-sync-usage')
  assert (e['action'], e['error'], e['exit_code']) == (
      'serve-sync', 'UsageError', 2)

  assert _step(run, 'clean')['action'] == 'clean'
  e = _step(run, 'usage')
  assert (e['action'], e['error'], e['exit_code']) == (
      'verify', 'NoSuchOption', 2)


def test_the_full_run_chain_verifies(full_run):
  log = full_run.log
  lines = log.read_bytes().splitlines()
  events = [json.loads(l) for l in lines]
  assert [e['seq'] for e in events] == list(range(1, len(events) + 1))
  assert events[0]['prev'] == audit.GENESIS
  head = hashlib.sha256(lines[-1]).hexdigest()
  r = cli('audit', 'verify', log)
  assert r.returncode == 0, r.stderr
  assert r.stdout == (f'OK: {log}: {len(events)} events, chain intact; head '
                      f'{head}\n')
  # A head kept from earlier still anchors the grown log.
  earlier = hashlib.sha256(lines[4]).hexdigest()
  r = cli('audit', 'verify', log, '--expect-head', earlier)
  assert r.returncode == 0 and r.stdout.endswith(
      'the expected head is event 5\n'), r.stdout


def test_no_event_holds_key_material_passphrases_pins_or_file_names(
    full_run):
  data = full_run.log.read_bytes()
  assert len(full_run.secrets) > 20
  for secret in full_run.secrets:
    assert secret not in data, secret
  # Nor any key URI: recipients and signers appear as key ids only.
  assert b'pin-value' not in data and b'pkcs11:' not in data
  assert b'.key.pem' not in data and b'.pub.pem' not in data


# --- the chain against tampering ----------------------------------------------


def _log(path, n=6):
  auditor = audit.Auditor(audit.FileSink(path))
  for i in range(n):
    auditor.emit('inspect', package_id=f'{i:032x}', recipients=['sha256:x'])
  return path.read_bytes().splitlines(keepends=True)


def _verify(path, *extra):
  r = cli('audit', 'verify', path, *extra)
  return r


def _refused(r, match):
  assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
  assert r.stdout == ''
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error: audit '
                                                 'log '), r.stderr
  assert match in lines[0], lines[0]
  return lines[0]


def _edit(line: bytes, **changes) -> bytes:
  e = json.loads(line)
  e.update(changes)
  return audit.canonical(e) + b'\n'


def test_intact_log_verifies(tmp_path):
  log = tmp_path / 'a.jsonl'
  lines = _log(log)
  r = _verify(log)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith(f'OK: {log}: 6 events, chain intact; head ')
  assert audit.verify_log(str(log)).head == hashlib.sha256(
      lines[-1][:-1]).hexdigest()
  empty = tmp_path / 'empty.jsonl'
  empty.write_bytes(b'')
  assert audit.verify_log(str(empty)).head == audit.GENESIS


@pytest.mark.parametrize('how,match', [
    # A well-formed edit (canonical, same seq and prev): the next line's
    # prev no longer matches.
    ('edit', 'line 4 (seq 4) does not chain to line 3: line 3 was edited'),
    ('edit-bytes', 'line 3 is not an audit event'),
    ('delete', 'line 3 has seq 4, expected 3'),
    ('delete-first', 'line 1 has seq 2, expected 1'),
    ('insert', 'line 4 has seq 3, expected 4'),
    ('reorder', 'line 3 has seq 4, expected 3'),
    ('truncate', 'line 6 is truncated (no newline at its end)'),
    ('garbage', 'line 6 is not an audit event'),
    ('append-no-chain', 'line 7 has no valid seq and prev'),
    ('rechain-first', 'line 1 does not start a chain'),
])
def test_tampering_is_refused_naming_the_first_bad_line(tmp_path, how, match):
  log = tmp_path / 'a.jsonl'
  lines = _log(log)
  if how == 'edit':
    lines[2] = _edit(lines[2], outcome='error', error='Forged')
  elif how == 'edit-bytes':
    lines[2] = lines[2].replace(b'"outcome":"ok"', b'"outcome": "ok"')
  elif how == 'delete':
    del lines[2]
  elif how == 'delete-first':
    del lines[0]
  elif how == 'insert':  # a forged event, even chained to the line before
    forged = audit.make_event('decrypt', seq=3, prev=hashlib.sha256(
        lines[1][:-1]).hexdigest())
    lines.insert(2, audit.canonical(forged) + b'\n')
  elif how == 'reorder':
    lines[2], lines[3] = lines[3], lines[2]
  elif how == 'truncate':
    lines[-1] = lines[-1][:-10]
  elif how == 'garbage':
    lines[5] = b'hello\n'
  elif how == 'append-no-chain':
    lines.append(b'{"v":1}\n')
  elif how == 'rechain-first':
    lines[0] = _edit(lines[0], prev='1' * 64)
  log.write_bytes(b''.join(lines))
  line = _refused(_verify(log), match)
  with pytest.raises(audit.AuditLogError):
    audit.verify_log(str(log))
  assert str(log) in line


def test_removed_or_edited_newest_events_need_the_kept_head(tmp_path):
  """What the chain alone cannot see (docs/SECURITY.md §8): the newest
  events cut off, or the last one edited. A head kept elsewhere can."""
  log = tmp_path / 'a.jsonl'
  lines = _log(log)
  head = audit.verify_log(str(log)).head
  for changed in (lines[:-2], lines[:-1] + [_edit(lines[-1], outcome='error')]):
    log.write_bytes(b''.join(changed))
    assert _verify(log).returncode == 0  # undetectable without an anchor
    _refused(_verify(log, '--expect-head', head),
             f'the expected head {head} is not in it')
  # A whole rewrite with a recomputed chain: the same.
  log.unlink()
  _log(log)
  _refused(_verify(log, '--expect-head', head), 'is not in it')
  r = _verify(log, '--expect-head', 'not-a-hash')
  assert r.returncode == 2 and '--expect-head' in r.stderr


def test_a_broken_log_is_not_appended_to_and_the_command_does_not_run(
    tmp_path):
  log = tmp_path / 'a.jsonl'
  lines = _log(log, 3)
  log.write_bytes(b''.join(lines)[:-5])  # the last line cut
  _util.make_tree(tmp_path / 'm', {'saved_model.pb': 10})
  cli('keygen', 'x25519', tmp_path / 'k', env=_env())
  r = cli('encrypt', tmp_path / 'm', tmp_path / 'p', '-r',
          tmp_path / 'k.pub.pem', log=log)
  assert r.returncode == 4 and 'ends with a truncated line' in r.stderr
  assert r.stderr.count('\n') == 1 and r.stdout == ''
  assert not (tmp_path / 'p').exists()
  assert log.read_bytes() == b''.join(lines)[:-5]
  # An unusable sink is refused the same way, before anything is done.
  for spec, code in ((tmp_path / 'no-such-dir' / 'log', 9),
                     (tmp_path, 9),
                     ('syslog:host:1:2', 2)):
    r = cli('--audit-log', spec, 'encrypt', tmp_path / 'm', tmp_path / 'p',
            '-r', tmp_path / 'k.pub.pem', env=_env())
    assert r.returncode == code, (spec, r.stderr)
    assert r.stderr.count('\n') == 1 and not (tmp_path / 'p').exists()


def test_concurrent_appends_keep_one_chain(tmp_path):
  """Processes appending at the same time (flock, one O_APPEND write each)
  interleave whole lines, and every line chains to the one before it."""
  log = tmp_path / 'a.jsonl'
  _log(log, 2)  # appending to an existing log continues its chain
  code = ('import sys\n'
          'from tfx_encrypt import audit\n'
          'a = audit.Auditor(audit.FileSink(sys.argv[1]))\n'
          'sys.stdin.readline()\n'  # start together
          'for i in range(int(sys.argv[2])):\n'
          '  a.emit("verify", version=f"{sys.argv[3]}-{i}")\n')
  procs = [subprocess.Popen(
      [sys.executable, '-c', code, str(log), '40', str(k)],
      stdin=subprocess.PIPE, env=_env()) for k in range(8)]
  # ... and real commands with the same log.
  _util.make_tree(tmp_path / 'm', {'saved_model.pb': 10})
  assert cli('keygen', 'x25519', tmp_path / 'k', env=_env()).returncode == 0
  assert cli('encrypt', tmp_path / 'm', tmp_path / 'p', '-r',
             tmp_path / 'k.pub.pem', env=_env()).returncode == 0
  clis = [subprocess.Popen(
      [sys.executable, '-m', 'tfx_encrypt', 'inspect', str(tmp_path / 'p')],
      stdout=subprocess.DEVNULL, env=_env(log)) for _ in range(4)]
  for p in procs:
    p.stdin.write(b'go\n')
    p.stdin.close()
  for p in procs + clis:
    assert p.wait(timeout=180) == 0
  found = audit.verify_log(str(log))
  assert found.events == 2 + 8 * 40 + 4
  events = read_events(log)
  versions = [e['version'] for e in events if e['action'] == 'verify']
  assert sorted(versions) == sorted(f'{k}-{i}' for k in range(8)
                                    for i in range(40))
  assert sum(e['action'] == 'inspect' for e in events) == 2 + 4
  assert _verify(log).returncode == 0


# --- signals ------------------------------------------------------------------


def test_an_interrupted_command_emits_one_interrupted_event(tmp_path):
  model = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 700})
  os.makedirs(tmp_path / 'm' / 'variables')
  with open(tmp_path / 'm' / 'variables' / 'v.data', 'wb') as f:
    f.truncate(300 * MiB)  # sparse: long enough to be caught half-way
  assert cli('keygen', 'x25519', tmp_path / 'k', env=_env()).returncode == 0
  parent = tmp_path / 'out'
  parent.mkdir()
  log = tmp_path / 'a.jsonl'
  p = subprocess.Popen(
      [sys.executable, '-m', 'tfx_encrypt', 'encrypt', model,
       str(parent / 'p'), '-r', str(tmp_path / 'k.pub.pem')],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(log))
  try:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None and not [
        n for n in os.listdir(parent) if not n.endswith('.lock')]:
      time.sleep(0.005)
    assert p.poll() is None, 'encrypt ended before it could be interrupted'
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
  finally:
    if p.poll() is None:
      p.kill()
      p.wait()
  assert p.returncode == 143, err
  [e] = read_events(log)
  assert (e['action'], e['outcome'], e['signal'], e['exit_code']) == (
      'encrypt', 'interrupted', 'SIGTERM', 143)
  assert e['error'] is None and e['package'] == str(parent / 'p')
  assert audit.verify_log(str(log)).events == 1


# --- the other sinks ----------------------------------------------------------


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  d = tmp_path_factory.mktemp('small')
  _util.make_tree(d / 'm', {'saved_model.pb': 10})
  for name, kind in (('k', 'x25519'), ('s', 'ed25519')):
    assert cli('keygen', kind, d / name, env=_env()).returncode == 0
  assert cli('encrypt', d / 'm', d / 'p', '-r', d / 'k.pub.pem',
             '--sign-with', d / 's.key.pem', env=_env()).returncode == 0
  return d


def test_syslog_sink_over_udp(small):
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.bind(('127.0.0.1', 0))
    sock.settimeout(30)
    port = sock.getsockname()[1]
    r = cli('--audit-log', f'syslog:127.0.0.1:{port}', 'inspect',
            small / 'p', env=_env())
    assert r.returncode == 0, r.stderr
    ok, _ = sock.recvfrom(65536)
    r = cli('verify', small / 'p', '--trust', small / 'k.pub.pem',
            env=_env(f'syslog:127.0.0.1:{port}'))
    assert r.returncode == 2
    failed, _ = sock.recvfrom(65536)
  for datagram, pri, outcome in ((ok, 14, 'ok'), (failed, 12, 'error')):
    # <facility user * 8 + INFO 6 / WARNING 4>tfx-encrypt[PID]: JSON NUL
    head, _, body = datagram.partition(b': ')
    assert head.startswith(b'<%d>tfx-encrypt[' % pri), datagram
    assert body.endswith(b'\x00')
    e = json.loads(body[:-1])
    assert e['outcome'] == outcome and 'seq' not in e and 'prev' not in e
    assert head == b'<%d>tfx-encrypt[%d]' % (pri, e['pid'])
  assert json.loads(failed.partition(b': ')[2][:-1])['error'] == 'KeyRoleError'


def test_syslog_sink_on_a_unix_socket(small, tmp_path):
  path = str(tmp_path / 'log.sock')
  with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    sock.bind(path)
    sock.settimeout(30)
    r = cli('--audit-log', f'syslog:{path}', 'inspect', small / 'p',
            env=_env())
    assert r.returncode == 0 and r.stderr == ''
    head, _, body = sock.recv(65536).partition(b': ')
  assert head.startswith(b'<14>tfx-encrypt[')
  assert json.loads(body[:-1])['action'] == 'inspect'
  # Nobody listening (no syslog daemon): refused before the command runs.
  r = cli('--audit-log', f'syslog:{tmp_path}/none.sock', 'inspect',
          small / 'p', env=_env())
  assert r.returncode == 9 and r.stdout == ''
  assert r.stderr == (f'tfx-encrypt: error: audit log syslog:{tmp_path}/'
                      'none.sock: No such file or directory\n')


def test_stderr_sink(small):
  r = cli('--audit-log', 'stderr', 'inspect', small / 'p', env=_env())
  assert r.returncode == 0
  [line] = r.stderr.splitlines()
  e = json.loads(line)
  assert e['action'] == 'inspect' and e['package'] == str(small / 'p')
  r = cli('decrypt', small / 'p', small / 'o', '-i', small / 'k.key.pem',
          env=_env('stderr'))
  assert r.returncode == 2
  error, line = r.stderr.splitlines()
  assert error.startswith('tfx-encrypt: error: ')
  assert json.loads(line)['error'] == 'UsageError'


def test_logging_sink(caplog):
  caplog.set_level(logging.INFO, logger=audit.LOGGER_NAME)
  with audit.execution('logging', 'encrypt-pusher'):
    audit.note(version='7', pushed=True)
  with pytest.raises(errors.TamperedPackageError):
    with audit.execution('logging', 'encrypt-pusher'):
      raise errors.TamperedPackageError('x')
  ok, bad = caplog.records
  assert ok.levelno == logging.INFO and bad.levelno == logging.WARNING
  assert ok.audit_event['version'] == '7'
  assert json.loads(ok.getMessage()) == ok.audit_event
  assert (bad.audit_event['outcome'], bad.audit_event['error']) == (
      'error', 'TamperedPackageError')


def test_untrusted_strings_are_stored_exactly_and_shown_escaped(tmp_path):
  hostile = 'sha256:\x1b[32mOK\x1b[0m\nforged line\u202e\u2028'
  log = tmp_path / 'a.jsonl'
  sink = audit.FileSink(log)
  sink.write(audit.make_event('inspect', signer=hostile,
                              recipients=[hostile]))
  data = log.read_bytes()
  assert data.count(b'\n') == 1 and data.isascii()
  assert not any(c < 0x20 for c in data[:-1])
  [e] = read_events(log)
  assert e['signer'] == hostile and e['recipients'] == [hostile]
  # audit verify shows what it quotes escaped.
  weird = tmp_path / 'log\x1b[31m\nname'
  weird.write_bytes(data[:-3])
  r = _verify(weird)
  assert r.returncode == 4 and r.stderr.count('\n') == 1
  assert '\x1b' not in r.stderr and '\\x1b' in r.stderr
  with pytest.raises(ValueError, match='not audit event fields'):
    audit.make_event('encrypt', identity='pkcs11:...')


def test_sink_specs():
  assert isinstance(audit.open_sink('stderr'), audit.StreamSink)
  assert isinstance(audit.open_sink('logging'), audit.LoggingSink)
  assert audit.open_sink('syslog').address == '/dev/log'
  assert audit.open_sink('syslog:/run/x.sock').address == '/run/x.sock'
  assert audit.open_sink('syslog:10.0.0.1').address == ('10.0.0.1', 514)
  assert audit.open_sink('syslog:logs.example:6514').address == (
      'logs.example', 6514)
  assert audit.open_sink('syslog:[::1]:515').address == ('::1', 515)
  assert audit.open_sink('./stderr').path == './stderr'
  for bad in ('', 'syslog:', 'syslog:h:0', 'syslog:h:x', 'syslog:a:1:2'):
    with pytest.raises(errors.UsageError):
      audit.open_sink(bad)


@pytest.mark.parametrize('given, want', [
    ('s3://bucket/models/x/3', 's3://bucket/models/x/3'),
    ('gs://bucket/m/model.tfxe', 'gs://bucket/m/model.tfxe'),
    ('pkg', os.path.join(os.getcwd(), 'pkg')),
    ('file://x', os.path.join(os.getcwd(), 'file:/x')),
])
def test_event_locations_keep_object_store_uris(given, want):
  """A remote package (serve-sync from s3:// / gs://, remote commands) is
  recorded as its URI, never made into a local path ('/cwd/s3:/bucket')."""
  assert audit.location(given) == want

  class Info:
    path = given
  assert audit.package_fields(Info())['package'] == want
