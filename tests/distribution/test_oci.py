"""OCI registry distribution against a real CNCF distribution registry.

The `registry` fixture runs `docker-registry serve` (Debian package
`docker-registry`; `make test` installs it) on a free 127.0.0.1 port with a
temporary filesystem store. A missing binary FAILS the tests: it never skips.
"""

import contextlib
import glob
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests._util import Keys, leftovers, make_tree, read_tree
from tfx_encrypt import errors
from tfx_encrypt import package as pkg
from tfx_encrypt.distribution import oci
from tfx_encrypt.format import header as header_lib

pytestmark = pytest.mark.integration

REGISTRY_BIN = '/usr/bin/docker-registry'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OCI_ACCEPT = {'Accept': oci.OCI_MANIFEST_MEDIA_TYPE}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _get(url, headers=None):
  with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                              timeout=10) as r:
    return r.read()


class Registry:
  """A running docker-registry: its address and its storage directory."""

  def __init__(self, host: str, root: str):
    self.host = host
    self.root = root

  def ref(self, name: str) -> str:
    return f'{self.host}/{name}'

  def manifest(self, repo: str, tag: str) -> dict:
    return json.loads(_get(f'http://{self.host}/v2/{repo}/manifests/{tag}',
                           OCI_ACCEPT))

  def blob(self, repo: str, digest: str) -> bytes:
    return _get(f'http://{self.host}/v2/{repo}/blobs/{digest}')

  def blob_path(self, digest: str) -> str:
    hexd = digest.split(':', 1)[1]
    return os.path.join(self.root, 'docker', 'registry', 'v2', 'blobs',
                        'sha256', hexd[:2], hexd, 'data')


