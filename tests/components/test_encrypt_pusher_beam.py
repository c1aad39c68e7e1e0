"""Beam executor tests: DirectRunner with 2 worker processes, real MLMD."""

import base64
import json
import os

import apache_beam as beam
from ml_metadata.metadata_store import metadata_store
import pytest
from tfx import v1 as tfx
from tfx.orchestration import metadata

from pipelines import local_pipeline
import tfx_encrypt
from tfx_encrypt import errors
from tfx_encrypt import keys as keys_lib
from tfx_encrypt import package as package_lib
from tfx_encrypt.components.encrypt_pusher import beam_executor
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.keys.base import WrapContext

_MULTI = ['--direct_num_workers=2', '--direct_running_mode=multi_processing']
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(tfx_encrypt.__file__)))


@pytest.fixture
def worker_env(monkeypatch):
  """Beam worker subprocesses must import tfx_encrypt."""
  path = os.environ.get('PYTHONPATH')
  monkeypatch.setenv('PYTHONPATH',
                     _REPO + (os.pathsep + path if path else ''))
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '3')


@pytest.fixture(scope='module')
def big_model(tmp_path_factory, write_model_fn):
  """A real SavedModel plus a 3.5 MiB shard, so files split into ranges."""
  d = str(tmp_path_factory.mktemp('big_model'))
  write_model_fn(d)
  with open(os.path.join(d, 'assets.extra.bin'), 'wb') as f:
    f.write(os.urandom((3 << 20) + (1 << 19) + 17))
  return d


def _tree(root):
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      p = os.path.join(d, name)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def _secrets_of(package, identity):
  """The DEK and derived keys of a package, recovered with its identity."""
  hpath = os.path.join(package, package_lib.HEADER_NAME)
  with open(hpath, 'rb') as f:
    h, _ = header_lib.Header.read(f)
  backend = keys_lib.resolve(identity)
  [stanza] = [s for s in h.recipients if backend.matches(s)]
  dek = backend.unwrap(stanza, WrapContext(h.package_id, h.context))
  k = header_lib.DerivedKeys(dek, h.package_id, h.suite)
  return [dek, k.stream_key, k.mac_key]


class _RecordingPipeline(beam.Pipeline):
  """Keeps the serialized job graph that is submitted to the runner."""
  graphs = []

  def run(self, test_runner_api='AUTO'):
    _RecordingPipeline.graphs.append(
        self.to_runner_api(use_fake_coders=True).SerializeToString())
    return super().run(test_runner_api)


@pytest.mark.slow
def test_two_worker_processes_segment_ranges_decryptable(
    tmp_path, big_model, keys, worker_env, predict_fn, expected_predictions,
    monkeypatch):
  del worker_env
  import dill  # pylint: disable=g-import-not-at-top
  pickles = []
  real_dumps = dill.dumps

  def recording_dumps(*args, **kwargs):
    out = real_dumps(*args, **kwargs)
    pickles.append(out)
    return out

  monkeypatch.setattr(dill, 'dumps', recording_dumps)
  stats = beam_executor.BeamStats()
  pkg = str(tmp_path / 'pkg')
  _RecordingPipeline.graphs.clear()
  info = beam_executor.encrypt_model_with_beam(
      big_model, pkg, recipients=[keys.recipient, keys.other],
      worker_identity=keys.recipient_key, signer=keys.signer,
      context={'team': 'ml'}, segment_bytes=1 << 20, stats=stats,
      make_pipeline=lambda: _RecordingPipeline(argv=_MULTI))
  # Fanned out: two worker processes, ranges of the big file, each worker
  # unwrapped the data key itself.
  assert len(stats.worker_pids) == 2
  assert os.getpid() not in stats.worker_pids
  assert stats.work_items > stats.files
  assert stats.dek_unwraps in (None, 1, 2)
  assert info.signer and info.file_count == stats.files
  # The plaintext DEK and derived keys are nowhere in the job graph or in
  # any pickled DoFn; the worker identity is there, as a URI.
  [graph] = _RecordingPipeline.graphs
  monkeypatch.setattr(dill, 'dumps', real_dumps)
  blob = b'\0'.join(pickles + [graph])
  assert keys.recipient_key.encode() in blob
  for secret in _secrets_of(pkg, keys.recipient_key):
    for form in (secret, secret.hex().encode(),
                 base64.b64encode(secret), base64.b64encode(secret).strip(b'=')):
      assert form not in blob
  # A standard package: the plain decrypt_model (other recipient too) reads it.
  out = str(tmp_path / 'out')
  dec = package_lib.decrypt_model(pkg, out, identities=[keys.other_key],
                                  trusted=[keys.signer_pub])
  assert dec.fingerprint == info.fingerprint
  assert _tree(out) == _tree(big_model)
  assert (predict_fn(out) == expected_predictions).all()
  assert sorted(os.listdir(tmp_path)) == ['out', 'pkg']  # no temp dirs


def test_in_memory_runner_bundle(tmp_path, big_model, keys):
  pkg = str(tmp_path / 'model.tfxe')
  info = beam_executor.encrypt_model_with_beam(
      big_model, pkg, recipients=[keys.recipient],
      worker_identity=keys.recipient_key, bundle=True,
      cipher='chacha20-poly1305', segment_bytes=2 << 20,
      make_pipeline=beam.Pipeline)
  assert info.bundle and info.cipher == 'chacha20-poly1305'
  out = str(tmp_path / 'out')
  package_lib.decrypt_model(pkg, out, identities=[keys.recipient_key],
                            allow_unsigned=True)
  assert _tree(out) == _tree(big_model)


