"""Push packages to, and pull them from, OCI registries (oras-py).

A package travels as an OCI image manifest with exactly ONE layer: the bundle
bytes (FORMAT.md §2), media type `application/vnd.tfx-encrypt.package.v1`.
The manifest's config (media type
`application/vnd.tfx-encrypt.config.v1+json`) holds public header facts
only. `pull_package` checks the manifest's shape, the layer's size bound and
digest, then runs `verify_package` (signature + every ciphertext digest, no
key needed) on a private temporary copy before publishing the bundle
atomically. See docs/DISTRIBUTION.md.

Credentials: `RegistryAuth` (basic auth user and password, a TLS client
certificate for mutual TLS, the registry's CA), else the docker config.
Registries that challenge with `Basic` (htpasswd) are answered here, those
that challenge with `Bearer` by oras's token flow.

`oras` (and `requests`) are imported lazily: `import tfx_encrypt` and
`import tfx_encrypt.distribution` work without the `[oci]` extra.
"""

import dataclasses
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import tempfile
import urllib.parse
from typing import Any, Dict, Optional, Sequence, Tuple

from tfx_encrypt import _fsutil
from tfx_encrypt import _signals
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt import package as pkg
from tfx_encrypt import policy as policy_lib
from tfx_encrypt import storage

#: Media type of the single layer: the package's bundle bytes.
PACKAGE_MEDIA_TYPE = 'application/vnd.tfx-encrypt.package.v1'
#: Media type (and OCI 1.1 artifact type) of the config blob.
CONFIG_MEDIA_TYPE = 'application/vnd.tfx-encrypt.config.v1+json'
OCI_MANIFEST_MEDIA_TYPE = 'application/vnd.oci.image.manifest.v1+json'
TITLE_ANNOTATION = 'org.opencontainers.image.title'
CREATED_ANNOTATION = 'org.opencontainers.image.created'
#: Largest layer `pull_package` accepts unless told otherwise (64 GiB).
DEFAULT_MAX_PACKAGE_BYTES = 64 << 30
#: Bounds on the small JSON documents read from a registry.
MAX_MANIFEST_BYTES = 1 << 20
MAX_CONFIG_BYTES = 64 << 10
#: Upload chunk size (memory per push is about one chunk).
CHUNK_BYTES = 8 << 20
#: Seconds to connect, and between bytes, before a registry counts as down.
DEFAULT_TIMEOUT = 60.0

_REPO_RE = re.compile(
    r'^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*'
    r'(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$')
_TAG_RE = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$')
_DIGEST_RE = re.compile(r'^sha256:[a-f0-9]{64}$')
_HOST_RE = re.compile(r'^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?$')


# --- errors ---------------------------------------------------------------------

class RegistryError(errors.TfxEncryptError):
  """The registry refused or failed a request."""
  exit_code = 10


class RegistryUnavailableError(RegistryError):
  """The registry could not be reached (down, wrong address, TLS, timeout)."""


class RegistryAuthError(RegistryError):
  """The registry wants credentials, or refused the ones it got (401/403)."""


class ClientCertificateError(RegistryAuthError):
  """The registry refused the TLS client certificate, or wants one (mTLS)."""


# --- authentication and TLS ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RegistryAuth:
  """Credentials and TLS settings for one push or pull (besides docker's).

  Attributes:
    username: HTTP basic auth user name (``--username``); the password comes
      with it. Without one, credentials come from the docker config.
    password: its password (``--password-stdin``, ``TFXE_REGISTRY_PASSWORD``;
      never a command-line argument). Not shown by ``repr``.
    ca_file: PEM bundle of the CA(s) that issued the registry's certificate
      (``--ca-file``); replaces the system CAs for this registry and its
      token service.
    cert_file: PEM client certificate (chain) for mutual TLS (``--cert-file``).
    key_file: its private key, an unencrypted PEM file (``--key-file``).
  """
  username: Optional[str] = None
  password: Optional[str] = dataclasses.field(default=None, repr=False)
  ca_file: Optional[str] = None
  cert_file: Optional[str] = None
  key_file: Optional[str] = None

  def check(self) -> None:
    """Refuses incomplete or unusable settings before any request."""
    if (self.username is None) != (self.password is None):
      raise errors.UsageError(
          'registry credentials need both a user name and a password: '
          '--username USER with --password-stdin or TFXE_REGISTRY_PASSWORD')
    if self.username is not None and (not self.username or
                                      ':' in self.username):
      raise errors.UsageError(
          'the registry user name must be non-empty and contain no ":"')
    if (self.cert_file is None) != (self.key_file is None):
      raise errors.UsageError(
          'a TLS client certificate needs both --cert-file and --key-file')
    if self.ca_file is not None and not os.path.isfile(self.ca_file):
      raise errors.UsageError(f'--ca-file {self.ca_file}: no such file')
    if self.cert_file is not None:
      _check_client_pair(self.cert_file, self.key_file)


