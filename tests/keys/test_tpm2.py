"""Device identities in a TPM 2.0, through the pkcs11: backend (issue 13).

A software TPM (swtpm) behind the tpm2-abrmd resource manager and
tpm2-pkcs11, started by the `tpm` fixture (tests/fakes/tpm.py); tokens and
keys are made with pkcs11-tool, as on a device, and the private keys are
generated inside the TPM, never extractable. The "publisher" runs without
any TPM environment and only sees the exported public key; the "device"
decrypts with `-i 'pkcs11:...'`. A missing Debian package FAILS these tests.
"""

import json
import os
import subprocess
import sys

import pytest

from tests._util import Keys, make_tree, read_tree
from tfx_encrypt import errors
from tfx_encrypt import keys
from tfx_encrypt import package as pkg
from tfx_encrypt.keys import pkcs11 as p11
from tfx_encrypt.keys.base import WrapContext

pytestmark = pytest.mark.integration

PIN = '2468-device-pin'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DEK = bytes(range(32))
CTX = WrapContext(b'\x07' * 16, {'model': 'taxi', 'env': 'edge'})


@pytest.fixture(scope='session')
def tpm():
  from tests.fakes import tpm as tpm_lib  # pylint: disable=g-import-not-at-top
  try:
    t = tpm_lib.Tpm()
  except RuntimeError as e:
    pytest.fail(str(e), pytrace=False)
  yield t
  t.stop()


class Device:
  """A token in the TPM with an RSA-3072 key (kek) and an EC P-256 key."""

  def __init__(self, tpm, tmp):
    self.tpm = tpm
    self.token = tpm.new_token(PIN)
    tpm.generate(self.token, PIN, 'kek', 'rsa:3072', key_id='01')
    tpm.generate(self.token, PIN, 'sig', 'EC:prime256v1', key_id='02')
    self.pin_file = tpm.write_pin_file(PIN)
    self.identity = tpm.uri(self.token, 'kek', key_id='01',
                            pin_file=self.pin_file)
    self.key_id = f'pkcs11:token={self.token};object=kek;id=%01'
    # Exported with pkcs11-tool: DER SubjectPublicKeyInfo.
    self.der = tpm.export_public(self.token, 'kek', str(tmp / 'kek.der'))

  def recipient(self, pub_path=None) -> str:
    """What the publisher is given: the key's URI path + its public key."""
    return (f'{self.key_id}?x-public-key=file:{pub_path or self.der}'
            '&x-oaep=sha256')


@pytest.fixture(scope='module')
def device(tpm, tmp_path_factory):
  return Device(tpm, tmp_path_factory.mktemp('device'))


@pytest.fixture(scope='module')
def local(tmp_path_factory):
  return Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  return make_tree(tmp_path_factory.mktemp('model') / 'm', {
      'saved_model.pb': 4000, 'variables/variables.index': 300,
      'variables/variables.data-00000-of-00001': 200_000,
      'assets/vocab.txt': b'a\nb\n'})


