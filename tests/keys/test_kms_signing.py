"""Package signatures made by key services (issue 13): the private key never
leaves AWS KMS, Cloud KMS, Vault transit or Azure Key Vault.

Every backend is reached through its real client library: AWS through real
boto3 against moto's standalone server (requests counted by the proxy in
front of it), the others through the loopback protocol fakes of tests/fakes
(test-only), which sign with real `cryptography` keys. Signatures are
checked with the same URI as trust anchor, with the PEM that `tfx-encrypt
pubkey` exports, and end to end through the CLI.
"""

import os
import subprocess
import sys

import pytest

import tfx_encrypt as te
from tests import _util
from tests.fakes import backends as fx
from tests.keys.conftest import AZURE_TOKEN, VAULT_TOKEN
from tfx_encrypt import errors
from tfx_encrypt import keys
from tfx_encrypt import package as pkg_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.keys import _signing
from tfx_encrypt.keys.aws_kms import AwsKmsKey
from tfx_encrypt.keys.azure_kv import AzureKeyVaultKey
from tfx_encrypt.keys.gcp_kms import GcpKmsKey
from tfx_encrypt.keys.vault import VaultKey

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
MESSAGE = b'tfxe2 header signature\x00' + bytes(range(32))
SECRETS = (VAULT_TOKEN, AZURE_TOKEN, 'testing')


@pytest.fixture(autouse=True)
def _fresh_public_key_cache():
  _signing.clear_cache()
  yield
  _signing.clear_cache()


@pytest.fixture(scope='module')
def local(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  return _util.make_tree(tmp_path_factory.mktemp('model'), {
      'saved_model.pb': 3000, 'variables/variables.index': 200,
      'variables/variables.data-00000-of-00001': 70000})


# -- one object per service: how to make keys, count calls, break things -----


class Service:
  """What a test needs of one key service."""

  name = ''
  sign_op = ''
  pub_op = ''

  def new_signer(self, kind: str = 'ecdsa') -> str:
    """A fresh signing key's URI."""
    raise NotImplementedError

  def counts(self):
    raise NotImplementedError

  def backend(self, uri: str):
    """A new backend object, as resolve() would build it."""
    return keys.resolve(uri)

  def deny_sign(self, uri: str) -> None:
    raise NotImplementedError

  def disable(self, uri: str) -> None:
    raise NotImplementedError


class Aws(Service):
  name, sign_op, pub_op = 'aws', 'Sign', 'GetPublicKey'

  def __init__(self, env):
    self.env = env

  def new_signer(self, kind='ecdsa'):
    assert kind == 'ecdsa'
    return self.env.create_signing_key()

  def counts(self):
    return self.env.counts()

  def deny_sign(self, uri):
    self.env.proxy.inject(fx.Fault(
        1, 400, b'{"__type":"AccessDeniedException","message":"User: arn:aws:'
        b'iam::123456789012:user/ci is not authorized to perform: kms:Sign"}',
        {'Content-Type': 'application/x-amz-json-1.1'}, op='Sign'))

  def disable(self, uri):
    # moto 5.2 records DisableKey but does not enforce it: the proxy answers
    # as AWS KMS does for a disabled key.
    self.env.admin.disable_key(KeyId=self.env.key_uuid(uri))
    fault = fx.aws_kms_json_error('DisabledException',
                                  f'{self.env.arn(uri)} is disabled.')
    fault.op = 'Sign'
    self.env.proxy.inject(fault)


class Gcp(Service):
  name, sign_op, pub_op = 'gcp', 'AsymmetricSign', 'GetPublicKey'

  def __init__(self, server):
    self.server = server

  def new_signer(self, kind='ecdsa'):
    return self.server.add_signing_key(
        'EC_SIGN_ED25519' if kind == 'ed25519' else 'EC_SIGN_P256_SHA256')

  def counts(self):
    return dict(self.server.calls)

  def deny_sign(self, uri):
    self.server.key(uri).denied = True

  def disable(self, uri):
    self.server.key(uri).state = 'DISABLED'


class Vault(Service):
  name, sign_op, pub_op = 'vault', 'sign', 'read'

  def __init__(self, server):
    self.server = server
    self.n = 0

  def new_signer(self, kind='ecdsa'):
    self.n += 1
    name = f'release-{self.n}'
    self.server.add_signing_key(
        name, 'ed25519' if kind == 'ed25519' else 'ecdsa-p256')
    return self.server.uri(name)

  def counts(self):
    return dict(self.server.calls)

  def deny_sign(self, uri):
    name = uri.rsplit('/', 1)[1]
    self.server.add_token(VAULT_TOKEN, {('read', 'transit', name)})


class Azure(Service):
  name, sign_op, pub_op = 'azure', 'sign', 'get'

  def __init__(self, server):
    self.server = server
    self.n = 0

  def new_signer(self, kind='ecdsa'):
    assert kind == 'ecdsa'
    self.n += 1
    name = f'release-{self.n}'
    self.server.add_key(name, kty='EC')
    return self.server.uri(name)

  def counts(self):
    return dict(self.server.calls)

  def backend(self, uri):
    return AzureKeyVaultKey(uri, credential=self.server.credential)

  def deny_sign(self, uri):
    self.server.denied.add('sign')

  def disable(self, uri):
    self.server.keys[uri.rsplit('/', 1)[1]].enabled = False


SERVICES = ['aws', 'gcp', 'vault', 'azure']


@pytest.fixture(params=SERVICES)
def service(request):
  if request.param == 'aws':
    return Aws(request.getfixturevalue('aws'))
  if request.param == 'gcp':
    return Gcp(request.getfixturevalue('gcp'))
  if request.param == 'vault':
    return Vault(request.getfixturevalue('vault'))
  return Azure(request.getfixturevalue('azure'))


def _trusted(service, uri):
  """The URI as a trust anchor (Azure needs the fake's credential)."""
  return service.backend(uri) if service.name == 'azure' else uri


def _signer(service, uri):
  return service.backend(uri) if service.name == 'azure' else uri


def _one_line(e) -> str:
  text = str(e)
  assert '\n' not in text, text
  for secret in SECRETS:
    assert secret not in text
  return text


def _cli(*args, env=None):
  # google-api-core warns about Python 3.10 on import; not ours to show.
  full = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS='ignore')
  full.update(env or {})
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt',
                         *map(str, args)], capture_output=True, text=True,
                        env=full, check=False)


