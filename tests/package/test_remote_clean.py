"""`tfx-encrypt clean s3://... | gs://...`: what a SIGKILLed push leaves.

A push (or an encrypt to a store) writes payload objects first and the
header last; killed in between, it leaves payload objects without a
header. `clean` removes exactly those versions, and only when they look
like ours and are old enough; a package, a running push, a version with
anything else in it, or another name, is never touched. Against moto
(s3://) and the patched GCS emulator (gs://) on loopback.
"""

import os
import signal
import subprocess
import sys
import time

import click.testing
import pytest

import tfx_encrypt as te
from tfx_encrypt import cli
from tfx_encrypt import storage
from tfx_encrypt.package import layout
from tests import _util

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(params=['s3', 'gs'])
def store(request):
  return request.getfixturevalue(f'{request.param}_store')


def _payloads(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': b'\x08\x01',
                                         'variables/v': 2 * MiB})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  pdir = tmp_path / 'p' / 'payload'
  return {f'payload/{n}': (pdir / n).read_bytes()
          for n in sorted(os.listdir(pdir))}


def _put_all(uri, objects):
  for name, data in objects.items():
    storage.put(storage.join(uri, name), data)


def test_clean_removes_only_old_incomplete_versions_of_ours(tmp_path, keys,
                                                            store):
  base = store.new_base()
  payloads = _payloads(tmp_path, keys)
  te.encrypt_model(tmp_path / 'm', storage.join(base, '100'),
                   recipients=[keys.pub('x')])          # a package: kept
  _put_all(storage.join(base, '101'), payloads)         # incomplete: removed
  _put_all(storage.join(base, '102'), payloads)         # + a foreign object
  storage.put(storage.join(base, '102', 'notes.txt'), b'mine')
  _put_all(storage.join(base, 'logs'), payloads)        # not a version name
  storage.put(storage.join(base, '103', 'payload', '00000000'),
              b'not a payload stream' * 4)              # not ours
  storage.put(storage.join(base, '104', 'model.tfxe'), b'x' * 64)  # a bundle
  before = storage.list_objects(base)

  # Recent: reported, left alone (a push may still be running).
  found = layout.clean_remote(base, older_than_s=3600)
  assert [(f.uri, f.removed) for f in found] == [
      (storage.join(base, '101'), False)]
  assert storage.list_objects(base) == before

  # Two hours later: removed, and nothing else.
  found = layout.clean_remote(base, older_than_s=3600,
                              now=time.time() + 7200)
  assert [(f.uri, f.removed, f.objects) for f in found] == [
      (storage.join(base, '101'), True, len(payloads))]
  after = storage.list_objects(base)
  assert set(before) - set(after) == {f'101/{n}' for n in payloads}
  assert all(after[n] == before[n] for n in after)
  te.inspect_package(storage.join(base, '100'))


def test_clean_a_package_uri_itself(tmp_path, keys, store):
  base = store.new_base()
  _put_all(storage.join(base, 'pkg'), _payloads(tmp_path, keys))
  r = click.testing.CliRunner().invoke(
      cli.main, ['clean', storage.join(base, 'pkg'), '--older-than', '0'])
  assert r.exit_code == 0, r.output
  assert 'removed ' + storage.join(base, 'pkg') in r.output
  assert storage.list_names(storage.join(base, 'pkg')) == []
  r = click.testing.CliRunner().invoke(cli.main, ['clean', base])
  assert r.exit_code == 0 and 'nothing to clean' in r.output, r.output


def _sigkill_after(script, args, line):
  """Run `script` in a process (with this environment: the emulators),
  wait until it prints `line`, then SIGKILL it."""
  proc = subprocess.Popen(
      [sys.executable, '-c', script] + list(args), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ))
  try:
    got = proc.stdout.readline()
    assert line in got, proc.stderr.read()[-3000:]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


_SLOW_PUSH = r'''
import sys, time
from tfx_encrypt.components.encrypt_pusher import push
from tfx_encrypt import storage
real = storage.put_create_only

def slow(uri, data):
  real(uri, data)
  if uri.endswith('payload/00000001'):
    print('PAYLOADS-WRITTEN', flush=True)
    time.sleep(600)  # SIGKILLed here: payloads written, no header
push.storage.put_create_only = slow
push.push_package(sys.argv[1], sys.argv[2], version='1700000000')
'''


