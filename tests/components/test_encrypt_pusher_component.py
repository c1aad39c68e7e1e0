"""Construction and spec tests of EncryptPusher (mirrors Pusher's)."""

import base64
import json
import os

import pytest
from tfx.proto import pusher_pb2
from tfx.types import channel_utils
from tfx.types import standard_artifacts
from tfx.types import standard_component_specs

from tfx_encrypt import errors
from tfx_encrypt import types as tfxe_types
from tfx_encrypt.components import BeamEncryptPusher
from tfx_encrypt.components import EncryptPusher
from tfx_encrypt.components.encrypt_pusher import beam_executor
from tfx_encrypt.components.encrypt_pusher import executor
from tfx_encrypt.components.encrypt_pusher import params
from tfx_encrypt.components.encrypt_pusher import spec

_PEM = ('-----BEGIN PRIVATE KEY-----\n'
        'MC4CAQAwBQYDK2VuBCIEIJDdyyQ4nEr3PbZlhRgAZ4z6rO/Wzh8n8SLeJy7W7Xdg\n'
        '-----END PRIVATE KEY-----\n')
_RAW_B64 = base64.b64encode(bytes(range(7, 39))).decode()
_RAW_HEX = bytes(range(100, 132)).hex()


@pytest.fixture
def model():
  return channel_utils.as_channel([standard_artifacts.Model()])


@pytest.fixture
def blessing():
  return channel_utils.as_channel([standard_artifacts.ModelBlessing()])


def _make(model, **kwargs):
  kwargs.setdefault('recipients', ['/keys/recipient.pub.pem'])
  kwargs.setdefault('push_destination', '/serving/encrypted')
  return EncryptPusher(model=model, **kwargs)


def test_keys_match_tfx_standard_component_specs():
  for name in ('MODEL_KEY', 'MODEL_BLESSING_KEY', 'INFRA_BLESSING_KEY',
               'PUSHED_MODEL_KEY', 'PUSH_DESTINATION_KEY', 'CUSTOM_CONFIG_KEY'):
    assert getattr(spec, name) == getattr(standard_component_specs, name)
  pusher = standard_component_specs.PusherSpec
  for key in pusher.INPUTS:
    assert spec.EncryptPusherSpec.INPUTS[key].type == pusher.INPUTS[key].type
  assert spec.EncryptPusherSpec.TYPE_ANNOTATION is pusher.TYPE_ANNOTATION


def test_artifact_type():
  assert tfxe_types.EncryptedModel.TYPE_NAME == 'tfx_encrypt.EncryptedModel'
  assert not tfxe_types.EncryptedModel.PROPERTIES
  mlmd_type = tfxe_types.EncryptedModel._get_artifact_type()  # pylint: disable=protected-access
  assert mlmd_type.name == 'tfx_encrypt.EncryptedModel'
  assert not mlmd_type.properties


def test_construct(model, blessing):
  c = _make(model, model_blessing=blessing,
            recipients=['/keys/a.pub.pem',
                        'aws-kms://arn:aws:kms:eu-west-1:111122223333:key/'
                        '1234abcd-12ab-34cd-56ef-1234567890ab'],
            signer='file:///keys/signer.key.pem',
            cipher='chacha20-poly1305',
            encryption_context={'team': 'fraud', 'ticket': 42},
            custom_config={'note': 'release 7'},
            bundle=True)
  assert c.outputs['encrypted_model'].type_name == 'tfx_encrypt.EncryptedModel'
  assert c.outputs['pushed_model'].type_name == (
      standard_artifacts.PushedModel.TYPE_NAME)
  props = c.exec_properties
  assert json.loads(props['recipients'])[1].startswith('aws-kms://')
  assert props['signer'] == 'file:///keys/signer.key.pem'
  assert props['cipher'] == 'chacha20-poly1305'
  assert json.loads(props['encryption_context']) == {'team': 'fraud',
                                                     'ticket': '42'}
  assert json.loads(props['custom_config']) == {'note': 'release 7'}
  assert props['push_destination'] == '/serving/encrypted'
  assert props['bundle'] == 1
  assert isinstance(c.executor_spec.executor_class, type)
  assert c.executor_spec.executor_class is executor.Executor


