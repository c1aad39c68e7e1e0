"""PKCS#11 backend against SoftHSM2 (a real PKCS#11 module).

Each test gets a fresh token in the process's temporary SOFTHSM2_CONF; keys
are generated inside the token as sensitive and non-extractable, so a
successful round trip shows the wrap happens inside the token.
"""

import base64
import logging

import pytest

from tfx_encrypt import errors
from tfx_encrypt import keys
from tfx_encrypt.keys import pkcs11 as p11
from tfx_encrypt.keys.base import Stanza, WrapContext

DEK = bytes(range(100, 132))
CTX = WrapContext(b'\x02' * 16, {'model': 'demo'})
PIN = '4711-secret-pin'


# -- URI handling (no token needed) --------------------------------------------

def test_uri_parsing_and_canonical_key_id():
  path, query, raw_id = p11.parse_uri(
      'pkcs11:token=My%20Token;object=kek;id=%01%02;type=secret-key'
      '?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/x')
  assert path == {'token': 'My Token', 'object': 'kek', 'id': '0102',
                  'type': 'secret-key'}
  assert query == {'module-path': '/usr/lib/softhsm/libsofthsm2.so',
                   'pin-source': 'file:/x'}
  assert raw_id == b'\x01\x02'
  key = p11.Pkcs11Key('pkcs11:token=My%20Token;object=kek;type=private'
                      '?module-path=/m.so&pin-value=123456')
  # type, module and PIN are not part of the public id.
  assert key.key_id == 'pkcs11:token=My%20Token;object=kek'
  assert '123456' not in key.uri and '123456' not in repr(key)
  pub = p11.Pkcs11Key('pkcs11:object=kek;token=My%20Token;type=public'
                      '?module-path=/m.so')
  assert pub.key_id == key.key_id


@pytest.mark.parametrize('uri,match', [
    ('pkcs11:object=kek?module-path=/m.so', 'name the token'),
    ('pkcs11:token=t?module-path=/m.so', 'object='),
    ('pkcs11:token=t;object=k;colour=red?module-path=/m.so', 'unknown'),
    ('pkcs11:token=t;object=k?module-path=/m.so&pin-value=1&pin-source=/p',
     'not both'),
    ('pkcs11:token=t;token=u;object=k?module-path=/m.so', 'twice'),
    ('pkcs11:token=t;object=k%zz?module-path=/m.so', 'percent'),
    ('pkcs11:token=t;object=k;type=blob?module-path=/m.so', 'type'),
    ('pkcs11-token=t', 'starts with'),
])
def test_bad_uris(uri, match, monkeypatch):
  monkeypatch.delenv('TFXE_PKCS11_MODULE', raising=False)
  with pytest.raises(errors.InvalidKeyUriError, match=match):
    p11.Pkcs11Key(uri)


def test_module_from_env_or_name(monkeypatch):
  monkeypatch.delenv('TFXE_PKCS11_MODULE', raising=False)
  with pytest.raises(errors.InvalidKeyUriError, match='TFXE_PKCS11_MODULE'):
    p11.Pkcs11Key('pkcs11:token=t;object=k')
  monkeypatch.setenv('TFXE_PKCS11_MODULE', '/opt/hsm/lib.so')
  assert p11.Pkcs11Key('pkcs11:token=t;object=k').module_path == (
      '/opt/hsm/lib.so')
  key = p11.Pkcs11Key('pkcs11:token=t;object=k?module-name=softhsm2')
  assert key.module_path.endswith('libsofthsm2.so')


def test_registry_resolves_scheme():
  key = keys.resolve('pkcs11:token=t;object=k?module-path=/m.so')
  assert isinstance(key, p11.Pkcs11Key)


# -- against SoftHSM2 ----------------------------------------------------------

@pytest.fixture
def token(softhsm, monkeypatch):
  monkeypatch.delenv('TFXE_PKCS11_PIN', raising=False)
  return softhsm.new_token(PIN)