def _check_client_pair(cert_file: str, key_file: str) -> None:
  """Loads the pair once, so that a bad file fails here, in one line."""
  import ssl  # pylint: disable=g-import-not-at-top
  for flag, path in (('--cert-file', cert_file), ('--key-file', key_file)):
    if not os.path.isfile(path):
      raise errors.UsageError(f'{flag} {path}: no such file')
  ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
  try:
    # A password callback that gives none: an encrypted key fails here
    # instead of OpenSSL prompting on the terminal later.
    ctx.load_cert_chain(cert_file, key_file, password=lambda: b'')
  except ssl.SSLError as e:
    raise errors.UsageError(
        f'cannot use the TLS client certificate {cert_file} with the key '
        f'{key_file} ({e.reason or "invalid"}): both must be PEM, the key '
        'unencrypted and matching the certificate') from None
  except OSError as e:
    raise errors.UsageError(
        f'cannot read the TLS client certificate or key ({e.strerror})'
    ) from None


def _tls_alert(e: Exception) -> Optional[str]:
  """The TLS alert a registry sent about our certificate, if that is it."""
  text = str(e).lower()
  for alert in ('certificate required', 'unknown ca', 'bad certificate',
                'certificate expired', 'certificate revoked',
                'certificate unknown', 'unsupported certificate',
                'access denied'):
    if f'alert {alert}' in text:
      return alert
  return None


class ArtifactNotFoundError(RegistryError):
  """The repository, tag, digest or a blob is unknown to the registry."""


class NotAPackageArtifactError(errors.UnsupportedFormatError):
  """The artifact at the reference is not a tfx-encrypt package."""


class ArtifactTooLargeError(errors.UnsupportedFormatError):
  """The package layer is larger than the pull's size bound."""


# --- references -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Reference:
  """REGISTRY/REPOSITORY[:TAG][@DIGEST]."""
  registry: str
  repository: str
  tag: Optional[str]
  digest: Optional[str]

  def __str__(self) -> str:
    s = f'{self.registry}/{self.repository}'
    if self.tag:
      s += f':{self.tag}'
    if self.digest:
      s += f'@{self.digest}'
    return s

  @property
  def manifest_ref(self) -> str:
    return self.digest or self.tag or 'latest'


def parse_reference(ref: str) -> Reference:
  """Parse REGISTRY/REPOSITORY:TAG (or @sha256:DIGEST); the registry is required."""
  usage = (f'bad registry reference {ref!r}: expected REGISTRY/REPOSITORY:TAG '
           'or REGISTRY/REPOSITORY@sha256:DIGEST, e.g. '
           'ghcr.io/acme/models/taxi:7 or 127.0.0.1:5000/models/taxi:7')
  rest, digest = ref, None
  if '@' in rest:
    rest, _, digest = rest.partition('@')
    if not _DIGEST_RE.match(digest):
      raise errors.UsageError(usage)
  registry, slash, path = rest.partition('/')
  if not slash or not _HOST_RE.match(registry) or not (
      '.' in registry or ':' in registry or registry == 'localhost'):
    raise errors.UsageError(usage)
  tag = None
  last = path.rsplit('/', 1)[-1]
  if ':' in last:
    path, _, tag = path.rpartition(':')
    if not _TAG_RE.match(tag):
      raise errors.UsageError(usage)
  if not _REPO_RE.match(path):
    raise errors.UsageError(usage)
  return Reference(registry, path, tag, digest)


def _is_loopback(registry: str) -> bool:
  host = registry
  if host.startswith('['):
    host = host[1:host.index(']')]
  elif host.count(':') == 1:
    host = host.split(':')[0]
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


# --- registry client (oras) -------------------------------------------------------

def _import_oras():
  try:
    import oras.provider  # pylint: disable=g-import-not-at-top
    import requests  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if (e.name or '').split('.')[0] not in ('oras', 'requests'):
      raise
    raise errors.UsageError(
        'pushing to and pulling from OCI registries needs oras, which is not '
        "installed: pip install 'tfx-encrypt[oci]'") from e
  # oras logs its own view of failures (e.g. "This endpoint requires a
  # token") through stdlib logging; without a handler Python would print them
  # on stderr next to our typed error. A NullHandler keeps them available to
  # applications that configure logging, and off a bare stderr.
  oras_log = logging.getLogger('oras')
  if not any(isinstance(h, logging.NullHandler) for h in oras_log.handlers):
    oras_log.addHandler(logging.NullHandler())
  return oras.provider, requests


def _docker_configs() -> Optional[list]:
  d = os.environ.get('DOCKER_CONFIG')
  if d and os.path.isfile(os.path.join(d, 'config.json')):
    return [os.path.join(d, 'config.json')]
  return None


