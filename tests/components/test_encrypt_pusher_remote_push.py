"""EncryptPusher's push to gs:// and s3://: create-only, never overwriting.

Against moto's standalone server (s3://, real boto3, which enforces
`If-None-Match: *`) and gcp-storage-emulator with the TEST-ONLY
`ifGenerationMatch=0` patch of tests/fakes/gcs_emulator.py (gs://, real
google-cloud-storage client); both on loopback (tests/fakes/stores.py).
"""

import os
import subprocess
import sys
import time

import pytest

import tfx_encrypt
from tfx_encrypt import errors
from tfx_encrypt import package as package_lib
from tfx_encrypt import storage
from tfx_encrypt.components.encrypt_pusher import push as push_lib
from tfx_encrypt.components.encrypt_pusher import spec
from tests import _util

V = 1700000000


@pytest.fixture(params=['s3', 'gs'])
def store(request):
  return request.getfixturevalue(f'{request.param}_store')


@pytest.fixture(scope='module')
def lkeys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


def _package(root, lkeys, bundle=False, seed=0):
  src = _util.make_tree(os.path.join(root, 'm'), {
      'saved_model.pb': b'\x08\x01', 'variables/data': 3 * (1 << 20) + seed,
      'variables/index': 100})
  pkg = os.path.join(root, 'pkg')
  if bundle:
    os.makedirs(pkg)
    package_lib.encrypt_model(src, os.path.join(pkg, spec.BUNDLE_FILE_NAME),
                              recipients=[lkeys.pub('x')], bundle=True)
  else:
    package_lib.encrypt_model(src, pkg, recipients=[lkeys.pub('x')])
  return src, pkg


def _pkg_uri(target, bundle):
  return storage.join(target, spec.BUNDLE_FILE_NAME) if bundle else target


@pytest.mark.parametrize('bundle', [False, True], ids=['dir', 'bundle'])
def test_push_then_read_back(tmp_path, lkeys, store, bundle):
  src, pkg = _package(str(tmp_path), lkeys, bundle)
  base = store.new_base()
  target, version = push_lib.push_package(pkg, base, version=str(V))
  assert (target, version) == (storage.join(base, str(V)), str(V))
  names = storage.list_names(target)
  if bundle:
    assert names == [spec.BUNDLE_FILE_NAME]
  else:
    assert names == ['payload/00000000', 'payload/00000001',
                     'payload/00000002', 'tfxe.header']
  local = package_lib.inspect_package(
      os.path.join(pkg, spec.BUNDLE_FILE_NAME) if bundle else pkg)
  assert package_lib.inspect_package(
      _pkg_uri(target, bundle)).package_id == local.package_id
  package_lib.decrypt_model(_pkg_uri(target, bundle), tmp_path / 'out',
                            identities=[lkeys.priv('x')], allow_unsigned=True)
  assert _util.read_tree(tmp_path / 'out') == _util.read_tree(src)
  # The next push of the same version goes to the next one.
  target2, version2 = push_lib.push_package(pkg, base, version=str(V))
  assert version2 == str(V + 1) and target2 == storage.join(base, str(V + 1))


def test_a_version_holding_anything_is_left_alone(tmp_path, lkeys, store):
  _, pkg = _package(str(tmp_path), lkeys)
  base = store.new_base()
  foreign = storage.join(base, str(V), 'payload', '00000000')
  storage.put(foreign, b'someone else')  # e.g. an incomplete push
  _, version = push_lib.push_package(pkg, base, version=str(V))
  assert version == str(V + 1)
  assert storage.list_names(storage.join(base, str(V))) == ['payload/00000000']
  with storage.open_reader(foreign) as r:
    assert r.read_range(0, 100) == b'someone else'


def test_header_collision_removes_this_push_and_takes_the_next(
    tmp_path, lkeys, store, monkeypatch):
  """Another writer commits the version between our check and our header:
  our header write fails create-only, our payloads go, next version."""
  _, pkg = _package(str(tmp_path), lkeys)
  base = store.new_base()
  theirs = storage.join(base, str(V), 'tfxe.header')
  storage.put(theirs, b'their header')
  real_list = storage.list_names
  calls = []

  def list_names(uri):  # our existence check misses it once (the race)
    calls.append(uri)
    return [] if len(calls) == 1 else real_list(uri)
  monkeypatch.setattr(push_lib.storage, 'list_names', list_names)
  _, version = push_lib.push_package(pkg, base, version=str(V))
  assert version == str(V + 1)
  assert real_list(storage.join(base, str(V))) == ['tfxe.header']
  with storage.open_reader(theirs) as r:
    assert r.read_range(0, 100) == b'their header'
  assert real_list(storage.join(base, str(V + 1)))[-1] == 'tfxe.header'


def test_failed_push_removes_its_payload_objects(tmp_path, lkeys, store,
                                                 monkeypatch):
  _, pkg = _package(str(tmp_path), lkeys)
  base = store.new_base()
  real_put = storage.put_create_only

  def put_create_only(uri, data):
    if uri.endswith('tfxe.header'):
      raise ConnectionError('network down')
    return real_put(uri, data)
  monkeypatch.setattr(push_lib.storage, 'put_create_only', put_create_only)
  with pytest.raises(ConnectionError):
    push_lib.push_package(pkg, base, version=str(V))
  assert storage.list_names(base) == []


