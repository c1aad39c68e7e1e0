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
_UNBLESSED_PIPELINE = 'tfx-encrypt-lineage-unblessed'
_EXECUTION_TYPE = (
    'tfx_encrypt.components.encrypt_pusher.component.EncryptPusher')
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
  # An unblessed run: TFX still publishes its EncryptedModel (encrypted=0).
  tfx.orchestration.LocalDagRunner().run(local_pipeline.create_pipeline(
      pipeline_name=_UNBLESSED_PIPELINE,
      pipeline_root=os.path.join(workdir, 'pipeline_root_unblessed'),
      metadata_path=first['metadata_path'],
      model_uri=os.path.join(workdir, 'model'),
      recipients=[os.path.join(keys, 'recipient.pub.pem')],
      signer=os.path.join(keys, 'signer.key.pem'),
      push_destination=os.path.join(workdir, 'serving-unblessed'),
      blessed=False))
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


@pytest.mark.slow
def test_unblessed_run_is_marked_and_skipped(runs, store):
  """TFX publishes the declared EncryptedModel of an unblessed run: it says
  `encrypted=0` (and Pusher's `pushed=0`), and every query skips it."""
  assert lineage.encrypted_models(store, pipeline_name=_UNBLESSED_PIPELINE
                                  ) == []
  [record] = lineage.encrypted_models(store, pipeline_name=_UNBLESSED_PIPELINE,
                                      include_unpackaged=True)
  assert record['status'] == 'no package'
  assert record['properties']['encrypted'] == 0
  assert record['properties']['pushed'] == 0
  assert 'package_id' not in record['properties']
  assert not os.listdir(record['uri'])  # TFX's empty output directory
  assert len(lineage.encrypted_models(store)) == 3
  assert {r['status'] for r in lineage.encrypted_models(
      store, include_unpackaged=True)} == {'live', 'no package'}
  assert all(r['properties']['encrypted'] == 1
             for r in lineage.encrypted_models(store))
  # The example's own helper picks the newest *pushed* artifact, not the
  # newer unblessed one.
  from pipelines import local_pipeline  # pylint: disable=g-import-not-at-top
  [blessed] = lineage.encrypted_models(store, pipeline_name=_BLESSED_PIPELINE)
  assert record['id'] > blessed['id']
  assert local_pipeline._encrypted_model_record(  # pylint: disable=protected-access
      runs['store_path'])['id'] == blessed['id']
  proc = _cli('--mlmd-sqlite', runs['store_path'], '--pipeline',
              _UNBLESSED_PIPELINE)
  assert proc.returncode == 1 and proc.stdout == '', proc.stderr
  proc = _cli('--mlmd-sqlite', runs['store_path'], '--pipeline',
              _UNBLESSED_PIPELINE, '--all')
  assert proc.returncode == 0, proc.stderr
  assert 'not pushed' in proc.stdout
  assert 'status    no package' in proc.stdout


@pytest.mark.slow
def test_version_filter(runs, store):
  # A version names a directory under one push destination: two pipelines
  # pushing to two destinations in the same second share it, so the
  # pipeline goes with it.
  demo = runs['first']['pipeline_name']
  for summary in (runs['first'], runs['second']):
    version = summary['pushed_version']
    assert _ids(lineage.encrypted_models(store, version=version,
                                         pipeline_name=demo)) == [
                                             summary[
                                                 'encrypted_model_artifact_id']]
    assert summary['encrypted_model_artifact_id'] in _ids(
        lineage.encrypted_models(store, version=version))
    proc = _cli('--mlmd-sqlite', runs['store_path'], '--version', version,
                '--pipeline', demo, '--json')
    assert proc.returncode == 0, proc.stderr
    [t] = json.loads(proc.stdout)
    assert t['encrypted_model']['id'] == summary['encrypted_model_artifact_id']
    assert t['pushes'][0]['pushed_version'] == version
  assert lineage.encrypted_models(store, version='1') == []
  proc = _cli('--mlmd-sqlite', runs['store_path'], '--version', '1')
  assert proc.returncode == 1
  assert proc.stderr.startswith('tfx-encrypt: error: no EncryptedModel '
                                'matches') and 'version 1' in proc.stderr


@pytest.mark.slow
def test_trace_upstream_of_an_imported_model(runs, store):
  t = lineage.trace(store, runs['first']['encrypted_model_artifact_id'])
  [model] = t['models']
  producer = model['produced_by']
  assert producer['type'].endswith('Importer')
  assert producer['component_id'] == 'model_importer'
  assert producer['inputs'] == [] and t['examples'] == []
  assert t['pushes'] == [t['pushed_model']]
  assert t['rotated_from'] == [] and t['rotations'] == []


