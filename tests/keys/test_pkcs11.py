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


# -- signing with an EC P-256 key pair in the token (issue 13) ------------------

SIG_ALG = 'ecdsa-p256-sha256'


def _pem_of(key, path):
  """Writes the key's public half as PEM (what `tfx-encrypt pubkey` prints)."""
  with open(path, 'wb') as f:
    f.write(key.public_key_pem())
  return str(path)


@pytest.fixture
def sign_calls(monkeypatch):
  """Counts C_Sign operations (python-pkcs11's single-part sign)."""
  import pkcs11._pkcs11 as lowlevel  # pylint: disable=g-import-not-at-top
  calls = []
  original = lowlevel.SignMixin._sign

  def counting(self, *args, **kwargs):
    calls.append(args[0])
    return original(self, *args, **kwargs)
  monkeypatch.setattr(lowlevel.SignMixin, '_sign', counting)
  return calls


@pytest.fixture
def public_reads(monkeypatch):
  """Counts reads of a public key object from a token."""
  calls = []
  original = p11.Pkcs11Key._read_public

  def counting(self, session):
    calls.append(self.key_id)
    return original(self, session)
  monkeypatch.setattr(p11.Pkcs11Key, '_read_public', counting)
  return calls


@pytest.fixture
def model(tmp_path):
  from tests._util import make_tree  # pylint: disable=g-import-not-at-top
  return make_tree(tmp_path / 'model', {
      'saved_model.pb': 3000, 'variables/variables.index': 200,
      'variables/variables.data-00000-of-00001': 70_000})


@pytest.fixture
def local_keys(tmp_path):
  from tests._util import Keys  # pylint: disable=g-import-not-at-top
  (tmp_path / 'keys').mkdir()
  return Keys(tmp_path / 'keys')


@pytest.mark.integration
def test_ec_key_signs_one_token_call_per_signature(
    softhsm, token, model, local_keys, tmp_path, sign_calls, public_reads):
  from tfx_encrypt import package as pkg  # pylint: disable=g-import-not-at-top
  from tests._util import read_tree  # pylint: disable=g-import-not-at-top
  softhsm.generate_ec(token, PIN, 'release')
  pin_file = softhsm.write_pin_file(PIN)
  signer = keys.resolve(softhsm.uri(token, 'release', pin_file=pin_file),
                        role='signer')
  assert signer.signature_alg == SIG_ALG
  pem = _pem_of(signer, tmp_path / 'release.pub.pem')
  # The signer id is the public key's sha256: id, as for the exported PEM.
  assert signer.signer_id == keys.resolve(pem, role='trust').key_id
  assert signer.signer_id.startswith('sha256:')
  infos = []
  for n in range(3):   # ECDSA is randomised: several signatures, high S too
    out = tmp_path / f'm{n}.tfxe'
    infos.append(pkg.encrypt_model(model, out, recipients=[local_keys.pub('x')],
                                   signer=signer, bundle=True,
                                   context={'model': 'taxi'}))
  assert len(sign_calls) == 3                  # one C_Sign per package
  assert all(len(d) == 32 for d in sign_calls)  # CKM_ECDSA over SHA-256(msg)
  assert public_reads == [signer.key_id]       # public key read once
  for n, info in enumerate(infos):
    assert info.signature_alg == SIG_ALG and info.signer == signer.signer_id
    # A reader refuses a high-S or malformed signature, so verifying proves
    # the token's r || s became the one canonical raw form.
    by_pem = pkg.verify_package(tmp_path / f'm{n}.tfxe', trusted=[pem])
    assert by_pem.signature_verified
  # Trust by the same pkcs11 URI (no PIN): public key read once, verified
  # locally for every package (no token call per verification).
  del public_reads[:]
  anchor = keys.resolve(softhsm.uri(token, 'release'), role='trust')
  for n in range(3):
    assert pkg.verify_package(tmp_path / f'm{n}.tfxe',
                              trusted=[anchor]).signature_verified
  assert public_reads == [anchor.key_id] and len(sign_calls) == 3
  pkg.decrypt_model(tmp_path / 'm0.tfxe', tmp_path / 'plain',
                    identities=[local_keys.priv('x')],
                    trusted=[softhsm.uri(token, 'release')])
  assert read_tree(tmp_path / 'plain') == read_tree(model)
  # Another key in the token is not trusted for these packages.
  softhsm.generate_ec(token, PIN, 'other')
  with pytest.raises(errors.UntrustedSignerError, match='not among'):
    pkg.verify_package(tmp_path / 'm0.tfxe',
                       trusted=[softhsm.uri(token, 'other')])


