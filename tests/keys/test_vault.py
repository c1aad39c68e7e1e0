"""Vault transit backend: real hvac over HTTPS (verified against a throwaway
CA) to the loopback protocol fake in tests/fakes/vault.py (test-only)."""

import logging

import pytest

from tfx_encrypt import errors
from tfx_encrypt import keys
from tfx_encrypt.keys.base import Stanza, WrapContext
from tfx_encrypt.keys.vault import VaultKey, parse_uri

DEK = bytes(range(50, 82))
CTX = WrapContext(b'\x04' * 16, {'model': 'demo', 'team': 'ml'})


def test_uri_forms():
  k = VaultKey('hcvault://Vault.Example.com:8200/kms/transit/keys/models')
  assert (k.host, k.port, k.mount, k.name) == (
      'vault.example.com', '8200', 'kms/transit', 'models')
  assert k.key_id == 'hcvault://vault.example.com:8200/kms/transit/keys/models'
  assert k.base_url == 'https://vault.example.com:8200'
  assert VaultKey('hcvault://v/transit/keys/k').base_url == 'https://v'
  assert parse_uri('hcvault://[::1]:8200/transit/keys/k')['host'] == '[::1]'
  assert isinstance(keys.resolve('hcvault://v:1/transit/keys/k'), VaultKey)


@pytest.mark.parametrize('uri', [
    'hcvault://v:8200/transit/k',
    'hcvault://v:8200/keys/k',
    'hcvault://v:99999/transit/keys/k',
    'hcvault://v/transit/keys/k?token=abc',
    'hcvault://s.SECRETTOKEN@v/transit/keys/k',
    'https://v/transit/keys/k',
])
def test_bad_uris(uri):
  with pytest.raises(errors.InvalidKeyUriError) as ei:
    VaultKey(uri)
  assert 'SECRETTOKEN' not in str(ei.value)
  assert 'token=abc' not in str(ei.value)


def test_roundtrip_over_tls_one_call_each(vault):
  vault.add_key('models')
  uri = vault.uri('models')
  stanza = VaultKey(uri).wrap(DEK, CTX)
  assert stanza.type == 'hcvault' and stanza.key_id == uri
  assert stanza.body['ct'].startswith('vault:v1:')
  assert dict(vault.calls) == {'encrypt': 1}
  assert VaultKey(uri).unwrap(stanza, CTX) == DEK
  assert dict(vault.calls) == {'encrypt': 1, 'decrypt': 1}
  assert set(vault.seen_tokens) == {vault.token}


def test_associated_data_binds_context(vault):
  vault.add_key('models')
  key = VaultKey(vault.uri('models'))
  stanza = key.wrap(DEK, CTX)
  with pytest.raises(errors.TamperedPackageError, match='encryption context'):
    key.unwrap(stanza, WrapContext(b'\x04' * 16, {'model': 'demo'}))
  ct = stanza.body['ct']
  flipped = ct[:-6] + ('A' if ct[-6] != 'A' else 'B') + ct[-5:]
  with pytest.raises(errors.TamperedPackageError):
    key.unwrap(Stanza('hcvault', key.key_id, {'ct': flipped}), CTX)
  with pytest.raises(errors.TamperedPackageError, match='malformed'):
    key.unwrap(Stanza('hcvault', key.key_id, {'ct': 'not-vault'}), CTX)
  assert vault.calls['decrypt'] == 2


def test_tls_is_verified(vault, monkeypatch):
  vault.add_key('models')
  monkeypatch.delenv('VAULT_CACERT')
  with pytest.raises(errors.BackendUnavailableError, match='VAULT_CACERT'):
    VaultKey(vault.uri('models')).wrap(DEK, CTX)
  assert dict(vault.calls) == {}   # refused before any request was served


def test_plain_http_is_opt_in(vault, monkeypatch, fast_retry):
  """TFXE_VAULT_HTTP=1 speaks HTTP; to the TLS server that fails closed."""
  vault.add_key('models')
  monkeypatch.setenv('TFXE_VAULT_HTTP', '1')
  key = VaultKey(vault.uri('models'))
  assert key.base_url.startswith('http://')
  with pytest.raises(errors.KeyBackendError):
    key.wrap(DEK, CTX)