def test_connect_needs_exactly_one_store(tmp_path):
  with pytest.raises(errors.UsageError, match='name one ML Metadata store'):
    lineage.connect()
  with pytest.raises(errors.UsageError, match='--mlmd-sqlite and --mlmd-grpc'):
    lineage.connect(sqlite='x', grpc='127.0.0.1:1')
  with pytest.raises(errors.UsageError, match='--mlmd-user'):
    lineage.connect(mysql='127.0.0.1:3306/db')
  for bad in ('127.0.0.1/db', 'host:99999/db', 'host:1/', 'host:1/a/b'):
    with pytest.raises(errors.UsageError, match='HOST:PORT'):
      lineage.connect(mysql=bad, user='u')
  with pytest.raises(errors.UsageError, match='HOST:PORT'):
    lineage.connect(grpc='nohost')
  junk = tmp_path / 'mlmd.pbtxt'
  junk.write_text('mysql { host: ')
  with pytest.raises(errors.UsageError, match='text proto'):
    lineage.connect(config_file=str(junk))
  with pytest.raises(lineage.MetadataStoreNotFoundError):
    lineage.connect(config_file=str(tmp_path / 'missing.pbtxt'))
  proc = _cli()
  assert proc.returncode == 2 and 'name one ML Metadata store' in proc.stderr


@pytest.mark.slow
def test_config_file_connection(runs, tmp_path):
  config = tmp_path / 'mlmd.pbtxt'
  config.write_text(f'sqlite {{ filename_uri: "{runs["store_path"]}" }}\n')
  store = lineage.connect(config_file=str(config))
  assert len(lineage.encrypted_models(store)) == 3
  proc = _cli('--mlmd-config', str(config), '--json')
  assert proc.returncode == 0, proc.stderr
  assert len(json.loads(proc.stdout)) == 3


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize('store_kind', ['s3', 'gs'])
def test_cli_package_in_an_object_store(runs, store_kind, request):
  """--package s3://... / gs://...: the header is read through
  tfx_encrypt.storage (moto's S3 server, the GCS emulator) and the
  artifact of that package is found; payloads without a header are an
  incomplete package, said so in one line."""
  # pylint: disable=g-import-not-at-top
  import click.testing
  from tfx_encrypt import cli
  from tfx_encrypt import storage
  from tests import _util
  # pylint: enable=g-import-not-at-top
  remote = request.getfixturevalue(f'{store_kind}_store')
  summary = runs['first']
  uri = storage.join(remote.new_base(), summary['pushed_version'])
  _util.upload_package(summary['pushed_destination'], uri)
  runner = click.testing.CliRunner()
  r = runner.invoke(cli.main, ['lineage', '--mlmd-sqlite', runs['store_path'],
                               '--package', uri, '--json'])
  assert r.exit_code == 0, r.stderr
  [t] = json.loads(r.stdout)
  assert t['encrypted_model']['id'] == summary['encrypted_model_artifact_id']
  r = runner.invoke(cli.main, ['lineage', '--mlmd-sqlite', runs['store_path'],
                               '--package', uri, '--format', 'dot'])
  assert r.exit_code == 0, r.stderr
  assert f'a{summary["encrypted_model_artifact_id"]} [' in r.stdout

  # Payload objects, no header: an interrupted (or running) push.
  partial = storage.join(remote.new_base(), '5')
  payload = os.path.join(summary['pushed_destination'], 'payload')
  for name in sorted(os.listdir(payload)):
    with open(os.path.join(payload, name), 'rb') as f:
      storage.put(storage.join(partial, 'payload', name), f)
  r = runner.invoke(cli.main, ['lineage', '--mlmd-sqlite', runs['store_path'],
                               '--package', partial])
  assert r.exit_code == errors.UnsupportedFormatError.exit_code == 3
  assert r.stdout == ''
  assert r.stderr.count('\n') == 1, r.stderr
  assert r.stderr.startswith(f'tfx-encrypt: error: --package {partial} is '
                             'an incomplete package: ')
  assert 'no tfxe.header' in r.stderr
  assert r.stderr.endswith('; there is no package id to look up in ML '
                           'Metadata\n')
  # Nothing there at all.
  r = runner.invoke(cli.main, ['lineage', '--mlmd-sqlite', runs['store_path'],
                               '--package', storage.join(partial, 'none')])
  assert r.exit_code == 2 and 'does not exist' in r.stderr, r.stderr


# --------------------------------------------------------------------------
# MariaDB (MySQL) ML Metadata: a trained pipeline, run twice, rotated.
# --------------------------------------------------------------------------

_TRAINED_PIPELINE = 'tfx-encrypt-lineage-trained'
_MLMD_USER = 'mlmd'
_MLMD_PASSWORD = 'not-a-real-secret-7Qx'
_MLMD_DATABASE = 'tfxe_lineage'