class _Client:
  """One registry + repository, through oras's Registry (auth, session).

  oras's `do_request` retries every failure five times with growing sleeps
  (minutes against a registry that is down); this client calls it once, with
  a timeout, and turns transport failures into typed errors.
  """

  def __init__(self, ref: Reference, insecure: bool, timeout: float,
               auth: Optional[RegistryAuth] = None):
    if insecure and not _is_loopback(ref.registry):
      raise errors.UsageError(
          f'--insecure (plain HTTP) is only allowed for a loopback registry '
          f'(localhost, 127.0.0.0/8, ::1), not {ref.registry}; use HTTPS')
    auth = auth or RegistryAuth()
    auth.check()
    if insecure and (auth.cert_file or auth.ca_file):
      raise errors.UsageError(
          '--insecure (plain HTTP) cannot be combined with --ca-file, '
          '--cert-file or --key-file (TLS settings)')
    provider, requests = _import_oras()
    self._requests = requests
    self.ref = ref
    self._auth = auth
    self._basic: Optional[str] = None  # the registry asked for basic auth
    self.reg = provider.Registry(hostname=ref.registry, insecure=insecure,
                                 tls_verify=auth.ca_file or True)
    session = self.reg.session
    if auth.cert_file:
      session.cert = (auth.cert_file, auth.key_file)
    plain_request = session.request

    def request(method, url, **kwargs):
      kwargs.setdefault('timeout', timeout)
      return plain_request(method, url, **kwargs)
    session.request = request
    self._do = provider.Registry.do_request.__wrapped__
    self.base = f'{self.reg.prefix}://{ref.registry}/v2/{ref.repository}'
    try:
      self.reg.auth.load_configs(self._container(), configs=_docker_configs())
    except (OSError, ValueError) as e:
      raise RegistryAuthError(
          f'cannot read the docker credentials config: {type(e).__name__}; '
          'fix ~/.docker/config.json (or $DOCKER_CONFIG/config.json)') from None
    if auth.username is not None:  # explicit credentials win
      self.reg.auth.set_basic_auth(auth.username, auth.password)
    self._answer_basic_challenges()

  def _answer_basic_challenges(self) -> None:
    """Answers `WWW-Authenticate: Basic` (htpasswd registries) too.

    oras-py's token backend answers only bearer-token challenges (it would
    request a token from the basic realm's name). A registry that asks for
    basic auth gets the credentials (explicit, or from the docker config)
    on the retry, and on every later request of this client without a
    challenge first; no credentials: RegistryAuthError.
    """
    backend = self.reg.auth
    token_flow = backend.authenticate_request

    def authenticate(original, headers, refresh=False):
      challenge = original.headers.get('Www-Authenticate', '')
      if not challenge.lower().startswith('basic'):
        return token_flow(original, headers, refresh)
      basic = getattr(backend, '_basic_auth', None)
      if not basic:
        return headers, False
      headers = dict(headers or {})
      headers['Authorization'] = f'Basic {basic}'
      self._basic = basic
      return headers, True
    backend.authenticate_request = authenticate

  def _container(self):
    import oras.container  # pylint: disable=g-import-not-at-top
    return oras.container.Container(
        f'{self.ref.repository}:{self.ref.tag or "latest"}',
        registry=self.ref.registry)

  def request(self, method: str, url: str, what: str, *,
              ok: Sequence[int] = (200, 201, 202), **kwargs):
    """One request (oras handles the token dance); typed errors otherwise."""
    requests = self._requests
    if self._basic is not None:
      headers = dict(kwargs.get('headers') or {})
      headers.setdefault('Authorization', f'Basic {self._basic}')
      kwargs['headers'] = headers
    try:
      r = self._do(self.reg, url, method, **kwargs)
    except requests.exceptions.SSLError as e:
      raise self._tls_error(e, what) from None
    except (requests.exceptions.ConnectionError,
            requests.exceptions.Timeout) as e:
      if _tls_alert(e):  # TLS 1.3: the refusal arrives after the handshake
        raise self._tls_error(e, what) from None
      host = urllib.parse.urlsplit(
          getattr(getattr(e, 'request', None), 'url', None) or '').netloc
      if host and host != self.ref.registry:  # e.g. its token service
        raise RegistryUnavailableError(
            f'cannot reach {host}, which registry {self.ref.registry} named '
            f'for authentication, to {what} ({type(e).__name__}); check the '
            "registry's auth configuration") from None
      raise RegistryUnavailableError(
          f'cannot reach registry {self.ref.registry} to {what} '
          f'({type(e).__name__}); check the address and that the registry is '
          'running') from None
    except requests.exceptions.RequestException as e:
      raise RegistryError(
          f'request to registry {self.ref.registry} failed while trying to '
          f'{what} ({type(e).__name__})') from None
    except ValueError:  # oras: 401/403 it cannot answer (no usable creds)
      raise self._auth_error(what, None) from None
    if r.status_code in ok:
      return r
    codes = _oci_error_codes(r)
    r.close()
    if r.status_code in (401, 403):
      raise self._auth_error(what, r.status_code)
    if r.status_code == 404:
      if 'MANIFEST_UNKNOWN' in codes or '/manifests/' in url:
        raise ArtifactNotFoundError(
            f'{self.ref} not found (manifest unknown): check the repository '
            'and the tag or digest; pushed tags are listed by '
            f'GET /v2/{self.ref.repository}/tags/list')
      if 'NAME_UNKNOWN' in codes:
        raise ArtifactNotFoundError(
            f'repository {self.ref.repository} does not exist on '
            f'{self.ref.registry}')
      raise ArtifactNotFoundError(
          f'registry {self.ref.registry} has no blob for {self.ref} '
          f'({", ".join(codes) or "404"}) while trying to {what}; the '
          'artifact is incomplete, push it again')
    raise RegistryError(
        f'registry {self.ref.registry} answered HTTP {r.status_code} '
        f'{", ".join(codes)} while trying to {what}'.rstrip())

  def _auth_error(self, what: str, status: Optional[int]) -> RegistryAuthError:
    code = f' (HTTP {status})' if status else ''
    if self._auth.username is not None:
      return RegistryAuthError(
          f'registry {self.ref.registry} refused to {what}{code} for user '
          f'{self._auth.username!r}: check the user name and password and '
          f'your permissions on {self.ref.repository}')
    return RegistryAuthError(
        f'registry {self.ref.registry} refused to {what}{code}: log in with '
        f'`docker login {self.ref.registry}` (credentials are read from '
        '~/.docker/config.json, $DOCKER_CONFIG or a credential helper), or '
        'pass --username with --password-stdin, and check your permissions '
        f'on {self.ref.repository}')

  def _tls_error(self, e: Exception, what: str) -> RegistryError:
    """A TLS failure, typed: our client certificate, or theirs."""
    alert = _tls_alert(e)
    host = self.ref.registry
    if alert == 'certificate required' or (
        alert and self._auth.cert_file is None):
      return ClientCertificateError(
          f'registry {host} requires a TLS client certificate to {what} '
          f'(TLS alert: {alert}): pass --cert-file and --key-file')
    if alert:
      return ClientCertificateError(
          f'registry {host} refused the TLS client certificate '
          f'{self._auth.cert_file} (TLS alert: {alert}) while trying to '
          f'{what}: it must be issued by a CA the registry trusts '
          '(http.tls.clientcas), valid now and not revoked')
    text = str(e)
    if 'CERTIFICATE_VERIFY_FAILED' in text:
      hint = ('pass the CA that issued it with --ca-file' if
              self._auth.ca_file is None else
              f'it is not issued by a CA in {self._auth.ca_file}')
      return RegistryUnavailableError(
          f'the TLS certificate of registry {host} is not trusted while '
          f'trying to {what}: {hint} (for a plain-HTTP loopback test '
          'registry, pass --insecure)')
    return RegistryUnavailableError(
        f'TLS handshake with registry {host} failed while trying to {what}; '
        'check its certificate and address (or, for a plain-HTTP loopback '
        'test registry, pass --insecure)')

  # -- blobs and manifests --

  def blob_exists(self, digest: str) -> bool:
    r = self.request('HEAD', f'{self.base}/blobs/{digest}', 'check a blob',
                     ok=(200, 404))
    return r.status_code == 200

  def _start_upload(self) -> str:
    r = self.request('POST', f'{self.base}/blobs/uploads/', 'start an upload',
                     headers={'Content-Length': '0'})
    return self._location(r)

  def _location(self, r) -> str:
    loc = r.headers.get('Location', '')
    if not loc:
      raise RegistryError(
          f'registry {self.ref.registry} gave no upload location')
    if not loc.startswith(('http://', 'https://')):
      loc = f'{self.reg.prefix}://{self.ref.registry}{loc}'
    return loc

  def _finish_upload(self, loc: str, digest: str, data: bytes = b'') -> None:
    sep = '&' if '?' in loc else '?'
    self.request('PUT', f'{loc}{sep}digest={digest}', 'finish an upload',
                 data=data, headers={'Content-Type': 'application/octet-stream',
                                     'Content-Length': str(len(data))})

  def upload_bytes(self, data: bytes, digest: str) -> None:
    if not self.blob_exists(digest):
      self._finish_upload(self._start_upload(), digest, data)

  def upload_file(self, path: str, digest: str, size: int) -> None:
    """Chunked upload (PATCH per CHUNK_BYTES): memory is one chunk."""
    if self.blob_exists(digest):
      return
    loc = self._start_upload()
    pos = 0
    with open(path, 'rb') as f:
      while pos < size:
        chunk = f.read(min(CHUNK_BYTES, size - pos))
        if not chunk:
          raise errors.TamperedPackageError(
              f'{path} shrank while it was being pushed')
        r = self.request(
            'PATCH', loc, 'upload the package',
            data=chunk, headers={
                'Content-Type': 'application/octet-stream',
                'Content-Range': f'{pos}-{pos + len(chunk) - 1}',
                'Content-Length': str(len(chunk))})
        loc = self._location(r)
        pos += len(chunk)
    self._finish_upload(loc, digest)

  def upload_chunks(self, chunks) -> Tuple[str, int]:
    """Chunked upload of the blob made of `chunks` (an iterable of bytes),
    hashed as it goes: (digest, size). For a source read only once (a
    package on an object store); memory is one chunk."""
    loc = self._start_upload()
    h = hashlib.sha256()
    pos = 0
    for chunk in chunks:
      if not chunk:
        continue
      h.update(chunk)
      r = self.request(
          'PATCH', loc, 'upload the package',
          data=chunk, headers={
              'Content-Type': 'application/octet-stream',
              'Content-Range': f'{pos}-{pos + len(chunk) - 1}',
              'Content-Length': str(len(chunk))})
      loc = self._location(r)
      pos += len(chunk)
    digest = f'sha256:{h.hexdigest()}'
    self._finish_upload(loc, digest)
    return digest, pos

  def put_manifest(self, body: bytes, tag: str) -> Optional[str]:
    r = self.request('PUT', f'{self.base}/manifests/{tag}', 'push the manifest',
                     data=body, headers={'Content-Type': OCI_MANIFEST_MEDIA_TYPE})
    return r.headers.get('Docker-Content-Digest')

  def get_small(self, url: str, what: str, limit: int,
                headers: Optional[dict] = None) -> Tuple[bytes, Any]:
    r = self.request('GET', url, what, stream=True, headers=headers or {})
    with r:
      buf = bytearray()
      for chunk in r.iter_content(64 << 10):
        buf += chunk
        if len(buf) > limit:
          raise NotAPackageArtifactError(
              f'{self.ref}: the {what.split()[-1]} is larger than {limit} '
              'bytes; this is not a tfx-encrypt package artifact')
      return bytes(buf), r.headers

  def download(self, digest: str, size: int, fd: int) -> None:
    """Stream the blob into fd, refusing more than `size` bytes; check digest."""
    r = self.request('GET', f'{self.base}/blobs/{digest}',
                     'download the package', stream=True)
    h = hashlib.sha256()
    got = 0
    with r:
      try:
        for chunk in r.iter_content(1 << 20):
          got += len(chunk)
          if got > size:
            raise errors.TamperedPackageError(
                f'{self.ref}: the registry sent more than the {size} bytes '
                'the manifest declares for the package layer')
          h.update(chunk)
          _fsutil.write_all(fd, chunk)
      except (self._requests.exceptions.ConnectionError,
              self._requests.exceptions.Timeout) as e:
        raise RegistryUnavailableError(
            f'download of {self.ref} from {self.ref.registry} was '
            f'interrupted ({type(e).__name__}); try again') from None
    if got != size or f'sha256:{h.hexdigest()}' != digest:
      raise errors.TamperedPackageError(
          f'{self.ref}: the package layer does not match its digest in the '
          'manifest (corrupted or modified in the registry)')


