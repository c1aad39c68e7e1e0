"""TEST-ONLY: environments for the key-backend tests, shared by fixtures.

Used by tests/keys/conftest.py and tests/test_backends_integration.py.
"""

import os
from typing import Dict

from tests.fakes.proxy import CountingProxy, Fault  # pylint: disable=unused-import
from tests.fakes.servers import MotoServer

# Retry settings that keep retry tests fast (milliseconds of backoff).
FAST_RETRY_ENV = {
    'TFXE_RETRY_MAX_ATTEMPTS': '4',
    'TFXE_RETRY_BASE_DELAY': '0.01',
    'TFXE_RETRY_MAX_DELAY': '0.05',
    'TFXE_RETRY_DEADLINE': '5',
    'TFXE_RETRY_REQUEST_TIMEOUT': '5',
}

AWS_REGION = 'us-east-1'
AWS_ENV_TO_CLEAR = (
    'AWS_PROFILE', 'AWS_DEFAULT_PROFILE', 'AWS_SESSION_TOKEN',
    'AWS_SECURITY_TOKEN', 'AWS_ENDPOINT_URL_KMS',
    'AWS_IGNORE_CONFIGURED_ENDPOINT_URLS', 'AWS_ROLE_ARN',
    'AWS_WEB_IDENTITY_TOKEN_FILE', 'AWS_CONTAINER_CREDENTIALS_RELATIVE_URI',
    'AWS_CONTAINER_CREDENTIALS_FULL_URI')


def start_moto(env: Dict[str, str] = None) -> MotoServer:
  return MotoServer(env)


def aws_kms_json_error(code: str, message: str, status: int = 400) -> Fault:
  """A fault body exactly as AWS KMS's JSON protocol sends errors."""
  body = ('{"__type":"%s","message":"%s"}' % (code, message)).encode()
  return Fault(1, status, body,
               {'Content-Type': 'application/x-amz-json-1.1',
                'x-amzn-ErrorType': code})


class AwsEnv:
  """moto behind a counting proxy, plus an admin client that bypasses it."""

  def __init__(self, moto: MotoServer):
    import boto3  # pylint: disable=g-import-not-at-top
    self.moto = moto
    self.proxy = CountingProxy('127.0.0.1', moto.port)
    self.admin = boto3.client(
        'kms', endpoint_url=moto.url, region_name=AWS_REGION,
        aws_access_key_id='testing', aws_secret_access_key='testing')

  def client_env(self) -> Dict[str, str]:
    """Environment under which the backend's default boto3 chain works."""
    return {
        'AWS_ENDPOINT_URL': self.proxy.url,
        'AWS_ACCESS_KEY_ID': 'testing',
        'AWS_SECRET_ACCESS_KEY': 'testing',
        'AWS_DEFAULT_REGION': AWS_REGION,
        'AWS_EC2_METADATA_DISABLED': 'true',
        'AWS_CONFIG_FILE': os.devnull,
        'AWS_SHARED_CREDENTIALS_FILE': os.devnull,
    }

  def create_key(self, description: str = 'tfx-encrypt test') -> str:
    """Creates a symmetric key through the KMS API; returns its key URI."""
    meta = self.admin.create_key(Description=description)['KeyMetadata']
    return 'aws-kms://' + meta['Arn']

  @staticmethod
  def arn(uri: str) -> str:
    return uri[len('aws-kms://'):]

  @staticmethod
  def key_uuid(uri: str) -> str:
    """The bare key id (moto's DisableKey etc. accept only this form)."""
    return uri.rsplit('key/', 1)[1]

  def counts(self) -> Dict[str, int]:
    return self.proxy.counts()

  def close(self) -> None:
    self.proxy.close()