@pytest.mark.integration
def test_aes_gcm_roundtrip(softhsm, token):
  softhsm.generate_aes(token, PIN, 'kek')
  uri = softhsm.uri(token, 'kek', pin_file=softhsm.write_pin_file(PIN))
  key = keys.resolve(uri)
  stanza = key.wrap(DEK, CTX)
  assert stanza.type == 'pkcs11-aes-gcm'
  assert stanza.key_id == f'pkcs11:token={token};object=kek'
  assert set(stanza.body) == {'iv', 'ct'}
  assert keys.resolve(uri).unwrap(stanza, CTX) == DEK
  # Two wraps use different IVs.
  assert key.wrap(DEK, CTX).body['iv'] != stanza.body['iv']


@pytest.mark.integration
def test_aes_gcm_binds_context_and_detects_tampering(softhsm, token):
  softhsm.generate_aes(token, PIN, 'kek')
  key = p11.Pkcs11Key(softhsm.uri(token, 'kek'), pin=PIN)
  stanza = key.wrap(DEK, CTX)
  with pytest.raises(errors.TamperedPackageError, match='authenticate'):
    key.unwrap(stanza, WrapContext(b'\x02' * 16, {'model': 'other'}))
  ct = bytearray(base64.b64decode(stanza.body['ct']))
  ct[3] ^= 0x40
  bad = Stanza(stanza.type, stanza.key_id,
               {'iv': stanza.body['iv'], 'ct': base64.b64encode(ct).decode()})
  with pytest.raises(errors.TamperedPackageError):
    key.unwrap(bad, CTX)
  with pytest.raises(errors.TamperedPackageError, match='malformed'):
    key.unwrap(Stanza(stanza.type, stanza.key_id, {'ct': 'AAAA'}), CTX)


@pytest.mark.integration
def test_rsa_wrap_needs_no_pin_unwrap_does(softhsm, token, caplog):
  softhsm.generate_rsa(token, PIN, 'dr-key')
  uri = softhsm.uri(token, 'dr-key')
  with caplog.at_level(logging.WARNING, logger='tfx_encrypt'):
    stanza = p11.Pkcs11Key(uri).wrap(DEK, CTX)   # public key only, no PIN
  assert stanza.type == 'pkcs11-rsa-oaep'
  # SoftHSM2 2.6 implements OAEP with SHA-1 and no label only.
  assert stanza.body['oaep'] in ('sha256+label', 'sha1')
  with pytest.raises(errors.KeyAccessDeniedError, match='TFXE_PKCS11_PIN'):
    p11.Pkcs11Key(uri).unwrap(stanza, CTX)
  assert p11.Pkcs11Key(uri, pin=PIN).unwrap(stanza, CTX) == DEK


@pytest.mark.integration
def test_pin_sources(softhsm, token, monkeypatch, caplog):
  softhsm.generate_aes(token, PIN, 'kek')
  stanza = p11.Pkcs11Key(softhsm.uri(token, 'kek'), pin=PIN).wrap(DEK, CTX)
  pin_file = softhsm.write_pin_file(PIN)
  base = f'pkcs11:token={token};object=kek?module-path={softhsm.module}'
  with caplog.at_level(logging.DEBUG):
    # file: URI, plain path, environment, pin-value (warned about).
    assert keys.resolve(f'{base}&pin-source=file:{pin_file}').unwrap(
        stanza, CTX) == DEK
    assert keys.resolve(f'{base}&pin-source={pin_file}').unwrap(
        stanza, CTX) == DEK
    monkeypatch.setenv('TFXE_PKCS11_PIN', PIN)
    assert keys.resolve(base).unwrap(stanza, CTX) == DEK
    monkeypatch.delenv('TFXE_PKCS11_PIN')
    key = keys.resolve(f'{base}&pin-value={PIN}')
    assert key.unwrap(stanza, CTX) == DEK
  assert any('pin-value' in r.getMessage() for r in caplog.records)
  assert all(PIN not in r.getMessage() for r in caplog.records)
  assert PIN not in key.uri and PIN not in key.key_id and PIN not in repr(key)