class _MariaDB:
  """Debian's mariadbd on a free loopback port, private datadir and socket,
  one user with a password (MLMD connects over TCP as Kubeflow's does)."""

  def __init__(self, root):
    # pylint: disable=g-import-not-at-top
    import shutil
    import time
    from tests.fakes import servers
    # pylint: enable=g-import-not-at-top
    mariadbd = '/usr/sbin/mariadbd'
    install = shutil.which('mariadb-install-db')
    client = shutil.which('mariadb')
    if not (os.path.exists(mariadbd) and install and client):
      raise RuntimeError('mariadb-server is not installed (Debian package '
                         'mariadb-server; scripts/ensure_system_packages.sh '
                         'test installs it)')
    self.root = root
    datadir, self.socket = os.path.join(root, 'data'), os.path.join(
        root, 'mysqld.sock')
    self.pid_file = os.path.join(root, 'mysqld.pid')
    user = (['--user=root'] if os.geteuid() == 0 else [])
    subprocess.run([install, '--no-defaults', f'--datadir={datadir}',
                    '--auth-root-authentication-method=normal',
                    '--skip-test-db', *user], check=True,
                   capture_output=True, timeout=120)
    self.port = servers.free_port()
    self._log = open(os.path.join(root, 'mysqld.log'), 'wb')
    self.proc = subprocess.Popen(
        [mariadbd, '--no-defaults', f'--datadir={datadir}', *user,
         f'--socket={self.socket}', f'--port={self.port}',
         '--bind-address=127.0.0.1', '--skip-name-resolve',
         f'--pid-file={self.pid_file}', '--skip-log-bin',
         '--innodb-buffer-pool-size=16M', '--innodb-log-file-size=8M',
         f'--log-error={os.path.join(root, "error.log")}'],
        stdout=self._log, stderr=subprocess.STDOUT)
    try:
      servers.wait_for_port(self.port, timeout=60, proc=self.proc)
      deadline = time.monotonic() + 30
      while True:
        done = subprocess.run(
            [client, '--no-defaults', f'--socket={self.socket}', '-uroot',
             '-e', f"CREATE USER '{_MLMD_USER}'@'%' IDENTIFIED BY "
             f"'{_MLMD_PASSWORD}'; GRANT ALL ON *.* TO '{_MLMD_USER}'@'%';"],
            capture_output=True, timeout=30, check=False)
        if done.returncode == 0:
          break
        if time.monotonic() > deadline:
          raise RuntimeError(done.stderr.decode(errors='replace'))
        time.sleep(0.2)
    except BaseException:
      self.stop()
      raise

  def config(self, password=_MLMD_PASSWORD):
    from tfx.orchestration import metadata  # pylint: disable=g-import-not-at-top
    return metadata.mysql_metadata_connection_config(
        '127.0.0.1', self.port, _MLMD_DATABASE, _MLMD_USER, password)

  @property
  def target(self):
    return f'127.0.0.1:{self.port}/{_MLMD_DATABASE}'

  def stop(self):
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self._log.close()


@pytest.fixture(scope='module')
def mariadb(tmp_path_factory):
  server = _MariaDB(str(tmp_path_factory.mktemp('mariadb')))
  yield server
  server.stop()


def _tfxe(*args, env=None, input_text=None):
  full_env = dict(os.environ)
  full_env.pop('TFXE_MLMD_PASSWORD', None)
  full_env.update(env or {})
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *args],
                        capture_output=True, text=True, cwd=_ROOT,
                        timeout=300, check=False, env=full_env,
                        input=input_text)


def _trained_pipeline(root, connection, csv_dir, recipients, signer,
                      destination):
  """CsvExampleGen -> StatisticsGen -> SchemaGen -> Trainer -> Evaluator ->
  EncryptPusher: a real, if tiny, training pipeline (a Keras model trained
  on 60 synthetic rows, evaluated by TFMA, which blesses it)."""
  # pylint: disable=g-import-not-at-top
  from tfx import v1 as tfx
  from tfx_encrypt.components import EncryptPusher
  from tests import _lineage_trainer
  # pylint: enable=g-import-not-at-top
  example_gen = tfx.components.CsvExampleGen(input_base=csv_dir)
  statistics_gen = tfx.components.StatisticsGen(
      examples=example_gen.outputs['examples'])
  schema_gen = tfx.components.SchemaGen(
      statistics=statistics_gen.outputs['statistics'])
  trainer = tfx.components.Trainer(
      run_fn='tests._lineage_trainer.run_fn',
      examples=example_gen.outputs['examples'],
      schema=schema_gen.outputs['schema'],
      train_args=tfx.proto.TrainArgs(num_steps=1),
      eval_args=tfx.proto.EvalArgs(num_steps=1))
  evaluator = tfx.components.Evaluator(
      examples=example_gen.outputs['examples'],
      model=trainer.outputs['model'],
      eval_config=_lineage_trainer.eval_config())
  pusher = EncryptPusher(model=trainer.outputs['model'],
                         model_blessing=evaluator.outputs['blessing'],
                         recipients=recipients, signer=signer,
                         push_destination=destination).with_id(
                             'encrypt_pusher')
  return tfx.dsl.Pipeline(
      pipeline_name=_TRAINED_PIPELINE, pipeline_root=root,
      metadata_connection_config=connection,
      components=[example_gen, statistics_gen, schema_gen, trainer,
                  evaluator, pusher], enable_cache=False)


