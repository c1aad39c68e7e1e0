"""AWS KMS backend against moto's standalone server (real boto3 over HTTP).

Requests are counted at a proxy in front of the server, so "exactly one
Encrypt per wrap, one Decrypt per unwrap" is checked on the wire.
"""

import logging
import time

import pytest

from tests.fakes import backends as fx
from tfx_encrypt import errors
from tfx_encrypt import keys
from tfx_encrypt.keys import _retry
from tfx_encrypt.keys.aws_kms import AwsKmsKey, parse_uri
from tfx_encrypt.keys.base import Stanza, WrapContext

# Every test here talks to a moto_server started by a fixture.
pytestmark = pytest.mark.integration

DEK = bytes(range(32))
CTX = WrapContext(b'\x01' * 16, {'model': 'demo', 'stage': 'prod'})


def test_uri_parsing_and_key_id():
  uri = ('aws-kms://arn:aws:kms:eu-west-1:123456789012:key/'
         '1234abcd-12ab-34cd-56ef-1234567890ab')
  parts = parse_uri(uri)
  assert parts['region'] == 'eu-west-1'
  assert parts['account'] == '123456789012'
  key = AwsKmsKey(uri)
  assert key.key_id == uri
  assert key.region == 'eu-west-1'
  alias = AwsKmsKey('aws-kms://arn:aws-us-gov:kms:us-gov-west-1:123456789012:'
                    'alias/models/prod')
  assert alias.is_alias


@pytest.mark.parametrize('uri', [
    'aws-kms://1234abcd-12ab-34cd-56ef-1234567890ab',
    'aws-kms://arn:aws:kms:us-east-1:1234:key/abc',
    'aws-kms://arn:aws:s3:us-east-1:123456789012:key/abc',
    'aws-kms://arn:aws:kms:us-east-1:123456789012:key/abc?x=y',
    'aws-kms://arn:aws:kms:us-east-1:123456789012:grant/abc',
])
def test_bad_uris(uri):
  with pytest.raises(errors.InvalidKeyUriError):
    AwsKmsKey(uri)


def test_registry_resolves_scheme(aws):
  uri = aws.create_key()
  key = keys.resolve(uri)
  assert isinstance(key, AwsKmsKey)
  assert key.key_id == uri


def test_roundtrip_one_request_each(aws):
  uri = aws.create_key()
  key = AwsKmsKey(uri)
  stanza = key.wrap(DEK, CTX)
  assert aws.counts() == {'Encrypt': 1}
  assert stanza.type == 'aws-kms' and stanza.key_id == uri
  assert set(stanza.body) == {'ct'}
  # A separate backend object (fresh client) on the decrypting side.
  other = AwsKmsKey(uri)
  assert other.matches(stanza)
  assert other.unwrap(stanza, CTX) == DEK
  assert aws.counts() == {'Encrypt': 1, 'Decrypt': 1}


def test_encryption_context_is_sent_to_kms(aws):
  uri = aws.create_key()
  stanza = AwsKmsKey(uri).wrap(DEK, CTX)
  # The admin (not via our backend) can decrypt only with the same context.
  blob = __import__('base64').b64decode(stanza.body['ct'])
  out = aws.admin.decrypt(CiphertextBlob=blob, EncryptionContext=CTX.as_dict())
  assert out['Plaintext'] == DEK
  assert CTX.as_dict()['tfxe:package-id'] == '01' * 16


def test_wrong_context_is_tampering_and_not_retried(aws):
  uri = aws.create_key()
  key = AwsKmsKey(uri)
  stanza = key.wrap(DEK, CTX)
  other_ctx = WrapContext(b'\x01' * 16, {'model': 'demo', 'stage': 'dev'})
  with pytest.raises(errors.TamperedPackageError, match='encryption context'):
    key.unwrap(stanza, other_ctx)
  assert aws.counts() == {'Encrypt': 1, 'Decrypt': 1}


def test_modified_ciphertext_is_tampering(aws):
  key = AwsKmsKey(aws.create_key())
  stanza = key.wrap(DEK, CTX)
  raw = bytearray(__import__('base64').b64decode(stanza.body['ct']))
  raw[-1] ^= 1
  bad = Stanza(stanza.type, stanza.key_id,
               {'ct': __import__('base64').b64encode(bytes(raw)).decode()})
  with pytest.raises(errors.TamperedPackageError):
    key.unwrap(bad, CTX)


def test_stanza_for_another_key_makes_no_request(aws):
  key_a = AwsKmsKey(aws.create_key())
  key_b = AwsKmsKey(aws.create_key())
  stanza = key_a.wrap(DEK, CTX)
  aws.proxy.reset()
  assert not key_b.matches(stanza)
  with pytest.raises(errors.NoMatchingKeyError):
    key_b.unwrap(stanza, CTX)
  assert aws.counts() == {}


