"""Consumer policy (tfx_encrypt.policy): require a context, refuse old versions.

A trusted signature says who published a package, not which one. These
tests check that a Policy refuses another model, another environment or an
older version by the same publisher -- right after the signature check and
before any key call -- in every consumer: decrypt_model,
iter_decrypted_files, verify_package, rotate_package, the CLI (exit 11),
serve-sync, OCI pull and runtime.load_model.
"""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import pytest

from tests import _util
from tfx_encrypt import errors
from tfx_encrypt import package as package_lib
from tfx_encrypt import policy as policy_lib
from tfx_encrypt.keys import local
from tfx_encrypt.policy import Policy
from tfx_encrypt.runtime import serving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = {'saved_model.pb': 700, 'variables/variables.index': 50,
         'variables/variables.data-00000-of-00001': 70_000}

TAXI = {'model': 'taxi', 'env': 'prod', 'version': '1700000007'}


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  return _util.make_tree(tmp_path_factory.mktemp('model') / 'm', MODEL)


class Packages:
  """Packages by the same trusted publisher ('ed'), differing in context."""

  def __init__(self, d, keys, model):
    self.d = d

    def make(name, context, signer='ed', bundle=False):
      path = os.path.join(d, name + ('.tfxe' if bundle else ''))
      package_lib.encrypt_model(
          model, path, recipients=[keys.pub('x')],
          signer=keys.priv(signer) if signer else None, context=context,
          bundle=bundle)
      return path

    self.taxi = make('taxi', TAXI)
    self.taxi_bundle = make('taxi-bundle', TAXI, bundle=True)
    self.older = make('taxi-old', dict(TAXI, version='1700000005'))
    self.fraud = make('fraud', dict(TAXI, model='fraud'))  # substituted
    self.staging = make('staging', dict(TAXI, env='staging'))
    self.no_env = make('no-env', {'model': 'taxi', 'version': '1700000007'})
    self.no_version = make('no-version', {'model': 'taxi', 'env': 'prod'})
    self.bad_version = make('bad-version', dict(TAXI, version='01700000007'))
    self.unsigned = make('unsigned', TAXI, signer=None)
    self.evil = make('evil', dict(TAXI, model='fraud'), signer='evil')


@pytest.fixture(scope='module')
def pkgs(tmp_path_factory, keys, model):
  return Packages(str(tmp_path_factory.mktemp('pkgs')), keys, model)


PROD_TAXI = Policy({'model': 'taxi', 'env': 'prod'}, min_version=1700000006)


# --- Policy.check -------------------------------------------------------------


def test_empty_policy_accepts_everything():
  p = Policy()
  assert p.empty and p.require_context == {} and p.min_version is None
  p.check({})
  p.check({'version': 'not a number', 'anything': 'goes'})


def test_required_values_must_match_exactly():
  p = Policy({'model': 'taxi', 'env': 'prod'})
  p.check({'model': 'taxi', 'env': 'prod', 'extra': 'ok'})
  for ctx, key, got in (
      ({'model': 'fraud', 'env': 'prod'}, 'model', "'fraud'"),
      ({'model': 'Taxi', 'env': 'prod'}, 'model', "'Taxi'"),  # case counts
      ({'model': 'taxi ', 'env': 'prod'}, 'model', "'taxi '"),
      ({'model': 'taxi', 'env': ''}, 'env', "''"),
  ):
    with pytest.raises(errors.PolicyError) as e:
      p.check(ctx)
    msg = str(e.value)
    assert f"context key '{key}' is {got}" in msg, msg
    assert f"requires '{p.require_context[key]}'" in msg
    assert '\n' not in msg and e.value.exit_code == 11


def test_required_key_missing():
  with pytest.raises(errors.PolicyError,
                     match=r"context key 'env' is missing; the policy "
                     r"requires 'prod'"):
    Policy({'model': 'taxi', 'env': 'prod'}).check({'model': 'taxi'})


def test_message_escapes_package_values():
  hostile = 'taxi\x1b[2K\rOK: signed by trusted\n\u202e'
  with pytest.raises(errors.PolicyError) as e:
    Policy({'model': 'taxi'}).check({'model': hostile})
  msg = str(e.value)
  assert '\x1b' not in msg and '\n' not in msg and '\r' not in msg
  assert '\u202e' not in msg
  assert '\\x1b[2K\\x0dOK' in msg and '\\u202e' in msg
  with pytest.raises(errors.PolicyError) as e:
    Policy(min_version=1).check({'version': 'x' * 10_000})
  assert len(str(e.value)) < 400  # cut, with the count of the rest