@pytest.fixture(scope='module')
def rotated(mariadb, tmp_path_factory):
  """The trained pipeline run twice into MariaDB (for key A, then A and B);
  run 1's push rewrapped in place (A out, B in), run 2's rotated into a new
  version (B only), both recorded in MLMD through the CLI."""
  # pylint: disable=g-import-not-at-top
  from absl import logging
  from tfx import v1 as tfx
  from tfx_encrypt.keys import local as local_keys
  from tests import _lineage_trainer
  # pylint: enable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  workdir = str(tmp_path_factory.mktemp('trained'))
  keys = {}
  for name, kind in (('a', 'x25519'), ('b', 'x25519'), ('s', 'ed25519')):
    prefix = os.path.join(workdir, name)
    local_keys.keygen(kind, prefix)
    keys[name] = (prefix + '.pub.pem', prefix + '.key.pem')
  csv_dir = os.path.join(workdir, 'csv')
  _lineage_trainer.write_csv(csv_dir)
  destination = os.path.join(workdir, 'serving')
  store = lineage.open_mysql('127.0.0.1', mariadb.port, _MLMD_DATABASE,
                             _MLMD_USER, _MLMD_PASSWORD)
  ids = []
  for recipients in ([keys['a'][0]], [keys['a'][0], keys['b'][0]]):
    tfx.orchestration.LocalDagRunner().run(_trained_pipeline(
        os.path.join(workdir, 'pipeline_root'), mariadb.config(), csv_dir,
        recipients, keys['s'][1], destination))
    ids.append(lineage.encrypted_models(store)[0]['id'])
  first, second = lineage.encrypted_models(store)[::-1]
  assert [first['id'], second['id']] == ids
  key_a, key_b = second['properties']['recipient_key_ids']
  assert first['properties']['recipient_key_ids'] == [key_a]
  v1 = first['properties']['pushed_destination']
  v2 = second['properties']['pushed_destination']
  env = {'TFXE_MLMD_PASSWORD': _MLMD_PASSWORD}
  rewrap = _tfxe('rewrap', v1, '-i', keys['a'][1], '--add-recipient',
                 keys['b'][0], '--remove-recipient', key_a, '--sign-with',
                 keys['s'][1], '--trust', keys['s'][0], '--mlmd-mysql',
                 mariadb.target, '--mlmd-user', _MLMD_USER, env=env)
  assert rewrap.returncode == 0, rewrap.stderr
  # rotate: the connection from a ConnectionConfig file without the
  # password, which comes from stdin.
  config = os.path.join(workdir, 'mlmd.pbtxt')
  with open(config, 'w') as f:
    f.write(f'mysql {{ host: "127.0.0.1" port: {mariadb.port} '
            f'database: "{_MLMD_DATABASE}" user: "{_MLMD_USER}" }}\n')
  v2_rotated = os.path.join(destination, str(int(os.path.basename(v2)) + 100))
  rotate = _tfxe('rotate', v2, v2_rotated, '-i', keys['a'][1], '-r',
                 keys['b'][0], '--sign-with', keys['s'][1], '--trust',
                 keys['s'][0], '--mlmd-config', config,
                 '--mlmd-password-stdin', input_text=_MLMD_PASSWORD + '\n')
  assert rotate.returncode == 0, rotate.stderr
  return {'workdir': workdir, 'keys': keys, 'key_a': key_a, 'key_b': key_b,
          'first': first, 'second': second, 'v1': v1, 'v2': v2,
          'v2_rotated': v2_rotated, 'rewrap': rewrap, 'rotate': rotate,
          'config': config, 'env': env}


@pytest.fixture
def mysql_store(mariadb):
  return lineage.open_mysql('127.0.0.1', mariadb.port, _MLMD_DATABASE,
                            _MLMD_USER, _MLMD_PASSWORD)