def test_construct_with_push_destination_proto(model):
  dest = pusher_pb2.PushDestination(
      filesystem=pusher_pb2.PushDestination.Filesystem(
          base_directory='/serving/x'))
  c = _make(model, push_destination=dest)
  assert c.exec_properties['push_destination'] == '/serving/x'


def test_construct_without_destination_and_single_recipient(model):
  c = _make(model, recipients='/keys/a.pub.pem', push_destination=None)
  assert json.loads(c.exec_properties['recipients']) == ['/keys/a.pub.pem']
  assert c.exec_properties['push_destination'] is None


def test_construct_with_key_backend_object(model, keys):
  from tfx_encrypt import keys as keys_lib  # pylint: disable=g-import-not-at-top
  c = _make(model, recipients=[keys_lib.resolve(keys.recipient)])
  assert json.loads(c.exec_properties['recipients']) == [keys.recipient]


def test_requires_model_or_infra_blessing():
  with pytest.raises(ValueError, match='model or infra_blessing'):
    EncryptPusher(recipients=['/k.pub.pem'], push_destination='/d')
  infra = channel_utils.as_channel([standard_artifacts.InfraBlessing()])
  EncryptPusher(infra_blessing=infra, recipients=['/k.pub.pem'],
                push_destination='/d')


@pytest.mark.parametrize('recipients', [[], None, ['a.pem', 'a.pem'], [42]])
def test_rejects_bad_recipients(model, recipients):
  with pytest.raises(errors.UsageError):
    _make(model, recipients=recipients)


@pytest.mark.parametrize('value', [
    _PEM,
    _PEM.replace('PRIVATE KEY', 'PUBLIC KEY'),
    _RAW_B64,
    _RAW_HEX,
    bytes(32),
    'pkcs11:token=hsm;object=model-key?pin-value=123456',
    'pkcs11:token=hsm;object=model-key;pin-value=123456',
    'hcvault://vault.local:8200/transit/keys/k?token=s.abcdefgh',
    'https://admin:hunter2@keys.example.com/k',
    'AGE-SECRET-KEY-1QYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGP',
    'file:///keys/' + _RAW_B64.replace('/', '_'),
])
def test_rejects_key_material_as_recipient(model, value):
  with pytest.raises(errors.KeyMaterialInParameterError) as e:
    _make(model, recipients=[value])
  message = str(e.value)
  assert 'key URI' in message
  # The error never echoes the secret.
  assert '123456' not in message and 'hunter2' not in message
  assert _RAW_B64 not in message and 'BEGIN' not in message


@pytest.mark.parametrize('kwargs', [
    {'signer': _PEM},
    {'signer': 'pkcs11:token=t;object=s?pin-value=0000'},
    {'encryption_context': {'k': _RAW_B64}},
    {'encryption_context': {'k': _PEM}},
    {'custom_config': {'nested': {'list': ['ok', _RAW_HEX]}}},
    {'custom_config': {'vault_token': 'x', 'password': 'hunter2'}},
    {'custom_config': {'client_secret': 'abc'}},
    {'push_destination': 'https://u:p@bucket.example.com/models'},
    {'push_destination': 's3://bucket/models?X-Amz-Signature=abcdef'},
])
def test_rejects_key_material_elsewhere(model, kwargs):
  with pytest.raises(errors.KeyMaterialInParameterError):
    _make(model, **kwargs)


