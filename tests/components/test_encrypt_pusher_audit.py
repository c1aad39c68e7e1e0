"""EncryptPusher's audit trail: one event per execution (docs/SECURITY.md §8).

The executor runs directly on a real SavedModel (as in
test_encrypt_pusher_executor.py); its `audit_log` exec property names a
hash-chained file that `tfx_encrypt.audit.verify_log` then checks.
"""

import json
import os

import pytest
from tfx.dsl.components.base import base_executor
from tfx.proto.orchestration import pipeline_pb2
from tfx.types import channel_utils
from tfx.types import standard_artifacts

from tfx_encrypt import audit
from tfx_encrypt import errors
from tfx_encrypt import package as package_lib
from tfx_encrypt import types as tfxe_types
from tfx_encrypt.components import EncryptPusher
from tfx_encrypt.components.encrypt_pusher import executor as executor_lib
from tfx_encrypt.components.encrypt_pusher import spec


def _run(tmp_path, model_uri, props, blessed=True, run='1'):
  model = standard_artifacts.Model()
  model.uri = model_uri
  blessing = standard_artifacts.ModelBlessing()
  blessing.uri = str(tmp_path / 'blessing')
  blessing.set_int_custom_property('blessed', int(blessed))
  encrypted = tfxe_types.EncryptedModel()
  encrypted.uri = str(tmp_path / run / 'encrypted_model')
  pushed = standard_artifacts.PushedModel()
  pushed.uri = str(tmp_path / run / 'pushed_model')
  for a in (encrypted, pushed):
    os.makedirs(a.uri)
  node = pipeline_pb2.PipelineNode()
  node.node_info.id = 'EncryptPusher'
  context = base_executor.BaseExecutor.Context(
      tmp_dir=str(tmp_path / 'tmp'), unique_id=run,
      pipeline_info=pipeline_pb2.PipelineInfo(id='fraud-pipeline'),
      pipeline_node=node, pipeline_run_id=f'run-{run}')
  executor_lib.Executor(context).Do(
      {spec.MODEL_KEY: [model], spec.MODEL_BLESSING_KEY: [blessing]},
      {spec.ENCRYPTED_MODEL_KEY: [encrypted], spec.PUSHED_MODEL_KEY: [pushed]},
      props)
  return encrypted


def _props(keys, log, **extra):
  props = {spec.RECIPIENTS_KEY: json.dumps([keys.recipient]),
           spec.SIGNER_KEY: keys.signer,
           spec.CUSTOM_CONFIG_KEY: 'null',
           spec.AUDIT_LOG_KEY: str(log)}
  props.update(extra)
  return props


def _events(log):
  with open(log, 'rb') as f:
    return [json.loads(line) for line in f]


def test_each_execution_emits_one_event(tmp_path, model_uri, keys):
  log = tmp_path / 'audit.jsonl'
  dest = tmp_path / 'serving'
  encrypted = _run(tmp_path, model_uri,
                   _props(keys, log, push_destination=str(dest)))
  [e] = _events(log)
  info = package_lib.inspect_package(encrypted.uri)
  [version] = os.listdir(dest)
  assert (e['action'], e['outcome'], e['error']) == (
      'encrypt-pusher', 'ok', None)
  assert e['package'] == encrypted.uri and e['package_id'] == info.package_id
  assert e['fingerprint'] == info.fingerprint
  assert e['recipients'] == [r['key_id'] for r in info.recipients]
  assert e['signer'] == info.signer and e['signer_verified'] is True
  assert (e['blessed'], e['pushed'], e['version']) == (True, True, version)
  assert e['destination'] == str(dest / version)
  assert (e['pipeline'], e['run_id']) == ('fraud-pipeline', 'run-1')
  assert 'exit_code' not in e and e['seq'] == 1

  # Not blessed: still one event; a failed execution: one, with its class.
  _run(tmp_path, model_uri, _props(keys, log), blessed=False, run='2')
  with pytest.raises(errors.TfxEncryptError) as raised:
    _run(tmp_path, model_uri,
         _props(keys, log, **{spec.SIGNER_KEY: keys.signer_pub}), run='3')
  _, unblessed, failed = _events(log)
  assert (unblessed['outcome'], unblessed['blessed'], unblessed['pushed']) == (
      'ok', False, False)
  assert 'package_id' not in unblessed
  assert (failed['outcome'], failed['error']) == (
      'error', type(raised.value).__name__)
  assert audit.verify_log(str(log)).events == 3
  data = log.read_bytes()
  for path in (keys.recipient_key, keys.signer, keys.other_key):
    body = b''.join(l for l in open(path, 'rb').read().splitlines()
                    if not l.startswith(b'-----'))
    assert body not in data


def test_without_audit_log_nothing_is_written(tmp_path, model_uri, keys):
  props = _props(keys, tmp_path / 'audit.jsonl')
  del props[spec.AUDIT_LOG_KEY]
  _run(tmp_path, model_uri, props)
  assert not (tmp_path / 'audit.jsonl').exists()


def test_audit_log_is_a_checked_exec_property(tmp_path):
  model = channel_utils.as_channel([standard_artifacts.Model()])
  c = EncryptPusher(model=model, recipients=['/keys/a.pub.pem'],
                    audit_log='/var/log/tfx-encrypt.jsonl')
  assert c.exec_properties[spec.AUDIT_LOG_KEY] == '/var/log/tfx-encrypt.jsonl'
  assert EncryptPusher(model=model, recipients=['/keys/a.pub.pem']
                       ).exec_properties[spec.AUDIT_LOG_KEY] is None
  with pytest.raises(errors.UsageError):
    EncryptPusher(model=model, recipients=['/keys/a.pub.pem'],
                  audit_log='syslog:host:1:2')
  with pytest.raises(errors.KeyMaterialInParameterError):
    EncryptPusher(model=model, recipients=['/keys/a.pub.pem'],
                  audit_log='-----BEGIN PRIVATE KEY-----\nMC4CAQAw\n')