def test_stanza_key_id_swapped_is_refused(aws):
  """A header that claims key B for a blob made with key A."""
  key_a = AwsKmsKey(aws.create_key())
  key_b = AwsKmsKey(aws.create_key())
  stanza = key_a.wrap(DEK, CTX)
  forged = Stanza(stanza.type, key_b.key_id, stanza.body)
  # moto answers AccessDeniedException here; real KMS IncorrectKeyException.
  with pytest.raises((errors.NoMatchingKeyError, errors.KeyAccessDeniedError,
                      errors.TamperedPackageError)):
    key_b.unwrap(forged, CTX)


def test_disabled_key(aws):
  # moto 5.2 records DisableKey but does not enforce it on Encrypt/Decrypt,
  # so the proxy answers exactly as AWS KMS does for a disabled key.
  uri = aws.create_key()
  key = AwsKmsKey(uri)
  stanza = key.wrap(DEK, CTX)
  aws.admin.disable_key(KeyId=aws.key_uuid(uri))
  aws.proxy.reset()
  for _ in range(2):
    aws.proxy.inject(fx.aws_kms_json_error(
        'DisabledException', f'{aws.arn(uri)} is disabled.'))
  with pytest.raises(errors.KeyDisabledError, match='enable-key'):
    key.wrap(DEK, CTX)
  with pytest.raises(errors.KeyDisabledError):
    key.unwrap(stanza, CTX)
  assert aws.counts() == {'Encrypt': 1, 'Decrypt': 1}  # not retried


def test_key_pending_deletion(aws):
  uri = aws.create_key()
  aws.admin.schedule_key_deletion(KeyId=aws.key_uuid(uri),
                                  PendingWindowInDays=7)
  aws.proxy.inject(fx.aws_kms_json_error(
      'KMSInvalidStateException',
      f'{aws.arn(uri)} is pending deletion.'))
  with pytest.raises(errors.KeyDisabledError, match='pending deletion'):
    AwsKmsKey(uri).wrap(DEK, CTX)


def test_unknown_key(aws):
  uri = ('aws-kms://arn:aws:kms:us-east-1:123456789012:key/'
         '00000000-0000-0000-0000-000000000000')
  with pytest.raises(errors.KeyNotFoundError, match='does not know'):
    AwsKmsKey(uri).wrap(DEK, CTX)
  assert aws.counts() == {'Encrypt': 1}


def test_access_denied_json_error_not_retried(aws):
  uri = aws.create_key()
  aws.proxy.inject(fx.aws_kms_json_error(
      'AccessDeniedException', 'User: arn:aws:iam::123456789012:user/x is '
      'not authorized to perform: kms:Encrypt'))
  with pytest.raises(errors.KeyAccessDeniedError, match='kms:Encrypt'):
    AwsKmsKey(uri).wrap(DEK, CTX)
  assert aws.counts() == {'Encrypt': 1}


@pytest.mark.parametrize('fault', [
    fx.aws_kms_json_error('ThrottlingException', 'Rate exceeded'),
    fx.aws_kms_json_error('KMSInternalException', 'internal', 500),
    fx.Fault(1, 503, b'Service Unavailable', {'Content-Type': 'text/plain'}),
])
def test_transient_errors_are_retried(aws, fast_retry, fault, caplog):
  uri = aws.create_key()
  fault.count = 2
  aws.proxy.inject(fault)
  with caplog.at_level(logging.WARNING, logger='tfx_encrypt'):
    stanza = AwsKmsKey(uri).wrap(DEK, CTX)
  # Two injected failures, then the real request: botocore did not retry
  # on its own, only our policy did.
  assert aws.counts() == {'Encrypt': 3}
  assert sum('retrying' in r.getMessage() for r in caplog.records) == 2
  assert AwsKmsKey(uri).unwrap(stanza, CTX) == DEK


def test_retries_are_bounded(aws, fast_retry):
  uri = aws.create_key()
  aws.proxy.inject(fx.Fault(100, 503, b'down', {'Content-Type': 'text/plain'}))
  t0 = time.monotonic()
  with pytest.raises(errors.BackendUnavailableError, match='4 attempts'):
    AwsKmsKey(uri).wrap(DEK, CTX)
  assert aws.counts() == {'Encrypt': 4}   # TFXE_RETRY_MAX_ATTEMPTS
  assert time.monotonic() - t0 < 5


def test_retry_deadline_bounds_total_time(aws, monkeypatch):
  uri = aws.create_key()
  policy = _retry.RetryPolicy(max_attempts=1000, deadline=0.5, base_delay=0.1,
                              max_delay=0.2)
  key = AwsKmsKey(uri, retry=policy)
  # One call before the clock: the client's start-up (botocore loading its
  # models, the first connection) took more than the whole 0.5 s deadline
  # on a loaded CI machine, leaving no time for a second attempt.
  key.wrap(DEK, CTX)
  before = aws.counts()['Encrypt']
  aws.proxy.inject(fx.aws_kms_json_error('ThrottlingException', 'slow down'))
  aws.proxy.faults[0].count = 100
  t0 = time.monotonic()
  with pytest.raises(errors.BackendUnavailableError, match='throttling'):
    key.wrap(DEK, CTX)
  # Bounded by the deadline (0.5 s) plus one in-flight request; generous
  # for a loaded CI machine: without a deadline it would take 100 retries.
  assert time.monotonic() - t0 < 5
  assert 2 <= aws.counts()['Encrypt'] - before < 50