def test_token_never_leaks(vault, monkeypatch, caplog):
  vault.add_key('models')
  bad_token = 'hvs.WRONG-and-secret-987654321'
  monkeypatch.setenv('VAULT_TOKEN', bad_token)
  with caplog.at_level(logging.DEBUG):
    with pytest.raises(errors.KeyAccessDeniedError, match='permission') as ei:
      VaultKey(vault.uri('models')).wrap(DEK, CTX)
  text = str(ei.value) + repr(ei.value)
  assert bad_token not in text and vault.token not in text
  assert ei.value.__cause__ is None
  for record in caplog.records:
    assert bad_token not in record.getMessage()
  # A token allowed only to decrypt cannot wrap.
  limited = 'hvs.decrypt-only-token-55555'
  vault.add_token(limited, {('decrypt', 'transit', 'models')})
  with pytest.raises(errors.KeyAccessDeniedError, match='transit/encrypt'):
    VaultKey(vault.uri('models'), token=limited).wrap(DEK, CTX)


def test_no_token(vault, monkeypatch):
  vault.add_key('models')
  monkeypatch.delenv('VAULT_TOKEN')
  with pytest.raises(errors.KeyAccessDeniedError, match='VAULT_TOKEN'):
    VaultKey(vault.uri('models')).wrap(DEK, CTX)
  assert dict(vault.calls) == {}
  with open(f'{__import__("os").environ["HOME"]}/.vault-token', 'w') as f:
    f.write(vault.token + '\n')
  VaultKey(vault.uri('models')).wrap(DEK, CTX)   # ~/.vault-token is used


def test_unknown_key_and_mount(vault):
  vault.add_key('models')
  stanza = VaultKey(vault.uri('models')).wrap(DEK, CTX)
  # encrypt with a token that may not create keys: permission denied
  with pytest.raises(errors.KeyAccessDeniedError):
    VaultKey(vault.uri('typo')).wrap(DEK, CTX)
  other = VaultKey(vault.uri('typo'))
  with pytest.raises(errors.KeyNotFoundError, match='no transit key'):
    other.unwrap(Stanza('hcvault', other.key_id, stanza.body), CTX)
  with pytest.raises(errors.KeyNotFoundError, match='mount'):
    VaultKey(vault.uri('models', mount='nomount')).wrap(DEK, CTX)


def test_rotation_and_min_decryption_version(vault):
  tk = vault.add_key('models')
  key = VaultKey(vault.uri('models'))
  old = key.wrap(DEK, CTX)
  tk.rotate()
  new = key.wrap(DEK, CTX)
  assert new.body['ct'].startswith('vault:v2:')
  assert key.unwrap(old, CTX) == DEK   # Vault keeps old versions
  tk.min_decryption_version = 2
  with pytest.raises(errors.KeyDisabledError, match='min_decryption_version'):
    key.unwrap(old, CTX)
  assert key.unwrap(new, CTX) == DEK


def test_namespace_header(vault, monkeypatch):
  vault.add_key('models')
  monkeypatch.setenv('VAULT_NAMESPACE', 'team-a')
  VaultKey(vault.uri('models')).wrap(DEK, CTX)
  assert vault.seen_namespaces[-1] == 'team-a'


def test_throttling_sealed_and_5xx_retried(vault, fast_retry):
  vault.add_key('models')
  vault.inject(1, 429, ['request rate limit exceeded'])
  vault.inject(1, 503, ['Vault is sealed'])
  stanza = VaultKey(vault.uri('models')).wrap(DEK, CTX)
  assert dict(vault.calls) == {'encrypt': 3}
  vault.inject(100, 500, ['internal error'])
  with pytest.raises(errors.BackendUnavailableError, match='4 attempts'):
    VaultKey(vault.uri('models')).unwrap(stanza, CTX)
  assert vault.calls['decrypt'] == 4


def test_server_stopped(vault, fast_retry):
  vault.add_key('models')
  key = VaultKey(vault.uri('models'))
  stanza = key.wrap(DEK, CTX)
  vault.stop()
  with pytest.raises(errors.BackendUnavailableError, match='unreachable'):
    key.unwrap(stanza, CTX)