@contextlib.contextmanager
def _running_registry(d, extra_config=''):
  """Start docker-registry with a temp config; stop it on exit."""
  if not os.path.exists(REGISTRY_BIN):
    pytest.fail(f'{REGISTRY_BIN} is missing: install the Debian package '
                "'docker-registry' (make test does); these tests never skip",
                pytrace=False)
  root = str(d / 'store')
  port = _free_port()
  config = d / 'config.yml'
  config.write_text(
      'version: 0.1\n'
      'log:\n  level: error\n'
      f'storage:\n  filesystem:\n    rootdirectory: {root}\n'
      f'http:\n  addr: 127.0.0.1:{port}\n' + extra_config)
  log = open(d / 'registry.log', 'wb')
  proc = subprocess.Popen([REGISTRY_BIN, 'serve', str(config)],
                          stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 30
    while True:
      if proc.poll() is not None:
        pytest.fail(f'docker-registry exited with {proc.returncode}: '
                    f'{(d / "registry.log").read_text()[-2000:]}',
                    pytrace=False)
      try:
        _get(f'http://127.0.0.1:{port}/v2/')
        break
      except urllib.error.HTTPError:  # 401: up, wants auth
        break
      except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
          pytest.fail('docker-registry did not answer GET /v2/ within 30 s',
                      pytrace=False)
        time.sleep(0.1)
    yield Registry(f'127.0.0.1:{port}', root)
  finally:
    proc.terminate()
    try:
      proc.wait(10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()


@pytest.fixture(scope='module')
def registry(tmp_path_factory):
  with _running_registry(tmp_path_factory.mktemp('registry')) as r:
    yield r


class _TokenHandler(http.server.BaseHTTPRequestHandler):
  """A token service: grants a token, or denies (401) when `deny` is set."""
  deny = False

  def do_GET(self):  # pylint: disable=invalid-name
    body = b'{"errors":[{"code":"DENIED"}]}' if self.deny else \
        b'{"token":"test-token"}'
    self.send_response(401 if self.deny else 200)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture(scope='module')
def auth_registry(tmp_path_factory):
  """A registry behind token auth ('silly': any bearer token is accepted)."""
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _TokenHandler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  realm = f'http://127.0.0.1:{server.server_address[1]}/token'
  try:
    with _running_registry(
        tmp_path_factory.mktemp('auth-registry'),
        f'auth:\n  silly:\n    realm: {realm}\n    service: test\n') as r:
      yield r
  finally:
    server.shutdown()
    server.server_close()


SOURCE = {
    'saved_model.pb': 5000,
    'variables/variables.data-00000-of-00001': 1_300_000,
    'variables/variables.index': 300,
    'assets/vocab.txt': b'a\nb\nc\n',
}


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  return make_tree(tmp_path_factory.mktemp('model') / 'm', SOURCE)


def _encrypt(model, keys, path, *, bundle, signer='ed'):
  pkg.encrypt_model(model, path, recipients=[keys.pub('x')],
                    signer=keys.priv(signer) if signer else None,
                    bundle=bundle, context={'model': 'taxi'})
  return str(path)


@pytest.mark.parametrize('bundle', [False, True], ids=['directory', 'bundle'])
def test_push_pull_decrypt_roundtrip(registry, keys, model, tmp_path, bundle):
  src = _encrypt(model, keys, tmp_path / ('m.tfxe' if bundle else 'm.pkg'),
                 bundle=bundle)
  tag = 'bundle' if bundle else 'directory'
  digest = oci.push_package(src, registry.ref(f'models/taxi:{tag}'),
                            insecure=True)
  assert digest.startswith('sha256:')
  out = tmp_path / 'pulled.tfxe'
  res = oci.pull_package(registry.ref(f'models/taxi:{tag}'), out,
                         trusted=[keys.pub('ed')], insecure=True)
  assert res.manifest_digest == digest
  assert res.info.signature_verified and res.info.path == str(out)
  assert os.path.isfile(out)
  pkg.decrypt_model(out, tmp_path / 'plain', identities=[keys.priv('x')],
                    trusted=[keys.pub('ed')])
  assert read_tree(tmp_path / 'plain') == read_tree(model)
  # The layer is exactly the bundle form of the package.
  if bundle:
    with open(src, 'rb') as f:
      assert f.read() == open(out, 'rb').read()
  # Pull by digest pins the same artifact; an existing OUT needs --force.
  by_digest = registry.ref(f'models/taxi@{digest}')
  with pytest.raises(errors.OutputExistsError):
    oci.pull_package(by_digest, out, trusted=[keys.pub('ed')], insecure=True)
  res2 = oci.pull_package(by_digest, out, trusted=[keys.pub('ed')],
                          insecure=True, force=True)
  assert res2.manifest_digest == digest
  assert leftovers(str(tmp_path), 'pulled.tfxe') == []


def test_manifest_and_config_carry_media_types_and_no_secret(
    registry, keys, model, tmp_path):
  src = _encrypt(model, keys, tmp_path / 'm.pkg', bundle=False)
  oci.push_package(src, registry.ref('models/meta:1'), insecure=True)
  m = registry.manifest('models/meta', '1')
  assert m['schemaVersion'] == 2
  assert m['mediaType'] == 'application/vnd.oci.image.manifest.v1+json'
  assert m['config']['mediaType'] == \
      'application/vnd.tfx-encrypt.config.v1+json'
  assert m['artifactType'] == m['config']['mediaType']
  assert len(m['layers']) == 1
  assert m['layers'][0]['mediaType'] == 'application/vnd.tfx-encrypt.package.v1'
  config = json.loads(registry.blob('models/meta', m['config']['digest']))
  info = pkg.inspect_package(src)
  assert config == {
      'format_version': header_lib.FORMAT_VERSION, 'cipher': 'aes-256-gcm',
      'fingerprint': info.fingerprint, 'package_id': info.package_id,
      'signer_key_id': info.signer,
      'recipient_key_ids': [r['key_id'] for r in info.recipients]}
  # Nothing secret: no private key material, no plaintext of the model.
  text = json.dumps(m) + json.dumps(config)
  for name in ('x', 'ed'):
    with open(keys.priv(name)) as f:
      pem = f.read()
    body = ''.join(pem.strip().splitlines()[1:-1])
    assert body[:40] not in text
  assert 'PRIVATE' not in text and 'vocab' not in text
  layer = registry.blob('models/meta', m['layers'][0]['digest'])
  assert hashlib.sha256(layer).hexdigest() == \
      m['layers'][0]['digest'].split(':')[1]
  for content in (b'a\nb\nc\n', open(os.path.join(
      model, 'saved_model.pb'), 'rb').read()[:64]):
    assert content not in layer


def test_untrusted_signer_and_unsigned_leave_nothing(registry, keys, model,
                                                     tmp_path):
  src = _encrypt(model, keys, tmp_path / 'm.tfxe', bundle=True)
  oci.push_package(src, registry.ref('models/trust:1'), insecure=True)
  out = tmp_path / 'out.tfxe'
  with pytest.raises(errors.UntrustedSignerError):
    oci.pull_package(registry.ref('models/trust:1'), out,
                     trusted=[keys.pub('evil')], insecure=True)
  assert not os.path.lexists(out) and leftovers(str(tmp_path), 'out.tfxe') == []
  unsigned = _encrypt(model, keys, tmp_path / 'u.tfxe', bundle=True,
                      signer=None)
  oci.push_package(unsigned, registry.ref('models/trust:unsigned'),
                   insecure=True)
  with pytest.raises(errors.UntrustedSignerError):
    oci.pull_package(registry.ref('models/trust:unsigned'), out,
                     trusted=[keys.pub('ed')], insecure=True)
  assert not os.path.lexists(out)
  res = oci.pull_package(registry.ref('models/trust:unsigned'), out,
                         allow_unsigned=True, insecure=True)
  assert not res.info.signature_verified and os.path.isfile(out)


def test_tampered_blob_in_registry_storage(registry, keys, model, tmp_path):
  src = _encrypt(model, keys, tmp_path / 'm.tfxe', bundle=True)
  oci.push_package(src, registry.ref('models/tamper:1'), insecure=True)
  m = registry.manifest('models/tamper', '1')
  path = registry.blob_path(m['layers'][0]['digest'])
  with open(path, 'r+b') as f:  # flip one ciphertext byte near the end
    f.seek(-100, os.SEEK_END)
    b = f.read(1)
    f.seek(-100, os.SEEK_END)
    f.write(bytes([b[0] ^ 1]))
  out = tmp_path / 'out.tfxe'
  with pytest.raises(errors.TamperedPackageError, match='digest in the manifest'):
    oci.pull_package(registry.ref('models/tamper:1'), out,
                     trusted=[keys.pub('ed')], insecure=True)
  assert not os.path.lexists(out) and leftovers(str(tmp_path), 'out.tfxe') == []


def test_tampered_bundle_pushed_under_another_tag(registry, keys, model,
                                                  tmp_path):
  """A consistent artifact (layer digest matches) whose package was modified:
  verify_package catches it."""
  src = _encrypt(model, keys, tmp_path / 'm.tfxe', bundle=True)
  bad = tmp_path / 'bad.tfxe'
  shutil.copy(src, bad)
  with open(bad, 'r+b') as f:
    f.seek(-100, os.SEEK_END)
    b = f.read(1)
    f.seek(-100, os.SEEK_END)
    f.write(bytes([b[0] ^ 1]))
  oci.push_package(bad, registry.ref('models/tamper:evil'), insecure=True)
  out = tmp_path / 'out.tfxe'
  with pytest.raises(errors.TamperedPackageError, match='payload'):
    oci.pull_package(registry.ref('models/tamper:evil'), out,
                     trusted=[keys.pub('ed')], insecure=True)
  assert not os.path.lexists(out) and leftovers(str(tmp_path), 'out.tfxe') == []


def _put_manifest(registry, repo, tag, manifest):
  req = urllib.request.Request(
      f'http://{registry.host}/v2/{repo}/manifests/{tag}', method='PUT',
      data=json.dumps(manifest).encode(),
      headers={'Content-Type': oci.OCI_MANIFEST_MEDIA_TYPE})
  urllib.request.urlopen(req, timeout=10).read()


def test_refuses_foreign_manifests_and_oversized_layers(registry, keys, model,
                                                        tmp_path):
  src = _encrypt(model, keys, tmp_path / 'm.tfxe', bundle=True)
  oci.push_package(src, registry.ref('models/shape:1'), insecure=True)
  m = registry.manifest('models/shape', '1')
  out = tmp_path / 'out.tfxe'
  two = dict(m, layers=m['layers'] * 2)
  _put_manifest(registry, 'models/shape', 'two', two)
  with pytest.raises(oci.NotAPackageArtifactError, match='exactly one layer'):
    oci.pull_package(registry.ref('models/shape:two'), out,
                     trusted=[keys.pub('ed')], insecure=True)
  other = dict(m, layers=[dict(m['layers'][0],
                               mediaType='application/octet-stream')])
  _put_manifest(registry, 'models/shape', 'other', other)
  with pytest.raises(oci.NotAPackageArtifactError, match='media type'):
    oci.pull_package(registry.ref('models/shape:other'), out,
                     trusted=[keys.pub('ed')], insecure=True)
  with pytest.raises(oci.ArtifactTooLargeError, match='bound'):
    oci.pull_package(registry.ref('models/shape:1'), out,
                     trusted=[keys.pub('ed')], insecure=True, max_bytes=1000)
  assert not os.path.lexists(out) and leftovers(str(tmp_path), 'out.tfxe') == []


def test_unknown_tag_registry_down_and_bad_refs(registry, keys, tmp_path):
  out = tmp_path / 'out.tfxe'
  with pytest.raises(oci.ArtifactNotFoundError, match='not found'):
    oci.pull_package(registry.ref('models/taxi:no-such-tag'), out,
                     trusted=[keys.pub('ed')], insecure=True)
  down = f'127.0.0.1:{_free_port()}'
  t = time.monotonic()
  with pytest.raises(oci.RegistryUnavailableError, match='cannot reach'):
    oci.pull_package(f'{down}/models/taxi:1', out, trusted=[keys.pub('ed')],
                     insecure=True)
  assert time.monotonic() - t < 10  # no retry loop with sleeps
  assert not os.path.lexists(out)
  for bad in ('models/taxi:1', 'http://127.0.0.1:5000/m:1',
              f'{registry.host}/Models:1', f'{registry.host}/m@sha256:12'):
    with pytest.raises(errors.UsageError, match='bad registry reference'):
      oci.pull_package(bad, out, trusted=[keys.pub('ed')], insecure=True)
  with pytest.raises(errors.UsageError, match='loopback'):
    oci.pull_package('registry.example.com/m:1', out,
                     trusted=[keys.pub('ed')], insecure=True)
  with pytest.raises(errors.UsageError, match='whom you trust'):
    oci.pull_package(registry.ref('models/taxi:1'), out, insecure=True)


def _cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *args],
                        capture_output=True, text=True, cwd=REPO_ROOT,
                        env=env, timeout=120)


