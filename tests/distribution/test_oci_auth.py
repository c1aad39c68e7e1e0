"""Registry authentication: HTTP basic auth and TLS client certificates.

Real CNCF distribution registries (Debian `docker-registry`) on free
127.0.0.1 ports, configured with TLS (a test CA made here with
`cryptography`), `auth: htpasswd` (a bcrypt htpasswd file written by
Debian's `htpasswd -B`, package apache2-utils) and, for mutual TLS,
`http.tls.clientcas`. A missing binary FAILS the tests: they never skip.
"""

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests._util import Keys, leftovers, make_tree, read_tree
from tfx_encrypt import errors
from tfx_encrypt import package as pkg
from tfx_encrypt.distribution import oci

pytestmark = pytest.mark.integration

REGISTRY_BIN = '/usr/bin/docker-registry'
HTPASSWD_BIN = '/usr/bin/htpasswd'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USER = 'edge-device-17'
PASSWORD = 'Reg1stry-TESTONLY-s3cr3t'


# -- a test PKI -----------------------------------------------------------------

class Pki:
  """A CA, the registry's server certificate and client certificates."""

  def __init__(self, d):
    from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
    self.dir = str(d)
    self._ec = ec
    self.ca_key, self.ca = self._ca('tfx-encrypt test registry CA')
    self.ca_file = self._write('ca.pem', self.ca)
    self.server_cert, self.server_key = self.issue(
        'server', self.ca, self.ca_key, server=True)

  def _name(self, cn):
    from cryptography import x509  # pylint: disable=g-import-not-at-top
    from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

  def _ca(self, cn):
    from cryptography import x509  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives import hashes  # pylint: disable=g-import-not-at-top
    key = self._ec.generate_private_key(self._ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(self._name(cn)).issuer_name(self._name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                           critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert

  def other_ca(self):
    return self._ca('some other CA')

  def issue(self, name, ca, ca_key, *, server=False, expired=False):
    """Writes NAME.pem / NAME.key (PEM, unencrypted); returns the paths."""
    from cryptography import x509  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
    from cryptography.x509.oid import ExtendedKeyUsageOID  # pylint: disable=g-import-not-at-top
    key = self._ec.generate_private_key(self._ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = ((now - datetime.timedelta(days=2),
                   now - datetime.timedelta(days=1)) if expired else
                  (now - datetime.timedelta(minutes=5),
                   now + datetime.timedelta(days=1)))
    b = (x509.CertificateBuilder()
         .subject_name(self._name(f'tfx-encrypt test {name}'))
         .issuer_name(ca.subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                        critical=True)
         .add_extension(x509.ExtendedKeyUsage(
             [ExtendedKeyUsageOID.SERVER_AUTH if server else
              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
      b = b.add_extension(x509.SubjectAlternativeName([
          x509.DNSName('localhost'),
          x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    cert_path = self._write(f'{name}.pem', cert)
    key_path = os.path.join(self.dir, f'{name}.key')
    with open(key_path, 'wb') as f:
      f.write(key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path

  def _write(self, name, cert):
    from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
    path = os.path.join(self.dir, name)
    with open(path, 'wb') as f:
      f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
  return Pki(tmp_path_factory.mktemp('pki'))


# -- registries -------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _write_htpasswd(path):
  """A bcrypt htpasswd file (htpasswd -B; the password on stdin, not argv)."""
  if not os.path.exists(HTPASSWD_BIN):
    pytest.fail(f'{HTPASSWD_BIN} is missing: install the Debian package '
                "'apache2-utils' (make test does); these tests never skip",
                pytrace=False)
  subprocess.run([HTPASSWD_BIN, '-B', '-i', '-c', str(path), USER],
                 input=PASSWORD + '\n', text=True, check=True,
                 capture_output=True)
  assert open(path).read().startswith(f'{USER}:$2y$')


class Registry:

  def __init__(self, host):
    self.host = host

  def ref(self, name):
    return f'{self.host}/{name}'


@contextlib.contextmanager
def _registry(d, pki, *, htpasswd=True, client_cas=False):
  """docker-registry over TLS (htpasswd, clientcas optional); stopped after."""
  if not os.path.exists(REGISTRY_BIN):
    pytest.fail(f'{REGISTRY_BIN} is missing: install the Debian package '
                "'docker-registry' (make test does); these tests never skip",
                pytrace=False)
  port = _free_port()
  auth = ''
  if htpasswd:
    _write_htpasswd(d / 'htpasswd')
    auth = (f'auth:\n  htpasswd:\n    realm: tfx-encrypt-test\n'
            f'    path: {d / "htpasswd"}\n')
  tls = (f'  tls:\n    certificate: {pki.server_cert}\n'
         f'    key: {pki.server_key}\n')
  if client_cas:
    tls += f'    clientcas:\n      - {pki.ca_file}\n'
  (d / 'config.yml').write_text(
      'version: 0.1\nlog:\n  level: error\n'
      f'storage:\n  filesystem:\n    rootdirectory: {d / "store"}\n'
      + auth + f'http:\n  addr: 127.0.0.1:{port}\n' + tls)
  log = open(d / 'registry.log', 'wb')
  proc = subprocess.Popen([REGISTRY_BIN, 'serve', str(d / 'config.yml')],
                          stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 30
    while True:
      if proc.poll() is not None:
        pytest.fail(f'docker-registry exited with {proc.returncode}: '
                    f'{(d / "registry.log").read_text()[-2000:]}',
                    pytrace=False)
      try:
        with socket.create_connection(('127.0.0.1', port), timeout=1):
          break
      except OSError:
        if time.monotonic() > deadline:
          pytest.fail('docker-registry did not listen within 30 s',
                      pytrace=False)
        time.sleep(0.1)
    yield Registry(f'127.0.0.1:{port}')
  finally:
    proc.terminate()
    try:
      proc.wait(10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()


@pytest.fixture(scope='module')
def basic_registry(tmp_path_factory, pki):
  """TLS + htpasswd."""
  with _registry(tmp_path_factory.mktemp('basic-registry'), pki) as r:
    yield r


@pytest.fixture(scope='module')
def mtls_registry(tmp_path_factory, pki):
  """TLS + htpasswd + client certificates (http.tls.clientcas)."""
  with _registry(tmp_path_factory.mktemp('mtls-registry'), pki,
                 client_cas=True) as r:
    yield r


@pytest.fixture(scope='module')
def client(pki):
  """A device certificate issued by the registry's client CA."""
  return pki.issue('device', pki.ca, pki.ca_key)


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def package(tmp_path_factory, keys):
  d = tmp_path_factory.mktemp('pkg')
  model = make_tree(d / 'model', {'saved_model.pb': 3000,
                                  'variables/variables.index': 100,
                                  'variables/variables.data-00000-of-00001':
                                      300_000})
  out = d / 'm.tfxe'
  pkg.encrypt_model(model, out, recipients=[keys.pub('x')],
                    signer=keys.priv('ed'), bundle=True)
  return str(out), model


def _cli(*args, env=None, stdin=None):
  if env is None:
    env = {k: v for k, v in os.environ.items()
           if k != 'TFXE_REGISTRY_PASSWORD'}
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *args],
                        capture_output=True, text=True, cwd=REPO_ROOT,
                        env=env, input=stdin, timeout=120)


@pytest.fixture
def no_docker_config(tmp_path, monkeypatch):
  """HOME without ~/.docker and no DOCKER_CONFIG: no stored credentials."""
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.delenv('DOCKER_CONFIG', raising=False)
  monkeypatch.delenv('TFXE_REGISTRY_PASSWORD', raising=False)


def _auth(pki, **kw):
  return oci.RegistryAuth(ca_file=pki.ca_file, **kw)


# -- basic auth ----------------------------------------------------------------------

def test_basic_auth_push_pull(basic_registry, pki, keys, package, tmp_path,
                              no_docker_config):
  src, model = package
  ref = basic_registry.ref('models/taxi:1')
  good = _auth(pki, username=USER, password=PASSWORD)
  digest = oci.push_package(src, ref, auth=good)
  res = oci.pull_package(ref, tmp_path / 'p.tfxe', trusted=[keys.pub('ed')],
                         auth=good)
  assert res.manifest_digest == digest
  pkg.decrypt_model(tmp_path / 'p.tfxe', tmp_path / 'plain',
                    identities=[keys.priv('x')], trusted=[keys.pub('ed')])
  assert read_tree(tmp_path / 'plain') == read_tree(model)
  # No credentials, or a wrong password: refused, typed, nothing written.
  for auth, match in ((_auth(pki), 'docker login'),
                      (_auth(pki, username=USER, password='wrong-pass-1'),
                       USER)):
    with pytest.raises(oci.RegistryAuthError, match=match) as ei:
      oci.pull_package(ref, tmp_path / 'x.tfxe', trusted=[keys.pub('ed')],
                       auth=auth)
    assert 'wrong-pass-1' not in str(ei.value) and PASSWORD not in str(
        ei.value)
    assert not os.path.lexists(tmp_path / 'x.tfxe')
    assert leftovers(str(tmp_path), 'x.tfxe') == []
  # The registry's CA is needed: the system CAs do not know it.
  with pytest.raises(oci.RegistryUnavailableError, match='--ca-file'):
    oci.pull_package(ref, tmp_path / 'x.tfxe', trusted=[keys.pub('ed')],
                     auth=oci.RegistryAuth(username=USER, password=PASSWORD))


def test_basic_auth_from_docker_config(basic_registry, pki, keys, package,
                                       tmp_path, monkeypatch):
  src, _ = package
  config_dir = tmp_path / 'docker'
  config_dir.mkdir()
  token = base64.b64encode(f'{USER}:{PASSWORD}'.encode()).decode()
  (config_dir / 'config.json').write_text(json.dumps(
      {'auths': {basic_registry.host: {'auth': token}}}))
  monkeypatch.setenv('DOCKER_CONFIG', str(config_dir))
  ref = basic_registry.ref('models/docker-config:1')
  oci.push_package(src, ref, auth=_auth(pki))
  oci.pull_package(ref, tmp_path / 'p.tfxe', trusted=[keys.pub('ed')],
                   auth=_auth(pki))
  assert os.path.isfile(tmp_path / 'p.tfxe')


def test_cli_password_from_stdin_or_env_never_argv(basic_registry, pki, keys,
                                                   package, tmp_path,
                                                   no_docker_config):
  src, _ = package
  ref = basic_registry.ref('cli/taxi:1')
  env = dict(os.environ)
  r = _cli('push', src, ref, '--ca-file', pki.ca_file, '--username', USER,
           '--password-stdin', env=env, stdin=PASSWORD + '\n')
  assert r.returncode == 0, r.stderr
  assert PASSWORD not in r.stdout + r.stderr
  env['TFXE_REGISTRY_PASSWORD'] = PASSWORD
  r = _cli('pull', ref, str(tmp_path / 'p.tfxe'), '--trust', keys.pub('ed'),
           '--ca-cert', pki.ca_file, '-u', USER, env=env)
  assert r.returncode == 0, r.stderr
  # Wrong password: one line, exit 10, the password not echoed.
  r = _cli('pull', ref, str(tmp_path / 'x.tfxe'), '--trust', keys.pub('ed'),
           '--ca-file', pki.ca_file, '--username', USER, '--password-stdin',
           stdin='not-the-password-77\n')
  assert r.returncode == oci.RegistryError.exit_code
  assert r.stderr.count('\n') == 1 and 'not-the-password-77' not in r.stderr
  # A password on the command line is refused before anything is sent.
  r = _cli('pull', ref, str(tmp_path / 'x.tfxe'), '--trust', keys.pub('ed'),
           '--ca-file', pki.ca_file, '--username', USER, '--password',
           'argv-password-55')
  assert r.returncode == 2 and 'password-stdin' in r.stderr, r.stderr
  assert 'argv-password-55' not in r.stderr
  # A user name without any password source.
  r = _cli('pull', ref, str(tmp_path / 'x.tfxe'), '--trust', keys.pub('ed'),
           '--ca-file', pki.ca_file, '--username', USER, stdin='')
  assert r.returncode == 2 and 'TFXE_REGISTRY_PASSWORD' in r.stderr, r.stderr
  assert not os.path.lexists(tmp_path / 'x.tfxe')


# -- mutual TLS ---------------------------------------------------------------------

def test_client_certificate_push_pull(mtls_registry, pki, client, keys,
                                      package, tmp_path, no_docker_config):
  src, model = package
  ref = mtls_registry.ref('models/mtls:1')
  auth = _auth(pki, username=USER, password=PASSWORD, cert_file=client[0],
               key_file=client[1])
  digest = oci.push_package(src, ref, auth=auth)
  res = oci.pull_package(ref, tmp_path / 'p.tfxe', trusted=[keys.pub('ed')],
                         auth=auth)
  assert res.manifest_digest == digest
  pkg.decrypt_model(tmp_path / 'p.tfxe', tmp_path / 'plain',
                    identities=[keys.priv('x')], trusted=[keys.pub('ed')])
  assert read_tree(tmp_path / 'plain') == read_tree(model)


def test_missing_unknown_or_expired_client_certificate_refused(
    mtls_registry, pki, client, keys, package, tmp_path, no_docker_config):
  src, _ = package
  ref = mtls_registry.ref('models/mtls:2')
  creds = dict(username=USER, password=PASSWORD)
  oci.push_package(src, ref, auth=_auth(pki, cert_file=client[0],
                                        key_file=client[1], **creds))
  other_ca_key, other_ca = pki.other_ca()
  unknown = pki.issue('unknown', other_ca, other_ca_key)
  expired = pki.issue('expired', pki.ca, pki.ca_key, expired=True)
  out = tmp_path / 'x.tfxe'
  with pytest.raises(oci.ClientCertificateError,
                     match='requires a TLS client certificate'):
    oci.pull_package(ref, out, trusted=[keys.pub('ed')],
                     auth=_auth(pki, **creds))
  for cert, key in (unknown, expired):
    with pytest.raises(oci.ClientCertificateError,
                       match='refused the TLS client certificate'):
      oci.pull_package(ref, out, trusted=[keys.pub('ed')],
                       auth=_auth(pki, cert_file=cert, key_file=key, **creds))
    with pytest.raises(oci.ClientCertificateError):
      oci.push_package(src, ref, auth=_auth(pki, cert_file=cert,
                                            key_file=key, **creds))
  assert not os.path.lexists(out) and leftovers(str(tmp_path), 'x.tfxe') == []
  # CLI: one line, exit 10.
  r = _cli('pull', ref, str(out), '--trust', keys.pub('ed'), '--ca-file',
           pki.ca_file, '--cert-file', unknown[0], '--key-file', unknown[1],
           '--username', USER, '--password-stdin', stdin=PASSWORD)
  assert r.returncode == oci.RegistryError.exit_code, r.stderr
  assert r.stderr.startswith('tfx-encrypt: error: registry ')
  assert 'client certificate' in r.stderr and r.stderr.count('\n') == 1
  assert not os.path.lexists(out)
  r = _cli('pull', ref, str(out), '--trust', keys.pub('ed'), '--ca-file',
           pki.ca_file, '--cert', client[0], '--key', client[1],
           '--username', USER, '--password-stdin', stdin=PASSWORD)
  assert r.returncode == 0, r.stderr


def test_bad_tls_settings_are_usage_errors(pki, client, tmp_path, keys):
  ref = '127.0.0.1:5000/models/x:1'
  out = tmp_path / 'x.tfxe'
  cases = [
      (oci.RegistryAuth(cert_file=client[0]), '--key-file'),
      (oci.RegistryAuth(username=USER), 'password'),
      (oci.RegistryAuth(password=PASSWORD), 'user name'),
      (oci.RegistryAuth(ca_file=str(tmp_path / 'none.pem')), 'no such file'),
      (oci.RegistryAuth(cert_file=client[0], key_file=pki.server_key),
       'matching'),
  ]
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  with open(client[1], 'rb') as f:
    key = serialization.load_pem_private_key(f.read(), None)
  enc = tmp_path / 'enc.key'
  enc.write_bytes(key.private_bytes(
      serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
      serialization.BestAvailableEncryption(b'key-passphrase')))
  cases.append((oci.RegistryAuth(cert_file=client[0], key_file=str(enc)),
                'unencrypted'))
  for auth, match in cases:
    with pytest.raises(errors.UsageError, match=match) as ei:
      oci.pull_package(ref, out, trusted=[keys.pub('ed')], auth=auth)
    assert PASSWORD not in str(ei.value)
  assert PASSWORD not in repr(oci.RegistryAuth(username=USER,
                                               password=PASSWORD))
  with pytest.raises(errors.UsageError, match='--insecure'):
    oci.pull_package(ref, out, trusted=[keys.pub('ed')], insecure=True,
                     auth=oci.RegistryAuth(ca_file=pki.ca_file))