def test_sigkilled_push_is_cleaned(tmp_path, keys, store):
  """A real push process killed with SIGKILL between its payloads and its
  header: readers call the version incomplete; clean removes it; the next
  push of the same version then succeeds."""
  base = store.new_base()
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': b'\x08\x01',
                                         'variables/v': 2 * MiB,
                                         'variables/w': 100})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  _sigkill_after(_SLOW_PUSH, [str(tmp_path / 'p'), base],
                 'PAYLOADS-WRITTEN')
  version = storage.join(base, '1700000000')
  assert storage.list_names(version) == ['payload/00000000',
                                         'payload/00000001']
  with pytest.raises(te.errors.UnsupportedFormatError, match='incomplete'):
    te.inspect_package(version)
  r = click.testing.CliRunner().invoke(cli.main, ['clean', base])
  assert r.exit_code == 0, r.output
  assert 'left ' in r.output and storage.list_names(version)  # too recent
  r = click.testing.CliRunner().invoke(cli.main, ['clean', base,
                                                  '--older-than', '0'])
  assert r.exit_code == 0, r.output
  assert f'removed {version}' in r.output
  assert storage.list_names(base) == []
  from tfx_encrypt.components.encrypt_pusher import push  # pylint: disable=g-import-not-at-top
  target, v = push.push_package(str(tmp_path / 'p'), base,
                                version='1700000000')
  assert v == '1700000000' and te.inspect_package(target).file_count == 3


# --------------------------------------------------------------------------
# BeamEncryptPusher's staging prefixes (`.NAME.tfxe-beam-TOKEN/`).
# --------------------------------------------------------------------------

_KILLED_BEAM_RUN = r'''
import sys, time
import apache_beam as beam
from tfx_encrypt.components.encrypt_pusher import beam_executor
from tfx_encrypt.storage import _assemble

def stop(*a, **k):  # the job is done: parts and results are written
  print('PARTS-WRITTEN', flush=True)
  time.sleep(600)  # SIGKILLed here
_assemble.assemble = stop
beam_executor.encrypt_model_with_beam(
    sys.argv[1], sys.argv[2], recipients=[sys.argv[3]],
    worker_identity=sys.argv[4], segment_bytes=1 << 20,
    make_pipeline=beam.Pipeline)
'''


def test_sigkilled_beam_run_staging_is_cleaned(tmp_path, keys, store):
  """A real Beam run killed with SIGKILL after its workers wrote their
  parts and results: its staging prefix is left; clean reports it while
  it is recent, then removes it and nothing else."""
  base = store.new_base()
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': b'\x08\x01',
                                         'variables/v': 6 * MiB + 5,
                                         'variables/w': 100})
  for rel in ('saved_model.pb', 'variables/v', 'variables/w'):
    with open(os.path.join(src, *rel.split('/')), 'rb') as f:
      storage.put(storage.join(base, 'model', rel), f.read())
  _sigkill_after(_KILLED_BEAM_RUN,
                 [storage.join(base, 'model'), storage.join(base, 'out', 'pkg'),
                  keys.pub('x'), keys.priv('x')], 'PARTS-WRITTEN')
  left = storage.list_names(storage.join(base, 'out'))
  [stage] = {n.split('/')[0] for n in left}
  assert stage.startswith('.pkg.tfxe-beam-')
  assert 'tfxe-beam-staging.json' in [n.split('/', 1)[1] for n in left]
  assert any('/parts/' in n for n in left)
  assert any('/results/' in n for n in left)
  stage_uri = storage.join(base, 'out', stage)
  r = click.testing.CliRunner().invoke(
      cli.main, ['clean', storage.join(base, 'out')])
  assert r.exit_code == 0, r.output
  assert f'left {stage_uri}: a Beam run' in r.output
  assert 'nothing to clean' in r.output
  assert storage.list_names(storage.join(base, 'out')) == left
  r = click.testing.CliRunner().invoke(
      cli.main, ['clean', storage.join(base, 'out'), '--older-than', '0'])
  assert r.exit_code == 0, r.output
  assert (f"removed {stage_uri} (a Beam run's temporary objects: "
          f'{len(left)} objects)') in r.output
  assert storage.list_names(storage.join(base, 'out')) == []
  assert sorted(storage.list_names(base)) == [
      'model/saved_model.pb', 'model/variables/v', 'model/variables/w']


def _our_stage(parent, name='pkg', token='0123456789abcdef'):
  """A staging prefix as a run leaves it: marker, a part starting a
  payload stream, a later part, a digest record."""
  from tfx_encrypt.package import _parts  # pylint: disable=g-import-not-at-top
  stage = storage.join(parent, f'.{name}.tfxe-beam-{token}')
  _parts.write_staging_marker(stage, storage.join(parent, name))
  storage.put(storage.join(stage, 'parts/00000000/0000000000'),
              bytes([40]) + os.urandom(5 * MiB))
  storage.put(storage.join(stage, 'parts/00000000/0000000005'),
              os.urandom(1000))
  storage.put(storage.join(stage, 'results/00000000.json'),
              b'{"index": 0, "plain_digest": "aa", "cipher_digest": "bb", '
              b'"ct_size": 5243881, "pids": [1], "work_items": 2}')
  return stage


