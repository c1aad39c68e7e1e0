"""The compiled EncryptPusher step, run through TFX's own KFP v2 entrypoint.

The pipeline is compiled with KubeflowV2DagRunner; the test then plays the
part of Vertex AI Pipelines for the EncryptPusher task: it resolves the
task's input parameters from the compiled spec (replacing the KFP runtime
placeholders `{{$.pipeline_job_name}}`, ... as the orchestrator does),
builds the executor input (`{{$}}`) with the model artifact and the output
artifacts, and runs the container's command and arguments from the
compiled deployment spec: `python -m
tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor ...`, as
the step runs inside the image. Then it reads what the step reports back
(executor_output.json, which Vertex turns into ML Metadata records) and the
package itself.
"""

import json
import os
import subprocess
import sys

import pytest
from tfx import v1 as tfx

from tfx_encrypt import package as package_lib
from tfx_encrypt.components import BeamEncryptPusher
from tfx_encrypt.components import EncryptPusher
from tfx_encrypt.components import kubeflow_v2

experimental = pytest.importorskip('tfx.v1.orchestration.experimental')

pytestmark = pytest.mark.slow

_ENTRYPOINT = 'tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor'
_JOB = 'encrypt-vertex-20261202065900'
_JOB_UUID = '5b1f0c1e-6a55-4a3f-9f0e-0d5c1c2b7a10'
_TASK_UUID = '-4218032941236654080'
_MODEL_NAME = ('projects/123456789/locations/us-central1/metadataStores/'
               'default/artifacts/4242')
_TASK = 'encrypt_pusher'  # the component id, which TFX makes the task name
# What Vertex AI resolves KFP's runtime placeholders to for this task.
_RUNTIME = {
    '{{$.pipeline_job_name}}': _JOB,
    '{{$.pipeline_job_uuid}}': _JOB_UUID,
    '{{$.pipeline_task_name}}': _TASK,
    '{{$.pipeline_task_uuid}}': _TASK_UUID,
}


def _resolve(value):
  return _RUNTIME.get(value, value) if isinstance(value, str) else value


def _executor_input(spec, task_name, model_uri, task_root, spec_2_1):
  """The ExecutorInput JSON the orchestrator passes as `{{$}}`."""
  task = spec['root']['dag']['tasks'][task_name]
  component = spec['components'][task['componentRef']['name']]
  inputs = {'artifacts': {}}
  values = {}
  for name, parameter in task['inputs']['parameters'].items():
    runtime = parameter['runtimeValue']
    if 'constant' in runtime:  # pipeline spec 2.1
      values[name] = _resolve(runtime['constant'])
    else:  # 2.0: constantValue {stringValue | intValue | doubleValue}
      [(kind, value)] = runtime['constantValue'].items()
      values[name] = {kind: _resolve(value)}
  inputs['parameterValues' if spec_2_1 else 'parameters'] = values
  model_type = component['inputDefinitions']['artifacts']['model'][
      'artifactType']
  inputs['artifacts']['model'] = {'artifacts': [{
      'name': _MODEL_NAME, 'type': model_type, 'uri': model_uri,
      'metadata': {}}]}
  outputs = {'artifacts': {},
             'outputFile': os.path.join(task_root, 'executor_output.json')}
  for i, (key, definition) in enumerate(
      component['outputDefinitions']['artifacts'].items()):
    outputs['artifacts'][key] = {'artifacts': [{
        'name': _MODEL_NAME[:-4] + str(5000 + i),
        'type': definition['artifactType'],
        'uri': os.path.join(task_root, key), 'metadata': {}}]}
  return {'inputs': inputs, 'outputs': outputs}


@pytest.mark.parametrize('beam, spec_2_1', [(False, False), (False, True),
                                            (True, True)])