def _oci_error_codes(r) -> list:
  try:
    if int(r.headers.get('Content-Length') or 0) > 65536:
      return []
    body = r.json()
    return [str(e.get('code'))[:64] for e in body.get('errors', [])[:5]
            if isinstance(e, dict) and e.get('code')]
  except Exception:  # pylint: disable=broad-except  # any non-OCI error body
    return []


# --- push -----------------------------------------------------------------------

def config_facts(info: pkg.PackageInfo) -> Dict[str, Any]:
  """The manifest config: public header facts only (nothing secret)."""
  return {
      'format_version': info.format_version,
      'cipher': info.cipher,
      'fingerprint': info.fingerprint,
      'package_id': info.package_id,
      'signer_key_id': info.signer,
      'recipient_key_ids': [r['key_id'] for r in info.recipients],
  }


def _canonical(obj) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(',', ':'),
                    ensure_ascii=True).encode('ascii')


def push_package(package, ref: str, *, insecure: bool = False,
                 timeout: float = DEFAULT_TIMEOUT,
                 auth: Optional[RegistryAuth] = None) -> str:
  """Push a package (directory or bundle) to REGISTRY/REPOSITORY:TAG.

  `package` may be a `gs://` / `s3://` URI: it is then streamed from the
  store into the registry (no local copy), each payload's ciphertext digest
  checked on the way; a package that fails, or an incomplete push on the
  store (payloads without a header), is refused before the manifest is
  pushed, so the tag never names it.

  The artifact is one OCI manifest whose single layer is the bundle bytes
  (a directory package is first streamed into a bundle in a private temporary
  directory) and whose config holds `config_facts`. Credentials come from
  `auth` (basic auth, TLS client certificate, CA file; `RegistryAuth`), else
  the docker config (`~/.docker/config.json`, `$DOCKER_CONFIG`, credential
  helpers). `insecure` (plain HTTP) is accepted for loopback registries only.

  Returns the manifest digest (`sha256:...`): pull by
  `REGISTRY/REPOSITORY@DIGEST` to pin exactly this artifact.
  """
  r = parse_reference(ref)
  if r.digest:
    raise errors.UsageError(
        f'push to a tag (REGISTRY/REPOSITORY:TAG), not a digest: {ref}')
  r = dataclasses.replace(r, tag=r.tag or 'latest')
  remote = storage.is_remote(os.fspath(package))
  package = (os.fspath(package).rstrip('/') if remote else
             os.path.abspath(os.fspath(package)))
  # A package at all? (no key needed; on a store, an incomplete push --
  # payloads without a header -- is refused here, before any request.)
  info = pkg.inspect_package(package)
  client = _Client(r, insecure, timeout, auth)
  tmpdir = None
  try:
    if remote:
      # Streamed from the store, bundle bytes in order, each object pinned
      # to the version opened; every payload's ciphertext digest checked
      # on the way, before the manifest (the registry's commit) is pushed.
      digest, size = client.upload_chunks(_remote_bundle_chunks(package,
                                                                 info))
    else:
      tmpdir = tempfile.mkdtemp(prefix='tfxe-push-')  # 0700
      if info.bundle:
        blob = package
      else:
        blob = os.path.join(tmpdir, 'package.tfxe')
        pkg.bundle_directory_package(package, blob)
        bundled = pkg.inspect_package(blob)
        if (bundled.package_id, bundled.fingerprint) != (info.package_id,
                                                         info.fingerprint):
          raise errors.TamperedPackageError(
              f'{package} changed while it was being pushed; push it again')
      hexdigest, size = _fsutil.hash_file(blob, 'sha256')
      digest = f'sha256:{hexdigest}'
      client.upload_file(blob, digest, size)
    config = _canonical(config_facts(info))
    config_digest = f'sha256:{hashlib.sha256(config).hexdigest()}'
    client.upload_bytes(config, config_digest)
    name = package.rstrip('/').rsplit('/', 1)[-1]
    if not name.endswith(pkg.BUNDLE_SUFFIX):
      name += pkg.BUNDLE_SUFFIX
    manifest = _canonical({
        'schemaVersion': 2,
        'mediaType': OCI_MANIFEST_MEDIA_TYPE,
        'artifactType': CONFIG_MEDIA_TYPE,
        'config': {'mediaType': CONFIG_MEDIA_TYPE, 'digest': config_digest,
                   'size': len(config)},
        'layers': [{'mediaType': PACKAGE_MEDIA_TYPE, 'digest': digest,
                    'size': size,
                    'annotations': {TITLE_ANNOTATION: name}}],
        'annotations': {CREATED_ANNOTATION: info.created},
    })
    manifest_digest = f'sha256:{hashlib.sha256(manifest).hexdigest()}'
    echoed = client.put_manifest(manifest, r.tag)
    if echoed and echoed != manifest_digest:
      raise RegistryError(
          f'registry {r.registry} stored the manifest under {echoed}, not '
          f'{manifest_digest}; it rewrote the manifest, pull by tag instead')
    return manifest_digest
  finally:
    if tmpdir is not None:
      _fsutil.remove_tree(tmpdir)