# -- roles and forms: no network ---------------------------------------------


AWS_KEY = ('aws-kms://arn:aws:kms:eu-west-1:111122223333:key/'
           '1234abcd-12ab-34cd-56ef-1234567890ab')
GCP_KEY = 'gcp-kms://projects/p/locations/global/keyRings/r/cryptoKeys/k'
GCP_VERSION = GCP_KEY + '/cryptoKeyVersions/3'


def test_kms_uris_serve_trust_and_signer_without_any_call():
  for uri in (AWS_KEY, 'aws-kms://arn:aws:kms:eu-west-1:111122223333:alias/'
              'release', GCP_VERSION, 'hcvault://v.example.com/transit/keys/r',
              'azure-kv://v.vault.azure.net/keys/release/0123abcd'):
    for role in ('trust', 'signer'):
      key = keys.resolve(uri, role)
      assert key.key_id == uri and key.describe() == uri   # nothing fetched


def test_gcp_form_decides_the_role():
  for role in ('signer', 'trust'):
    with pytest.raises(errors.KeyRoleError,
                       match='append /cryptoKeyVersions/N'):
      keys.resolve(GCP_KEY, role)
  for role in ('recipient', 'identity'):
    with pytest.raises(errors.KeyRoleError, match='names a CryptoKeyVersion'):
      keys.resolve(GCP_VERSION, role)
    assert keys.resolve(GCP_KEY, role).key_id == GCP_KEY
  for bad in (GCP_KEY + '/cryptoKeyVersions/0', GCP_KEY + '/cryptoKeyVersions/',
              GCP_KEY + '/cryptoKeyVersions/x'):
    with pytest.raises(errors.InvalidKeyUriError):
      keys.resolve(bad)


def test_check_uri_form_is_offline(monkeypatch):
  import socket  # pylint: disable=g-import-not-at-top

  def no_network(*args, **kwargs):
    raise AssertionError('check_uri_form made a network call')

  monkeypatch.setattr(socket.socket, 'connect', no_network)
  keys.check_uri_form(GCP_VERSION, 'signer')
  keys.check_uri_form(AWS_KEY, 'signer')
  keys.check_uri_form('/no/such/file.pem', 'signer')   # checked at run time
  with pytest.raises(errors.KeyRoleError, match=r'^signer gcp-kms://'):
    keys.check_uri_form(GCP_KEY, 'signer', option='signer')
  with pytest.raises(errors.InvalidKeyUriError):
    keys.check_uri_form('aws-kms://arn:aws:kms:eu-west-1:111122223333:'
                        'grant/abc', 'signer')


