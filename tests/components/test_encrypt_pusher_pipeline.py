"""LocalDagRunner + SQLite ML Metadata integration tests of EncryptPusher.

Importer -> EncryptPusher, run for real; the records are read back through
the ml_metadata API.
"""

import json
import os

from click.testing import CliRunner
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2
import pytest
from tfx import v1 as tfx
from tfx.orchestration import metadata

from pipelines import local_pipeline
from tfx_encrypt.format import header as header_lib
from tfx_encrypt import cli
from tfx_encrypt import errors
from tfx_encrypt import package as package_lib

_TYPE = 'tfx_encrypt.EncryptedModel'
_EXECUTION_TYPE = 'tfx_encrypt.components.encrypt_pusher.component.EncryptPusher'
_KMS_KEY = ('aws-kms://arn:aws:kms:us-east-1:111122223333:key/'
            '1234abcd-12ab-34cd-56ef-1234567890ab')
_Event = metadata_store_pb2.Event
_Execution = metadata_store_pb2.Execution


def _store(metadata_path):
  return metadata_store.MetadataStore(
      metadata.sqlite_metadata_connection_config(metadata_path))


def _run(root, model_uri, keys, *, name='encrypt-test', **kwargs):
  kwargs.setdefault('recipients', [keys.recipient])
  kwargs.setdefault('signer', keys.signer)
  kwargs.setdefault('push_destination', os.path.join(root, 'serving'))
  pipeline = local_pipeline.create_pipeline(
      pipeline_name=name,
      pipeline_root=os.path.join(root, 'pipeline_root'),
      metadata_path=os.path.join(root, 'metadata.sqlite'),
      model_uri=model_uri, **kwargs)
  tfx.orchestration.LocalDagRunner().run(pipeline)
  return os.path.join(root, 'metadata.sqlite')


def _props(artifact_or_execution):
  out = {}
  for k, v in artifact_or_execution.custom_properties.items():
    kind = v.WhichOneof('value')
    out[k] = getattr(v, kind)
  return out


def _snapshot(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory, model_uri, keys):
  """The same pipeline run twice (cache off); first-run snapshot taken."""
  root = str(tmp_path_factory.mktemp('pipeline'))
  metadata_path = _run(root, model_uri, keys, blessed=True,
                       encryption_context={'team': 'fraud'})
  store = _store(metadata_path)
  [first] = store.get_artifacts_by_type(_TYPE)
  first_dest = _props(first)['pushed_destination']
  snapshot = _snapshot(first_dest)
  _run(root, model_uri, keys, blessed=True,
       encryption_context={'team': 'fraud'})
  return root, metadata_path, first_dest, snapshot


def test_type_registered_and_artifact_recorded(two_runs, model_uri, keys):
  root, metadata_path, _, _ = two_runs
  store = _store(metadata_path)
  artifact_type = store.get_artifact_type(_TYPE)
  assert not artifact_type.properties
  assert artifact_type.base_type == metadata_store_pb2.ArtifactType.MODEL

  encrypted = sorted(store.get_artifacts_by_type(_TYPE), key=lambda a: a.id)
  assert len(encrypted) == 2
  props = _props(encrypted[0])
  assert props['pushed'] == 1
  assert props['format_version'] == header_lib.FORMAT_VERSION
  assert props['cipher'] == 'aes-256-gcm'
  assert json.loads(props['recipient_uris']) == [keys.recipient]
  assert json.loads(props['recipient_key_ids'])[0].startswith('sha256:')
  assert props['signer_id'].startswith('sha256:')
  assert props['model_fingerprint'].startswith('sha256:')
  assert props['ciphertext_digest'].startswith('sha256:')
  assert props['file_count'] >= 3
  assert props['plaintext_bytes'] > 0 and props['ciphertext_bytes'] > 0
  assert props['pushed_destination'] == os.path.join(
      root, 'serving', props['pushed_version'])
  context = json.loads(props['encryption_context'])
  assert context['team'] == 'fraud'
  assert context['tfx.pipeline_name'] == 'encrypt-test'
  assert context['tfx.component_id'] == 'encrypt_pusher'
  assert context['tfx.pipeline_run_id']
  assert context['tfx.model_uri'] == model_uri
  # What MLMD says is what the package says.
  info = package_lib.inspect_package(encrypted[0].uri)
  assert info.fingerprint == props['model_fingerprint']
  assert info.payload_digest == props['ciphertext_digest']
  assert info.context == context

  [pushed_type] = [t for t in store.get_artifact_types()
                   if t.name == 'PushedModel']
  pushed = store.get_artifacts_by_type(pushed_type.name)
  assert len(pushed) == 2
  assert {_props(p)['pushed_version'] for p in pushed} == {
      _props(e)['pushed_version'] for e in encrypted}