def _remote_bundle_chunks(uri: str, info: pkg.PackageInfo):
  """Yield the bundle bytes of the package at `uri` (s3://, gs://) in
  chunks of at most CHUNK_BYTES, read from the store (FORMAT.md §2: the
  header, then the payloads in index order).

  The header is parsed from the very object version that is streamed and
  must be the package `inspect_package` described (`info`); each payload
  object must have its declared size and ciphertext digest
  (TamperedPackageError otherwise, raised before the manifest is pushed).
  Memory: one chunk, plus one storage chunk per open object.
  """
  from tfx_encrypt.format import digest as digest_lib  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.format.header import Header  # pylint: disable=g-import-not-at-top

  def changed(why: str) -> errors.TamperedPackageError:
    return errors.TamperedPackageError(
        f'{_text.printable(uri)} changed while it was being pushed ({why}); '
        'push it again')

  def stream(reader, start: int, length: int, hasher=None):
    pos, end = start, start + length
    while pos < end:
      chunk = reader.read_range(pos, min(CHUNK_BYTES, end - pos))
      if not chunk:
        raise changed('an object is shorter than its header says')
      if hasher is not None:
        hasher.update(chunk)
      pos += len(chunk)
      yield chunk

  first = uri if info.bundle else storage.join(uri, pkg.HEADER_NAME)
  with storage.open_reader(first) as reader:
    h, hlen = Header.read(storage.ReaderFile(reader))
    # What the config says (config_facts(info)) must describe these bytes.
    if (h.package_id.hex(), h.fingerprint,
        h.signature.key_id if h.signature else None,
        [s.key_id for s in h.recipients]) != (
            info.package_id, info.fingerprint, info.signer,
            [r['key_id'] for r in info.recipients]):
      raise changed('another package or header is there now')
    sizes = [size for size, _ in h.payloads]
    want = hlen + sum(sizes) if info.bundle else hlen
    if reader.size != want:
      raise changed('wrong length for its header')
    yield from stream(reader, 0, hlen)
    offset = hlen
    for i, (size, digest) in enumerate(h.payloads):
      hasher = digest_lib.new_hash(h.hash_alg)
      if info.bundle:
        yield from stream(reader, offset, size, hasher)
        offset += size
      else:
        try:
          payload = storage.open_reader(
              storage.join(uri, pkg.PAYLOAD_DIR, pkg.payload_name(i)))
        except FileNotFoundError:
          raise changed(f'payload {i} is gone') from None
        with payload:
          if payload.size != size:
            raise changed(f'payload {i} has the wrong size')
          yield from stream(payload, 0, size, hasher)
      if hasher.hexdigest() != digest:
        raise errors.TamperedPackageError(
            f'payload {i} of {_text.printable(uri)} does not match its '
            'digest in the header; the package was modified. Nothing was '
            'tagged')