# -- sign and verify, per service ----------------------------------------------


def test_one_remote_call_per_signature(service):
  uri = service.new_signer()
  signer = service.backend(uri)
  assert signer.signature_alg == 'ecdsa-p256-sha256'
  sig = signer.sign(MESSAGE)
  assert service.counts() == {service.pub_op: 1, service.sign_op: 1}
  # The public key is cached per process: every further signature, by this
  # or by a new backend object, is one Sign and nothing else.
  for i in range(3):
    service.backend(uri).sign(MESSAGE + bytes([i]))
  assert service.counts() == {service.pub_op: 1, service.sign_op: 4}
  # As a trust anchor: verified locally, no call at all.
  trust = service.backend(uri)
  assert trust.verify(MESSAGE, sig, 'ecdsa-p256-sha256')
  assert not trust.verify(MESSAGE + b'x', sig, 'ecdsa-p256-sha256')
  assert not trust.verify(MESSAGE, sig, 'ed25519')
  assert service.counts() == {service.pub_op: 1, service.sign_op: 4}
  # The signer id is the SPKI id, exactly as for the exported PEM.
  assert signer.signer_id.startswith('sha256:')
  assert signer.signer_id == _signing.PublicKeyInfo.from_pem(
      signer.public_key_pem(), 'x').key_id
  assert signer.describe() == f'{uri} ({signer.signer_id})'


@pytest.mark.parametrize('name', ['gcp', 'vault'])
def test_ed25519_signing(name, request):
  service = (Gcp(request.getfixturevalue('gcp')) if name == 'gcp' else
             Vault(request.getfixturevalue('vault')))
  uri = service.new_signer('ed25519')
  signer = service.backend(uri)
  assert signer.signature_alg == 'ed25519'
  sig = signer.sign(MESSAGE)
  assert len(sig) == 64   # raw, as FORMAT.md §8 stores it
  header_lib.check_raw_signature('ed25519', sig)
  assert service.backend(uri).verify(MESSAGE, sig, 'ed25519')
  assert service.counts() == {service.pub_op: 1, service.sign_op: 1}


def test_package_signed_by_service_verifies_with_uri_and_exported_pem(
    service, local, model, tmp_path):
  uri = service.new_signer()
  out = tmp_path / 'model.tfxe'
  info = te.encrypt_model(model, out, recipients=[local.pub('x')],
                          signer=_signer(service, uri), bundle=True)
  assert service.counts() == {service.pub_op: 1, service.sign_op: 1}
  signer_id = service.backend(uri).signer_id
  assert info.signer == signer_id and info.signature_alg == 'ecdsa-p256-sha256'
  # (a) the same URI as trust anchor
  assert te.verify_package(out, trusted=[_trusted(service, uri)]
                           ).signature_verified
  assert service.counts() == {service.pub_op: 1, service.sign_op: 1}
  # (b) the PEM `tfx-encrypt pubkey` exports, in a fresh process
  if service.name == 'azure':
    # (a CLI process would need a real Azure credential)
    pem = service.backend(uri).public_key_pem()
  else:
    r = _cli('pubkey', uri)
    assert r.returncode == 0, r.stderr
    # (the GCP fake's plaintext channel logs a warning line first)
    assert r.stderr.splitlines()[-1] == f'key id {signer_id}'
    pem = r.stdout.encode()
  pem_path = tmp_path / 'release.pub.pem'
  pem_path.write_bytes(pem)
  assert te.verify_package(out, trusted=[str(pem_path)]).signature_verified
  restored = tmp_path / 'restored'
  te.decrypt_model(out, restored, identities=[local.priv('x')],
                   trusted=[str(pem_path)])
  assert _util.read_tree(restored) == _util.read_tree(model)


