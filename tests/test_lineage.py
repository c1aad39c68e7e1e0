"""tfx_encrypt.lineage and `tfx-encrypt lineage` against a real MLMD store.

The example pipeline (pipelines/local_pipeline.py: Importer -> EncryptPusher
on LocalDagRunner with SQLite MLMD) runs twice, then once more as another
pipeline with a model blessing, all into one store; the lineage API and CLI
are checked against what those runs report.
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest

# ML Metadata comes with the [tfx] extra; TFXE_NO_SKIP=1 turns a skip into a
# failure.
metadata_store_pb2 = pytest.importorskip(
    'ml_metadata.proto.metadata_store_pb2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from tfx_encrypt import errors
from tfx_encrypt import lineage
from tfx_encrypt import package as package_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

# Every test needs ML Metadata; the `slow` ones run TFX pipelines.
pytestmark = pytest.mark.tfx

_BLESSED_PIPELINE = 'tfx-encrypt-lineage-blessed'
_EXECUTION_TYPE = (
    'tfx_encrypt.components.encrypt_pusher.component.EncryptPusher')
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', 'lineage',
                         *args], capture_output=True, text=True, cwd=_ROOT,
                        timeout=300, check=False)


def _sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------------
# Without TFX.
# --------------------------------------------------------------------------


def test_import_loads_neither_tensorflow_nor_tfx():
  code = ('import sys, tfx_encrypt.lineage\n'
          'bad = sorted(m for m in sys.modules if m.split(".")[0] in '
          '("tensorflow", "tfx", "apache_beam") or '
          'm.startswith("tfx_encrypt.components"))\n'
          'print(bad)\n'
          'assert "ml_metadata" in sys.modules\n'
          'sys.exit(1 if bad else 0)\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, cwd=_ROOT, timeout=120, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_open_sqlite_refuses_a_missing_store_and_creates_nothing(tmp_path):
  missing = tmp_path / 'no' / 'metadata.sqlite'
  with pytest.raises(lineage.MetadataStoreNotFoundError) as e:
    lineage.open_sqlite(str(missing))
  assert isinstance(e.value, errors.TfxEncryptError)
  assert isinstance(e.value, errors.UsageError)
  assert 'does not exist' in str(e.value)
  assert not missing.exists() and not missing.parent.exists()
  with pytest.raises(lineage.MetadataStoreNotFoundError):
    lineage.open_sqlite(str(tmp_path))  # a directory
  assert list(tmp_path.iterdir()) == []


def test_open_sqlite_refuses_a_file_that_is_not_a_store(tmp_path):
  junk = tmp_path / 'junk.sqlite'
  junk.write_bytes(b'not a database')
  with pytest.raises(lineage.MetadataStoreError) as e:
    lineage.open_sqlite(str(junk))
  assert 'not a readable ML Metadata store' in str(e.value)
  assert '\n' not in str(e.value) and 'CREATE TABLE' not in str(e.value)
  assert junk.read_bytes() == b'not a database'


def test_decode_value():
  value = metadata_store_pb2.Value
  assert lineage.decode_value(value(int_value=7)) == 7
  assert lineage.decode_value(value(string_value='x')) == 'x'
  assert lineage.decode_value(value(double_value=0.5)) == 0.5
  assert lineage.decode_value(value(bool_value=True)) is True
  assert lineage.decode_value(value()) is None
  v = value()
  v.struct_value.update({'a': 1, 'b': ['c']})
  assert lineage.decode_value(v) == {'a': 1, 'b': ['c']}
  v = value()
  v.proto_value.type_url = 'type.googleapis.com/some.Proto'
  v.proto_value.value = b'\x01\x02'
  assert lineage.decode_value(v) == {
      '@type': 'type.googleapis.com/some.Proto'}


def test_cli_without_ml_metadata_says_what_to_install(tmp_path):
  code = ('import sys\n'
          'sys.modules["ml_metadata"] = None  # as if not installed\n'
          'from tfx_encrypt.cli import main\n'
          'main()\n')
  store = tmp_path / 'metadata.sqlite'
  proc = subprocess.run(
      [sys.executable, '-c', code, 'lineage', '--mlmd-sqlite', str(store)],
      capture_output=True, text=True, cwd=_ROOT, timeout=120, check=False)
  assert proc.returncode == errors.UsageError.exit_code, proc.stderr
  assert proc.stderr.count('\n') == 1
  assert "pip install 'tfx-encrypt[tfx]'" in proc.stderr
  assert not store.exists()


def test_cli_missing_store_is_an_error_and_creates_nothing(tmp_path):
  store = tmp_path / 'metadata.sqlite'
  proc = _cli('--mlmd-sqlite', str(store))
  assert proc.returncode == 2
  assert proc.stdout == ''
  assert proc.stderr.startswith('tfx-encrypt: error: ML Metadata store')
  assert proc.stderr.count('\n') == 1
  assert not store.exists()


# --------------------------------------------------------------------------
# Against real pipeline runs.
# --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two runs of the example pipeline, plus one blessed run of another."""
  # pylint: disable=g-import-not-at-top
  from absl import logging
  from tfx import v1 as tfx
  from pipelines import local_pipeline
  # pylint: enable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  workdir = str(tmp_path_factory.mktemp('lineage'))
  first = local_pipeline.run(workdir)
  second = local_pipeline.run(workdir)
  keys = os.path.join(workdir, 'keys')
  blessed_dest = os.path.join(workdir, 'serving-blessed')
  tfx.orchestration.LocalDagRunner().run(local_pipeline.create_pipeline(
      pipeline_name=_BLESSED_PIPELINE,
      pipeline_root=os.path.join(workdir, 'pipeline_root_blessed'),
      metadata_path=first['metadata_path'],
      model_uri=os.path.join(workdir, 'model'),
      recipients=[os.path.join(keys, 'recipient.pub.pem')],
      signer=os.path.join(keys, 'signer.key.pem'),
      push_destination=blessed_dest,
      blessed=True))
  return {'workdir': workdir, 'first': first, 'second': second,
          'store_path': first['metadata_path'],
          'blessed_destination': blessed_dest}