# --- pull -----------------------------------------------------------------------

@dataclasses.dataclass
class PullResult:
  """What `pull_package` published."""
  info: pkg.PackageInfo  # of the verified bundle at `out`
  manifest_digest: str
  layer_digest: str


def _descriptor(d: Any, media_type: str, ref: Reference, what: str) -> Tuple[str, int]:
  if (not isinstance(d, dict) or d.get('mediaType') != media_type
      or not isinstance(d.get('digest'), str)
      or not _DIGEST_RE.match(d['digest'])
      or not isinstance(d.get('size'), int) or isinstance(d['size'], bool)
      or d['size'] < 0):
    got = d.get('mediaType') if isinstance(d, dict) else None
    raise NotAPackageArtifactError(
        f'{ref} is not a tfx-encrypt package: its {what} has media type '
        f'{got!r} (expected {media_type}) or a malformed descriptor')
  return d['digest'], d['size']


def _parse_manifest(body: bytes, ref: Reference, max_bytes: int
                    ) -> Tuple[Tuple[str, int], Tuple[str, int]]:
  try:
    m = json.loads(body)
  except ValueError:
    raise NotAPackageArtifactError(f'{ref}: the manifest is not JSON') from None
  if not isinstance(m, dict) or m.get('schemaVersion') != 2 or \
      m.get('mediaType', OCI_MANIFEST_MEDIA_TYPE) != OCI_MANIFEST_MEDIA_TYPE:
    raise NotAPackageArtifactError(
        f'{ref} is not a tfx-encrypt package: expected an OCI image manifest '
        f'({OCI_MANIFEST_MEDIA_TYPE}), got '
        f'{m.get("mediaType") if isinstance(m, dict) else type(m).__name__!r}')
  config = _descriptor(m.get('config'), CONFIG_MEDIA_TYPE, ref, 'config')
  layers = m.get('layers')
  if not isinstance(layers, list) or len(layers) != 1:
    raise NotAPackageArtifactError(
        f'{ref} is not a tfx-encrypt package: expected exactly one layer, '
        f'found {len(layers) if isinstance(layers, list) else "none"}')
  layer = _descriptor(layers[0], PACKAGE_MEDIA_TYPE, ref, 'layer')
  if layer[1] > max_bytes:
    raise ArtifactTooLargeError(
        f'{ref}: the package layer is {layer[1]} bytes, more than the '
        f'{max_bytes}-byte bound; raise max_bytes if you expect a package '
        'that large')
  if config[1] > MAX_CONFIG_BYTES:
    raise NotAPackageArtifactError(
        f'{ref}: the config blob is larger than {MAX_CONFIG_BYTES} bytes')
  return config, layer


