"""TEST-ONLY: environments for the key-backend tests, shared by fixtures.

Used by tests/keys/conftest.py and tests/keys/test_backends_integration.py.
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

  def apply(self, monkeypatch) -> None:
    """Point the default boto3 chain at this environment, hermetically."""
    for k, v in self.client_env().items():
      monkeypatch.setenv(k, v)
    for k in AWS_ENV_TO_CLEAR:
      monkeypatch.delenv(k, raising=False)

  def create_key(self, description: str = 'tfx-encrypt test') -> str:
    """Creates a symmetric key through the KMS API; returns its key URI."""
    meta = self.admin.create_key(Description=description)['KeyMetadata']
    return 'aws-kms://' + meta['Arn']

  def create_signing_key(self, key_spec: str = 'ECC_NIST_P256') -> str:
    """Creates an asymmetric SIGN_VERIFY key; returns its key URI."""
    meta = self.admin.create_key(Description='tfx-encrypt test signer',
                                 KeyUsage='SIGN_VERIFY',
                                 KeySpec=key_spec)['KeyMetadata']
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


# -- PKCS#11: SoftHSM2 --------------------------------------------------------

SOFTHSM_MODULE = '/usr/lib/softhsm/libsofthsm2.so'


class SoftHsm:
  """A SoftHSM2 token directory for this test process (real PKCS#11).

  SoftHSM reads SOFTHSM2_CONF once, when the module is initialised, and the
  backend keeps one initialised module per path for the whole process. So
  there is one SoftHsm per process (:meth:`shared`); tests add tokens to it
  and the backend's modules are re-initialised to see them.
  """

  _shared = None

  @classmethod
  def shared(cls) -> 'SoftHsm':
    if cls._shared is None:
      import atexit  # pylint: disable=g-import-not-at-top
      import tempfile  # pylint: disable=g-import-not-at-top
      cls._shared = cls(tempfile.mkdtemp(prefix='tfxe-softhsm-'))
      atexit.register(cls._shared.close)
    return cls._shared

  def __init__(self, root: str):
    import shutil  # pylint: disable=g-import-not-at-top
    if shutil.which('softhsm2-util') is None or not os.path.exists(
        SOFTHSM_MODULE):
      raise RuntimeError('SoftHSM2 is not installed: apt-get install softhsm2')
    self.root = root
    self.module = SOFTHSM_MODULE
    token_dir = os.path.join(root, 'tokens')
    os.makedirs(token_dir, exist_ok=True)
    self.conf = os.path.join(root, 'softhsm2.conf')
    with open(self.conf, 'w') as f:
      f.write(f'directories.tokendir = {token_dir}\n'
              'objectstore.backend = file\n'
              'log.level = ERROR\n'
              'slots.removable = false\n')
    os.environ['SOFTHSM2_CONF'] = self.conf
    self._n = 0

  def init_token(self, label: str, pin: str) -> None:
    import subprocess  # pylint: disable=g-import-not-at-top
    from tfx_encrypt.keys import pkcs11 as backend  # pylint: disable=g-import-not-at-top
    subprocess.run(
        ['softhsm2-util', '--init-token', '--free', '--label', label,
         '--pin', pin, '--so-pin', 'so-' + pin],
        check=True, capture_output=True,
        env=dict(os.environ, SOFTHSM2_CONF=self.conf))
    backend.refresh_modules()

  def new_token(self, pin: str = '1234') -> str:
    """Initialises a fresh token; returns its label."""
    self._n += 1
    label = f'tfxe-test-{os.getpid()}-{self._n}'
    self.init_token(label, pin)
    return label

  def _session(self, token_label: str, pin: str):
    from tfx_encrypt.keys import pkcs11 as backend  # pylint: disable=g-import-not-at-top
    lib = backend.load_module(self.module)
    return lib.get_token(token_label=token_label).open(rw=True, user_pin=pin)

  def generate_aes(self, token_label: str, pin: str, label: str,
                   key_id: bytes = b'') -> None:
    """A sensitive, non-extractable AES-256 key inside the token."""
    from pkcs11 import Attribute, KeyType  # pylint: disable=g-import-not-at-top
    template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True, Attribute.DECRYPT: True}
    with self._session(token_label, pin) as s:
      s.generate_key(KeyType.AES, 256, label=label, id=key_id or None,
                     store=True, template=template)

  def generate_rsa(self, token_label: str, pin: str, label: str,
                   bits: int = 2048) -> None:
    """An RSA key pair; the private half is sensitive and non-extractable."""
    from pkcs11 import Attribute, KeyType  # pylint: disable=g-import-not-at-top
    with self._session(token_label, pin) as s:
      s.generate_keypair(
          KeyType.RSA, bits, label=label, store=True,
          private_template={Attribute.SENSITIVE: True,
                            Attribute.EXTRACTABLE: False})

  def generate_ec(self, token_label: str, pin: str, label: str,
                  key_id: bytes = b'') -> None:
    """An EC P-256 key pair; the private half is sensitive, non-extractable."""
    from pkcs11 import Attribute, KeyType  # pylint: disable=g-import-not-at-top
    p256 = bytes.fromhex('06082a8648ce3d030107')  # DER OID of secp256r1
    with self._session(token_label, pin) as s:
      params = s.create_domain_parameters(
          KeyType.EC, {Attribute.EC_PARAMS: p256}, local=True)
      params.generate_keypair(
          store=True, label=label, id=key_id or None,
          private_template={Attribute.SENSITIVE: True,
                            Attribute.EXTRACTABLE: False})

  def write_pin_file(self, pin: str) -> str:
    self._n += 1
    path = os.path.join(self.root, f'pin-{self._n}')
    with open(path, 'w') as f:
      f.write(pin + '\n')
    os.chmod(path, 0o600)
    return path

  def uri(self, token: str, obj: str, *, pin_file: str = None,
          pin_value: str = None) -> str:
    q = [f'module-path={self.module}']
    if pin_file:
      q.append(f'pin-source=file:{pin_file}')
    if pin_value:
      q.append(f'pin-value={pin_value}')
    return f'pkcs11:token={token};object={obj}?' + '&'.join(q)

  def close(self) -> None:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(self.root, ignore_errors=True)
