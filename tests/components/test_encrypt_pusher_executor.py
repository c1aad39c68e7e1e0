"""Executor tests on a real SavedModel (no orchestrator)."""

import json
import os
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest
import tfx_encrypt
from tfx.dsl.components.base import base_executor
from tfx.proto.orchestration import pipeline_pb2
from tfx.types import standard_artifacts

from tfx_encrypt.format import header as header_lib
from tfx_encrypt import errors
from tfx_encrypt import package as package_lib
from tfx_encrypt import types as tfxe_types
from tfx_encrypt.components.encrypt_pusher import executor as executor_lib
from tfx_encrypt.components.encrypt_pusher import push as push_lib
from tfx_encrypt.components.encrypt_pusher import spec


def _artifacts(tmp_path, model_uri, blessed=None, infra_blessed=None):
  model = standard_artifacts.Model()
  model.uri = model_uri
  inputs = {spec.MODEL_KEY: [model]}
  if blessed is not None:
    b = standard_artifacts.ModelBlessing()
    b.uri = str(tmp_path / 'blessing')
    b.set_int_custom_property('blessed', int(blessed))
    inputs[spec.MODEL_BLESSING_KEY] = [b]
  if infra_blessed is not None:
    b = standard_artifacts.InfraBlessing()
    b.uri = str(tmp_path / 'infra_blessing')
    b.set_int_custom_property('blessed', int(infra_blessed))
    inputs[spec.INFRA_BLESSING_KEY] = [b]
  encrypted = tfxe_types.EncryptedModel()
  encrypted.uri = str(tmp_path / 'out' / 'encrypted_model' / '7')
  pushed = standard_artifacts.PushedModel()
  pushed.uri = str(tmp_path / 'out' / 'pushed_model' / '7')
  for a in (encrypted, pushed):  # TFX pre-creates output directories.
    os.makedirs(a.uri)
  outputs = {spec.ENCRYPTED_MODEL_KEY: [encrypted],
             spec.PUSHED_MODEL_KEY: [pushed]}
  return inputs, outputs, encrypted, pushed


def _props(keys, dest, **extra):
  props = {
      spec.RECIPIENTS_KEY: json.dumps([keys.recipient]),
      spec.SIGNER_KEY: keys.signer,
      spec.PUSH_DESTINATION_KEY: dest,
      spec.ENCRYPTION_CONTEXT_KEY: json.dumps({'team': 'ml'}),
      spec.CUSTOM_CONFIG_KEY: 'null',
  }
  props.update(extra)
  return props


def _context(tmp_path):
  node = pipeline_pb2.PipelineNode()
  node.node_info.id = 'EncryptPusher'
  return base_executor.BaseExecutor.Context(
      tmp_dir=str(tmp_path / 'tmp'), unique_id='7',
      pipeline_info=pipeline_pb2.PipelineInfo(id='fraud-pipeline'),
      pipeline_node=node, pipeline_run_id='run-2024-01-01')