@pytest.fixture
def store(runs):
  return lineage.open_sqlite(runs['store_path'])


def _ids(records):
  return [r['id'] for r in records]


def _recorded(store, artifact_id):
  """An artifact's custom properties as the executor wrote them (raw)."""
  [artifact] = store.get_artifacts_by_id([artifact_id])
  return {k: getattr(v, v.WhichOneof('value'))
          for k, v in artifact.custom_properties.items()}


@pytest.mark.slow
def test_every_property_the_executor_records_is_decoded(runs, store):
  """What EncryptPusher wrote into MLMD is what lineage reports, name by name.

  The names come from the store the pipeline runs wrote, not from a list
  shared with the executor: a property the executor starts recording that
  lineage drops, renames or decodes differently fails here. What TFX itself
  records on every output artifact (`is_external`, ...) is told apart by
  the input Model, which the Importer, not the executor, produced.
  """
  from tfx_encrypt import types  # pylint: disable=g-import-not-at-top
  assert lineage.ENCRYPTED_MODEL_TYPE == types.EncryptedModel.TYPE_NAME
  traces = [lineage.trace(store, r['id'])
            for r in lineage.encrypted_models(store)]
  assert len(traces) == 3
  for t in traces:
    em, pushed = t['encrypted_model'], t['pushed_model']
    [model] = t['models']
    tfx_own = _recorded(store, model['id']).keys()
    recorded = _recorded(store, em['id'])
    assert {'cipher', 'recipient_key_ids', 'model_fingerprint', 'pushed',
            'encryption_context'} <= recorded.keys()
    for name, value in recorded.items():
      if name in tfx_own and name not in em['properties']:
        continue
      assert name in em['properties'], name
      reported = em['properties'][name]
      if isinstance(reported, (list, dict)):  # recorded as JSON text
        value = json.loads(value)
      assert reported == value, name
    # The PushedModel carries the same package facts (reported once, on
    # the EncryptedModel), Pusher's three properties and a link back.
    for name, value in _recorded(store, pushed['id']).items():
      if name == 'encrypted_model_uri':
        assert value == em['uri']
      elif name in ('pushed', 'pushed_destination', 'pushed_version'):
        assert pushed[name] == value, name
      else:
        assert recorded[name] == value, name


@pytest.mark.slow
def test_encrypted_models_finds_both_runs_newest_first(runs, store):
  first, second = runs['first'], runs['second']
  assert first['predictions_match'] and second['predictions_match']
  demo = lineage.encrypted_models(store, pipeline_name=first['pipeline_name'])
  assert _ids(demo) == [second['encrypted_model_artifact_id'],
                        first['encrypted_model_artifact_id']]
  everything = lineage.encrypted_models(store)
  assert len(everything) == 3
  assert everything[0]['pipeline_name'] == _BLESSED_PIPELINE
  for record, summary in zip(demo, (second, first)):
    props = record['properties']
    assert record['type'] == 'tfx_encrypt.EncryptedModel'
    assert record['uri'] == summary['encrypted_model_uri']
    assert record['pipeline_name'] == 'tfx-encrypt-local-demo'
    assert record['component_id'] == 'encrypt_pusher'
    assert record['pipeline_run_id'] == (
        summary['encryption_context']['tfx.pipeline_run_id'])
    assert props['pushed'] == 1
    assert props['pushed_destination'] == summary['pushed_destination']
    assert props['pushed_version'] == summary['pushed_version']
    assert props['recipient_key_ids'] == summary['recipient_key_ids']
    assert props['signer_id'] == summary['signer_id']
    assert props['model_fingerprint'] == summary['model_fingerprint']
    assert props['ciphertext_digest'] == summary['ciphertext_digest']
    assert props['encryption_context'] == summary['encryption_context']
    assert props['cipher'] == 'aes-256-gcm'
  assert demo[0]['pipeline_run_id'] != demo[1]['pipeline_run_id']