@pytest.mark.slow
def test_mariadb_rotation_is_recorded(rotated, mysql_store):
  store = mysql_store
  first, second = rotated['first']['id'], rotated['second']['id']
  live = lineage.encrypted_models(store)
  by_id = {r['id']: r for r in lineage.encrypted_models(
      store, include_superseded=True)}
  assert set(by_id) == {r['id'] for r in live} | {first}
  [rewrapped, rotated_new] = sorted(set(by_id) - {first, second})
  assert _ids(live) == [rotated_new, rewrapped, second]
  assert f'execution' in rotated['rewrap'].stdout
  assert (f'EncryptedModel {rewrapped} (supersedes EncryptedModel {first})'
          in rotated['rewrap'].stdout)
  assert (f'EncryptedModel {rotated_new} (from EncryptedModel {second})'
          in rotated['rotate'].stdout)
  key_a, key_b = rotated['key_a'], rotated['key_b']

  old = by_id[first]
  assert old['status'] == 'superseded' and old['superseded_by'] == rewrapped
  new = by_id[rewrapped]
  assert new['status'] == 'live'
  assert new['uri'] == rotated['v1']
  assert new['properties']['recipient_key_ids'] == [key_b]
  assert new['properties']['pushed'] == 1
  assert new['properties']['pushed_destination'] == rotated['v1']
  assert new['properties']['package_id'] == old['properties']['package_id']
  assert new['properties']['model_fingerprint'] == (
      old['properties']['model_fingerprint'])
  assert new['properties']['ciphertext_digest'] == (
      old['properties']['ciphertext_digest'])  # a header swap
  assert new['pipeline_name'] == _TRAINED_PIPELINE
  assert new['pipeline_run_id'] == old['pipeline_run_id']

  r2 = by_id[second]
  assert r2['status'] == 'live'  # its package is still there, for A and B
  r2new = by_id[rotated_new]
  assert r2new['uri'] == rotated['v2_rotated']
  assert r2new['properties']['recipient_key_ids'] == [key_b]
  assert r2new['properties']['pushed_version'] == os.path.basename(
      rotated['v2_rotated'])
  assert r2new['properties']['package_id'] != r2['properties']['package_id']
  assert r2new['properties']['ciphertext_digest'] != (
      r2['properties']['ciphertext_digest'])

  # The worklist: live packages still wrapped for A; rotated ones apart.
  assert _ids(lineage.encrypted_models(store, key_id=key_a)) == [second]
  assert _ids(lineage.encrypted_models(store, key_id=key_a,
                                       include_superseded=True)) == [
                                           second, first]
  assert _ids(lineage.encrypted_models(store, key_id=key_b)) == [
      rotated_new, rewrapped, second]
  assert _ids(lineage.encrypted_models(
      store, version=os.path.basename(rotated['v1']))) == [rewrapped]

  # The traces: KeyRotation executions, their key ids, and the way back.
  t = lineage.trace(store, rewrapped)
  [back] = t['rotated_from']
  assert back['id'] == first
  rotation = back['rotation']
  assert rotation['type'] == lineage.KEY_ROTATION_TYPE
  assert rotation['state'] == 'COMPLETE'
  assert rotation['properties']['operation'] == 'rewrap'
  assert rotation['properties']['added_key_ids'] == [key_b]
  assert rotation['properties']['removed_key_ids'] == [key_a]
  assert t['execution']['type'] == _EXECUTION_TYPE
  assert t['execution']['pipeline_name'] == _TRAINED_PIPELINE
  assert [p['pushed_destination'] for p in t['pushes']] == [rotated['v1']]
  t_old = lineage.trace(store, first)
  [r] = t_old['rotations']
  assert r['id'] == rotation['id'] and r['new_artifact_id'] == rewrapped
  t2 = lineage.trace(store, second)
  [r] = t2['rotations']
  assert r['new_artifact_id'] == rotated_new
  assert r['properties']['operation'] == 'rotate'
  assert r['properties']['added_key_ids'] == []
  assert r['properties']['removed_key_ids'] == [key_a]

  # The rewrapped push decrypts with B, no longer with A.
  from tfx_encrypt import package as package_lib  # pylint: disable=g-import-not-at-top
  keys = rotated['keys']
  out = os.path.join(rotated['workdir'], 'decrypted-b')
  package_lib.decrypt_model(rotated['v1'], out, identities=[keys['b'][1]],
                            trusted=[keys['s'][0]])
  assert os.path.exists(os.path.join(out, 'saved_model.pb'))