@pytest.mark.integration
def test_cli_sign_with_pkcs11_and_trust_uri_or_pem(softhsm, token, model,
                                                   local_keys, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  softhsm.generate_ec(token, PIN, 'release')
  pin_file = softhsm.write_pin_file(PIN)
  signer_uri = softhsm.uri(token, 'release', pin_file=pin_file)
  anchor_uri = softhsm.uri(token, 'release')

  def cli(*args):
    return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *args],
                          capture_output=True, text=True, timeout=120)
  r = cli('pubkey', anchor_uri)
  assert r.returncode == 0, r.stderr
  pem = tmp_path / 'release.pub.pem'
  pem.write_text(r.stdout)
  key_id = keys.resolve(str(pem)).key_id
  assert key_id in r.stderr
  out = str(tmp_path / 'm.tfxe')
  r = cli('encrypt', model, out, '--bundle', '--recipient',
          local_keys.pub('x'), '--sign-with', signer_uri)
  assert r.returncode == 0, r.stderr
  for anchor in (anchor_uri, str(pem)):
    r = cli('verify', out, '--trust', anchor)
    assert r.returncode == 0, r.stderr
  r = cli('verify', out, '--trust', local_keys.pub('ec'))
  assert r.returncode == errors.UntrustedSignerError.exit_code
  assert r.stderr.count('\n') == 1
  # A public object cannot sign; an AES key cannot be a trust anchor.
  r = cli('encrypt', model, str(tmp_path / 'n.tfxe'), '--bundle',
          '--recipient', local_keys.pub('x'), '--sign-with',
          f'pkcs11:token={token};object=release;type=public'
          f'?module-path={softhsm.module}')
  assert r.returncode == 2 and 'type=public' in r.stderr, r.stderr
  assert r.stderr.count('\n') == 1 and PIN not in r.stderr
  r = cli('verify', out, '--trust',
          f'pkcs11:token={token};object=kek;type=secret-key'
          f'?module-path={softhsm.module}')
  assert r.returncode == 2 and 'trust anchor' in r.stderr, r.stderr


@pytest.mark.integration
def test_keys_that_cannot_sign_are_role_errors(softhsm, token, model,
                                               local_keys, tmp_path):
  from tfx_encrypt import package as pkg  # pylint: disable=g-import-not-at-top
  softhsm.generate_aes(token, PIN, 'kek')
  softhsm.generate_rsa(token, PIN, 'rsa')
  for label in ('kek', 'rsa'):
    signer = p11.Pkcs11Key(softhsm.uri(token, label), pin=PIN)
    assert signer.signature_alg is None
    out = tmp_path / f'{label}.tfxe'
    with pytest.raises(errors.KeyRoleError, match='no EC P-256 key pair'):
      pkg.encrypt_model(model, out, recipients=[local_keys.pub('x')],
                        signer=signer, bundle=True)
    assert not out.exists()
  with pytest.raises(errors.KeyNotFoundError, match='no token'):
    _ = p11.Pkcs11Key(softhsm.uri('no-such-token', 'x')).signature_alg
  with pytest.raises(errors.KeyRoleError, match='type=public'):
    keys.resolve(f'pkcs11:token={token};object=k;type=public'
                 f'?module-path={softhsm.module}', role='signer')


@pytest.mark.integration
def test_signing_needs_the_pin(softhsm, token, caplog):
  softhsm.generate_ec(token, PIN, 'release')
  key = p11.Pkcs11Key(softhsm.uri(token, 'release'))   # no PIN
  assert key.signature_alg == SIG_ALG                  # public object
  with pytest.raises(errors.KeyAccessDeniedError, match='PIN'):
    key.sign(b'message')
  wrong = p11.Pkcs11Key(softhsm.uri(token, 'release'), pin='wrong-0000')
  with caplog.at_level(logging.DEBUG):
    with pytest.raises(errors.KeyAccessDeniedError) as ei:
      wrong.sign(b'message')
  assert 'wrong-0000' not in str(ei.value)
  assert all('wrong-0000' not in r.getMessage() for r in caplog.records)