@pytest.mark.parametrize('version', ['7', '8', '1700000000', '9' * 20])
def test_min_version_accepts_at_or_above(version):
  Policy(min_version=7).check({'version': version})


def test_min_version_zero_and_boundaries():
  Policy(min_version=0).check({'version': '0'})
  Policy(min_version=10 ** 20 - 1).check({'version': '9' * 20})
  with pytest.raises(errors.PolicyError, match=r"is '6'; the policy requires "
                     r'a version >= 7'):
    Policy(min_version=7).check({'version': '6'})
  with pytest.raises(errors.PolicyError):
    Policy(min_version=10).check({'version': '9'})  # numeric, not text order


@pytest.mark.parametrize('version', [
    '07', '00', '-1', '+7', '1.0', '7.', '1e3', '', ' 7', '7 ', '7\n', '1_000',
    '0x7', '٧', '١٢', '７', '²', 'seven', '9' * 21, '1' + '0' * 20,
])
def test_malformed_version_refused(version):
  p = Policy(min_version=0)
  with pytest.raises(errors.PolicyError,
                     match='not a version number') as e:
    p.check({'version': version})
  assert '\n' not in str(e.value)


def test_missing_version_refused_never_zero():
  with pytest.raises(errors.PolicyError,
                     match=r"context key 'version' is missing; the policy "
                     r'requires a version >= 0'):
    Policy(min_version=0).check({'model': 'taxi'})


def test_version_key():
  p = Policy(min_version=3, version_key='release')
  p.check({'release': '3', 'version': '1'})
  with pytest.raises(errors.PolicyError, match="'release' is missing"):
    p.check({'version': '99'})
  with pytest.raises(errors.PolicyError, match="'release' is '2'"):
    p.check({'release': '2', 'version': '99'})


def test_context_and_version_rules_together():
  p = Policy({'model': 'taxi'}, min_version=5)
  p.check({'model': 'taxi', 'version': '5'})
  with pytest.raises(errors.PolicyError, match="'model'"):
    p.check({'model': 'fraud', 'version': '9'})
  with pytest.raises(errors.PolicyError, match="'version'"):
    p.check({'model': 'taxi', 'version': '4'})


def test_is_canonical_version():
  assert policy_lib.is_canonical_version('0')
  assert policy_lib.is_canonical_version('10')
  for v in ('01', '', '١٢', None, 7, b'7'):
    assert not policy_lib.is_canonical_version(v)


@pytest.mark.parametrize('kwargs', [
    {'require_context': ['model=taxi']},
    {'require_context': {'': 'x'}},
    {'require_context': {1: 'x'}},
    {'require_context': {'version': 7}},
    {'require_context': {'model': None}},
    {'min_version': True},
    {'min_version': 7.0},
    {'min_version': '7'},
    {'min_version': -1},
    {'min_version': 10 ** 20},
    {'version_key': ''},
    {'version_key': None},
])
def test_constructor_refuses_bad_arguments(kwargs):
  with pytest.raises(errors.UsageError):
    Policy(**kwargs)


def test_policy_is_frozen_hashable_and_picklable():
  src = {'model': 'taxi'}
  p = Policy(src, min_version=3)
  src['model'] = 'fraud'  # the policy keeps its own copy
  assert p.require_context == {'model': 'taxi'}
  with pytest.raises(TypeError):
    p.require_context['model'] = 'fraud'  # pytype: disable=unsupported-operands
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.min_version = 0
  assert p == Policy({'model': 'taxi'}, min_version=3)
  assert hash(p) == hash(Policy({'model': 'taxi'}, min_version=3))
  assert p != Policy({'model': 'taxi'}, min_version=4)
  assert pickle.loads(pickle.dumps(p)) == p
  assert Policy.from_dict(p.to_dict()) == p


# --- Policy.from_file ---------------------------------------------------------


def _write(tmp_path, text, name='policy.json'):
  path = tmp_path / name
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  return path