@pytest.mark.slow
def test_encrypted_models_filters(runs, store):
  first, second = runs['first'], runs['second']
  both = {first['encrypted_model_artifact_id'],
          second['encrypted_model_artifact_id']}
  demo = first['pipeline_name']

  def ids(**kwargs):
    return set(_ids(lineage.encrypted_models(store, pipeline_name=demo,
                                             **kwargs)))

  [recipient] = first['recipient_key_ids']
  assert ids(key_id=recipient) == both
  assert ids(key_id=first['signer_id']) == both
  recipient_uri = os.path.join(runs['workdir'], 'keys', 'recipient.pub.pem')
  assert ids(key_id=recipient_uri) == both
  assert ids(fingerprint=first['model_fingerprint']) == both
  assert ids(fingerprint=first['model_fingerprint'].split(':')[1]) == both
  assert ids(pushed_only=True) == both
  for summary in (first, second):
    package_id = package_lib.inspect_package(
        summary['pushed_destination']).package_id
    assert ids(package_id=package_id) == {
        summary['encrypted_model_artifact_id']}
    assert ids(package_id=package_id.upper()) == {
        summary['encrypted_model_artifact_id']}
  assert len(lineage.encrypted_models(store, pipeline_name=_BLESSED_PIPELINE)
            ) == 1
  assert len(lineage.encrypted_models(store, key_id=recipient)) == 3

  wrong_digest = 'sha256:' + '0' * 64
  assert lineage.encrypted_models(store, key_id=wrong_digest) == []
  assert lineage.encrypted_models(store, fingerprint=wrong_digest) == []
  assert lineage.encrypted_models(store, package_id='0' * 32) == []
  assert lineage.encrypted_models(store, pipeline_name='no-such') == []
  assert lineage.encrypted_models(store, pipeline_name=demo,
                                  key_id=wrong_digest) == []


@pytest.mark.slow
def test_trace_links_execution_model_and_pushed_model(runs, store):
  traces = []
  for summary in (runs['first'], runs['second']):
    t = lineage.trace(store, summary['encrypted_model_artifact_id'])
    traces.append(t)
    ex = t['execution']
    assert ex['state'] == 'COMPLETE'
    assert ex['type'] == _EXECUTION_TYPE
    assert ex['pipeline_name'] == summary['pipeline_name']
    assert ex['component_id'] == 'encrypt_pusher'
    assert ex['pipeline_run_id'] == (
        summary['encryption_context']['tfx.pipeline_run_id'])
    assert str(ex['id']) == summary['encryption_context']['tfx.execution_id']
    [model] = t['models']
    assert model['type'] == 'Model' and model['key'] == 'model'
    assert model['uri'] == os.path.join(runs['workdir'], 'model')
    assert str(model['id']) == (
        summary['encryption_context']['tfx.model_artifact_id'])
    assert t['blessings'] == []
    pushed = t['pushed_model']
    assert pushed['type'] == 'PushedModel' and pushed['key'] == 'pushed_model'
    assert pushed['pushed'] == 1
    assert pushed['pushed_destination'] == summary['pushed_destination']
    assert pushed['pushed_version'] == summary['pushed_version']
    assert pushed['id'] != t['encrypted_model']['id']
    props = t['encrypted_model']['properties']
    for k in ('cipher', 'model_fingerprint', 'ciphertext_digest',
              'signer_id', 'recipient_key_ids', 'encryption_context'):
      assert props[k] == summary[k], k
  first, second = traces
  assert (first['execution']['pipeline_run_id'] !=
          second['execution']['pipeline_run_id'])
  assert first['execution']['id'] != second['execution']['id']
  assert (first['pushed_model']['pushed_version'] !=
          second['pushed_model']['pushed_version'])


