"""Package-level tests with real key services: AWS KMS (moto_server, real
boto3 over HTTP) plus a PKCS#11 token (SoftHSM2).

The issue's "done when": a model encrypted for ``aws-kms://...`` plus
``pkcs11:...`` decrypts with either identity alone, and rewrap and rotate
work against both. KMS requests are counted at a proxy in front of moto.
"""

import hashlib
import os

import pytest

from tfx_encrypt import errors
from tfx_encrypt import package as pkg_lib
from tests.fakes import backends as fx

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures('fast_retry')]

PIN = '2468-integration'
MODEL = {
    'saved_model.pb': os.urandom(3000),
    'fingerprint.pb': os.urandom(40),
    'variables/variables.index': os.urandom(500),
    'variables/variables.data-00000-of-00001': os.urandom(2 * 1024 * 1024 + 7),
    'assets/vocab.txt': b'a\nb\nc\n',
    'assets.extra/tf_serving_warmup_requests': b'',
}


def _write_model(root):
  for rel, data in MODEL.items():
    p = os.path.join(root, *rel.split('/'))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, 'wb') as f:
      f.write(data)
  return root


def _read_tree(root):
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      p = os.path.join(d, name)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, root).replace(os.sep, '/')] = f.read()
  return out


def _payload_digest(package):
  h = hashlib.sha256()
  pdir = os.path.join(package, 'payload')
  for name in sorted(os.listdir(pdir)):
    with open(os.path.join(pdir, name), 'rb') as f:
      h.update(name.encode() + b'\0' + f.read())
  return h.hexdigest()


@pytest.fixture
def hsm(monkeypatch):
  """A fresh SoftHSM2 token with an AES key and an RSA key pair."""
  monkeypatch.delenv('TFXE_PKCS11_PIN', raising=False)
  softhsm = fx.SoftHsm.shared()
  token = softhsm.new_token(PIN)
  softhsm.generate_aes(token, PIN, 'kek')
  softhsm.generate_rsa(token, PIN, 'dr')
  pin_file = softhsm.write_pin_file(PIN)

  class Hsm:
    aes = softhsm.uri(token, 'kek', pin_file=pin_file)
    rsa_public = softhsm.uri(token, 'dr')              # wrap: no PIN needed
    rsa_private = softhsm.uri(token, 'dr', pin_file=pin_file)
  return Hsm


@pytest.fixture
def model(tmp_path):
  return _write_model(str(tmp_path / 'model'))


def test_aws_plus_pkcs11_either_identity_alone(aws, hsm, model, tmp_path):
  kms = aws.create_key()
  package = str(tmp_path / 'pkg')
  info = pkg_lib.encrypt_model(model, package, recipients=[kms, hsm.aes],
                               context={'model': 'demo'})
  # Exactly one KMS call per KMS recipient for the whole package.
  assert aws.counts() == {'Encrypt': 1}
  assert [(r['type'], r['key_id']) for r in info.recipients] == [
      ('aws-kms', kms), ('pkcs11-aes-gcm', hsm.aes.split('?')[0])]
  assert len(MODEL) > 1 and info.file_count == len(MODEL)
  listed = pkg_lib.inspect_package(package).recipients
  assert [r['key_id'] for r in listed] == [kms, hsm.aes.split('?')[0]]

  # KMS identity alone: at most one Decrypt, however many files.
  out1 = str(tmp_path / 'out-kms')
  pkg_lib.decrypt_model(package, out1, identities=[kms], allow_unsigned=True)
  assert _read_tree(out1) == MODEL
  assert aws.counts() == {'Encrypt': 1, 'Decrypt': 1}

  # HSM identity alone: no KMS request at all.
  out2 = str(tmp_path / 'out-hsm')
  pkg_lib.decrypt_model(package, out2, identities=[hsm.aes],
                        allow_unsigned=True)
  assert _read_tree(out2) == MODEL
  assert aws.counts() == {'Encrypt': 1, 'Decrypt': 1}

  # Both identities: the first that matches wins, still <= 1 KMS call.
  out3 = str(tmp_path / 'out-both')
  pkg_lib.decrypt_model(package, out3, identities=[kms, hsm.aes],
                        allow_unsigned=True)
  assert aws.counts() == {'Encrypt': 1, 'Decrypt': 2}


def test_bundle_form_and_wrong_identity(aws, hsm, model, tmp_path):
  kms = aws.create_key()
  other = aws.create_key()
  bundle = str(tmp_path / 'm.tfxe')
  pkg_lib.encrypt_model(model, bundle, recipients=[kms, hsm.rsa_public],
                        bundle=True)
  assert aws.counts() == {'Encrypt': 1}
  # A KMS key that is not a recipient: no request at all, a typed error.
  with pytest.raises(errors.NoMatchingKeyError):
    pkg_lib.decrypt_model(bundle, str(tmp_path / 'x'), identities=[other],
                          allow_unsigned=True)
  assert aws.counts() == {'Encrypt': 1}
  assert not os.path.exists(tmp_path / 'x')
  out = str(tmp_path / 'out')
  pkg_lib.decrypt_model(bundle, out, identities=[hsm.rsa_private],
                        allow_unsigned=True)
  assert _read_tree(out) == MODEL