def test_from_file(tmp_path):
  path = _write(tmp_path, json.dumps({
      'require_context': {'model': 'taxi', 'env': 'prod'},
      'min_version': 1700000000, 'version_key': 'release'}))
  assert Policy.from_file(path) == Policy(
      {'model': 'taxi', 'env': 'prod'}, 1700000000, 'release')
  assert Policy.from_file(str(path)) == Policy.from_file(path)
  assert Policy.from_file(_write(tmp_path, '{}', 'e.json')) == Policy()
  assert Policy.from_file(_write(tmp_path, '{"min_version": 3}', 'm.json')) \
      == Policy(min_version=3)


@pytest.mark.parametrize('text, fragment', [
    ('{"require_context": {}, "min_versoin": 3}', "unknown policy key "
     "'min_versoin'"),
    ('{"min_version": 3, "min_version": 4}', 'duplicate key'),
    ('{"require_context": {"a": "1", "a": "2"}}', 'duplicate key'),
    ('{"min_version": 3.0}', 'not an integer'),
    ('{"min_version": 1e3}', 'not an integer'),
    ('{"min_version": NaN}', 'not allowed'),
    ('{"min_version": Infinity}', 'not allowed'),
    ('{"min_version": true}', 'min_version must be a JSON integer'),
    ('{"min_version": "7"}', 'min_version must be a JSON integer'),
    ('{"min_version": null}', 'min_version must be a JSON integer'),
    ('{"min_version": -1}', 'min_version must be between'),
    ('{"min_version": 100000000000000000000}', 'min_version must be between'),
    ('{"require_context": ["model=taxi"]}', 'require_context must be'),
    ('{"require_context": {"version": 7}}', 'must be a string'),
    ('{"version_key": ""}', 'version_key must be'),
    ('[]', 'a policy is a JSON object'),
    ('"model=taxi"', 'a policy is a JSON object'),
    ('', 'not valid JSON'),
    ('{"min_version": 3', 'not valid JSON'),
    ('{"min_version": 3} {}', 'not valid JSON'),
    (b'{"require_context": {"model": "\xff"}}', 'not valid JSON'),
])
def test_from_file_is_strict(tmp_path, text, fragment):
  path = _write(tmp_path, text)
  with pytest.raises(errors.UsageError) as e:
    Policy.from_file(path)
  msg = str(e.value)
  assert fragment in msg, msg
  assert str(path) in msg and '\n' not in msg


def test_from_file_size_bound_and_missing(tmp_path):
  path = _write(tmp_path, '{"require_context": {"a": "' +
                'x' * policy_lib.MAX_FILE_BYTES + '"}}')
  with pytest.raises(errors.UsageError, match='larger than'):
    Policy.from_file(path)
  with pytest.raises(FileNotFoundError):
    Policy.from_file(tmp_path / 'missing.json')


# --- the API ------------------------------------------------------------------


def _decrypt(keys, package, out, policy, identity=None, **kwargs):
  kwargs.setdefault('trusted', [keys.pub('ed')])
  return package_lib.decrypt_model(
      package, out, identities=[identity or keys.priv('x')], policy=policy,
      **kwargs)


def test_decrypt_matching_policy(keys, pkgs, model, tmp_path):
  ident = _util.CountingKey(keys.priv('x'))
  for i, package in enumerate((pkgs.taxi, pkgs.taxi_bundle)):
    out = tmp_path / f'out{i}'
    info = _decrypt(keys, package, out, PROD_TAXI, ident)
    assert info.signature_verified and info.context == TAXI
    assert _util.read_tree(out) == _util.read_tree(model)
  assert ident.calls == 2
  # At the version itself, and with no policy at all.
  _decrypt(keys, pkgs.taxi, tmp_path / 'at', Policy(min_version=1700000007))
  _decrypt(keys, pkgs.older, tmp_path / 'none', None)