@pytest.mark.slow
def test_mariadb_trace_reaches_trainer_examples_and_example_gen(
    rotated, mysql_store):
  """From a pushed version back to the ExampleGen's input data."""
  for record in (rotated['first'], rotated['second']):
    version = os.path.basename(record['properties']['pushed_destination'])
    # (run 1's version also holds the rewrap's record: superseded here)
    assert record['id'] in _ids(lineage.encrypted_models(
        mysql_store, version=version, include_superseded=True))
    t = lineage.trace(mysql_store, record['id'])
    [model] = t['models']
    trainer = model['produced_by']
    assert trainer['type'] == 'tfx.components.trainer.component.Trainer'
    assert trainer['component_id'] == 'Trainer'
    assert trainer['state'] == 'COMPLETE'
    assert trainer['pipeline_run_id'] == t['execution']['pipeline_run_id']
    [examples] = [i for i in trainer['inputs'] if i['type'] == 'Examples']
    assert examples['key'] == 'examples'
    gen = examples['produced_by']
    assert gen['type'] == (
        'tfx.components.example_gen.csv_example_gen.component.CsvExampleGen')
    assert gen['component_id'] == 'CsvExampleGen'
    assert gen['pipeline_run_id'] == t['execution']['pipeline_run_id']
    [flat] = t['examples']
    assert flat['id'] == examples['id'] and flat['uri'] == examples['uri']
    assert flat['produced_by']['id'] == gen['id']
    assert gen['input_base'] == flat['produced_by']['input_base'] == (
        os.path.join(rotated['workdir'], 'csv'))
    assert json.loads(flat['split_names']) == ['train', 'eval']
    schema = [i for i in trainer['inputs'] if i['type'] == 'Schema']
    assert [i['produced_by']['component_id'] for i in schema] == ['SchemaGen']
    # EncryptPusher consumed the Evaluator's blessing: TFMA blessed the
    # trained model (binary accuracy >= 0.7 on the eval split).
    [blessing] = t['blessings']
    assert blessing['type'] == 'ModelBlessing'
    assert blessing['key'] == 'model_blessing'
    assert blessing['blessed'] == 1
    assert t['encrypted_model']['properties']['encrypted'] == 1


@pytest.mark.slow
def test_mariadb_lineage_picture(rotated, mysql_store, mariadb, tmp_path):
  """The picture of a pushed version, from MariaDB: every step of the
  pipeline, from the CSV directory to the push, as Graphviz parses it."""
  # pylint: disable=g-import-not-at-top
  from tests.lineage import test_graph
  # pylint: enable=g-import-not-at-top
  record = rotated['second']
  version = os.path.basename(record['properties']['pushed_destination'])
  graph = lineage.lineage_graph(mysql_store, [record['id']])
  nodes = {n['name']: n for n in graph['nodes']}
  by_component = {n['component_id']: n for n in graph['nodes']
                  if n['kind'] == 'execution' and n.get('component_id')}
  assert {'CsvExampleGen', 'StatisticsGen', 'SchemaGen', 'Trainer',
          'Evaluator', 'encrypt_pusher'} <= set(by_component)
  for n in by_component.values():
    assert n['pipeline_name'] == _TRAINED_PIPELINE
    assert n['state'] == 'COMPLETE'
  assert len({n['pipeline_run_id'] for n in by_component.values()
              if n['component_id'] != 'rotate'}) == 1
  [data] = [n for n in graph['nodes'] if n.get('role') == 'input data']
  assert data['uri'] == os.path.join(rotated['workdir'], 'csv')
  pushes = {n['uri'] for n in graph['nodes'] if n.get('role') == 'pushed'}
  assert record['properties']['pushed_destination'] in pushes
  edges = {(nodes[e['from']].get('type') or nodes[e['from']].get('role'),
            e['label'],
            nodes[e['to']].get('type') or nodes[e['to']].get('role'))
           for e in graph['edges']}
  short = {(f.rsplit('.', 1)[-1], label, t.rsplit('.', 1)[-1])
           for f, label, t in edges}
  for edge in (('input data', 'input_base', 'CsvExampleGen'),
               ('CsvExampleGen', 'examples', 'Examples'),
               ('Examples', 'examples', 'StatisticsGen'),
               ('StatisticsGen', 'statistics', 'ExampleStatistics'),
               ('ExampleStatistics', 'statistics', 'SchemaGen'),
               ('SchemaGen', 'schema', 'Schema'),
               ('Schema', 'schema', 'Trainer'),
               ('Examples', 'examples', 'Trainer'),
               ('Trainer', 'model', 'Model'),
               ('Model', 'model', 'Evaluator'),
               ('Examples', 'examples', 'Evaluator'),
               ('Evaluator', 'blessing', 'ModelBlessing'),
               ('ModelBlessing', 'model_blessing', 'EncryptPusher'),
               ('Model', 'model', 'EncryptPusher'),
               ('EncryptPusher', 'encrypted_model', 'EncryptedModel'),
               ('EncryptPusher', 'pushed_model', 'PushedModel'),
               ('EncryptedModel', 'pushed to', 'pushed'),
               # run 2's package was rotated into a new version
               ('EncryptedModel', 'encrypted_model', 'KeyRotation')):
    assert edge in short, edge
  [blessing] = [n for n in graph['nodes']
                if n.get('type') == 'ModelBlessing']
  assert blessing['blessed'] == 1
  # The CLI, from the pushed version: DOT that Graphviz parses into the same
  # graph, and an SVG / PNG drawn from it.
  mysql = ['--mlmd-mysql', mariadb.target, '--mlmd-user', _MLMD_USER,
           '--version', version, '--pipeline', _TRAINED_PIPELINE]
  proc = _tfxe('lineage', *mysql, '--format', 'dot', env=rotated['env'])
  assert proc.returncode == 0, proc.stderr
  _, parsed_nodes, parsed_edges = test_graph._parse_dot(proc.stdout)  # pylint: disable=protected-access
  assert set(parsed_nodes) == set(nodes)
  assert len(parsed_edges) == len(graph['edges'])
  assert proc.stdout == lineage.lineage_dot(mysql_store, [record['id']])
  svg = tmp_path / 'lineage.svg'
  proc = _tfxe('lineage', *mysql, '--format', 'svg', '-o', str(svg),
               env=rotated['env'])
  assert proc.returncode == 0, proc.stderr
  texts = test_graph._svg_texts(svg.read_bytes())  # pylint: disable=protected-access
  for label in ('CsvExampleGen', 'Evaluator', 'blessed', 'encrypt_pusher',
                os.path.join(rotated['workdir'], 'csv'),
                f'pushed version {version}',
                record['properties']['pushed_destination'],
                f'EncryptedModel {record["id"]}'):
    assert label in texts, label
  png = tmp_path / 'lineage.png'
  proc = _tfxe('lineage', *mysql, '--format', 'png', '-o', str(png),
               env=rotated['env'])
  assert proc.returncode == 0, proc.stderr
  assert png.read_bytes().startswith(b'\x89PNG\r\n\x1a\n')
  assert _MLMD_PASSWORD.encode() not in png.read_bytes() + svg.read_bytes()