def test_cli_push_pull_end_to_end(registry, keys, model, tmp_path):
  src = _encrypt(model, keys, tmp_path / 'm.pkg', bundle=False)
  ref = registry.ref('cli/taxi:7')
  r = _cli('push', src, ref, '--insecure')
  assert r.returncode == 0, r.stderr
  assert 'sha256:' in r.stdout and ref in r.stdout
  out = tmp_path / 'pulled.tfxe'
  r = _cli('pull', ref, str(out), '--trust', keys.pub('ed'), '--insecure')
  assert r.returncode == 0, r.stderr
  assert 'signed by trusted' in r.stdout
  pkg.decrypt_model(out, tmp_path / 'plain', identities=[keys.priv('x')],
                    trusted=[keys.pub('ed')])
  assert read_tree(tmp_path / 'plain') == read_tree(model)
  # Errors are one line, with the error class's exit code.
  r = _cli('pull', ref, str(out), '--trust', keys.pub('ed'), '--insecure')
  assert r.returncode == errors.OutputExistsError.exit_code
  assert r.stderr.count('\n') == 1 and 'already exists' in r.stderr
  r = _cli('pull', ref, str(tmp_path / 'x.tfxe'), '--trust',
           keys.pub('evil'), '--insecure')
  assert r.returncode == errors.UntrustedSignerError.exit_code, r.stderr
  assert r.stderr.startswith('tfx-encrypt: error: ') and \
      r.stderr.count('\n') == 1
  assert not os.path.lexists(tmp_path / 'x.tfxe')
  r = _cli('pull', registry.ref('cli/taxi:missing'), str(tmp_path / 'x.tfxe'),
           '--allow-unsigned', '--insecure')
  assert r.returncode == oci.RegistryError.exit_code
  assert 'not found' in r.stderr and r.stderr.count('\n') == 1
  r = _cli('pull', ref, str(tmp_path / 'x.tfxe'), '--insecure')
  assert r.returncode == 2 and 'whom you trust' in r.stderr
  r = _cli('push', src, f'127.0.0.1:{_free_port()}/cli/taxi:1', '--insecure')
  assert r.returncode == oci.RegistryError.exit_code
  assert 'cannot reach' in r.stderr and r.stderr.count('\n') == 1
  assert glob.glob(str(tmp_path / '.x.tfxe*')) == []