def pull_package(ref: str, out, *, trusted: Sequence[pkg.KeyLike] = (),
                 allow_unsigned: bool = False, insecure: bool = False,
                 force: bool = False, max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES,
                 timeout: float = DEFAULT_TIMEOUT,
                 policy: Optional[policy_lib.Policy] = None,
                 auth: Optional[RegistryAuth] = None) -> PullResult:
  """Pull a package from the registry into `out`, verified.

  `out` is a bundle file, or a `gs://` / `s3://` URI: there the package is
  written as EncryptPusher pushes (docs/OBJECT_STORES.md): the directory
  form (`out/payload/...`, then `out/tfxe.header` as the commit point), or
  the one bundle object if `out` ends in `.tfxe`; every object
  create-only, after the whole package was verified in a private local
  staging file (ciphertext only); objects written are deleted on failure;
  an existing `out` is never replaced (no `force` there).

  Refuses a manifest that is not exactly {config: tfx-encrypt config, one
  layer: tfx-encrypt package}, and a layer larger than `max_bytes` (default
  64 GiB). The layer is streamed into a private temporary sibling of `out`
  (checking its size and sha256 digest), then `verify_package` checks the
  signature against `trusted` (or accepts an unsigned package only with
  `allow_unsigned`) and every ciphertext digest, and the config is checked
  against the header. With `policy`, the signed context must satisfy it too
  (PolicyError, checked right after the signature). Only then is `out`
  published atomically; on any error nothing is left at `out`. `auth` as
  for `push_package`.
  """
  r = parse_reference(ref)
  remote = storage.is_remote(os.fspath(out))
  if not trusted and not allow_unsigned:
    raise errors.UsageError(
        'say whom you trust: --trust PUBLISHER_PUBLIC_KEY, or --allow-unsigned')
  if remote:
    out = os.fspath(out).rstrip('/')
    _check_store_output(out, force)
  else:
    out = os.path.abspath(os.fspath(out))
    out = _fsutil.check_output(out, force=force)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
      raise errors.UsageError(f'parent directory {parent} does not exist')
  client = _Client(r, insecure, timeout, auth)
  body, headers = client.get_small(
      f'{client.base}/manifests/{r.manifest_ref}', 'fetch the manifest',
      MAX_MANIFEST_BYTES, headers={'Accept': OCI_MANIFEST_MEDIA_TYPE})
  manifest_digest = f'sha256:{hashlib.sha256(body).hexdigest()}'
  if r.digest and manifest_digest != r.digest:
    raise errors.TamperedPackageError(
        f'{ref}: the registry returned a manifest with digest '
        f'{manifest_digest}, not the one requested')
  del headers
  (config_digest, _), (layer_digest, layer_size) = _parse_manifest(
      body, r, max_bytes)
  config, _ = client.get_small(f'{client.base}/blobs/{config_digest}',
                               'fetch the config', MAX_CONFIG_BYTES)
  if f'sha256:{hashlib.sha256(config).hexdigest()}' != config_digest:
    raise errors.TamperedPackageError(
        f'{ref}: the config blob does not match its digest in the manifest')
  try:
    facts = json.loads(config)
  except ValueError:
    raise NotAPackageArtifactError(f'{ref}: the config is not JSON') from None
  # A store has no rename: the bundle is staged (ciphertext only) in a
  # private temporary directory and verified there, then published.
  tmpdir = tempfile.mkdtemp(prefix='tfxe-pull-') if remote else None
  tmp = (os.path.join(tmpdir, 'package.tfxe') if remote
         else _fsutil.temp_sibling(out))
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                 getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_CLOEXEC', 0),
                 0o600)
    try:
      client.download(layer_digest, layer_size, fd)
    finally:
      os.close(fd)
    info = pkg.verify_package(tmp, trusted=trusted,
                              allow_unsigned=allow_unsigned, policy=policy)
    if facts != config_facts(info):
      raise errors.TamperedPackageError(
          f'{ref}: the manifest config does not describe the package it '
          'carries (package id, fingerprint, signer or recipients differ)')
    if remote:
      info.bundle = _publish_to_store(tmp, info, out)
    else:
      os.chmod(tmp, 0o644)
      _fsutil.publish(tmp, out, force=force)
  except BaseException:
    _fsutil.remove_tree(tmpdir if remote else tmp)
    raise
  if remote:
    _fsutil.remove_tree(tmpdir)
  info.path = out
  return PullResult(info=info, manifest_digest=manifest_digest,
                    layer_digest=layer_digest)