def test_trust_uri_of_another_key_is_untrusted(service, local, model,
                                               tmp_path):
  uri, other = service.new_signer(), service.new_signer()
  out = tmp_path / 'p'
  te.encrypt_model(model, out, recipients=[local.pub('x')],
                   signer=_signer(service, uri))
  with pytest.raises(errors.UntrustedSignerError,
                     match='not among the trusted keys') as ei:
    te.verify_package(out, trusted=[_trusted(service, other)])
  # The message names both ids: the package's and the trust anchor's.
  text = _one_line(ei.value)
  assert service.backend(uri).signer_id in text
  assert service.backend(other).signer_id in text
  with pytest.raises(errors.UntrustedSignerError):
    te.decrypt_model(out, tmp_path / 'o', identities=[local.priv('x')],
                     trusted=[_trusted(service, other)])
  assert not os.path.exists(tmp_path / 'o')


def test_access_denied_on_sign(service):
  uri = service.new_signer()
  signer = service.backend(uri)
  signer.public_key_info()   # the public key may be read; Sign may not
  service.deny_sign(uri)
  with pytest.raises(errors.KeyAccessDeniedError) as ei:
    signer.sign(MESSAGE)
  text = _one_line(ei.value)
  want = {'aws': 'kms:Sign', 'gcp': 'cloudkms.cryptoKeyVersions.useToSign',
          'vault': '"update" capability on transit/sign/',
          'azure': 'keys/sign'}[service.name]
  assert want in text
  assert service.counts()[service.sign_op] == 1   # not retried


@pytest.mark.parametrize('name', ['aws', 'gcp', 'azure'])
def test_disabled_key(name, request):
  service = {'aws': lambda: Aws(request.getfixturevalue('aws')),
             'gcp': lambda: Gcp(request.getfixturevalue('gcp')),
             'azure': lambda: Azure(request.getfixturevalue('azure'))}[name]()
  uri = service.new_signer()
  signer = service.backend(uri)
  signer.public_key_info()
  service.disable(uri)
  with pytest.raises(errors.KeyDisabledError) as ei:
    signer.sign(MESSAGE)
  _one_line(ei.value)
  assert isinstance(ei.value, errors.KeyBackendError)


def test_key_that_cannot_sign_is_a_usage_error(aws, gcp, vault, azure):
  symmetric = gcp.add_key(key='sym')
  gcp.keys[symmetric[len('gcp-kms://'):] + '/cryptoKeyVersions/1'] = gcp.key(
      symmetric)
  cases = [
      (aws.create_key(), 'SIGN_VERIFY key with key spec ECC_NIST_P256'),
      (symmetric + '/cryptoKeyVersions/1', 'EC_SIGN_P256_SHA256'),
      (gcp.add_signing_key('EC_SIGN_P384_SHA384'), 'EC_SIGN_P256_SHA256'),
  ]
  vault.add_key('aead')
  vault.add_signing_key('derived', 'ed25519', derived=True)
  cases += [(vault.uri('aead'), 'ecdsa-p256 or ed25519'),
            (vault.uri('derived'), 'not derived')]
  azure.add_key('rsa')
  for uri, match in cases:
    with pytest.raises(errors.UsageError, match=match) as ei:
      pkg_lib.resolve_signer(uri)
    _one_line(ei.value)
  with pytest.raises(errors.UsageError, match='EC key on curve P-256'):
    pkg_lib.resolve_signer(AzureKeyVaultKey(azure.uri('rsa'),
                                               credential=azure.credential))


def test_service_answer_that_does_not_verify_is_refused(gcp):
  """A key changed while in use: the cached public key no longer matches."""
  service = Gcp(gcp)
  uri = service.new_signer()
  signer = GcpKmsKey(uri)
  signer.public_key_info()
  fake = gcp.key(uri)
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  fake.private = ec.generate_private_key(ec.SECP256R1())
  with pytest.raises(errors.KeyBackendError, match='does not verify') as ei:
    signer.sign(MESSAGE)
  _one_line(ei.value)
  # The stale public key was dropped: the next use fetches the new one.
  sig = GcpKmsKey(uri).sign(MESSAGE)
  assert GcpKmsKey(uri).verify(MESSAGE, sig, 'ecdsa-p256-sha256')
  assert gcp.calls['GetPublicKey'] == 2


