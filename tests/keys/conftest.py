"""Fixtures for the key-backend tests: real servers on loopback ports.

* AWS KMS: moto's standalone server (``moto_server``), reached by real boto3
  over HTTP, through a counting/fault-injecting proxy (tests/fakes/proxy.py).
* PKCS#11: SoftHSM2 with a token initialised in a temporary SOFTHSM2_CONF.
* GCP KMS, Vault, Azure Key Vault: the loopback protocol fakes of
  tests/fakes (test-only), reached by the real client libraries.
"""

import pytest

from tests.fakes import backends as fx


@pytest.fixture
def fast_retry(monkeypatch):
  """Short backoffs so retry tests take milliseconds, not seconds."""
  for k, v in fx.FAST_RETRY_ENV.items():
    monkeypatch.setenv(k, v)


@pytest.fixture(scope='session')
def moto():
  server = fx.start_moto()
  yield server
  server.close()


@pytest.fixture
def aws(moto, monkeypatch):
  """An AWS KMS test environment; its proxy counts requests per operation."""
  env = fx.AwsEnv(moto)
  for k, v in env.client_env().items():
    monkeypatch.setenv(k, v)
  for k in fx.AWS_ENV_TO_CLEAR:
    monkeypatch.delenv(k, raising=False)
  yield env
  env.close()


@pytest.fixture(scope='session')
def softhsm():
  """The process's SoftHSM2 token directory (temporary SOFTHSM2_CONF)."""
  return fx.SoftHsm.shared()


@pytest.fixture
def gcp(monkeypatch):
  """The loopback Cloud KMS gRPC fake (tests/fakes/gcp_kms.py)."""
  from tests.fakes.gcp_kms import FakeGcpKms  # pylint: disable=g-import-not-at-top
  server = FakeGcpKms()
  monkeypatch.setenv('TFXE_GCP_KMS_ENDPOINT', server.endpoint)
  monkeypatch.setenv('TFXE_GCP_KMS_INSECURE', '1')
  yield server
  server.stop()