def test_rewrap_add_and_remove_against_both(aws, hsm, model, tmp_path):
  kms = aws.create_key()
  kms2 = aws.create_key()
  package = str(tmp_path / 'pkg')
  pkg_lib.encrypt_model(model, package, recipients=[kms])
  before = _payload_digest(package)
  aws.proxy.reset()

  # KMS identity adds the HSM keys: one Decrypt, no Encrypt.
  info = pkg_lib.rewrap_package(package, identities=[kms],
                                add_recipients=[hsm.aes, hsm.rsa_public],
                                allow_unsigned=True)
  assert aws.counts() == {'Decrypt': 1}
  assert [r['type'] for r in info.recipients] == [
      'aws-kms', 'pkcs11-aes-gcm', 'pkcs11-rsa-oaep']

  # HSM identity removes the KMS key and adds another: one Encrypt only.
  aws.proxy.reset()
  info = pkg_lib.rewrap_package(package, identities=[hsm.aes],
                                remove_recipients=[kms],
                                add_recipients=[kms2], allow_unsigned=True)
  assert aws.counts() == {'Encrypt': 1}
  assert [r['key_id'] for r in info.recipients] == [
      hsm.aes.split('?')[0], hsm.rsa_public.split('?')[0], kms2]
  assert _payload_digest(package) == before   # payload untouched

  with pytest.raises(errors.NoMatchingKeyError):
    pkg_lib.decrypt_model(package, str(tmp_path / 'no'), identities=[kms],
                          allow_unsigned=True)
  for i, ident in enumerate([kms2, hsm.aes, hsm.rsa_private]):
    out = str(tmp_path / f'out{i}')
    pkg_lib.decrypt_model(package, out, identities=[ident],
                          allow_unsigned=True)
    assert _read_tree(out) == MODEL


def test_rotate_against_both(aws, hsm, model, tmp_path):
  kms = aws.create_key()
  package = str(tmp_path / 'pkg')
  old = pkg_lib.encrypt_model(model, package, recipients=[kms, hsm.aes])
  aws.proxy.reset()
  rotated = str(tmp_path / 'rotated')
  new = pkg_lib.rotate_package(package, rotated, identities=[hsm.aes],
                               recipients=[kms, hsm.aes],
                               allow_unsigned=True)
  assert aws.counts() == {'Encrypt': 1}
  assert new.package_id != old.package_id
  assert new.fingerprint == old.fingerprint
  aws.proxy.reset()
  again = str(tmp_path / 'rotated2')
  pkg_lib.rotate_package(rotated, again, identities=[kms],
                         recipients=[kms, hsm.rsa_public],
                         allow_unsigned=True)
  assert aws.counts() == {'Decrypt': 1, 'Encrypt': 1}
  for i, ident in enumerate([kms, hsm.rsa_private]):
    out = str(tmp_path / f'out{i}')
    pkg_lib.decrypt_model(again, out, identities=[ident], allow_unsigned=True)
    assert _read_tree(out) == MODEL


def test_failing_kms_leaves_nothing_behind(monkeypatch, hsm, model, tmp_path):
  """The KMS server is stopped in the middle of the run."""
  server = fx.start_moto()
  env = fx.AwsEnv(server)
  try:
    env.apply(monkeypatch)
    kms = env.create_key()
    package = str(tmp_path / 'pkg')
    pkg_lib.encrypt_model(model, package, recipients=[kms])
    dual = str(tmp_path / 'dual')
    pkg_lib.encrypt_model(model, dual, recipients=[kms, hsm.aes])
    server.stop()
    # KMS down: the recovery identity (HSM) still opens the dual package.
    recovered = str(tmp_path / 'recovered')
    pkg_lib.decrypt_model(dual, recovered, identities=[kms, hsm.aes],
                          allow_unsigned=True)
    assert _read_tree(recovered) == MODEL
    before = sorted(os.listdir(tmp_path))

    out = str(tmp_path / 'out')
    with pytest.raises(errors.BackendUnavailableError):
      pkg_lib.decrypt_model(package, out, identities=[kms],
                            allow_unsigned=True)
    with pytest.raises(errors.BackendUnavailableError):
      pkg_lib.encrypt_model(model, str(tmp_path / 'pkg2'),
                            recipients=[hsm.aes, kms])
    with pytest.raises(errors.BackendUnavailableError):
      pkg_lib.rotate_package(package, str(tmp_path / 'rot'),
                             identities=[kms], recipients=[hsm.aes],
                             allow_unsigned=True)
    header = os.path.join(package, 'tfxe.header')
    with open(header, 'rb') as f:
      header_bytes = f.read()
    with pytest.raises(errors.BackendUnavailableError):
      pkg_lib.rewrap_package(package, identities=[kms],
                             add_recipients=[hsm.aes], allow_unsigned=True)
    # No output, no temporary sibling, the package unchanged.
    assert sorted(os.listdir(tmp_path)) == before
    with open(header, 'rb') as f:
      assert f.read() == header_bytes
  finally:
    env.close()
    server.close()