def test_lineage_links_model_execution_outputs(two_runs):
  _, metadata_path, _, _ = two_runs
  store = _store(metadata_path)
  executions = store.get_executions_by_type(_EXECUTION_TYPE)
  assert len(executions) == 2
  for execution in executions:
    assert execution.last_known_state == _Execution.COMPLETE
    events = store.get_events_by_execution_ids([execution.id])
    by_key = {}
    for e in events:
      by_key.setdefault((e.type, e.path.steps[0].key), []).append(
          e.artifact_id)
    assert set(by_key) == {(_Event.INPUT, 'model'),
                           (_Event.INPUT, 'model_blessing'),
                           (_Event.OUTPUT, 'encrypted_model'),
                           (_Event.OUTPUT, 'pushed_model')}
    [model] = store.get_artifacts_by_id(by_key[(_Event.INPUT, 'model')])
    [enc] = store.get_artifacts_by_id(
        by_key[(_Event.OUTPUT, 'encrypted_model')])
    [push] = store.get_artifacts_by_id(by_key[(_Event.OUTPUT, 'pushed_model')])
    types = {t.id: t.name for t in store.get_artifact_types()}
    assert types[model.type_id] == 'Model'
    assert types[enc.type_id] == _TYPE
    assert types[push.type_id] == 'PushedModel'
    # Which model, which run, which keys, pushed where.
    context = json.loads(_props(enc)['encryption_context'])
    assert context['tfx.model_artifact_id'] == str(model.id)
    contexts = {c.name for c in store.get_contexts_by_artifact(enc.id)}
    assert 'encrypt-test' in contexts
    assert context['tfx.pipeline_run_id'] in contexts
    # The execution's parameters hold key URIs only.
    exec_props = _props(execution)
    assert 'recipients' in exec_props
    for value in exec_props.values():
      assert 'BEGIN' not in str(value) and 'PRIVATE' not in str(value)


def test_second_run_new_version_first_untouched(two_runs):
  root, metadata_path, first_dest, snapshot = two_runs
  versions = sorted(os.listdir(os.path.join(root, 'serving')))
  assert len(versions) == 2 and all(v.isdigit() for v in versions)
  assert _snapshot(first_dest) == snapshot
  store = _store(metadata_path)
  dests = {_props(a)['pushed_destination']
           for a in store.get_artifacts_by_type(_TYPE)}
  assert len(dests) == 2


def test_pushed_package_decrypts_with_cli(two_runs, keys, tmp_path, predict_fn,
                                          expected_predictions):
  _, _, first_dest, _ = two_runs
  out = str(tmp_path / 'decrypted')
  result = CliRunner().invoke(cli.main, [
      'decrypt', first_dest, out, '--identity', keys.recipient_key,
      '--trust', keys.signer_pub])
  assert result.exit_code == 0, result.output
  assert (predict_fn(out) == expected_predictions).all()


def test_unblessed_model_is_not_pushed(tmp_path, model_uri, keys):
  root = str(tmp_path)
  metadata_path = _run(root, model_uri, keys, blessed=False)
  store = _store(metadata_path)
  [execution] = store.get_executions_by_type(_EXECUTION_TYPE)
  assert execution.last_known_state == _Execution.COMPLETE
  [enc] = store.get_artifacts_by_type(_TYPE)
  assert _props(enc)['pushed'] == 0
  assert 'model_fingerprint' not in _props(enc)
  [push] = store.get_artifacts_by_type('PushedModel')
  assert _props(push)['pushed'] == 0
  dest = os.path.join(root, 'serving')
  assert not os.path.exists(dest) or not os.listdir(dest)


def test_failing_kms_fails_execution_and_leaves_nothing(tmp_path, model_uri,
                                                        keys, monkeypatch):
  # A KMS recipient whose endpoint is a closed loopback port.
  monkeypatch.setenv('AWS_ENDPOINT_URL', 'http://127.0.0.1:9')
  monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'testing')
  monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'testing')
  monkeypatch.setenv('TFXE_RETRY_MAX_ATTEMPTS', '1')
  root = str(tmp_path)
  with pytest.raises(errors.BackendUnavailableError, match='unreachable'):
    _run(root, model_uri, keys, recipients=[keys.recipient, _KMS_KEY])
  store = _store(os.path.join(root, 'metadata.sqlite'))
  [execution] = store.get_executions_by_type(_EXECUTION_TYPE)
  assert execution.last_known_state == _Execution.FAILED
  dest = os.path.join(root, 'serving')
  assert not os.path.exists(dest) or not os.listdir(dest)
  # No package and no temporary directory in the pipeline root either.
  node_dir = os.path.join(root, 'pipeline_root', 'encrypt_pusher')
  for d in ('encrypted_model', 'pushed_model'):
    path = os.path.join(node_dir, d)
    assert not os.path.exists(path) or not os.listdir(path), os.listdir(path)


@pytest.mark.slow
def test_example_pipeline_run(tmp_path):
  summary = local_pipeline.run(str(tmp_path / 'demo'))
  assert summary['predictions_match']
  assert summary['pushed'] == 1
  assert os.path.isdir(summary['pushed_destination'])
  assert summary['encryption_context']['tfx.pipeline_name'] == (
      local_pipeline.PIPELINE_NAME)