@pytest.mark.parametrize('where', ['request', 'response'])
def test_gcp_crc32c_on_sign_is_checked(gcp, fast_retry, where):
  uri = Gcp(gcp).new_signer()
  signer = GcpKmsKey(uri)
  signer.public_key_info()
  gcp.corrupt = where
  with pytest.raises(errors.BackendUnavailableError, match='corrupted'):
    signer.sign(MESSAGE)
  assert gcp.calls['AsymmetricSign'] == 4   # TFXE_RETRY_MAX_ATTEMPTS


def test_throttled_sign_is_retried(aws, fast_retry):
  uri = aws.create_signing_key()
  signer = AwsKmsKey(uri)
  signer.public_key_info()
  fault = fx.aws_kms_json_error('ThrottlingException', 'Rate exceeded')
  fault.count, fault.op = 2, 'Sign'
  aws.proxy.inject(fault)
  sig = signer.sign(MESSAGE)
  assert AwsKmsKey(uri).verify(MESSAGE, sig, 'ecdsa-p256-sha256')
  assert aws.counts() == {'GetPublicKey': 1, 'Sign': 3}


def test_aws_alias_signs_with_the_key_behind_it(aws, local, model, tmp_path):
  uri = aws.create_signing_key()
  aws.admin.create_alias(AliasName='alias/release',
                         TargetKeyId=aws.key_uuid(uri))
  alias = uri.rsplit(':', 1)[0] + ':alias/release'
  out = tmp_path / 'p'
  te.encrypt_model(model, out, recipients=[local.pub('x')], signer=alias)
  # Same key, same signer id, whichever way it is named.
  assert te.verify_package(out, trusted=[uri]).signer == (
      AwsKmsKey(alias).signer_id)


# -- end to end through the CLI (AWS KMS: moto) ------------------------------


def test_cli_end_to_end_with_aws_kms(aws, local, model, tmp_path):
  signer = aws.create_signing_key()
  kek = aws.create_key()
  out = tmp_path / 'model.tfxe'
  r = _cli('encrypt', model, out, '--bundle', '--recipient', kek,
           '--sign-with', signer, '--context', 'model=demo')
  assert r.returncode == 0, r.stderr
  # One process: one GetPublicKey, one Sign, one Encrypt.
  assert aws.counts() == {'GetPublicKey': 1, 'Sign': 1, 'Encrypt': 1}
  r = _cli('verify', out, '--trust', signer)
  assert r.returncode == 0, r.stderr
  r = _cli('decrypt', out, tmp_path / 'restored', '--identity', kek,
           '--trust', signer)
  assert r.returncode == 0, r.stderr
  assert _util.read_tree(tmp_path / 'restored') == _util.read_tree(model)
  pem = tmp_path / 'release.pub.pem'
  r = _cli('pubkey', signer)
  assert r.returncode == 0 and r.stderr.startswith('key id sha256:'), r.stderr
  pem.write_text(r.stdout)
  r = _cli('verify', out, '--trust', pem)
  assert r.returncode == 0, r.stderr
  # A trust URI naming another key: untrusted (exit 6), one line.
  r = _cli('verify', out, '--trust', aws.create_signing_key())
  assert r.returncode == 6, r.stderr
  assert len(r.stderr.splitlines()) == 1
  assert 'not among the trusted keys' in r.stderr
  # Sign denied: exit 8, one line, nothing written.
  aws.proxy.reset()
  Aws(aws).deny_sign(signer)
  r = _cli('encrypt', model, tmp_path / 'denied.tfxe', '--bundle',
           '--recipient', local.pub('x'), '--sign-with', signer)
  assert r.returncode == 8, r.stderr
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and 'kms:Sign' in lines[0], lines
  assert 'testing' not in r.stderr   # the secret access key
  assert not os.path.exists(tmp_path / 'denied.tfxe')


def test_cli_pubkey_errors_are_one_line(tmp_path, local):
  r = _cli('pubkey', local.priv('x'))
  assert r.returncode == 0 and 'BEGIN PUBLIC KEY' in r.stdout
  assert 'PRIVATE' not in r.stdout
  assert r.stderr.strip() == f'key id {keys.resolve(local.pub("x")).key_id}'
  for args, code in (((tmp_path / 'missing.pem',), 2), ((GCP_KEY,), 2),
                     (('nope://x',), 2)):
    r = _cli('pubkey', *args)
    assert r.returncode == code, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error: '), (
        lines)
    assert r.stdout == ''