@pytest.mark.integration
def test_wrong_pin_is_access_denied_and_not_leaked(softhsm, token, caplog):
  softhsm.generate_aes(token, PIN, 'kek')
  stanza = p11.Pkcs11Key(softhsm.uri(token, 'kek'), pin=PIN).wrap(DEK, CTX)
  wrong = 'wrong-pin-9876'
  with caplog.at_level(logging.DEBUG):
    with pytest.raises(errors.KeyAccessDeniedError, match='rejected the PIN') \
        as ei:
      keys.resolve(softhsm.uri(token, 'kek', pin_value=wrong)).unwrap(
          stanza, CTX)
  text = str(ei.value) + repr(ei.value.__cause__) + repr(
      ei.value.__context__)
  assert wrong not in text and PIN not in text
  assert all(wrong not in r.getMessage() for r in caplog.records)
  missing = softhsm.uri(token, 'kek', pin_file='/nonexistent/pin')
  with pytest.raises(errors.KeyAccessDeniedError, match='PIN file'):
    keys.resolve(missing).unwrap(stanza, CTX)


@pytest.mark.integration
def test_unknown_token_and_object(softhsm, token):
  softhsm.generate_aes(token, PIN, 'kek')
  with pytest.raises(errors.KeyNotFoundError, match='no token'):
    p11.Pkcs11Key(softhsm.uri('no-such-token', 'kek'), pin=PIN).wrap(DEK, CTX)
  with pytest.raises(errors.KeyNotFoundError, match='no AES secret key'):
    p11.Pkcs11Key(softhsm.uri(token, 'nope'), pin=PIN).wrap(DEK, CTX)
  stanza = p11.Pkcs11Key(softhsm.uri(token, 'kek'), pin=PIN).wrap(DEK, CTX)
  gone = Stanza(stanza.type, f'pkcs11:token={token};object=nope', stanza.body)
  with pytest.raises(errors.KeyNotFoundError):
    p11.Pkcs11Key(softhsm.uri(token, 'nope'), pin=PIN).unwrap(gone, CTX)


@pytest.mark.integration
def test_missing_module():
  key = p11.Pkcs11Key('pkcs11:token=t;object=k?module-path=/nonexistent.so',
                      pin='x')
  with pytest.raises(errors.BackendUnavailableError, match='does not exist'):
    key.wrap(DEK, CTX)


@pytest.mark.integration
def test_same_label_in_other_token_does_not_match(softhsm, token):
  other = softhsm.new_token(PIN)
  softhsm.generate_aes(token, PIN, 'kek')
  softhsm.generate_aes(other, PIN, 'kek')
  a = p11.Pkcs11Key(softhsm.uri(token, 'kek'), pin=PIN)
  b = p11.Pkcs11Key(softhsm.uri(other, 'kek'), pin=PIN)
  stanza = a.wrap(DEK, CTX)
  assert a.matches(stanza) and not b.matches(stanza)
  with pytest.raises(errors.NoMatchingKeyError):
    b.unwrap(stanza, CTX)
  # A header that lies about the key id: the other token's key cannot
  # authenticate the blob.
  forged = Stanza(stanza.type, b.key_id, stanza.body)
  with pytest.raises(errors.TamperedPackageError):
    b.unwrap(forged, CTX)


@pytest.mark.integration
def test_duplicate_labels_need_an_id(softhsm, token):
  softhsm.generate_aes(token, PIN, 'dup', key_id=b'\x01')
  softhsm.generate_aes(token, PIN, 'dup', key_id=b'\x02')
  with pytest.raises(errors.UsageError, match='id='):
    p11.Pkcs11Key(softhsm.uri(token, 'dup'), pin=PIN).wrap(DEK, CTX)
  uri = (f'pkcs11:token={token};object=dup;id=%02'
         f'?module-path={softhsm.module}')
  key = p11.Pkcs11Key(uri, pin=PIN)
  assert key.key_id == f'pkcs11:token={token};object=dup;id=%02'
  stanza = key.wrap(DEK, CTX)
  assert key.unwrap(stanza, CTX) == DEK