@pytest.mark.slow
def test_trace_reports_the_blessing(runs, store):
  [record] = lineage.encrypted_models(store, pipeline_name=_BLESSED_PIPELINE)
  t = lineage.trace(store, record['id'])
  [blessing] = t['blessings']
  assert blessing['type'] == 'ModelBlessing'
  assert blessing['key'] == 'model_blessing'
  assert blessing['blessed'] == 1
  assert t['pushed_model']['pushed_destination'].startswith(
      runs['blessed_destination'] + os.sep)
  assert t['execution']['pipeline_name'] == _BLESSED_PIPELINE


@pytest.mark.slow
def test_trace_refuses_other_artifacts(runs, store):
  model_id = int(runs['first']['encryption_context']['tfx.model_artifact_id'])
  with pytest.raises(lineage.NoMatchError, match='is a Model'):
    lineage.trace(store, model_id)
  with pytest.raises(lineage.NoMatchError, match='no artifact'):
    lineage.trace(store, 10**9)


@pytest.mark.slow
def test_queries_leave_the_store_alone_and_return_no_secrets(runs):
  before = _sha256(runs['store_path'])
  store = lineage.open_sqlite(runs['store_path'])
  dumped = json.dumps([lineage.trace(store, r['id'])
                       for r in lineage.encrypted_models(store)])
  assert _sha256(runs['store_path']) == before
  keys = os.path.join(runs['workdir'], 'keys')
  for name in ('recipient.key.pem', 'signer.key.pem'):
    with open(os.path.join(keys, name)) as f:
      body = ''.join(f.read().split('\n')[1:-2])
    assert body and body not in dumped
    assert name not in dumped  # private key URIs are execution parameters
  assert 'PRIVATE KEY' not in dumped


@pytest.mark.slow
def test_cli_table(runs):
  proc = _cli('--mlmd-sqlite', runs['store_path'], '--pipeline',
              runs['first']['pipeline_name'])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].split()[:2] == ['ID', 'PIPELINE']
  rows = [l for l in lines[1:] if not l.startswith(' ')]
  assert [int(r.split()[0]) for r in rows] == [
      runs['second']['encrypted_model_artifact_id'],
      runs['first']['encrypted_model_artifact_id']]
  for row, summary in zip(rows, (runs['second'], runs['first'])):
    run_id = summary['encryption_context']['tfx.pipeline_run_id']
    assert f'{summary["pipeline_name"]} / {run_id}' in row
    assert os.path.join(runs['workdir'], 'model') in row
    assert (f'{summary["pushed_destination"]} '
            f'(version {summary["pushed_version"]})') in row
  assert proc.stdout.count(
      f'recipient {runs["first"]["recipient_key_ids"][0]}') == 2
  assert proc.stdout.count(f'signer    {runs["first"]["signer_id"]}') == 2


@pytest.mark.slow
def test_cli_json_and_package(runs):
  proc = _cli('--mlmd-sqlite', runs['store_path'], '--json')
  assert proc.returncode == 0, proc.stderr
  traces = json.loads(proc.stdout)
  assert len(traces) == 3
  assert {t['execution']['state'] for t in traces} == {'COMPLETE'}
  for summary in (runs['first'], runs['second']):
    proc = _cli('--mlmd-sqlite', runs['store_path'], '--package',
                summary['pushed_destination'], '--json')
    assert proc.returncode == 0, proc.stderr
    [t] = json.loads(proc.stdout)
    assert t['encrypted_model']['id'] == summary['encrypted_model_artifact_id']
    assert t['pushed_model']['pushed_destination'] == (
        summary['pushed_destination'])
  proc = _cli('--mlmd-sqlite', runs['store_path'], '--key-id',
              runs['first']['signer_id'], '--fingerprint',
              runs['first']['model_fingerprint'], '--pipeline',
              _BLESSED_PIPELINE)
  assert proc.returncode == 0, proc.stderr
  assert len([l for l in proc.stdout.splitlines()[1:]
              if not l.startswith(' ')]) == 1


@pytest.mark.slow
def test_cli_no_match_fails_with_one_line(runs):
  before = _sha256(runs['store_path'])
  for args in (['--key-id', 'sha256:' + '0' * 64],
               ['--pipeline', 'no-such-pipeline'],
               ['--fingerprint', 'sha256:' + '1' * 64, '--json']):
    proc = _cli('--mlmd-sqlite', runs['store_path'], *args)
    assert proc.returncode == lineage.NoMatchError.exit_code == 1
    assert proc.stdout == ''
    assert proc.stderr.startswith(
        'tfx-encrypt: error: no EncryptedModel matches')
    assert proc.stderr.count('\n') == 1
  assert _sha256(runs['store_path']) == before