def test_blessed_model_is_encrypted_and_pushed(tmp_path, model_uri, keys,
                                               predict_fn,
                                               expected_predictions):
  dest = str(tmp_path / 'serving')
  inputs, outputs, encrypted, pushed = _artifacts(tmp_path, model_uri,
                                                  blessed=True,
                                                  infra_blessed=True)
  ex = executor_lib.Executor(_context(tmp_path))
  ex.Do(inputs, outputs, _props(keys, dest))

  versions = os.listdir(dest)
  assert len(versions) == 1 and versions[0].isdigit()
  version = versions[0]
  assert abs(int(version) - time.time()) < 120
  pushed_path = os.path.join(dest, version)

  for a in (encrypted, pushed):
    assert a.get_int_custom_property('pushed') == 1
    assert a.get_string_custom_property('pushed_destination') == pushed_path
    assert a.get_string_custom_property('pushed_version') == version
    assert a.get_int_custom_property('format_version') == header_lib.FORMAT_VERSION
    assert a.get_string_custom_property('cipher') == 'aes-256-gcm'
    assert a.get_string_custom_property('signer_id').startswith('sha256:')
    assert a.get_string_custom_property('model_fingerprint').startswith(
        'sha256:')
    assert a.get_string_custom_property('ciphertext_digest').startswith(
        'sha256:')
    assert a.get_int_custom_property('file_count') >= 3
    assert a.get_int_custom_property('plaintext_bytes') > 0
    assert a.get_int_custom_property('ciphertext_bytes') > a.get_int_custom_property('plaintext_bytes')
    assert json.loads(a.get_string_custom_property('recipient_uris')) == [
        keys.recipient]
    key_ids = json.loads(a.get_string_custom_property('recipient_key_ids'))
    assert len(key_ids) == 1 and key_ids[0].startswith('sha256:')
  ctx = json.loads(encrypted.get_string_custom_property('encryption_context'))
  assert ctx['team'] == 'ml'
  assert ctx['tfx.pipeline_name'] == 'fraud-pipeline'
  assert ctx['tfx.pipeline_run_id'] == 'run-2024-01-01'
  assert ctx['tfx.component_id'] == 'EncryptPusher'
  assert ctx['tfx.model_uri'] == model_uri

  # The artifact holds the package; the pushed copy is byte-identical.
  info = package_lib.inspect_package(encrypted.uri)
  assert info.context == ctx
  assert package_lib.inspect_package(pushed_path).payload_digest == (
      info.payload_digest)
  assert info.fingerprint == encrypted.get_string_custom_property(
      'model_fingerprint')
  # No plaintext and no temporary directories anywhere we wrote.
  assert not [n for n in os.listdir(os.path.dirname(encrypted.uri))
              if n != '7']
  assert sorted(os.listdir(pushed_path)) == ['payload', 'tfxe.header']

  out = str(tmp_path / 'decrypted')
  package_lib.decrypt_model(pushed_path, out, identities=[keys.recipient_key],
                            trusted=[keys.signer_pub])
  assert (predict_fn(out) == expected_predictions).all()


@pytest.mark.parametrize('blessed,infra', [(False, None), (True, False),
                                           (None, False)])
def test_unblessed_model_is_not_encrypted_or_pushed(tmp_path, model_uri, keys,
                                                    blessed, infra):
  dest = str(tmp_path / 'serving')
  inputs, outputs, encrypted, pushed = _artifacts(tmp_path, model_uri,
                                                  blessed=blessed,
                                                  infra_blessed=infra)
  executor_lib.Executor().Do(inputs, outputs, _props(keys, dest))
  for a in (encrypted, pushed):
    assert a.get_int_custom_property('pushed') == 0
    assert not a.has_custom_property('model_fingerprint')
  assert not os.path.exists(dest)
  assert os.listdir(encrypted.uri) == []


def test_no_push_destination_records_package_only(tmp_path, model_uri, keys):
  inputs, outputs, encrypted, pushed = _artifacts(tmp_path, model_uri)
  executor_lib.Executor().Do(
      inputs, outputs, _props(keys, None, **{spec.BUNDLE_KEY: 1}))
  assert encrypted.get_int_custom_property('pushed') == 0
  assert encrypted.get_int_custom_property('bundle') == 1
  bundle = os.path.join(encrypted.uri, spec.BUNDLE_FILE_NAME)
  assert package_lib.inspect_package(bundle).bundle
  assert pushed.get_string_custom_property('encrypted_model_uri') == (
      encrypted.uri)


def test_second_push_gets_new_version_first_untouched(tmp_path, model_uri,
                                                      keys):
  dest = str(tmp_path / 'serving')
  inputs, outputs, _, _ = _artifacts(tmp_path / 'a', model_uri)
  now = int(time.time())
  with mock.patch.object(executor_lib.time, 'time', return_value=now):
    executor_lib.Executor().Do(inputs, outputs, _props(keys, dest))
    first = os.path.join(dest, str(now))
    snapshot = _snapshot(first)
    inputs, outputs, _, pushed = _artifacts(tmp_path / 'b', model_uri)
    executor_lib.Executor().Do(inputs, outputs, _props(keys, dest))
  assert sorted(os.listdir(dest)) == [str(now), str(now + 1)]
  assert pushed.get_string_custom_property('pushed_version') == str(now + 1)
  assert _snapshot(first) == snapshot