@pytest.mark.parametrize('name, fragment', [
    ('fraud', "context key 'model' is 'fraud'; the policy requires 'taxi'"),
    ('staging', "context key 'env' is 'staging'; the policy requires 'prod'"),
    ('no_env', "context key 'env' is missing; the policy requires 'prod'"),
    ('older', "context key 'version' is '1700000005'; the policy requires a "
     'version >= 1700000006'),
    ('no_version', "context key 'version' is missing"),
    ('bad_version', "'01700000007', not a version number"),
])
def test_decrypt_refused_before_any_key_call(keys, pkgs, tmp_path, name,
                                             fragment):
  ident = _util.CountingKey(keys.priv('x'))
  out = tmp_path / 'out'
  with pytest.raises(errors.PolicyError) as e:
    _decrypt(keys, getattr(pkgs, name), out, PROD_TAXI, ident)
  assert fragment in str(e.value), str(e.value)
  assert ident.calls == 0  # no unwrap, so no KMS call either
  assert os.listdir(tmp_path) == []  # nothing at OUT, no temporary sibling


def test_signature_is_checked_before_the_policy(keys, pkgs, tmp_path):
  # Signed by an untrusted key, and its context fails the policy too: the
  # signer is what is reported (an unauthenticated context means nothing).
  ident = _util.CountingKey(keys.priv('x'))
  with pytest.raises(errors.UntrustedSignerError):
    _decrypt(keys, pkgs.evil, tmp_path / 'o', PROD_TAXI, ident)
  with pytest.raises(errors.UntrustedSignerError):
    _decrypt(keys, pkgs.unsigned, tmp_path / 'o', PROD_TAXI, ident)
  assert ident.calls == 0


def test_unsigned_allowed_is_still_policed(keys, pkgs, tmp_path):
  _decrypt(keys, pkgs.unsigned, tmp_path / 'ok', PROD_TAXI,
           allow_unsigned=True, trusted=[])
  ident = _util.CountingKey(keys.priv('x'))
  with pytest.raises(errors.PolicyError):
    _decrypt(keys, pkgs.unsigned, tmp_path / 'o', Policy({'model': 'fraud'}),
             ident, allow_unsigned=True, trusted=[])
  assert ident.calls == 0 and not (tmp_path / 'o').exists()


def test_iter_decrypted_files_with_policy(keys, pkgs, model):
  ident = _util.CountingKey(keys.priv('x'))
  files = dict(package_lib.iter_decrypted_files(
      pkgs.taxi, identities=[ident], trusted=[keys.pub('ed')],
      policy=PROD_TAXI))
  assert files == _util.read_tree(model)
  ident.calls = 0
  it = package_lib.iter_decrypted_files(
      pkgs.fraud, identities=[ident], trusted=[keys.pub('ed')],
      policy=PROD_TAXI)
  with pytest.raises(errors.PolicyError, match="'model' is 'fraud'"):
    next(it)
  assert ident.calls == 0


def test_verify_package_with_policy(keys, pkgs, monkeypatch):
  info = package_lib.verify_package(pkgs.taxi, trusted=[keys.pub('ed')],
                                    policy=PROD_TAXI)
  assert info.signature_verified
  # Refused before any payload is read.
  source_cls = package_lib._Source  # pylint: disable=protected-access
  monkeypatch.setattr(source_cls, 'open_payload',
                      lambda *a: pytest.fail('payload read after refusal'))
  for name in ('fraud', 'older', 'no_version'):
    with pytest.raises(errors.PolicyError):
      package_lib.verify_package(getattr(pkgs, name),
                                 trusted=[keys.pub('ed')], policy=PROD_TAXI)


def test_rotate_package_with_policy(keys, pkgs, tmp_path):
  ident = _util.CountingKey(keys.priv('x'))
  out = tmp_path / 'rotated'
  with pytest.raises(errors.PolicyError, match="'model' is 'fraud'"):
    package_lib.rotate_package(
        pkgs.fraud, out, identities=[ident], recipients=[keys.pub('x2')],
        trusted=[keys.pub('ed')], signer=keys.priv('ed'), policy=PROD_TAXI)
  assert ident.calls == 0 and os.listdir(tmp_path) == []
  info = package_lib.rotate_package(
      pkgs.taxi, out, identities=[ident], recipients=[keys.pub('x2')],
      trusted=[keys.pub('ed')], signer=keys.priv('ed'), policy=PROD_TAXI)
  assert info.context == TAXI and ident.calls == 1


# --- the CLI ------------------------------------------------------------------


def cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
      capture_output=True, text=True, timeout=180, check=False,
      env=dict(os.environ, PYTHONPATH=ROOT))


def one_line_error(r, code, fragment=''):
  assert r.returncode == code, (r.returncode, r.stderr)
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error: '), (
      r.stderr)
  assert fragment in lines[0], lines[0]
  return lines[0]