def test_server_stopped_mid_run(monkeypatch, fast_retry):
  """A dedicated moto server is stopped between wrap and unwrap."""
  server = fx.start_moto()
  try:
    env = fx.AwsEnv(server)
    env.apply(monkeypatch)
    monkeypatch.setenv('AWS_ENDPOINT_URL', server.url)  # direct, no proxy
    uri = env.create_key()
    key = AwsKmsKey(uri)
    stanza = key.wrap(DEK, CTX)
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(errors.BackendUnavailableError,
                       match='unreachable') as ei:
      key.unwrap(stanza, CTX)
    assert 'gave up after 4 attempts' in str(ei.value)
    assert time.monotonic() - t0 < 5
    env.close()
  finally:
    server.close()


def test_iam_access_denied_with_real_credentials(monkeypatch):
  """moto enforcing IAM: a user without kms:Encrypt gets a typed error."""
  import boto3  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  # The first 6 requests (the IAM set-up below) are not authenticated.
  server = fx.start_moto({'INITIAL_NO_AUTH_ACTION_COUNT': '6'})
  try:
    iam = boto3.client('iam', endpoint_url=server.url,
                       region_name=fx.AWS_REGION, aws_access_key_id='x',
                       aws_secret_access_key='x')
    creds = {}
    for user, actions in (('admin', ['kms:*']),
                          ('decrypt-only', ['kms:Decrypt'])):
      iam.create_user(UserName=user)
      ak = iam.create_access_key(UserName=user)['AccessKey']
      iam.put_user_policy(UserName=user, PolicyName='p', PolicyDocument=(
          json.dumps({'Version': '2012-10-17', 'Statement': [{
              'Effect': 'Allow', 'Action': actions, 'Resource': '*'}]})))
      creds[user] = ak
    admin = boto3.client(
        'kms', endpoint_url=server.url, region_name=fx.AWS_REGION,
        aws_access_key_id=creds['admin']['AccessKeyId'],
        aws_secret_access_key=creds['admin']['SecretAccessKey'])
    arn = admin.create_key()['KeyMetadata']['Arn']
    env = fx.AwsEnv(server)
    env.apply(monkeypatch)
    monkeypatch.setenv('AWS_ENDPOINT_URL', server.url)
    monkeypatch.setenv('AWS_ACCESS_KEY_ID',
                       creds['decrypt-only']['AccessKeyId'])
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY',
                       creds['decrypt-only']['SecretAccessKey'])
    with pytest.raises(errors.KeyAccessDeniedError, match='kms:Encrypt') as ei:
      AwsKmsKey('aws-kms://' + arn).wrap(DEK, CTX)
    assert creds['decrypt-only']['SecretAccessKey'] not in str(ei.value)
    # Unknown credentials are an access problem too.
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'AKIANOTAREALKEY00000')
    with pytest.raises(errors.KeyAccessDeniedError):
      AwsKmsKey('aws-kms://' + arn).wrap(DEK, CTX)
    env.close()
  finally:
    server.close()


def test_no_credentials(monkeypatch, aws):
  uri = aws.create_key()
  monkeypatch.delenv('AWS_ACCESS_KEY_ID')
  monkeypatch.delenv('AWS_SECRET_ACCESS_KEY')
  with pytest.raises(errors.KeyAccessDeniedError, match='credential'):
    AwsKmsKey(uri).wrap(DEK, CTX)
  assert aws.counts() == {}


def test_service_specific_endpoint_variable(aws, monkeypatch):
  """AWS_ENDPOINT_URL_KMS wins over AWS_ENDPOINT_URL (botocore config)."""
  uri = aws.create_key()
  monkeypatch.setenv('AWS_ENDPOINT_URL', 'http://127.0.0.1:9')  # discard port
  monkeypatch.setenv('AWS_ENDPOINT_URL_KMS', aws.proxy.url)
  AwsKmsKey(uri).wrap(DEK, CTX)
  assert aws.counts() == {'Encrypt': 1}


def test_wrap_rejects_bad_dek(aws):
  key = AwsKmsKey(aws.create_key())
  with pytest.raises(errors.UsageError):
    key.wrap(b'short', CTX)
  assert aws.counts() == {}


def test_malformed_stanza_body(aws):
  key = AwsKmsKey(aws.create_key())
  with pytest.raises(errors.TamperedPackageError):
    key.unwrap(Stanza('aws-kms', key.key_id, {'ct': '***'}), CTX)
  with pytest.raises(errors.TamperedPackageError):
    key.unwrap(Stanza('aws-kms', key.key_id, {'ct': 'AAAA', 'x': ''}), CTX)
  assert aws.counts() == {}