def _snapshot(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


def test_concurrent_pushes_same_second_never_overwrite(tmp_path, model_uri,
                                                       keys):
  """Threads pushing packages in the same second get distinct versions."""
  packages = []
  for i in range(6):
    p = str(tmp_path / f'pkg{i}')
    package_lib.encrypt_model(os.path.join(model_uri, 'Format-Serving'), p,
                              recipients=[keys.recipient])
    packages.append(p)
  dest = str(tmp_path / 'serving')
  barrier = threading.Barrier(len(packages))
  results, failures = {}, []

  def push(i):
    try:
      barrier.wait()
      results[i] = push_lib.push_package(packages[i], dest,
                                         version='1700000000')
    except Exception as e:  # pylint: disable=broad-except
      failures.append(e)

  threads = [threading.Thread(target=push, args=(i,))
             for i in range(len(packages))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not failures
  versions = sorted(int(v) for _, v in results.values())
  assert versions == list(range(1700000000, 1700000000 + len(packages)))
  assert sorted(os.listdir(dest)) == [str(v) for v in versions]
  for i, (path, _) in results.items():
    assert (package_lib.inspect_package(path).package_id ==
            package_lib.inspect_package(packages[i]).package_id)


_PUSH_SCRIPT = r'''
import os, sys, time
from tfx_encrypt.components.encrypt_pusher import push
pkg, dest, go = sys.argv[1:4]
while not os.path.exists(go):
  time.sleep(0.01)
path, version = push.push_package(pkg, dest, version='1700000000')
print(version)
'''


@pytest.mark.slow
def test_concurrent_pushes_from_processes(tmp_path, model_uri, keys):
  packages = []
  for i in range(2):
    p = str(tmp_path / f'pkg{i}')
    package_lib.encrypt_model(os.path.join(model_uri, 'Format-Serving'), p,
                              recipients=[keys.recipient])
    packages.append(p)
  dest, go = str(tmp_path / 'serving'), str(tmp_path / 'go')
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(tfx_encrypt.__file__)))]
      +
      [p for p in [env.get('PYTHONPATH')] if p])
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  procs = [subprocess.Popen([sys.executable, '-c', _PUSH_SCRIPT, p, dest, go],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True) for p in packages]
  time.sleep(1.0)
  open(go, 'w').close()
  versions = []
  for p in procs:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-2000:]
    versions.append(out.strip().splitlines()[-1])
  assert sorted(versions) == ['1700000000', '1700000001']
  assert sorted(os.listdir(dest)) == ['1700000000', '1700000001']


def test_existing_version_is_never_replaced(tmp_path, model_uri, keys):
  dest = tmp_path / 'serving'
  (dest / '1700000000').mkdir(parents=True)  # even an empty one
  (dest / '1700000001').write_text('a file')
  pkg = str(tmp_path / 'pkg')
  package_lib.encrypt_model(os.path.join(model_uri, 'Format-Serving'), pkg,
                            recipients=[keys.recipient])
  path, version = push_lib.push_package(pkg, str(dest),
                                        version='1700000000')
  assert version == '1700000002'
  assert os.listdir(dest / '1700000000') == []
  assert (dest / '1700000001').read_text() == 'a file'
  assert sorted(os.listdir(dest)) == ['1700000000', '1700000001',
                                      '1700000002']
  assert path == str(dest / '1700000002')


def test_failing_recipient_leaves_nothing(tmp_path, model_uri, keys,
                                          monkeypatch):
  monkeypatch.setenv('AWS_ENDPOINT_URL', 'http://127.0.0.1:9')
  monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'testing')
  monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'testing')
  monkeypatch.setenv('TFXE_RETRY_MAX_ATTEMPTS', '1')
  dest = str(tmp_path / 'serving')
  inputs, outputs, encrypted, _ = _artifacts(tmp_path, model_uri)
  props = _props(keys, dest)
  props[spec.RECIPIENTS_KEY] = json.dumps([
      keys.recipient,
      'aws-kms://arn:aws:kms:us-east-1:111122223333:key/'
      '1234abcd-12ab-34cd-56ef-1234567890ab'])
  with pytest.raises(errors.TfxEncryptError):
    executor_lib.Executor().Do(inputs, outputs, props)
  assert not os.path.exists(dest) or os.listdir(dest) == []
  parent = os.path.dirname(encrypted.uri)
  assert os.listdir(parent) == ['7'] and os.listdir(encrypted.uri) == []