def test_step_runs_through_kfp_v2_entrypoint_with_provenance(
    tmp_path, model_uri, keys, beam, spec_2_1, predict_fn,
    expected_predictions):
  if not hasattr(experimental, 'KubeflowV2DagRunner'):
    pytest.skip('kfp-pipeline-spec is not installed')
  serving = str(tmp_path / 'serving')
  importer = tfx.dsl.Importer(
      source_uri=model_uri,
      artifact_type=tfx.types.standard_artifacts.Model).with_id('importer')
  kwargs = dict(
      model=importer.outputs['result'], recipients=[keys.recipient],
      signer=keys.signer, push_destination=serving,
      encryption_context={'team': 'ml'})
  if beam:  # same keywords, plus the key the Beam workers unwrap with
    pusher = BeamEncryptPusher(beam_worker_identity=keys.recipient_key,
                               **kwargs)
  else:
    pusher = EncryptPusher(**kwargs)
  pusher.with_id(_TASK)
  pipeline = tfx.dsl.Pipeline(
      pipeline_name='encrypt-vertex', pipeline_root=str(tmp_path / 'root'),
      components=[importer, pusher])
  runner = experimental.KubeflowV2DagRunner(
      config=experimental.KubeflowV2DagRunnerConfig(
          default_image=kubeflow_v2.image_map(pipeline),
          use_pipeline_spec_2_1=spec_2_1),
      output_dir=str(tmp_path), output_filename='pipeline.json')
  runner.run(pipeline, write_out=True)
  with open(tmp_path / 'pipeline.json') as f:
    spec = json.load(f)['pipelineSpec']

  # The compiled task carries the placeholders and the pipeline name.
  parameters = spec['root']['dag']['tasks'][_TASK]['inputs']['parameters']
  compiled = json.dumps(parameters)
  for placeholder in _RUNTIME:
    assert placeholder in compiled
  assert 'encrypt-vertex' in compiled

  # Run the container as Vertex would: <job>/<task>_<uuid>/ under the root.
  task_root = str(tmp_path / 'root' / '123456789' / _JOB /
                  f'{_TASK}_{_TASK_UUID}')
  executor_input = _executor_input(spec, _TASK, model_uri, task_root,
                                   spec_2_1)
  component = spec['root']['dag']['tasks'][_TASK]['componentRef']['name']
  label = spec['components'][component]['executorLabel']
  container = spec['deploymentSpec']['executors'][label]['container']
  assert container['command'][1:] == ['-m', _ENTRYPOINT]
  assert container['args'][1] == (
      f'{type(pusher).EXECUTOR_SPEC.executor_class.__module__}.Executor')
  args = [json.dumps(executor_input) if a == '{{$}}' else a
          for a in container['args']]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  result = subprocess.run([sys.executable, '-m', _ENTRYPOINT, *args],
                          cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-5000:]

  with open(os.path.join(task_root, 'executor_output.json')) as f:
    output = json.load(f)
  want = {
      'tfx.pipeline_name': 'encrypt-vertex',
      'tfx.pipeline_run_id': _JOB,
      'tfx.pipeline_run_uuid': _JOB_UUID,
      'tfx.component_id': _TASK,
      'tfx.execution_id': _TASK_UUID,
      'tfx.model_artifact_id': _MODEL_NAME,
      'tfx.model_uri': model_uri,
      'team': 'ml',
  }
  contexts = {}
  for key in ('encrypted_model', 'pushed_model'):
    [artifact] = output['artifacts'][key]['artifacts']
    metadata = artifact['metadata']
    contexts[key] = json.loads(metadata['encryption_context'])
    assert metadata['pushed'] == 1
    # The runtime name comes back, so Vertex updates the right record.
    assert artifact['name'] == executor_input['outputs']['artifacts'][key][
        'artifacts'][0]['name']
  context = contexts['encrypted_model']
  assert contexts['pushed_model'] == context
  for key, value in want.items():
    assert context[key] == value, key
  # Never the hash TFX's entrypoint makes of the artifact name.
  assert not any(v.isdigit() and len(v) > 12 for k, v in context.items()
                 if k != 'version' and k != 'tfx.execution_id')

  # The package's signed context says the same; it decrypts.
  [artifact] = output['artifacts']['pushed_model']['artifacts']
  pushed = artifact['metadata']['pushed_destination']
  info = package_lib.inspect_package(pushed)
  assert info.context == context
  assert package_lib.inspect_package(
      executor_input['outputs']['artifacts']['encrypted_model']['artifacts'][0]
      ['uri']).context == context
  out = str(tmp_path / 'decrypted')
  package_lib.decrypt_model(pushed, out, identities=[keys.recipient_key],
                            trusted=[keys.signer_pub])
  assert (predict_fn(out) == expected_predictions).all()


def test_placeholders_left_unresolved_are_ignored(tmp_path, model_uri, keys):
  """On other orchestrators the kfp_* properties keep the placeholder text:
  no provenance is taken from them."""
  from tfx_encrypt.components.encrypt_pusher import params  # pylint: disable=g-import-not-at-top
  pusher = EncryptPusher(
      model=tfx.dsl.Importer(
          source_uri=model_uri,
          artifact_type=tfx.types.standard_artifacts.Model).with_id(
              'importer2').outputs['result'],
      recipients=[keys.recipient], push_destination=str(tmp_path))
  p = params.Params(pusher.exec_properties)
  assert p.kfp == {} and p.pipeline_name is None
  resolved = dict(pusher.exec_properties,
                  kfp_pipeline_job_name='job-1', pipeline_name='pn')
  p = params.Params(resolved)
  assert p.kfp == {'kfp_pipeline_job_name': 'job-1'}
  assert p.pipeline_name == 'pn'


def test_hashed_id_is_tfx_entrypoint_hash():
  """kfp_v2.hashed_id must stay the id TFX's v2 entrypoint derives from an
  artifact's runtime name (a private TFX function: this catches drift)."""
  from tfx.orchestration.kubeflow.v2.container import kubeflow_v2_entrypoint_utils as utils  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.components.encrypt_pusher import kfp_v2  # pylint: disable=g-import-not-at-top
  names = {}
  assert kfp_v2.hashed_id(_MODEL_NAME) == utils._get_hashed_id(  # pylint: disable=protected-access
      _MODEL_NAME, names)
  # Not under the entrypoint: artifact ids are real MLMD ids.
  assert kfp_v2.runtime_artifact_names() is None
