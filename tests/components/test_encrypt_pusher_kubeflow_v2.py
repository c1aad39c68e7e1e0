"""The EncryptedModel type and EncryptPusher compile for Vertex AI Pipelines."""

import json

import pytest
from tfx import v1 as tfx

from tfx_encrypt.components import EncryptPusher

experimental = pytest.importorskip('tfx.v1.orchestration.experimental')


def test_kubeflow_v2_compile(tmp_path):
  if not hasattr(experimental, 'KubeflowV2DagRunner'):
    pytest.skip('kfp-pipeline-spec is not installed')
  importer = tfx.dsl.Importer(
      source_uri='gs://bucket/model',
      artifact_type=tfx.types.standard_artifacts.Model).with_id('importer')
  pusher = EncryptPusher(
      model=importer.outputs['result'],
      recipients=['gcp-kms://projects/p/locations/global/keyRings/r/'
                  'cryptoKeys/k'],
      signer='gcp-kms://projects/p/locations/global/keyRings/r/cryptoKeys/'
      'signer/cryptoKeyVersions/1',
      push_destination='gs://bucket/encrypted')
  pipeline = tfx.dsl.Pipeline(
      pipeline_name='encrypt-vertex', pipeline_root='gs://bucket/root',
      components=[importer, pusher])
  runner = experimental.KubeflowV2DagRunner(
      config=experimental.KubeflowV2DagRunnerConfig(
          default_image='gcr.io/example/tfx-encrypt:latest'),
      output_dir=str(tmp_path), output_filename='pipeline.json')
  spec = runner.run(pipeline, write_out=True)
  with open(tmp_path / 'pipeline.json') as f:
    written = json.load(f)
  assert written['pipelineSpec'] == spec['pipelineSpec']
  outputs = spec['pipelineSpec']['components']['EncryptPusher'][
      'outputDefinitions']['artifacts']
  assert outputs['encrypted_model']['artifactType']['instanceSchema'] == (
      'title: tfx_encrypt.EncryptedModel\ntype: object\n')
  assert outputs['pushed_model']['artifactType']['instanceSchema'].startswith(
      'title: tfx.PushedModel\n')
  executor = spec['pipelineSpec']['deploymentSpec']['executors'][
      'EncryptPusher_executor']['container']
  assert ('tfx_encrypt.components.encrypt_pusher.executor.Executor'
          in executor['args'])
  assert 'BEGIN' not in json.dumps(spec)