def test_push_failure_cleans_temporary_dirs(tmp_path, model_uri, keys):
  dest = str(tmp_path / 'serving')
  inputs, outputs, _, _ = _artifacts(tmp_path, model_uri)
  real_rename = push_lib.rename_noreplace

  def failing_rename(src, dst):
    if dst.startswith(dest):
      raise OSError(5, 'I/O error')
    real_rename(src, dst)

  with mock.patch.object(push_lib, 'rename_noreplace', failing_rename):
    with pytest.raises(OSError, match='I/O error'):
      executor_lib.Executor().Do(inputs, outputs, _props(keys, dest))
  assert os.listdir(dest) == []


def test_executor_rejects_key_material(tmp_path, model_uri, keys):
  inputs, outputs, _, _ = _artifacts(tmp_path, model_uri)
  with open(keys.recipient_key) as f:
    pem = f.read()
  with pytest.raises(errors.KeyMaterialInParameterError):
    executor_lib.Executor().Do(
        inputs, outputs, _props(keys, str(tmp_path / 'd'),
                                **{spec.SIGNER_KEY: pem}))


def test_remote_filesystems(tmp_path, model_uri, keys, predict_fn,
                            expected_predictions):
  """Model, artifact and destination on a non-local tf.io.gfile scheme."""
  from tfx.dsl.io import fileio  # pylint: disable=g-import-not-at-top
  from tfx.utils import io_utils  # pylint: disable=g-import-not-at-top
  root = f'ram://encrypt-pusher-{os.getpid()}-{time.monotonic_ns()}'
  remote_model = f'{root}/model'
  io_utils.copy_dir(model_uri, remote_model)
  inputs, outputs, encrypted, pushed = _artifacts(tmp_path, remote_model)
  encrypted.uri = f'{root}/out/encrypted_model/7'
  fileio.makedirs(encrypted.uri)
  dest = f'{root}/serving'
  staging_before = _staging_dirs()
  executor_lib.Executor().Do(inputs, outputs, _props(keys, dest))
  executor_lib.Executor().Do(inputs, outputs, _props(keys, dest))
  versions = sorted(fileio.listdir(dest))
  assert len(versions) == 2
  version = pushed.get_string_custom_property('pushed_version')
  assert version == versions[1].rstrip('/')
  local = str(tmp_path / 'fetched')
  io_utils.copy_dir(f'{dest}/{version}', local)
  out = str(tmp_path / 'decrypted')
  package_lib.decrypt_model(local, out, identities=[keys.recipient_key],
                            trusted=[keys.signer_pub])
  assert (predict_fn(out) == expected_predictions).all()
  fetched = str(tmp_path / 'fetched-artifact')
  io_utils.copy_dir(encrypted.uri, fetched)
  assert package_lib.inspect_package(fetched).fingerprint == (
      encrypted.get_string_custom_property('model_fingerprint'))
  # Nothing plaintext or temporary is left in the local staging area.
  assert _staging_dirs() <= staging_before


def _staging_dirs():
  import glob  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  return set(glob.glob(os.path.join(tempfile.gettempdir(),
                                    'tfx-encrypt-staging-*')))


def test_file_uri_model_is_read_not_moved(tmp_path, model_uri, keys):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = str(tmp_path / 'model_copy')
  shutil.copytree(model_uri, copy)
  before = _snapshot(copy)
  inputs, outputs, encrypted, _ = _artifacts(tmp_path, 'file://' + copy)
  executor_lib.Executor().Do(inputs, outputs,
                             _props(keys, 'file://' + str(tmp_path / 'dest')))
  assert _snapshot(copy) == before
  assert encrypted.get_int_custom_property('pushed') == 1
  assert encrypted.get_string_custom_property(
      'pushed_destination').startswith('file://')


def test_remote_artifact_with_foreign_content_is_never_replaced(
    tmp_path, model_uri, keys):
  """docs/SECURITY.md §1: only an empty directory or a package is replaced."""
  from tfx.dsl.io import fileio  # pylint: disable=g-import-not-at-top
  root = f'ram://encrypt-pusher-foreign-{os.getpid()}-{time.monotonic_ns()}'
  inputs, outputs, encrypted, _ = _artifacts(tmp_path, model_uri)
  encrypted.uri = f'{root}/out/encrypted_model/8'
  fileio.makedirs(encrypted.uri)
  with fileio.open(f'{encrypted.uri}/notes.txt', 'wb') as f:
    f.write(b'not ours')
  with pytest.raises(errors.OutputExistsError, match='never replaces'):
    executor_lib.Executor().Do(inputs, outputs, _props(keys, None))
  with fileio.open(f'{encrypted.uri}/notes.txt', 'rb') as f:
    assert f.read() == b'not ours'