def _decrypt_args(keys, package, out):
  return ['decrypt', package, out, '-i', keys.priv('x'), '--trust',
          keys.pub('ed')]


def test_cli_decrypt_policy_flags(keys, pkgs, tmp_path):
  out = tmp_path / 'o'
  args = _decrypt_args(keys, pkgs.taxi, out)
  one_line_error(cli(*args, '--require-context', 'model=fraud'), 11,
                 "context key 'model' is 'taxi'; the policy requires 'fraud'")
  one_line_error(cli(*args, '--require-context', 'model=taxi',
                     '--require-context', 'region=eu'), 11,
                 "context key 'region' is missing")
  one_line_error(cli(*args, '--min-version', '1700000008'), 11,
                 'requires a version >= 1700000008')
  one_line_error(cli(*args, '--min-version', '7', '--version-key', 'env'),
                 11, "context key 'env' is 'prod', not a version number")
  assert not out.exists() and os.listdir(tmp_path) == []
  r = cli(*args, '--require-context', 'model=taxi', '--require-context',
          'env=prod', '--min-version', '1700000007')
  assert r.returncode == 0, r.stderr
  assert _util.read_tree(out)


def test_cli_policy_file(keys, pkgs, tmp_path):
  good = _write(tmp_path, json.dumps(PROD_TAXI.to_dict()), 'good.json')
  newer = _write(tmp_path, json.dumps(
      {'require_context': {'model': 'taxi'}, 'min_version': 1700000008}),
                 'newer.json')
  out = tmp_path / 'o'
  one_line_error(cli(*_decrypt_args(keys, pkgs.taxi, out), '--policy', newer),
                 11, 'requires a version >= 1700000008')
  one_line_error(cli(*_decrypt_args(keys, pkgs.fraud, out), '--policy', good),
                 11, "'model' is 'fraud'")
  assert not out.exists()
  r = cli(*_decrypt_args(keys, pkgs.taxi, out), '--policy', good)
  assert r.returncode == 0, r.stderr


@pytest.mark.parametrize('extra, fragment', [
    (['--policy', '{good}', '--min-version', '1'],
     '--policy FILE is the whole policy; put --min-version into the file'),
    (['--policy', '{good}', '--require-context', 'model=taxi'],
     'put --require-context into the file'),
    (['--policy', '{good}', '--version-key', 'version'],
     'put --version-key into the file'),
    (['--version-key', 'release'], '--version-key names the key'),
    (['--min-version', '07'], '--min-version expects a non-negative integer'),
    (['--min-version', '-1'], '--min-version expects'),
    (['--min-version', '١٢'], '--min-version expects'),
    (['--min-version', '9' * 21], '--min-version expects'),
    (['--require-context', 'model'], '--require-context expects KEY=VALUE'),
    (['--require-context', '=taxi'], '--require-context expects KEY=VALUE'),
    (['--require-context', 'm=a', '--require-context', 'm=b'], 'given twice'),
    (['--policy', '{bad}'], "unknown policy key 'min_versoin'"),
])
def test_cli_policy_usage_errors(keys, pkgs, tmp_path, extra, fragment):
  good = _write(tmp_path, '{"min_version": 1}', 'good.json')
  bad = _write(tmp_path, '{"min_versoin": 1}', 'bad.json')
  extra = [a.format(good=good, bad=bad) for a in extra]
  out = tmp_path / 'o'
  one_line_error(cli(*_decrypt_args(keys, pkgs.taxi, out), *extra), 2,
                 fragment)
  assert not out.exists()


def test_cli_verify_and_rotate(keys, pkgs, tmp_path):
  base = ['verify', pkgs.taxi, '--trust', keys.pub('ed')]
  one_line_error(cli(*base, '--require-context', 'env=staging'), 11,
                 "'env' is 'prod'")
  r = cli(*base, '--require-context', 'env=prod', '--min-version', '1')
  assert r.returncode == 0 and r.stdout.startswith('OK: '), r.stderr
  out = tmp_path / 'rotated'
  rotate = ['rotate', pkgs.older, out, '-i', keys.priv('x'), '-r',
            keys.pub('x2'), '--trust', keys.pub('ed'), '--sign-with',
            keys.priv('ed')]
  one_line_error(cli(*rotate, '--min-version', '1700000006'), 11,
                 "'version' is '1700000005'")
  assert not out.exists() and os.listdir(tmp_path) == []
  r = cli(*rotate, '--min-version', '1700000005')
  assert r.returncode == 0, r.stderr


