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
  env = dict(os.environ)
  proc = subprocess.Popen(
      [sys.executable, '-c', _SLOW_PUSH, str(tmp_path / 'p'), base],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
      env=env)
  try:
    line = proc.stdout.readline()
    assert 'PAYLOADS-WRITTEN' in line, proc.stderr.read()[-2000:]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
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
