"""Azure Key Vault backend: real azure-keyvault-keys over HTTPS (bearer
challenge flow, verified TLS) to the loopback REST fake in
tests/fakes/azure_kv.py (test-only)."""

import base64
import logging

import pytest

from tests.keys.conftest import AZURE_TOKEN, FakeAzureCredential
from tfx_encrypt import errors
from tfx_encrypt import keys
from tfx_encrypt.keys.azure_kv import AzureKeyVaultKey, parse_uri
from tfx_encrypt.keys.base import Stanza, WrapContext

DEK = bytes(range(200, 232))
CTX = WrapContext(b'\x05' * 16, {'model': 'demo'})


def _key(azure, name='kek', **kw):
  return AzureKeyVaultKey(azure.uri(name, **kw), credential=azure.credential)


def test_uri_forms(monkeypatch):
  monkeypatch.delenv('TFXE_AZURE_KV_ENDPOINT', raising=False)
  p = parse_uri('azure-kv://MyVault.vault.azure.net/keys/model-kek/0123abcd')
  assert p == {'host': 'myvault.vault.azure.net', 'name': 'model-kek',
               'version': '0123abcd'}
  k = AzureKeyVaultKey('azure-kv://myvault.vault.azure.net/keys/kek',
                       credential=object())
  assert k.key_id == 'azure-kv://myvault.vault.azure.net/keys/kek'
  assert k.vault_url == 'https://myvault.vault.azure.net'
  assert isinstance(keys.resolve(k.key_id), AzureKeyVaultKey)
  for bad in ('azure-kv://myvault/keys/kek',
              'azure-kv://myvault.vault.azure.net/secrets/kek',
              'azure-kv://myvault.vault.azure.net/keys/kek/v1/extra',
              'azure-kv://myvault.vault.azure.net/keys/k_ek',
              'azure-kv://myvault.vault.azure.net:443/keys/kek'):
    with pytest.raises(errors.InvalidKeyUriError):
      AzureKeyVaultKey(bad)
  with pytest.raises(errors.UsageError, match='https'):
    AzureKeyVaultKey(k.key_id, vault_url='http://127.0.0.1:1')


def test_roundtrip_one_request_each(azure):
  azure.add_key('kek')
  stanza = _key(azure).wrap(DEK, CTX)
  assert stanza.type == 'azure-kv-rsa-oaep-256'
  assert stanza.key_id == azure.uri('kek')
  assert set(stanza.body) == {'ver', 'alg', 'ct', 'n', 'e'}
  assert dict(azure.calls) == {'get': 1}
  assert azure.challenges >= 1   # the SDK's bearer challenge flow ran
  scopes, tenant = azure.credential.requests[0]
  assert scopes == ('https://vault.azure.net/.default',)
  assert tenant and tenant.startswith('72f988bf')
  assert _key(azure).unwrap(stanza, CTX) == DEK
  assert dict(azure.calls) == {'get': 1, 'unwrapkey': 1}
  # Once the challenge is cached, each operation is exactly one request.
  before = azure.challenges
  _key(azure).unwrap(stanza, CTX)
  _key(azure).wrap(DEK, CTX)
  assert dict(azure.calls) == {'get': 2, 'unwrapkey': 2}
  assert azure.challenges == before


def test_context_is_not_bound_by_key_vault(azure):
  """Key Vault wrap has no AAD: the header MAC binds the context instead."""
  azure.add_key('kek')
  stanza = _key(azure).wrap(DEK, CTX)
  other = WrapContext(b'\x06' * 16, {'model': 'other'})
  assert _key(azure).unwrap(stanza, other) == DEK


def test_rotation_uses_recorded_version(azure):
  fk = azure.add_key('kek')
  old = _key(azure).wrap(DEK, CTX)
  v2 = fk.rotate()
  new = _key(azure).wrap(DEK, CTX)
  assert new.body['ver'] == v2 and old.body['ver'] != v2
  assert _key(azure).unwrap(old, CTX) == DEK
  assert _key(azure).unwrap(new, CTX) == DEK
  pinned = _key(azure, version=old.body['ver'])
  assert pinned.key_id.endswith('/' + old.body['ver'])
  stanza = pinned.wrap(DEK, CTX)
  assert stanza.body['ver'] == old.body['ver']
  assert pinned.unwrap(stanza, CTX) == DEK