@pytest.mark.parametrize('uri', [
    '/home/ml/keys/recipient.pub.pem',
    'keys/recipient.pub.pem',
    'file:///etc/tfx-encrypt/recipient.pub.pem',
    'aws-kms://arn:aws:kms:us-east-1:123456789012:key/'
    '1234abcd-12ab-34cd-56ef-1234567890ab',
    'aws-kms://arn:aws:kms:eu-west-1:111122223333:alias/model-encryption-prod',
    'gcp-kms://projects/my-project-123456/locations/us-central1/keyRings/'
    'modelEncryptionRing2024/cryptoKeys/RecipientKey01',
    'hcvault://vault.example.com:8200/transit/keys/model-key',
    'azure-kv://myvault.vault.azure.net/keys/mykey/'
    '0123456789abcdef0123456789abcdef',
    'pkcs11:token=SoftHSM%20Token;object=model-rsa;type=public'
    '?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin',
])
def test_accepts_key_uris(model, uri):
  # A Cloud KMS signer names a key version (see the test below).
  signer = (uri + '/cryptoKeyVersions/1' if uri.startswith('gcp-kms://')
            else uri)
  c = _make(model, recipients=[uri], signer=signer,
            encryption_context={'model_sha': 'sha256:' + 'ab' * 32,
                                'git': 'e83c5163316f89bfbde7d9ab23ca2e25604af290',
                                'owner': 'ml-platform@example.com'})
  assert json.loads(c.exec_properties['recipients']) == [uri]


@pytest.mark.parametrize('signer, error, match', [
    ('gcp-kms://projects/p/locations/global/keyRings/r/cryptoKeys/k',
     errors.KeyRoleError, 'append /cryptoKeyVersions/N'),
    ('gcp-kms://projects/p/locations/global/keyRings/r/cryptoKeys/k/'
     'cryptoKeyVersions/0', errors.InvalidKeyUriError, 'CryptoKeyVersion'),
    ('aws-kms://arn:aws:kms:us-east-1:123456789012:grant/abc',
     errors.InvalidKeyUriError, 'key ARN'),
    ('aws-kms://1234abcd-12ab-34cd-56ef-1234567890ab',
     errors.InvalidKeyUriError, 'key ARN'),
    ('hcvault://vault.example.com:8200/transit/release',
     errors.InvalidKeyUriError, 'MOUNT/keys/NAME'),
    ('azure-kv://myvault/keys/release', errors.InvalidKeyUriError,
     'VAULT.vault.azure.net'),
])
def test_signer_uri_form_is_checked_at_build_time(model, signer, error,
                                                  match, monkeypatch):
  """Issue 13: a KMS signer URI of the wrong form fails when the pipeline is
  built, not when it runs; checking it makes no network call."""
  import socket  # pylint: disable=g-import-not-at-top

  def no_network(*args, **kwargs):
    raise AssertionError('the component made a network call')

  monkeypatch.setattr(socket.socket, 'connect', no_network)
  with pytest.raises(error, match=match) as ei:
    _make(model, signer=signer)
  assert isinstance(ei.value, errors.UsageError)
  assert str(ei.value).startswith('signer ') or error is not errors.KeyRoleError
  for good in ('gcp-kms://projects/p/locations/global/keyRings/r/cryptoKeys/'
               'k/cryptoKeyVersions/7',
               'aws-kms://arn:aws:kms:us-east-1:123456789012:alias/release',
               'hcvault://vault.example.com:8200/transit/keys/release',
               'azure-kv://myvault.vault.azure.net/keys/release'):
    assert _make(model, signer=good).exec_properties['signer'] == good
    assert BeamEncryptPusher(
        model=model, recipients=['/keys/a.pub.pem'], signer=good,
        beam_worker_identity='/keys/a.key.pem',
        push_destination='/d').exec_properties['signer'] == good
  with pytest.raises(error, match=match):
    BeamEncryptPusher(model=model, recipients=['/keys/a.pub.pem'],
                      beam_worker_identity='/keys/a.key.pem',
                      signer=signer, push_destination='/d')


def test_rejects_unknown_cipher_and_hash(model):
  with pytest.raises(errors.UsageError, match='cipher'):
    _make(model, cipher='aes-128-cbc')
  with pytest.raises(errors.UsageError, match='hash_alg'):
    _make(model, hash_alg='md5')