# -- RSA-OAEP modes and exported public keys -------------------------------------

def _exported(token, label, pub_path, oaep, key_id=None):
  path = f'pkcs11:token={token};object={label}'
  if key_id:
    path += f';id={key_id}'
  return f'{path}?x-public-key=file:{pub_path}&x-oaep={oaep}'


@pytest.mark.integration
def test_exported_public_key_wraps_without_the_token(softhsm, token, tmp_path,
                                                     monkeypatch):
  softhsm.generate_rsa(token, PIN, 'dev')
  in_token = p11.Pkcs11Key(softhsm.uri(token, 'dev'), pin=PIN)
  pem = _pem_of(in_token, tmp_path / 'dev.pub.pem')
  # SoftHSM2 2.6 unwraps OAEP with SHA-1 only: enrol it with x-oaep=sha1.
  monkeypatch.delenv('TFXE_PKCS11_MODULE', raising=False)
  exported = keys.resolve(_exported(token, 'dev', pem, 'sha1'),
                          role='recipient')
  assert exported.module_path is None
  stanza = exported.wrap(DEK, CTX)            # no module, no token
  assert stanza.type == 'pkcs11-rsa-oaep' and stanza.body['oaep'] == 'sha1'
  assert stanza.key_id == in_token.key_id     # the device's identity matches
  assert in_token.matches(stanza) and in_token.unwrap(stanza, CTX) == DEK
  # Enrolled with a mode the token cannot decrypt: a typed error saying what
  # to do, not a bare PKCS#11 code.
  label_bound = keys.resolve(_exported(token, 'dev', pem, 'sha256%2Blabel'))
  stanza = label_bound.wrap(DEK, CTX)
  assert stanza.body['oaep'] == 'sha256+label'
  with pytest.raises(errors.KeyBackendError, match='x-oaep=sha256'):
    in_token.unwrap(stanza, CTX)
  # The same exported key as an identity or signer: refused up front.
  for role in ('identity', 'signer'):
    with pytest.raises(errors.KeyRoleError, match='x-public-key'):
      keys.resolve(_exported(token, 'dev', pem, 'sha1'), role=role)


@pytest.mark.parametrize('query,match', [
    ('x-public-key=file:/nonexistent.pem', 'x-oaep'),
    ('x-public-key=file:/nonexistent.pem&x-oaep=md5', 'x-oaep'),
    ('module-path=/m.so&x-oaep=sha512', 'x-oaep'),
])
def test_bad_oaep_attributes(query, match):
  with pytest.raises(errors.InvalidKeyUriError, match=match):
    p11.Pkcs11Key(f'pkcs11:token=t;object=k?{query}')


def test_exported_key_file_errors(tmp_path):
  key = p11.Pkcs11Key(_exported('t', 'k', tmp_path / 'missing.pem', 'sha256'))
  with pytest.raises(errors.InvalidKeyUriError, match='cannot read'):
    key.wrap(DEK, CTX)
  junk = tmp_path / 'junk.pem'
  junk.write_bytes(b'not a key')
  with pytest.raises(errors.InvalidKeyUriError, match='not a PEM or DER'):
    p11.Pkcs11Key(_exported('t', 'k', junk, 'sha256')).wrap(DEK, CTX)
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  ec_pem = tmp_path / 'ec.pem'
  ec_pem.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key()
                     .public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.
                                   SubjectPublicKeyInfo))
  with pytest.raises(errors.KeyRoleError, match='cannot wrap'):
    p11.Pkcs11Key(_exported('t', 'k', ec_pem, 'sha256')).wrap(DEK, CTX)


@pytest.mark.integration
def test_oaep_mode_is_checked_on_read(softhsm, token):
  softhsm.generate_rsa(token, PIN, 'dev')
  key = p11.Pkcs11Key(softhsm.uri(token, 'dev'), pin=PIN)
  stanza = key.wrap(DEK, CTX)
  for mode in ('sha512', '', 'SHA1'):
    bad = Stanza(stanza.type, stanza.key_id, dict(stanza.body, oaep=mode))
    with pytest.raises(errors.TamperedPackageError, match='malformed'):
      key.unwrap(bad, CTX)