def test_tampering(azure):
  azure.add_key('kek')
  key = _key(azure)
  stanza = key.wrap(DEK, CTX)
  ct = bytearray(base64.b64decode(stanza.body['ct']))
  ct[10] ^= 1
  body = dict(stanza.body, ct=base64.b64encode(bytes(ct)).decode())
  with pytest.raises(errors.TamperedPackageError, match='could not unwrap'):
    key.unwrap(Stanza(stanza.type, stanza.key_id, body), CTX)
  with pytest.raises(errors.TamperedPackageError, match='malformed'):
    key.unwrap(Stanza(stanza.type, stanza.key_id,
                      dict(stanza.body, ver='../../x')), CTX)
  with pytest.raises(errors.KeyNotFoundError):
    key.unwrap(Stanza(stanza.type, stanza.key_id,
                      dict(stanza.body, ver='f' * 32)), CTX)
  other = _key(azure, name='other')
  assert not other.matches(stanza)
  with pytest.raises(errors.NoMatchingKeyError):
    other.unwrap(stanza, CTX)


def test_typed_errors(azure):
  fk = azure.add_key('kek')
  stanza = _key(azure).wrap(DEK, CTX)
  with pytest.raises(errors.KeyNotFoundError, match='no such key'):
    _key(azure, name='missing').wrap(DEK, CTX)
  fk.enabled = False
  with pytest.raises(errors.KeyDisabledError, match='disabled'):
    _key(azure).wrap(DEK, CTX)
  with pytest.raises(errors.KeyDisabledError):
    _key(azure).unwrap(stanza, CTX)
  fk.enabled = True
  azure.denied.add('unwrapkey')
  with pytest.raises(errors.KeyAccessDeniedError, match='keys/unwrapKey'):
    _key(azure).unwrap(stanza, CTX)
  azure.denied.clear()
  fk.expires = 1000000000   # 2001
  with pytest.raises(errors.KeyDisabledError, match='expired'):
    _key(azure).wrap(DEK, CTX)
  fk.expires = None
  fk.key_ops = ['sign', 'verify']
  with pytest.raises(errors.UsageError, match='wrapKey'):
    _key(azure).wrap(DEK, CTX)


def test_credential_failure(azure):
  azure.add_key('kek')
  key = AzureKeyVaultKey(azure.uri('kek'),
                         credential=FakeAzureCredential(fail=True))
  with pytest.raises(errors.KeyAccessDeniedError, match='DefaultAzureCred'):
    key.wrap(DEK, CTX)
  assert dict(azure.calls) == {}
  wrong = AzureKeyVaultKey(azure.uri('kek'),
                           credential=FakeAzureCredential(token='nope'))
  with pytest.raises(errors.KeyAccessDeniedError):
    wrong.wrap(DEK, CTX)


def test_throttling_and_5xx_retried(azure, fast_retry):
  azure.add_key('kek')
  azure.inject(1, 429, 'Throttled', 'Request was not processed because too '
               'many requests were received.')
  azure.inject(1, 503, 'ServiceUnavailable', 'try later')
  stanza = _key(azure).wrap(DEK, CTX)
  assert dict(azure.calls) == {'get': 3}
  azure.inject(100, 500, 'InternalError', 'boom')
  with pytest.raises(errors.BackendUnavailableError, match='4 attempts'):
    _key(azure).unwrap(stanza, CTX)
  assert azure.calls['unwrapkey'] == 4


def test_server_stopped(azure, fast_retry):
  azure.add_key('kek')
  key = _key(azure)
  stanza = key.wrap(DEK, CTX)
  azure.stop()
  with pytest.raises(errors.BackendUnavailableError, match='unreachable'):
    key.unwrap(stanza, CTX)


def test_tls_is_verified(azure, monkeypatch):
  azure.add_key('kek')
  monkeypatch.delenv('TFXE_AZURE_KV_CA_BUNDLE')
  with pytest.raises(errors.BackendUnavailableError,
                     match='TFXE_AZURE_KV_CA_BUNDLE'):
    _key(azure).wrap(DEK, CTX)
  assert dict(azure.calls) == {} and azure.challenges == 0


def test_bearer_token_never_logged(azure, caplog):
  azure.add_key('kek')
  with caplog.at_level(logging.DEBUG):
    stanza = _key(azure).wrap(DEK, CTX)
    _key(azure).unwrap(stanza, CTX)
    azure.denied.add('unwrapkey')
    with pytest.raises(errors.KeyAccessDeniedError) as ei:
      _key(azure).unwrap(stanza, CTX)
  assert AZURE_TOKEN in azure.seen_auth[-1]   # it was sent...
  assert AZURE_TOKEN not in str(ei.value)     # ...but never shown
  for record in caplog.records:
    assert AZURE_TOKEN not in record.getMessage()