def test_every_package_reading_command_has_the_options():
  from tfx_encrypt import cli as cli_lib  # pylint: disable=g-import-not-at-top
  names = {'--require-context', '--min-version', '--version-key', '--policy'}
  for command in ('decrypt', 'verify', 'rotate', 'serve-sync', 'pull'):
    opts = {o for p in cli_lib.main.commands[command].params
            for o in p.opts}
    assert names <= opts, command
  # ... and they are the same objects' definitions (one decorator).
  helps = {tuple(sorted((o, p.help) for p in cli_lib.main.commands[c].params
                        for o in p.opts if o in names))
           for c in ('decrypt', 'verify', 'rotate', 'serve-sync', 'pull')}
  assert len(helps) == 1


# --- serve-sync ---------------------------------------------------------------


def _push(keys, model, source, version, context, signer='ed'):
  package_lib.encrypt_model(model, os.path.join(source, version),
                            recipients=[keys.pub('x')],
                            signer=keys.priv(signer), context=context)


def _summary(result):
  return [(a.action, a.version, a.error) for a in result.actions]


def test_serve_sync_skips_versions_the_policy_refuses(keys, model, tmp_path):
  source = tmp_path / 'push'
  source.mkdir()
  _push(keys, model, source, '1700000001', {'model': 'taxi',
                                            'version': '1700000001'})
  _push(keys, model, source, '1700000002', {'model': 'taxi',
                                            'version': '1700000002'})
  # Newest: the same publisher's other model, pushed to the wrong place.
  _push(keys, model, source, '1700000003', {'model': 'fraud',
                                            'version': '1700000003'})
  serving_base = tmp_path / 'serving'
  ident = _util.CountingKey(keys.priv('x'))
  result = serving.sync_serving(
      source, serving_base, identities=[ident], trusted=[keys.pub('ed')],
      keep=2, policy=Policy({'model': 'taxi'}))
  assert _summary(result) == [('failed', '1700000003', 'PolicyError'),
                              ('installed', '1700000002', None),
                              ('installed', '1700000001', None)]
  assert "'model' is 'fraud'" in result.failed[0].message
  assert ident.calls == 2  # none for the refused version
  assert sorted(n for n in os.listdir(serving_base) if n.isdigit()) == [
      '1700000001', '1700000002']
  marker = serving.read_marker(str(serving_base))
  assert marker['1700000002']['context'] == {'model': 'taxi',
                                             'version': '1700000002'}

  # Raising min_version later takes an installed version down: it is
  # re-checked against the context recorded at install, with no key call.
  ident.calls = 0
  result = serving.sync_serving(
      source, serving_base, identities=[ident], trusted=[keys.pub('ed')],
      keep=2, policy=Policy({'model': 'taxi'}, min_version=1700000002))
  assert _summary(result) == [('failed', '1700000003', 'PolicyError'),
                              ('kept', '1700000002', None),
                              ('failed', '1700000001', 'PolicyError'),
                              ('removed', '1700000001', None)]
  assert ident.calls == 0
  assert sorted(n for n in os.listdir(serving_base) if n.isdigit()) == [
      '1700000002']
  assert set(serving.read_marker(str(serving_base))) == {'1700000002'}


def test_serve_sync_rechecks_versions_installed_without_a_context(
    keys, model, tmp_path):
  """A marker written before contexts were recorded: the source package is
  verified key-lessly once, and its context recorded."""
  source = tmp_path / 'push'
  source.mkdir()
  for v in ('1700000001', '1700000002'):
    _push(keys, model, source, v, {'model': 'taxi', 'version': v})
  serving_base = tmp_path / 'serving'
  kwargs = dict(identities=[keys.priv('x')], trusted=[keys.pub('ed')], keep=2)
  serving.sync_serving(source, serving_base, **kwargs)
  path = serving_base / serving.MARKER_NAME
  doc = json.loads(path.read_text())
  for entry in doc['versions'].values():
    del entry['context']
  path.write_text(json.dumps(doc))
  result = serving.sync_serving(source, serving_base,
                                policy=Policy(min_version=1700000002),
                                **kwargs)
  assert _summary(result) == [('kept', '1700000002', None),
                              ('failed', '1700000001', 'PolicyError'),
                              ('removed', '1700000001', None)]
  assert serving.read_marker(str(serving_base))['1700000002']['context'] == {
      'model': 'taxi', 'version': '1700000002'}