def test_missing_oras_is_a_usage_error(monkeypatch, tmp_path, keys):
  monkeypatch.setitem(sys.modules, 'oras', None)
  monkeypatch.setitem(sys.modules, 'oras.provider', None)
  with pytest.raises(errors.UsageError, match=r"pip install 'tfx-encrypt\[oci\]'"):
    oci.pull_package('127.0.0.1:5000/m:1', tmp_path / 'o.tfxe',
                     trusted=[keys.pub('ed')], insecure=True)


def test_token_auth_granted_and_denied(auth_registry, keys, model, tmp_path,
                                       monkeypatch):
  src = _encrypt(model, keys, tmp_path / 'm.tfxe', bundle=True)
  ref = auth_registry.ref('auth/taxi:1')
  oci.push_package(src, ref, insecure=True)  # anonymous token granted
  out = tmp_path / 'out.tfxe'
  oci.pull_package(ref, out, trusted=[keys.pub('ed')], insecure=True)
  assert os.path.isfile(out)
  monkeypatch.setattr(_TokenHandler, 'deny', True)
  out2 = tmp_path / 'out2.tfxe'
  with pytest.raises(oci.RegistryAuthError, match='docker login'):
    oci.pull_package(ref, out2, trusted=[keys.pub('ed')], insecure=True)
  assert not os.path.lexists(out2)
  env = dict(os.environ, HOME=str(tmp_path))  # no docker config
  r = _cli('pull', ref, str(out2), '--trust', keys.pub('ed'), '--insecure',
           env=env)
  assert r.returncode == oci.RegistryError.exit_code
  assert r.stderr.startswith('tfx-encrypt: error: registry ') and \
      'docker login' in r.stderr and r.stderr.count('\n') == 1, r.stderr
  assert not os.path.lexists(out2)