# --- pull into an object store ------------------------------------------------

def _check_store_output(out: str, force: bool) -> None:
  """`out` on a store must name a bucket and hold nothing yet."""
  if force:
    raise errors.UsageError(
        '--force does not apply to a gs:// or s3:// OUT: tfx-encrypt never '
        'replaces objects on a store; pull into a new OUT, or remove the old '
        'one yourself')
  _, _, key = storage.split(out)  # names a bucket
  if not key.strip('/'):
    raise errors.UsageError(
        f'{_text.printable(out)}: name the package inside the bucket, e.g. '
        f'{_text.printable(out)}/models/taxi/7')
  if storage.exists(out) or storage.list_names(out):
    raise errors.OutputExistsError(
        f'{_text.printable(out)} already exists on the store; tfx-encrypt '
        'never replaces objects there: pull into a new OUT')


class _FileRange(io.RawIOBase):
  """Bytes [offset, offset + length) of an open file, as a seekable file
  (what storage.put takes): a payload of the staged bundle."""

  def __init__(self, fd: int, offset: int, length: int):
    super().__init__()
    self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    mv = memoryview(b).cast('B')
    n = max(0, min(len(mv), self._length - self._pos))
    if n == 0:
      return 0
    got = _fsutil.read_into_exact(self._fd, mv[:n], self._offset + self._pos)
    if got != n:
      raise errors.TamperedPackageError('the staged package shrank')
    self._pos += n
    return n

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos,
            io.SEEK_END: self._length}[whence]
    self._pos = max(0, base + offset)
    return self._pos

  def tell(self) -> int:
    return self._pos


def _publish_to_store(bundle: str, info: pkg.PackageInfo, out: str) -> bool:
  """Write the verified bundle file `bundle` to `out` on a store, as
  EncryptPusher pushes (docs/OBJECT_STORES.md): every object create-only,
  the payload objects first, then the commit point -- the header, or, for an
  `out` ending in `.tfxe`, the one bundle object. On any failure before
  the commit (e.g. another writer got there first: OutputExistsError) the
  payload objects this pull wrote are deleted; the other writer's are
  never touched. Returns True for the bundle form.
  """
  if info.bundle is not True:  # verify_package of a file: always a bundle
    raise errors.UsageError('internal: the staged package is not a bundle')
  as_bundle = out.endswith(pkg.BUNDLE_SUFFIX)
  hlen = info.header_bytes
  fd = os.open(bundle, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0) |
               getattr(os, 'O_CLOEXEC', 0))
  written = []
  committed = False
  try:
    size = os.fstat(fd).st_size
    if as_bundle:  # one object: its create-only write is the commit
      with _signals.deferred():
        storage.put_create_only(out, _FileRange(fd, 0, size))
        _signals.mark_committed()
      return True
    if storage.list_names(out):  # someone wrote there while we downloaded
      raise errors.OutputExistsError(
          f'{_text.printable(out)} already exists on the store; tfx-encrypt '
          'never replaces objects there: pull into a new OUT')
    sizes = _payload_sizes(fd, hlen)
    offset = hlen
    for i, n in enumerate(sizes):
      uri = storage.join(out, pkg.PAYLOAD_DIR, pkg.payload_name(i))
      try:
        storage.put_create_only(uri, _FileRange(fd, offset, n))
      except storage.ObjectExistsError:
        raise  # another writer's object: never ours to delete
      except BaseException:
        written.append(uri)  # it may have been written before the error
        raise
      written.append(uri)
      offset += n
    if offset != size:
      raise errors.TamperedPackageError('the staged package changed')
    uri = storage.join(out, pkg.HEADER_NAME)
    hbytes = os.pread(fd, hlen, 0)
    # The commit point. Signals are held while it is written (CLI): a
    # signal must not leave a header whose payloads the cleanup removed.
    try:
      with _signals.deferred():
        storage.put_create_only(uri, hbytes)
        _signals.mark_committed()
    except storage.ObjectExistsError:
      raise  # another writer's header: ours are only payloads, removed
    except Exception:  # pylint: disable=broad-except
      if _holds(uri, hbytes):  # the write went through before the error
        return False
      raise
    except BaseException:  # KeyboardInterrupt (the API has no handlers)
      committed = _holds(uri, hbytes)  # then keep the published package
      raise
    return False
  except BaseException:
    if committed:
      raise
    for uri in reversed(written):
      try:
        storage.delete(uri)
      except Exception:  # pylint: disable=broad-except
        logging.getLogger(__name__).warning(
            'could not remove %s', _text.printable(uri), exc_info=True)
    raise
  finally:
    os.close(fd)


def _holds(uri: str, data: bytes) -> bool:
  """True if the object `uri` exists and holds exactly `data`."""
  try:
    with storage.open_reader(uri) as r:
      return r.size == len(data) and r.read_range(0, r.size) == data
  except Exception:  # pylint: disable=broad-except  # unknown: not ours
    return False


def _payload_sizes(fd: int, hlen: int):
  from tfx_encrypt.format.header import Header  # pylint: disable=g-import-not-at-top
  with os.fdopen(os.dup(fd), 'rb') as f:
    h, n = Header.read(f)
  if n != hlen:
    raise errors.TamperedPackageError('the staged package changed')
  return [size for size, _ in h.payloads]