def test_rejects_reserved_context_keys(model):
  for key in ('tfx.pipeline_name', 'tfxe:package-id'):
    with pytest.raises(errors.UsageError, match='reserved'):
      _make(model, encryption_context={key: 'x'})


def test_context_version_must_be_canonical_at_build_time(model):
  """`version` is what consumers compare with --min-version (issue 9)."""
  for bad in ('07', '-1', '1.0', '', '١٢', 'v7', 7.5):
    with pytest.raises(errors.UsageError,
                       match=r"encryption_context\['version'\] must be"):
      _make(model, encryption_context={'version': bad})
  for good, want in (('0', '0'), ('1700000000', '1700000000'), (42, '42')):
    c = _make(model, encryption_context={'version': good})
    assert json.loads(c.exec_properties['encryption_context']) == {
        'version': want}


def test_executor_rechecks_exec_properties():
  """A hand-edited compiled pipeline is refused at run time too."""
  with pytest.raises(errors.KeyMaterialInParameterError):
    params.Params({'recipients': json.dumps([_PEM])})
  with pytest.raises(errors.KeyMaterialInParameterError):
    params.Params({'recipients': json.dumps(['/k.pem']),
                   'custom_config': json.dumps({'x': _RAW_B64})})
  with pytest.raises(errors.KeyMaterialInParameterError):
    params.Params({'recipients': json.dumps(['/k.pem']),
                   'beam_worker_identity': 'pkcs11:object=x?pin-value=1'})
  p = params.Params({'recipients': json.dumps(['/k.pem']), 'bundle': 1,
                     'encryption_context': json.dumps({'a': 'b'})})
  assert p.recipients == ['/k.pem'] and p.bundle
  assert p.encryption_context == {'a': 'b'}


def test_beam_component(model):
  c = BeamEncryptPusher(model=model, recipients=['/keys/a.pub.pem'],
                        push_destination='/d',
                        beam_worker_identity='/keys/a.key.pem',
                        beam_segment_bytes=8 << 20)
  c.with_beam_pipeline_args(['--direct_num_workers=2'])
  assert c.executor_spec.executor_class is beam_executor.Executor
  assert '--direct_num_workers=2' in c.executor_spec.beam_pipeline_args
  assert c.exec_properties['beam_worker_identity'] == '/keys/a.key.pem'
  assert c.exec_properties['beam_segment_bytes'] == 8 << 20
  with pytest.raises(errors.KeyMaterialInParameterError):
    BeamEncryptPusher(model=model, recipients=['/keys/a.pub.pem'],
                      beam_worker_identity=_PEM)


def test_top_level_type_is_importable_for_vertex():
  # tfx_encrypt/__init__.py exports EncryptedModel lazily so the Vertex
  # container can import the type by its TYPE_NAME.
  from tfx.utils import import_utils  # pylint: disable=g-import-not-at-top
  cls = import_utils.import_class_by_path(tfxe_types.EncryptedModel.TYPE_NAME)
  assert cls is tfxe_types.EncryptedModel


def test_component_files_exist():
  here = os.path.dirname(executor.__file__)
  for name in ('component.py', 'executor.py', 'beam_executor.py', 'spec.py',
               'params.py', 'key_material.py', 'push.py'):
    assert os.path.exists(os.path.join(here, name))


# -- Build-time validation (issue 14) ----------------------------------------

_GCP_KEY = 'gcp-kms://projects/p/locations/global/keyRings/r/cryptoKeys/k'
_AWS_KEY = ('aws-kms://arn:aws:kms:us-east-1:123456789012:key/'
            '1234abcd-12ab-34cd-56ef-1234567890ab')


@pytest.fixture
def no_network(monkeypatch):
  import socket  # pylint: disable=g-import-not-at-top

  def connect(*args, **kwargs):
    raise AssertionError('the component made a network call')

  monkeypatch.setattr(socket.socket, 'connect', connect)