def test_clean_removes_only_old_beam_staging_of_ours(store):
  """Named like ours AND holding what a run writes (its marker naming the
  prefix, parts, results): removed once old enough. Lookalikes, each off
  in one way, are never touched, however old."""
  from tfx_encrypt.package import _parts  # pylint: disable=g-import-not-at-top
  base = store.new_base()
  ours = _our_stage(base)
  # Lookalikes:
  no_marker = _our_stage(base, token='1' * 16)
  storage.delete(storage.join(no_marker, _parts.STAGING_MARKER))
  foreign = _our_stage(base, token='2' * 16)
  storage.put(storage.join(foreign, 'notes.txt'), b'mine')
  bad_part = _our_stage(base, token='3' * 16)
  storage.put(storage.join(bad_part, 'parts/00000000/0000000000'),
              b'not a payload stream' * 4)
  copied_marker = _our_stage(base, token='4' * 16)  # names another prefix
  with storage.open_reader(storage.join(ours, _parts.STAGING_MARKER)) as r:
    storage.put(storage.join(copied_marker, _parts.STAGING_MARKER),
                r.read_range(0, r.size))
  bad_result = _our_stage(base, token='5' * 16)
  storage.put(storage.join(bad_result, 'results/00000000.json'), b'[1]')
  fake_marker = storage.join(base, '.pkg.tfxe-beam-' + '6' * 16)
  storage.put(storage.join(fake_marker, _parts.STAGING_MARKER),
              b'{"tag": "something else", "staging": ".pkg.tfxe-beam-'
              + b'6' * 16 + b'"}')
  # Our content under names that are not a staging prefix's:
  for name in ('.pkg.tfxe-tmp-' + '7' * 16, '.pkg.tfxe-beam-' + '8' * 15,
               '.pkg.tfxe-beam-' + '9' * 16 + '.lock', 'pkg-beam'):
    src = _our_stage(base, token='a' * 16)
    for n in storage.list_names(src):
      with storage.open_reader(storage.join(src, n)) as r:
        storage.put(storage.join(base, name, n), r.read_range(0, r.size))
      storage.delete(storage.join(src, n))
  before = storage.list_objects(base)

  # Recent: reported, left alone (the run may still be going).
  found = layout.clean_remote(base, older_than_s=3600)
  assert [(f.uri, f.kind, f.removed) for f in found] == [
      (ours, 'beam-staging', False)]
  assert storage.list_objects(base) == before

  # Two hours later: ours removed, and nothing else.
  found = layout.clean_remote(base, older_than_s=3600,
                              now=time.time() + 7200)
  assert [(f.uri, f.kind, f.removed, f.objects) for f in found] == [
      (ours, 'beam-staging', True, 4)]
  after = storage.list_objects(base)
  prefix = ours.rpartition('/')[2] + '/'
  assert set(before) - set(after) == {n for n in before
                                      if n.startswith(prefix)}
  assert all(after[n] == before[n] for n in after)


def test_clean_a_staging_prefix_uri_itself(store):
  base = store.new_base()
  stage = _our_stage(storage.join(base, 'artifacts'))
  storage.put(storage.join(base, 'artifacts', 'pkg', 'tfxe.header'), b'h')
  r = click.testing.CliRunner().invoke(
      cli.main, ['clean', stage, '--older-than', '0'])
  assert r.exit_code == 0, r.output
  assert f'removed {stage}' in r.output
  assert storage.list_names(storage.join(base, 'artifacts')) == [
      'pkg/tfxe.header']


def test_clean_removes_only_old_bundle_headers_of_ours(store):
  """The hidden header a bundle upload to gs:// writes before its compose
  (storage/_bundle.py), left by a SIGKILL: removed when old; lookalikes
  (not starting with the magic, too large, other names, under a prefix)
  never."""
  from tfx_encrypt.format import header as header_lib  # pylint: disable=g-import-not-at-top
  base = store.new_base()
  ours = storage.join(base, '.model.tfxe.tfxe-bundle-0123456789abcdef')
  storage.put(ours, header_lib.MAGIC + b'rest of a header')
  keep = {
      '.model.tfxe.tfxe-bundle-fedcba9876543210': b'not a header',
      '.big.tfxe.tfxe-bundle-00112233445566aa':
          header_lib.MAGIC + b'x' * header_lib.MAX_HEADER,
      '.model.tfxe.tfxe-bundle-0123': header_lib.MAGIC,
      'model.tfxe.tfxe-bundle-0123456789abcdef': header_lib.MAGIC,
      '.d.tfxe-bundle-0123456789abcdef/x': header_lib.MAGIC,
  }
  for name, data in keep.items():
    storage.put(storage.join(base, name), data)
  found = layout.clean_remote(base, older_than_s=3600)
  assert [(f.uri, f.removed, f.kind) for f in found] == [
      (ours, False, 'bundle-header')]
  assert storage.exists(ours)
  found = layout.clean_remote(base, older_than_s=3600,
                              now=time.time() + 7200)
  assert [(f.uri, f.removed) for f in found] == [(ours, True)]
  assert not storage.exists(ours)
  assert sorted(storage.list_names(base)) == sorted(keep)
  out = click.testing.CliRunner().invoke(
      cli.main, ['clean', base, '--older-than', '0'])
  assert out.exit_code == 0, out.output
  assert 'nothing to clean' in out.output
  assert sorted(storage.list_names(base)) == sorted(keep)
