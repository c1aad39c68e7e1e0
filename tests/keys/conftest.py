"""Fixtures for the key-backend tests: real servers on loopback ports.

* AWS KMS: the `moto` / `aws` / `fast_retry` fixtures in tests/conftest.py
  (shared with the package-level integration tests).
* PKCS#11: SoftHSM2 with a token initialised in a temporary SOFTHSM2_CONF.
* GCP KMS, Vault, Azure Key Vault: the loopback protocol fakes of
  tests/fakes (test-only), reached by the real client libraries.
"""

import pytest

from tests.fakes import backends as fx


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


@pytest.fixture(scope='session')
def tls_cert(tmp_path_factory):
  """(cert_path, key_path) of a throwaway self-signed loopback certificate."""
  from tests.fakes import tls  # pylint: disable=g-import-not-at-top
  return tls.make_self_signed(str(tmp_path_factory.mktemp('tls')))


VAULT_TOKEN = 'hvs.TESTONLY-s3cr3t-vault-token-0123456789'


@pytest.fixture
def vault(tls_cert, monkeypatch, tmp_path):
  """The loopback HTTPS fake of Vault transit (tests/fakes/vault.py)."""
  from tests.fakes import tls  # pylint: disable=g-import-not-at-top
  from tests.fakes.vault import FakeVault  # pylint: disable=g-import-not-at-top
  server = FakeVault(tls.server_context(*tls_cert))
  server.add_token(VAULT_TOKEN)
  for k in ('VAULT_CAPATH', 'VAULT_NAMESPACE', 'TFXE_VAULT_HTTP',
            'VAULT_CLIENT_CERT', 'VAULT_CLIENT_KEY', 'VAULT_ADDR'):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))   # no ~/.vault-token
  monkeypatch.setenv('VAULT_TOKEN', VAULT_TOKEN)
  monkeypatch.setenv('VAULT_CACERT', tls_cert[0])
  server.token = VAULT_TOKEN
  yield server
  server.stop()


AZURE_TOKEN = 'eyTESTONLY.azure-bearer-token.s3cr3t'


class FakeAzureCredential:
  """A TokenCredential handing out the fake vault's bearer token."""

  def __init__(self, token=AZURE_TOKEN, fail=False):
    self.token = token
    self.fail = fail
    self.requests = []

  def get_token(self, *scopes, claims=None, tenant_id=None, enable_cae=False,
                **kwargs):
    del claims, enable_cae, kwargs
    from azure.core.credentials import AccessToken  # pylint: disable=g-import-not-at-top
    from azure.core.exceptions import ClientAuthenticationError  # pylint: disable=g-import-not-at-top
    self.requests.append((scopes, tenant_id))
    if self.fail:
      raise ClientAuthenticationError('DefaultAzureCredential failed to '
                                      'retrieve a token (test)')
    import time  # pylint: disable=g-import-not-at-top
    return AccessToken(self.token, int(time.time()) + 3600)


@pytest.fixture
def azure(tls_cert, monkeypatch):
  """The loopback HTTPS fake of Azure Key Vault (tests/fakes/azure_kv.py)."""
  from tests.fakes import tls  # pylint: disable=g-import-not-at-top
  from tests.fakes.azure_kv import FakeAzureKeyVault  # pylint: disable=g-import-not-at-top
  server = FakeAzureKeyVault(tls.server_context(*tls_cert), AZURE_TOKEN)
  monkeypatch.setenv('TFXE_AZURE_KV_ENDPOINT', server.endpoint)
  monkeypatch.setenv('TFXE_AZURE_KV_CA_BUNDLE', tls_cert[0])
  server.credential = FakeAzureCredential()
  yield server
  server.stop()