@pytest.mark.slow
def test_mariadb_cli_worklist_json_and_table(rotated, mariadb):
  first, second = rotated['first']['id'], rotated['second']['id']
  key_a = rotated['key_a']
  mysql = ['--mlmd-mysql', mariadb.target, '--mlmd-user', _MLMD_USER]
  proc = _tfxe('lineage', *mysql, '--key-id', key_a, '--json',
               env=rotated['env'])
  assert proc.returncode == 0, proc.stderr
  traces = json.loads(proc.stdout)
  assert [(t['encrypted_model']['id'], t['encrypted_model']['status'])
          for t in traces] == [(second, 'live'), (first, 'superseded')]
  rewrapped = traces[1]['encrypted_model']['superseded_by']
  assert traces[1]['rotations'][0]['new_artifact_id'] == rewrapped
  assert traces[0]['models'][0]['produced_by']['type'].endswith('Trainer')
  assert traces[0]['examples'][0]['produced_by']['type'].endswith(
      'CsvExampleGen')

  # The table, with the password on stdin.
  proc = _tfxe('lineage', *mysql, '--mlmd-password-stdin', '--key-id', key_a,
               input_text=_MLMD_PASSWORD + '\n')
  assert proc.returncode == 0, proc.stderr
  rows = [l for l in proc.stdout.splitlines()[1:] if not l.startswith(' ')]
  assert [int(r.split()[0]) for r in rows] == [second, first]
  assert (f'status    superseded (replaced by EncryptedModel {rewrapped})'
          in proc.stdout)
  assert f'rotated   rewrap -> EncryptedModel {rewrapped}' in proc.stdout
  assert f'removed {key_a})' in proc.stdout
  assert 'from Trainer execution' in proc.stdout
  assert 'from CsvExampleGen execution' in proc.stdout
  assert f'<- {os.path.join(rotated["workdir"], "csv")})' in proc.stdout
  assert _MLMD_PASSWORD not in proc.stdout + proc.stderr

  # A config file for `lineage` too; --version picks the rewrapped one.
  proc = _tfxe('lineage', '--mlmd-config', rotated['config'], '--version',
               os.path.basename(rotated['v1']), '--json', env=rotated['env'])
  assert proc.returncode == 0, proc.stderr
  [t] = json.loads(proc.stdout)
  assert t['encrypted_model']['id'] == rewrapped
  assert t['rotated_from'][0]['id'] == first

  # A wrong or missing password: one line, exit 3, no password echoed.
  for env in ({'TFXE_MLMD_PASSWORD': 'wrong-password'}, {}):
    proc = _tfxe('lineage', *mysql, env=env)
    assert proc.returncode == lineage.MetadataStoreError.exit_code == 3
    assert proc.stdout == ''
    assert proc.stderr.startswith(
        f'tfx-encrypt: error: mysql://{_MLMD_USER}@127.0.0.1:')
    assert proc.stderr.count('\n') == 1, proc.stderr
    assert 'check the host, port, database, user and password' in proc.stderr
    assert 'wrong-password' not in proc.stderr