@pytest.mark.parametrize('recipient, error, match', [
    (_GCP_KEY + '/cryptoKeyVersions/1', errors.KeyRoleError,
     'drop /cryptoKeyVersions/N'),
    ('gcp-kms://projects/p/keyRings/r/cryptoKeys/k', errors.InvalidKeyUriError,
     ''),
    ('aws-kms://arn:aws:kms:us-east-1:123456789012:grant/abc',
     errors.InvalidKeyUriError, 'key ARN'),
    ('hcvault://vault.example.com:8200/transit/release',
     errors.InvalidKeyUriError, 'MOUNT/keys/NAME'),
    ('azure-kv://myvault/keys/release', errors.InvalidKeyUriError,
     'VAULT.vault.azure.net'),
])
@pytest.mark.parametrize('beam', [False, True])
def test_recipient_uri_form_is_checked_at_build_time(model, recipient, error,
                                                     match, beam, no_network):
  del no_network
  kwargs = dict(model=model, recipients=['/keys/a.pub.pem', recipient],
                push_destination='/d')
  if beam:
    kwargs['beam_worker_identity'] = '/keys/a.key.pem'
  with pytest.raises(error, match=match) as ei:
    (BeamEncryptPusher if beam else EncryptPusher)(**kwargs)
  if error is errors.KeyRoleError:
    # Names the parameter and the entry, as the user wrote it.
    assert str(ei.value).startswith('recipients[1] ')


def test_beam_without_worker_identity_needs_a_recipient_workers_can_use(
    model, no_network):
  """Workers unwrap the data key themselves: with only public key files as
  recipients and no beam_worker_identity, the job could never run."""
  del no_network
  for recipients in (['/keys/a.pub.pem'],
                     ['/keys/a.pub.pem', 'file:///keys/b.pub.pem'],
                     ['pkcs11:token=t;object=o;x-public-key=/k.pub.pem']):
    with pytest.raises(errors.UsageError) as ei:
      BeamEncryptPusher(model=model, recipients=recipients,
                        push_destination='/d')
    message = str(ei.value)
    assert 'beam_worker_identity=' in message
    assert 'KMS recipient' in message
  # A KMS recipient is also what workers unwrap with; so is a token key.
  for recipients in (['/keys/a.pub.pem', _GCP_KEY], [_AWS_KEY],
                     ['pkcs11:token=t;object=o?module-path=/lib/p11.so']):
    c = BeamEncryptPusher(model=model, recipients=recipients,
                          push_destination='/d')
    assert c.exec_properties['beam_worker_identity'] is None
  # A private key file every worker reads (checked by the workers).
  BeamEncryptPusher(model=model, recipients=['/keys/a.pub.pem'],
                    beam_worker_identity='/keys/a.key.pem',
                    push_destination='/d')
  # The plain component has no workers: no such requirement.
  _make(model, recipients=['/keys/a.pub.pem'])


@pytest.mark.parametrize('identity, recipients, error, match', [
    ('/keys/a.pub.pem', ['/keys/a.pub.pem'], errors.UsageError,
     'public key file'),
    (_GCP_KEY, ['/keys/a.pub.pem'], errors.UsageError,
     'not among the recipients'),
    (_GCP_KEY + '/cryptoKeyVersions/2', [_GCP_KEY], errors.KeyRoleError,
     'CryptoKeyVersion'),
])
def test_beam_worker_identity_is_checked_at_build_time(
    model, identity, recipients, error, match, no_network):
  del no_network
  with pytest.raises(error, match=match) as ei:
    BeamEncryptPusher(model=model, recipients=recipients,
                      beam_worker_identity=identity, push_destination='/d')
  assert 'beam_worker_identity' in str(ei.value)