def test_cli_serve_sync_policy(keys, model, tmp_path):
  source = tmp_path / 'push'
  source.mkdir()
  _push(keys, model, source, '1700000001', {'model': 'taxi',
                                            'version': '1700000001'})
  _push(keys, model, source, '1700000002', {'model': 'taxi',
                                            'version': '0017'})
  r = cli('serve-sync', source, tmp_path / 'serving', '-i', keys.priv('x'),
          '--trust', keys.pub('ed'), '--once', '--keep', '2',
          '--require-context', 'model=taxi', '--min-version', '1')
  assert r.returncode == 1, r.stderr
  lines = r.stdout.splitlines()
  assert lines[0].startswith('failed 1700000002: PolicyError: refused by the '
                             "consumer policy: context key 'version' is "
                             "'0017', not a version number"), lines
  assert lines[1].startswith('installed 1700000001 into '), lines


# --- OCI pull -----------------------------------------------------------------


@pytest.mark.integration
def test_pull_refuses_and_publishes_nothing(keys, pkgs, tmp_path_factory,
                                            tmp_path):
  from tests.distribution.test_oci import _running_registry  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.distribution import oci  # pylint: disable=g-import-not-at-top
  with _running_registry(tmp_path_factory.mktemp('registry')) as registry:
    ref = registry.ref('models/taxi:7')
    oci.push_package(pkgs.taxi_bundle, ref, insecure=True)
    out = tmp_path / 'pulled.tfxe'
    for policy in (Policy({'model': 'fraud'}),
                   Policy(min_version=1700000008)):
      with pytest.raises(errors.PolicyError):
        oci.pull_package(ref, out, trusted=[keys.pub('ed')], insecure=True,
                         policy=policy)
      assert os.listdir(tmp_path) == []  # nothing published, no leftovers
    one_line_error(cli('pull', ref, out, '--trust', keys.pub('ed'),
                       '--insecure', '--require-context', 'env=staging'),
                   11, "'env' is 'prod'")
    assert os.listdir(tmp_path) == []
    res = oci.pull_package(ref, out, trusted=[keys.pub('ed')], insecure=True,
                           policy=PROD_TAXI)
    assert res.info.context == TAXI and out.is_file()


# --- runtime.load_model -------------------------------------------------------


@pytest.mark.tfx
def test_load_model_with_policy(keys, tmp_path):
  tf = pytest.importorskip('tensorflow')
  from tfx_encrypt import runtime  # pylint: disable=g-import-not-at-top

  class Tiny(tf.Module):

    def __init__(self):
      super().__init__()
      self.w = tf.Variable([[2.0], [3.0]])

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    def __call__(self, x):
      return tf.matmul(x, self.w)

  sm = str(tmp_path / 'sm')
  m = Tiny()
  tf.saved_model.save(m, sm, signatures={'serving_default': m.__call__})
  pkg = tmp_path / 'p'
  package_lib.encrypt_model(sm, pkg, recipients=[keys.pub('x')],
                            signer=keys.priv('ed'), context=TAXI)
  ident = _util.CountingKey(keys.priv('x'))
  loaded = runtime.load_model(pkg, identities=[ident],
                              trusted=[keys.pub('ed')], policy=PROD_TAXI)
  y = loaded.signatures['serving_default'](x=tf.constant([[1.0, 1.0]]))
  assert float(list(y.values())[0].numpy()[0][0]) == 5.0
  ident.calls = 0
  for policy in (Policy({'model': 'fraud'}), Policy(min_version=1700000008)):
    with pytest.raises(errors.PolicyError):
      runtime.load_model(pkg, identities=[ident], trusted=[keys.pub('ed')],
                         policy=policy)
  assert ident.calls == 0
  assert not tf.io.gfile.exists('ram://tfx-encrypt') or not tf.io.gfile.listdir(
      'ram://tfx-encrypt')