@pytest.mark.slow
def test_mariadb_rewrap_of_an_unrecorded_package_changes_nothing(
    rotated, mariadb, tmp_path):
  """The MLMD lookup comes first: an unknown package is not rewrapped."""
  from tfx_encrypt import package as package_lib  # pylint: disable=g-import-not-at-top
  keys = rotated['keys']
  copy = str(tmp_path / 'copy')
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(rotated['v2_rotated'], copy)
  before = package_lib.inspect_package(copy).recipients
  proc = _tfxe('rewrap', copy, '-i', keys['b'][1], '--add-recipient',
               keys['a'][0], '--sign-with', keys['s'][1], '--trust',
               keys['s'][0], '--mlmd-mysql', mariadb.target, '--mlmd-user',
               _MLMD_USER, env=rotated['env'])
  assert proc.returncode == lineage.NoMatchError.exit_code, proc.stderr
  assert 'no live tfx_encrypt.EncryptedModel' in proc.stderr
  assert package_lib.inspect_package(copy).recipients == before


# --------------------------------------------------------------------------
# A metadata gRPC service. No `metadata_store_server` binary ships with the
# ml-metadata wheel or Debian, so the service here is a TEST-ONLY Python
# stand-in: every MetadataStoreService RPC handed to a real SQLite-backed
# MetadataStore. The client side (ml_metadata's gRPC stub, through
# lineage.open_grpc and --mlmd-grpc) is the real one.
# --------------------------------------------------------------------------


class _GrpcMetadataService:

  def __init__(self, sqlite_path):
    # pylint: disable=g-import-not-at-top
    from concurrent import futures
    import grpc
    from ml_metadata.proto import metadata_store_service_pb2 as service_pb2
    from tests.fakes import servers
    # pylint: enable=g-import-not-at-top
    backend = lineage.open_sqlite(sqlite_path)
    service = service_pb2.DESCRIPTOR.services_by_name['MetadataStoreService']
    handlers = {}
    for method in service.methods:
      request_cls = getattr(service_pb2, method.input_type.name)
      response_cls = getattr(service_pb2, method.output_type.name)

      def handle(request, context, name=method.name, response_cls=response_cls):
        response = response_cls()
        try:
          backend._call_method(name, request, response)  # pylint: disable=protected-access
        except Exception as e:  # pylint: disable=broad-except
          code = getattr(e, 'error_code', 2)
          status = {s.value[0]: s for s in grpc.StatusCode}.get(
              code, grpc.StatusCode.UNKNOWN)
          context.abort(status, str(e))
        return response

      handlers[method.name] = grpc.unary_unary_rpc_method_handler(
          handle, request_deserializer=request_cls.FromString,
          response_serializer=response_cls.SerializeToString)
    self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    self.server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    self.port = servers.free_port()
    self.server.add_insecure_port(f'127.0.0.1:{self.port}')
    self.server.start()

  def stop(self):
    self.server.stop(grace=None)


@pytest.mark.slow
def test_grpc_service(runs):
  service = _GrpcMetadataService(runs['store_path'])
  try:
    store = lineage.open_grpc('127.0.0.1', service.port)
    local = lineage.open_sqlite(runs['store_path'])
    over_grpc = lineage.encrypted_models(store)
    assert over_grpc == lineage.encrypted_models(local)
    assert [lineage.trace(store, r['id']) for r in over_grpc] == [
        lineage.trace(local, r['id']) for r in over_grpc]
    proc = _cli('--mlmd-grpc', f'127.0.0.1:{service.port}', '--json')
    assert proc.returncode == 0, proc.stderr
    assert [t['encrypted_model']['id'] for t in json.loads(proc.stdout)] == (
        _ids(over_grpc))
  finally:
    service.stop()
  # Nothing listens there any more: one line, exit 3.
  proc = _cli('--mlmd-grpc', f'127.0.0.1:{service.port}')
  assert proc.returncode == 3, proc.stderr
  assert proc.stderr.startswith(
      f'tfx-encrypt: error: grpc://127.0.0.1:{service.port} is not a '
      'readable ML Metadata store')
  assert proc.stderr.count('\n') == 1