def test_not_a_package_is_refused(tmp_path, store):
  (tmp_path / 'x').mkdir()
  (tmp_path / 'x' / 'f').write_text('x')
  with pytest.raises(errors.UsageError):
    push_lib.push_package(str(tmp_path / 'x'), store.new_base(),
                          version=str(V))


_PUSH_SCRIPT = r'''
import os, sys, time
from tfx_encrypt.components.encrypt_pusher import push
go, base, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
pkgs = sys.argv[4:]
while not os.path.exists(go):
  time.sleep(0.01)
for _ in range(rounds):
  for pkg in pkgs:
    print(push.push_package(pkg, base, version='1700000000')[1], flush=True)
'''


@pytest.mark.slow
@pytest.mark.parametrize('bundle', [False, True], ids=['dir', 'bundle'])
def test_two_processes_racing_never_overwrite(tmp_path, lkeys, store,
                                              bundle):
  pkgs = []
  for i in range(2):
    _, p = _package(str(tmp_path / f'p{i}'), lkeys, bundle, seed=i)
    pkgs.append(p)
  ids = {package_lib.inspect_package(_pkg_uri(p, bundle)).package_id: i
         for i, p in enumerate(pkgs)}
  base, go = store.new_base(), str(tmp_path / 'go')
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(tfx_encrypt.__file__)))]
      + [p for p in [env.get('PYTHONPATH')] if p])
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  rounds = 3
  procs = [subprocess.Popen(
      [sys.executable, '-c', _PUSH_SCRIPT, go, base, str(rounds), p],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
           for p in pkgs]
  time.sleep(3.0)  # both have imported TFX and wait at the line
  open(go, 'w').close()
  versions = {}
  for i, p in enumerate(procs):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    versions[i] = [int(v) for v in out.split()]
  every = sorted(versions[0] + versions[1])
  assert every == list(range(V, V + 2 * rounds))  # distinct, no gap
  for i, vs in versions.items():
    for v in vs:  # each version is complete and holds that writer's package
      info = package_lib.inspect_package(
          _pkg_uri(storage.join(base, str(v)), bundle))
      assert ids[info.package_id] == i
      package_lib.verify_package(_pkg_uri(storage.join(base, str(v)), bundle),
                                 allow_unsigned=True)
  # Nothing else: no leftover payloads of a push that lost a version.
  expect = 1 if bundle else 4
  assert len(storage.list_names(base)) == expect * 2 * rounds


def test_executor_pushes_to_the_store(tmp_path, model_uri, keys, store):
  """EncryptPusher with a gs:// / s3:// push_destination: the pushed
  version decrypts, from the store, to the model byte for byte."""
  from tfx_encrypt.components.encrypt_pusher import executor as executor_lib  # pylint: disable=g-import-not-at-top
  from tests.components import test_encrypt_pusher_executor as ext  # pylint: disable=g-import-not-at-top
  base = store.new_base()
  inputs, outputs, encrypted, pushed = ext._artifacts(  # pylint: disable=protected-access
      tmp_path, model_uri, blessed=True)
  executor_lib.Executor(ext._context(tmp_path)).Do(  # pylint: disable=protected-access
      inputs, outputs, ext._props(keys, base))  # pylint: disable=protected-access
  version = pushed.get_string_custom_property('pushed_version')
  dest = pushed.get_string_custom_property('pushed_destination')
  assert dest == storage.join(base, version)
  assert pushed.get_int_custom_property('pushed') == 1
  assert package_lib.inspect_package(dest).payload_digest == (
      package_lib.inspect_package(encrypted.uri).payload_digest)
  package_lib.decrypt_model(dest, tmp_path / 'decrypted',
                            identities=[keys.recipient_key],
                            trusted=[keys.signer_pub])
  want = os.path.join(model_uri, 'Format-Serving')
  assert _util.read_tree(tmp_path / 'decrypted') == _util.read_tree(want)


def _remote_artifacts(tmp_path, model_uri, encrypted_uri):
  from tests.components import test_encrypt_pusher_executor as ext  # pylint: disable=g-import-not-at-top
  inputs, outputs, encrypted, pushed = ext._artifacts(  # pylint: disable=protected-access
      tmp_path, model_uri, blessed=True)
  encrypted.uri = encrypted_uri  # a remote pipeline root
  return inputs, outputs, encrypted, pushed


@pytest.mark.parametrize('bundle', [False, True], ids=['dir', 'bundle'])
def test_executor_writes_the_artifact_to_the_store(tmp_path, model_uri, keys,
                                                   store, bundle):
  from tfx_encrypt.components.encrypt_pusher import executor as executor_lib  # pylint: disable=g-import-not-at-top
  from tests.components import test_encrypt_pusher_executor as ext  # pylint: disable=g-import-not-at-top
  root = store.new_base()
  art = storage.join(root, 'EncryptPusher', 'encrypted_model', '7')
  # An earlier attempt of this execution left a package there: replaced.
  storage.put(storage.join(art, 'payload', '00000000'), b'old payload')
  inputs, outputs, encrypted, pushed = _remote_artifacts(tmp_path, model_uri,
                                                         art)
  props = ext._props(keys, storage.join(root, 'serving'))  # pylint: disable=protected-access
  if bundle:
    props[spec.BUNDLE_KEY] = 1
  executor_lib.Executor(ext._context(tmp_path)).Do(inputs, outputs, props)  # pylint: disable=protected-access
  pkg = _pkg_uri(art, bundle)
  info = package_lib.inspect_package(pkg)
  dest = pushed.get_string_custom_property('pushed_destination')
  assert package_lib.inspect_package(_pkg_uri(dest, bundle)).payload_digest \
      == info.payload_digest
  package_lib.decrypt_model(pkg, tmp_path / 'decrypted',
                            identities=[keys.recipient_key],
                            trusted=[keys.signer_pub])
  want = os.path.join(model_uri, 'Format-Serving')
  assert _util.read_tree(tmp_path / 'decrypted') == _util.read_tree(want)


def test_executor_never_replaces_foreign_artifact_content(tmp_path, model_uri,
                                                          keys, store):
  from tfx_encrypt.components.encrypt_pusher import executor as executor_lib  # pylint: disable=g-import-not-at-top
  from tests.components import test_encrypt_pusher_executor as ext  # pylint: disable=g-import-not-at-top
  root = store.new_base()
  art = storage.join(root, 'encrypted_model', '7')
  storage.put(storage.join(art, 'notes.txt'), b'mine')
  inputs, outputs, _, _ = _remote_artifacts(tmp_path, model_uri, art)
  with pytest.raises(errors.OutputExistsError, match='already has content'):
    executor_lib.Executor(ext._context(tmp_path)).Do(  # pylint: disable=protected-access
        inputs, outputs, ext._props(keys, storage.join(root, 'serving')))  # pylint: disable=protected-access
  assert storage.list_names(art) == ['notes.txt']
  assert storage.list_names(storage.join(root, 'serving')) == []


def _bundle_leftovers(art, payload=b'\x28' + b'c' * 99, header=None):
  """What a bundle upload to gs:// SIGKILLed before its compose leaves in
  the artifact: the payload streams under the bundle's name, the header in
  a hidden sibling (storage/_bundle.py)."""
  from tfx_encrypt.format import header as header_lib  # pylint: disable=g-import-not-at-top
  storage.put(storage.join(art, spec.BUNDLE_FILE_NAME, 'payload', '00000000'),
              payload)
  storage.put(storage.join(art, f'.{spec.BUNDLE_FILE_NAME}.tfxe-bundle-'
                                '0123456789abcdef'),
              header if header is not None else header_lib.MAGIC + b'h')


def test_executor_clears_what_a_killed_bundle_upload_left(tmp_path, model_uri,
                                                          keys, store):
  from tfx_encrypt.components.encrypt_pusher import executor as executor_lib  # pylint: disable=g-import-not-at-top
  from tests.components import test_encrypt_pusher_executor as ext  # pylint: disable=g-import-not-at-top
  root = store.new_base()
  art = storage.join(root, 'encrypted_model', '7')
  _bundle_leftovers(art)
  inputs, outputs, _, _ = _remote_artifacts(tmp_path, model_uri, art)
  props = ext._props(keys, storage.join(root, 'serving'))  # pylint: disable=protected-access
  props[spec.BUNDLE_KEY] = 1
  executor_lib.Executor(ext._context(tmp_path)).Do(inputs, outputs, props)  # pylint: disable=protected-access
  assert storage.list_names(art) == [spec.BUNDLE_FILE_NAME]
  package_lib.decrypt_model(_pkg_uri(art, True), tmp_path / 'decrypted',
                            identities=[keys.recipient_key],
                            trusted=[keys.signer_pub])


@pytest.mark.parametrize('bad', ['payload', 'header'])
def test_bundle_leftover_lookalikes_are_refused(tmp_path, model_uri, keys,
                                                store, bad):
  from tfx_encrypt.components.encrypt_pusher import executor as executor_lib  # pylint: disable=g-import-not-at-top
  from tests.components import test_encrypt_pusher_executor as ext  # pylint: disable=g-import-not-at-top
  root = store.new_base()
  art = storage.join(root, 'encrypted_model', '7')
  if bad == 'payload':
    _bundle_leftovers(art, payload=b'not a payload stream')
  else:
    _bundle_leftovers(art, header=b'not a header')
  before = storage.list_names(art)
  inputs, outputs, _, _ = _remote_artifacts(tmp_path, model_uri, art)
  props = ext._props(keys, storage.join(root, 'serving'))  # pylint: disable=protected-access
  props[spec.BUNDLE_KEY] = 1
  with pytest.raises(errors.OutputExistsError, match='already has content'):
    executor_lib.Executor(ext._context(tmp_path)).Do(inputs, outputs, props)  # pylint: disable=protected-access
  assert storage.list_names(art) == before