def _publisher_env():
  """No TPM, no PKCS#11 module: the publisher has the public key only."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('TPM2_', 'TFXE_PKCS11', 'DBUS_'))}
  env['TSS2_LOG'] = 'all+NONE'
  return env


def _cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *args],
                        capture_output=True, text=True, cwd=REPO_ROOT,
                        env=env, timeout=180)


def test_private_key_is_generated_in_the_tpm_and_never_extractable(device):
  from pkcs11 import Attribute, KeyType, ObjectClass  # pylint: disable=g-import-not-at-top
  lib = p11.load_module(device.tpm.module)
  with lib.get_token(token_label=device.token).open(user_pin=PIN) as s:
    key = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label='kek')
    assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
    assert key[Attribute.NEVER_EXTRACTABLE] and key[Attribute.LOCAL]
    pub = s.get_key(ObjectClass.PUBLIC_KEY, KeyType.RSA, label='kek')
    assert len(pub[Attribute.MODULUS]) * 8 == 3072
  assert 'never extractable' in device.tpm.objects(device.token, PIN)


def test_wrap_through_the_token_records_the_tpm_oaep_mode(device):
  key = p11.Pkcs11Key(device.identity)
  stanza = key.wrap(DEK, CTX)           # the token's public key object
  # tpm2-pkcs11 reports itself (C_GetInfo); the TPM cannot take the wrap
  # context as OAEP label, so the mode without a label is chosen and
  # recorded; the header MAC binds the context.
  assert stanza.type == 'pkcs11-rsa-oaep' and stanza.body['oaep'] == 'sha256'
  assert key.unwrap(stanza, CTX) == DEK
  # An explicit label-bound wrap is refused by the TPM with a typed error
  # that says how to enrol the key instead; the TPM stays usable.
  forced = p11.Pkcs11Key(device.identity + '&x-oaep=sha256%2Blabel')
  bound = forced.wrap(DEK, CTX)
  assert bound.body['oaep'] == 'sha256+label'
  with pytest.raises(errors.KeyBackendError, match='x-oaep=sha256'):
    key.unwrap(bound, CTX)
  assert key.unwrap(stanza, CTX) == DEK
  # A modified ciphertext fails in the TPM (OAEP decoding).
  ct = bytearray(p11.b64d(stanza.body['ct']))
  ct[5] ^= 1
  bad = p11.Stanza(stanza.type, stanza.key_id,
                   dict(stanza.body, ct=p11.b64e(bytes(ct))))
  with pytest.raises(errors.TamperedPackageError):
    key.unwrap(bad, CTX)
  assert key.unwrap(stanza, CTX) == DEK


def test_exported_public_key_matches_the_token(device, tmp_path):
  key = p11.Pkcs11Key(device.identity)
  pem = tmp_path / 'kek.pub.pem'
  pem.write_bytes(key.public_key_pem())
  from_der = p11.Pkcs11Key(device.recipient()).public_key_pem()
  assert from_der == pem.read_bytes()
  stanza = keys.resolve(device.recipient(str(pem)), role='recipient').wrap(
      DEK, CTX)
  assert stanza.key_id == device.key_id and key.matches(stanza)
  assert key.unwrap(stanza, CTX) == DEK


def test_encrypt_for_device_and_recipient_then_decrypt_on_device(
    device, local, model, tmp_path):
  out = str(tmp_path / 'm.tfxe')
  # Publisher: no TPM and no module, only the exported public key.
  r = _cli('encrypt', model, out, '--bundle', '--recipient',
           device.recipient(), '--recipient', local.pub('x'),
           '--sign-with', local.priv('ed'), '--context', 'model=taxi',
           env=_publisher_env())
  assert r.returncode == 0, r.stderr
  r = _cli('inspect', out, '--json')
  stanzas = {s['key_id']: s for s in json.loads(r.stdout)['recipients']}
  assert stanzas[device.key_id]['type'] == 'pkcs11-rsa-oaep'
  # Device: decrypt with the TPM key alone.
  r = _cli('decrypt', out, str(tmp_path / 'dev'), '-i', device.identity,
           '--trust', local.pub('ed'))
  assert r.returncode == 0, r.stderr
  assert read_tree(tmp_path / 'dev') == read_tree(model)
  # The normal recipient alone, too.
  pkg.decrypt_model(out, tmp_path / 'ops', identities=[local.priv('x')],
                    trusted=[local.pub('ed')])
  assert read_tree(tmp_path / 'ops') == read_tree(model)


def test_enrolment_with_rewrap_add_recipient(device, local, model, tmp_path):
  out = str(tmp_path / 'm.tfxe')
  pkg.encrypt_model(model, out, recipients=[local.pub('x')],
                    signer=local.priv('ed'), bundle=True)
  r = _cli('decrypt', out, str(tmp_path / 'before'), '-i', device.identity,
           '--trust', local.pub('ed'))
  assert r.returncode == errors.NoMatchingKeyError.exit_code, r.stderr
  # Enrol: the device's public key (exported through the backend this
  # time: tfx-encrypt pubkey) is added by the publisher, who re-signs.
  r = _cli('pubkey', device.tpm.uri(device.token, 'kek', key_id='01'))
  assert r.returncode == 0, r.stderr
  pem = tmp_path / 'device.pub.pem'
  pem.write_text(r.stdout)
  r = _cli('rewrap', out, '--identity', local.priv('x'), '--trust',
           local.pub('ed'), '--add-recipient', device.recipient(str(pem)),
           '--sign-with', local.priv('ed'), env=_publisher_env())
  assert r.returncode == 0, r.stderr
  r = _cli('decrypt', out, str(tmp_path / 'after'), '-i', device.identity,
           '--trust', local.pub('ed'))
  assert r.returncode == 0, r.stderr
  assert read_tree(tmp_path / 'after') == read_tree(model)
  # Retire the device: remove its key id; it can no longer decrypt.
  r = _cli('rewrap', out, '--identity', local.priv('x'), '--trust',
           local.pub('ed'), '--remove-recipient', device.key_id,
           '--sign-with', local.priv('ed'), env=_publisher_env())
  assert r.returncode == 0, r.stderr
  r = _cli('decrypt', out, str(tmp_path / 'gone'), '-i', device.identity,
           '--trust', local.pub('ed'))
  assert r.returncode == errors.NoMatchingKeyError.exit_code, r.stderr
  assert r.stderr.count('\n') == 1 and PIN not in r.stderr


def test_tpm_ec_key_signs_and_is_trusted_by_uri_or_pem(device, local, model,
                                                       tmp_path):
  signer_uri = device.tpm.uri(device.token, 'sig', key_id='02',
                              pin_file=device.pin_file)
  signer = keys.resolve(signer_uri, role='signer')
  out = tmp_path / 'm.tfxe'
  info = pkg.encrypt_model(model, out, recipients=[local.pub('x')],
                           signer=signer, bundle=True)
  assert info.signature_alg == 'ecdsa-p256-sha256'
  pem = tmp_path / 'sig.pub.pem'
  pem.write_bytes(signer.public_key_pem())
  assert keys.resolve(str(pem)).key_id == info.signer
  anchor = device.tpm.uri(device.token, 'sig', key_id='02')
  for trusted in (anchor, str(pem)):
    assert pkg.verify_package(out, trusted=[trusted]).signature_verified