# --- the push version in the context (consumer policy, issue 9) ---------------


def _cli(*args):
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  return subprocess.run(
      [sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
      capture_output=True, text=True, timeout=180, check=False,
      env=dict(os.environ, PYTHONPATH=root))


def test_context_records_the_push_version(tmp_path, model_uri, keys):
  """`version` in the signed context equals the pushed version, so that
  `decrypt --min-version` works out of the box."""
  dest = str(tmp_path / 'serving')
  inputs, outputs, encrypted, pushed = _artifacts(tmp_path, model_uri)
  executor_lib.Executor(_context(tmp_path)).Do(inputs, outputs,
                                               _props(keys, dest))
  version = pushed.get_string_custom_property('pushed_version')
  pushed_path = os.path.join(dest, version)
  info = package_lib.inspect_package(pushed_path)
  assert info.context[spec.CONTEXT_VERSION] == version
  assert json.loads(encrypted.get_string_custom_property(
      'encryption_context'))[spec.CONTEXT_VERSION] == version
  v = int(version)
  common = ['decrypt', pushed_path, '-i', keys.recipient_key, '--trust',
            keys.signer_pub]
  r = _cli(*common[:2], tmp_path / 'newer', *common[2:], '--min-version',
           v + 1)
  assert r.returncode == 11, r.stderr
  assert r.stderr.startswith('tfx-encrypt: error: refused by the consumer '
                             f"policy: context key 'version' is '{version}'")
  assert len(r.stderr.splitlines()) == 1
  assert not (tmp_path / 'newer').exists()
  for i, min_version in enumerate((v, v - 1, 0)):
    r = _cli(*common[:2], tmp_path / f'ok{i}', *common[2:], '--min-version',
             min_version, '--require-context', 'team=ml')
    assert r.returncode == 0, r.stderr


def test_context_version_after_a_same_second_collision(tmp_path, model_uri,
                                                       keys):
  """The push directory moves to the next free number; the context keeps
  the version chosen before encrypting."""
  dest = tmp_path / 'serving'
  now = int(time.time())
  (dest / str(now)).mkdir(parents=True)
  inputs, outputs, _, pushed = _artifacts(tmp_path, model_uri)
  with mock.patch.object(executor_lib.time, 'time', return_value=now):
    executor_lib.Executor().Do(inputs, outputs, _props(keys, str(dest)))
  assert pushed.get_string_custom_property('pushed_version') == str(now + 1)
  info = package_lib.inspect_package(str(dest / str(now + 1)))
  assert info.context[spec.CONTEXT_VERSION] == str(now)


def test_user_context_version_is_kept(tmp_path, model_uri, keys):
  dest = str(tmp_path / 'serving')
  inputs, outputs, _, pushed = _artifacts(tmp_path, model_uri)
  executor_lib.Executor().Do(inputs, outputs, _props(
      keys, dest, **{spec.ENCRYPTION_CONTEXT_KEY: json.dumps(
          {'team': 'ml', 'version': 42})}))
  version = pushed.get_string_custom_property('pushed_version')
  assert abs(int(version) - time.time()) < 120  # the push is still dated
  info = package_lib.inspect_package(os.path.join(dest, version))
  assert info.context[spec.CONTEXT_VERSION] == '42'


@pytest.mark.parametrize('bad', ['07', '-1', '1.0', '', '١٢', 'v7', 7.5])
def test_user_context_version_must_be_canonical(tmp_path, model_uri, keys,
                                                bad):
  dest = str(tmp_path / 'serving')
  inputs, outputs, encrypted, _ = _artifacts(tmp_path, model_uri)
  with pytest.raises(errors.UsageError, match=r"encryption_context\['version'\]"
                     ' must be a non-negative integer'):
    executor_lib.Executor().Do(inputs, outputs, _props(
        keys, dest, **{spec.ENCRYPTION_CONTEXT_KEY: json.dumps(
            {'version': bad})}))
  assert not os.path.exists(dest) and os.listdir(encrypted.uri) == []