def test_beam_worker_identity_kms_recipient_is_accepted(model):
  c = BeamEncryptPusher(model=model, recipients=['/keys/a.pub.pem', _GCP_KEY],
                        beam_worker_identity=_GCP_KEY, push_destination='/d')
  assert c.exec_properties['beam_worker_identity'] == _GCP_KEY


@pytest.mark.parametrize('dest', [
    '/srv/models/encrypted',
    'models/encrypted',
    'file:///srv/models/encrypted',
    'gs://my-bucket/encrypted-models/fraud',
    'gs://my-bucket',
    'gs://my_bucket.example.com/a/b/',
    's3://my.bucket-1/a/b',
    'hdfs://namenode:8020/models',  # another tf.io.gfile filesystem
])
def test_push_destination_forms_accepted(model, dest):
  assert _make(model, push_destination=dest).exec_properties[
      'push_destination'] == dest
  proto = pusher_pb2.PushDestination(
      filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=dest))
  assert _make(model, push_destination=proto).exec_properties[
      'push_destination'] == dest


@pytest.mark.parametrize('dest, match', [
    ('http://models.example.com/encrypted', 'filesystem or a bucket'),
    ('https://storage.googleapis.com/my-bucket/x', 'filesystem or a bucket'),
    ('gcs://my-bucket/x', 'gs://, not gcs://'),
    ('ftp://host/x', 'filesystem or a bucket'),
    ('gs:/my-bucket/x', 'missing "//"'),
    ('s3:my-bucket/x', 'missing "//"'),
    ('gs://', 'valid bucket'),
    ('gs:///x', 'valid bucket'),
    ('gs://My-Bucket/x', 'valid bucket'),
    ('s3://b/x', 'valid bucket'),
    ('gs://my-bucket/a/../b', '".."'),
    ('gs://my-bucket/x?generation=1', 'query or fragment'),
    ('file://host/srv/x', 'three slashes'),
    ('file://srv/x', 'three slashes'),
    ('~/models', 'not expanded'),
    (' /srv/models', 'spaces'),
    ('/srv/models\n', 'control characters'),
])
def test_push_destination_obviously_wrong_is_refused(model, dest, match):
  with pytest.raises(errors.UsageError, match=match):
    _make(model, push_destination=dest)
  proto = pusher_pb2.PushDestination(
      filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=dest))
  with pytest.raises(errors.UsageError, match=match):
    _make(model, push_destination=proto)
  # And again by the executor (a hand-edited compiled pipeline).
  with pytest.raises(errors.UsageError, match=match):
    params.Params({'recipients': json.dumps(['/k.pem']),
                   'push_destination': dest})


def test_kfp_provenance_properties_are_placeholders(model):
  """Resolved by Kubeflow Pipelines v2 / Vertex AI (kfp_v2.py)."""
  props = _make(model).exec_properties
  assert props['kfp_pipeline_job_name'] == '{{$.pipeline_job_name}}'
  assert props['kfp_pipeline_task_name'] == '{{$.pipeline_task_name}}'
  assert props.get('pipeline_name') is None  # set by kubeflow_v2.image_map


def test_encrypt_pusher_replaces_pusher(model, blessing):
  """Position in the DAG (docs/COMPONENT.md): EncryptPusher takes Pusher's
  inputs and outputs Pusher's `pushed_model`; a stock Pusher cannot take
  either of its outputs (TFX's type check, not bypassed)."""
  from tfx.components import Pusher  # pylint: disable=g-import-not-at-top
  c = _make(model, model_blessing=blessing)
  assert c.outputs['pushed_model'].type is standard_artifacts.PushedModel
  assert set(standard_component_specs.PusherSpec.OUTPUTS) <= set(c.outputs)
  dest = pusher_pb2.PushDestination(
      filesystem=pusher_pb2.PushDestination.Filesystem(base_directory='/y'))
  for key in ('encrypted_model', 'pushed_model'):
    with pytest.raises(TypeError, match='should be a Channel of type'):
      Pusher(model=c.outputs[key], push_destination=dest)