def test_identity_that_cannot_unwrap_is_refused(tmp_path, big_model, keys):
  with pytest.raises(errors.UsageError, match='beam_worker_identity'):
    beam_executor.encrypt_model_with_beam(
        big_model, str(tmp_path / 'pkg'), recipients=[keys.recipient],
        make_pipeline=beam.Pipeline)  # a public key cannot unwrap
  with pytest.raises(errors.UsageError, match='beam_worker_identity'):
    beam_executor.encrypt_model_with_beam(
        big_model, str(tmp_path / 'pkg'), recipients=[keys.recipient],
        worker_identity=keys.other_key, make_pipeline=beam.Pipeline)
  assert os.listdir(tmp_path) == []


def test_worker_failure_leaves_nothing(tmp_path, big_model, keys,
                                       monkeypatch):
  def boom(job):
    raise errors.BackendUnavailableError('KMS unreachable (test)')
  monkeypatch.setattr(beam_executor, '_worker_envelope', boom)
  with pytest.raises(Exception, match='KMS unreachable'):
    beam_executor.encrypt_model_with_beam(
        big_model, str(tmp_path / 'pkg'), recipients=[keys.recipient],
        worker_identity=keys.recipient_key, make_pipeline=beam.Pipeline)
  assert os.listdir(tmp_path) == []


def _store(metadata_path):
  return metadata_store.MetadataStore(
      metadata.sqlite_metadata_connection_config(metadata_path))


@pytest.mark.slow
def test_beam_encrypt_pusher_on_local_dag_runner(tmp_path, model_uri, keys,
                                                 worker_env, predict_fn,
                                                 expected_predictions):
  del worker_env
  root = str(tmp_path)
  metadata_path = os.path.join(root, 'metadata.sqlite')
  pipeline = local_pipeline.create_pipeline(
      pipeline_name='beam-encrypt-test',
      pipeline_root=os.path.join(root, 'pipeline_root'),
      metadata_path=metadata_path, model_uri=model_uri,
      recipients=[keys.recipient], signer=keys.signer,
      push_destination=os.path.join(root, 'serving'), blessed=True,
      use_beam=True, beam_pipeline_args=_MULTI,
      beam_worker_identity=keys.recipient_key)
  tfx.orchestration.LocalDagRunner().run(pipeline)
  store = _store(metadata_path)
  [execution] = store.get_executions_by_type(
      'tfx_encrypt.components.encrypt_pusher.component.BeamEncryptPusher')
  assert execution.last_known_state == execution.COMPLETE
  [enc] = store.get_artifacts_by_type('tfx_encrypt.EncryptedModel')
  props = {k: getattr(v, v.WhichOneof('value'))
           for k, v in enc.custom_properties.items()}
  assert props['pushed'] == 1
  assert json.loads(props['recipient_uris']) == [keys.recipient]
  out = str(tmp_path / 'decrypted')
  package_lib.decrypt_model(props['pushed_destination'], out,
                            identities=[keys.recipient_key],
                            trusted=[keys.signer_pub])
  assert (predict_fn(out) == expected_predictions).all()
  assert package_lib.inspect_package(enc.uri).fingerprint == (
      props['model_fingerprint'])


@pytest.mark.slow
def test_benchmark_smoke(tmp_path, worker_env):
  del worker_env
  from pipelines import beam_benchmark  # pylint: disable=g-import-not-at-top
  result = beam_benchmark.run(str(tmp_path / 'bench'), size_mb=3,
                              workers=2, segment_mb=1)
  assert result['same_fingerprint']
  assert result['beam_worker_pids'] == 2
  assert result['beam_work_items'] > 3


@pytest.mark.parametrize('min_bytes,uses_beam', [(0, True), (1 << 40, False)])
def test_beam_executor_threshold(tmp_path, model_uri, keys, min_bytes,
                                 uses_beam):
  from tfx.dsl.components.base import base_beam_executor  # pylint: disable=g-import-not-at-top
  from tfx.types import standard_artifacts  # pylint: disable=g-import-not-at-top
  from tfx_encrypt import types as tfxe_types  # pylint: disable=g-import-not-at-top
  model = standard_artifacts.Model()
  model.uri = model_uri
  encrypted = tfxe_types.EncryptedModel()
  encrypted.uri = str(tmp_path / 'encrypted' / '1')
  pushed = standard_artifacts.PushedModel()
  pushed.uri = str(tmp_path / 'pushed' / '1')
  ex = beam_executor.Executor(base_beam_executor.BaseBeamExecutor.Context(
      beam_pipeline_args=['--runner=DirectRunner']))
  ex.Do({'model': [model]},
        {'encrypted_model': [encrypted], 'pushed_model': [pushed]},
        {'recipients': json.dumps([keys.recipient]),
         'beam_worker_identity': keys.recipient_key,
         'beam_min_bytes': min_bytes,
         'push_destination': str(tmp_path / 'serving')})
  assert (ex.last_beam_stats is not None) == uses_beam
  assert encrypted.get_int_custom_property('pushed') == 1
  out = str(tmp_path / 'out')
  package_lib.decrypt_model(
      encrypted.get_string_custom_property('pushed_destination'), out,
      identities=[keys.recipient_key], allow_unsigned=True)
