"""HashiCorp Vault transit key backend.

URI: ``hcvault://HOST[:PORT]/MOUNT/keys/NAME`` (Tink's form; MOUNT may have
several segments, e.g. ``hcvault://vault.example.com:8200/kms/transit/keys/
models``). The data key is wrapped with ``POST /v1/MOUNT/encrypt/NAME`` and
unwrapped with ``POST /v1/MOUNT/decrypt/NAME`` through hvac, with the
package wrap context as ``associated_data`` (base64). That needs an AEAD
transit key (``aes256-gcm96``, the default, ``aes128-gcm96`` or
``chacha20-poly1305``), not a derived or convergent one.

* Transport: HTTPS to ``https://HOST[:PORT]`` (no port = 443), certificate
  verification always on; CA from ``VAULT_CACERT`` (file) or
  ``VAULT_CAPATH`` (directory), client certificate from
  ``VAULT_CLIENT_CERT``/``VAULT_CLIENT_KEY``. ``VAULT_SKIP_VERIFY`` is
  ignored. ``TFXE_VAULT_HTTP=1`` switches to plaintext HTTP for a local
  ``vault server -dev`` only (the token then travels in clear).
* Token: ``VAULT_TOKEN``, else ``~/.vault-token`` (what ``vault login``
  writes); namespace from ``VAULT_NAMESPACE``. The token is never logged or
  put into an exception.
* Transit ``encrypt`` creates a missing key when the token may ``create``
  (upsert). Give the publishing token only ``update`` on
  ``MOUNT/encrypt/NAME`` so a typo fails instead of making a new key.

hvac's requests session does not retry; throttling (429), 5xx and
connection failures are retried by :mod:`tfx_encrypt.keys._retry`.

Signing (``--sign-with`` / ``--trust``; :mod:`tfx_encrypt.keys._signing`):
an ``ecdsa-p256`` or ``ed25519`` transit key (not derived). ``GET
/v1/MOUNT/keys/NAME`` once per key and process gives the public key of its
latest version; each signature is one ``POST /v1/MOUNT/sign/NAME`` pinned
to that ``key_version``: ECDSA with ``prehashed=true``,
``hash_algorithm=sha2-256``, ``marshaling_algorithm=asn1`` over SHA-256 of
the signature message; Ed25519 (pure) over the message itself. Policy:
``update`` on ``MOUNT/sign/NAME`` to sign, ``read`` on ``MOUNT/keys/NAME``
to sign or verify.
"""

import base64
import binascii
import os
import re
from typing import Any, Callable, Dict, Optional

from tfx_encrypt import errors
from tfx_encrypt.keys import _retry
from tfx_encrypt.keys import _signing
from tfx_encrypt.keys.base import KeyBackend, Stanza, WrapContext, b64d, b64e

STANZA_TYPE = 'hcvault'

_URI_RE = re.compile(
    r'^hcvault://(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|'
    r'\[[0-9A-Fa-f:.]{2,45}\])(?::(?P<port>\d{1,5}))?/'
    r'(?P<mount>[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*)/keys/'
    r'(?P<name>[A-Za-z0-9_.-]{1,128})$')
_CT_RE = re.compile(r'^vault:v\d{1,10}:[A-Za-z0-9+/=]{16,16000}$')
_SIG_RE = re.compile(r'^vault:v(\d{1,10}):([A-Za-z0-9+/=]{16,1000})$')
#: Transit key types that sign packages, and their algorithm.
SIGNING_TYPES = {'ecdsa-p256': _signing.ECDSA_P256,
                 'ed25519': _signing.ED25519}


def parse_uri(uri: str) -> Dict[str, str]:
  m = _URI_RE.match(uri or '')
  if not m or (m.group('port') and not 0 < int(m.group('port')) < 65536):
    raise errors.InvalidKeyUriError(
        'a Vault transit key URI must look like hcvault://HOST[:PORT]/MOUNT/'
        'keys/NAME (no credentials, no query); got '
        f'{_safe(uri)!r}')
  parts = m.groupdict()
  parts['host'] = parts['host'].lower()
  return parts


def _safe(uri: str) -> str:
  text = str(uri).split('?', 1)[0]
  text = re.sub(r'//[^/@]*@', '//***@', text)   # never echo userinfo
  return text[:300]


def role_form_problem(uri: str, role: Optional[str]) -> Optional[str]:
  """Why the URI's form cannot play `role`, or None; no I/O, no SDK.

  One URI form serves every role: the transit key's type (AEAD or
  ecdsa-p256 / ed25519) is known only to Vault.
  """
  del role
  parse_uri(uri)
  return None


class VaultKey(_signing.RemoteSigner, KeyBackend):
  """A Vault transit key: an AEAD key wraps the package data key, an
  ecdsa-p256 or ed25519 key signs packages."""

  signing_algs = (_signing.ECDSA_P256, _signing.ED25519)

  scheme = 'hcvault'
  stanza_types = (STANZA_TYPE,)

  def __init__(self, uri: str, *, token: Optional[str] = None,
               client: Any = None,
               retry: Optional[_retry.RetryPolicy] = None):
    """Creates the backend; no network access happens here.

    Args:
      uri: ``hcvault://HOST[:PORT]/MOUNT/keys/NAME``.
      token: a Vault token to use instead of VAULT_TOKEN / ~/.vault-token.
      client: an already configured ``hvac.Client`` (optional).
      retry: the retry policy; by default :meth:`RetryPolicy.from_env`.
    """
    parts = parse_uri(uri)
    super().__init__(uri)
    self.host = parts['host']
    self.port = parts['port']
    self.mount = parts['mount']
    self.name = parts['name']
    self._token = token
    self._client = client
    self.retry = retry or _retry.RetryPolicy.from_env()
    if client is None:
      _retry.import_sdk('hvac', self.scheme, 'vault')

  @property
  def key_id(self) -> str:
    port = f':{self.port}' if self.port else ''
    return f'hcvault://{self.host}{port}/{self.mount}/keys/{self.name}'

  @property
  def base_url(self) -> str:
    scheme = 'http' if os.environ.get('TFXE_VAULT_HTTP') == '1' else 'https'
    port = f':{self.port}' if self.port else ''
    return f'{scheme}://{self.host}{port}'

  # -- client ---------------------------------------------------------------
  def _secret(self) -> Optional[str]:
    if self._token:
      return self._token
    if self._client is not None:
      return getattr(self._client, 'token', None)
    return None

  def _vault(self):
    if self._client is None:
      import hvac  # pylint: disable=g-import-not-at-top
      from hvac import utils as hvac_utils  # pylint: disable=g-import-not-at-top
      token = self._token or hvac_utils.get_token_from_env()
      if not token:
        raise errors.KeyAccessDeniedError(
            f'{self.key_id}: no Vault token: set VAULT_TOKEN or run vault '
            'login (which writes ~/.vault-token)')
      self._token = token
      verify: Any = True
      if os.environ.get('VAULT_CAPATH'):
        verify = os.environ['VAULT_CAPATH']
      if os.environ.get('VAULT_CACERT'):
        verify = os.environ['VAULT_CACERT']
      cert = None
      if os.environ.get('VAULT_CLIENT_CERT'):
        cert = (os.environ['VAULT_CLIENT_CERT'],
                os.environ.get('VAULT_CLIENT_KEY'))
      self._client = hvac.Client(
          url=self.base_url, token=token, verify=verify, cert=cert,
          timeout=self.retry.request_timeout,
          namespace=os.environ.get('VAULT_NAMESPACE') or None)
    return self._client

  # -- wrapping -------------------------------------------------------------
  def wrap(self, dek: bytes, context: WrapContext) -> Stanza:
    if not isinstance(dek, (bytes, bytearray)) or not 16 <= len(dek) <= 64:
      raise errors.UsageError('the data key to wrap must be 16 to 64 bytes')
    plaintext = b64e(bytes(dek))
    aad = b64e(context.aad())

    def call():
      return self._vault().secrets.transit.encrypt_data(
          name=self.name, plaintext=plaintext, associated_data=aad,
          mount_point=self.mount)

    resp = self._call('encrypt', call)
    ct = ((resp or {}).get('data') or {}).get('ciphertext')
    if not isinstance(ct, str) or not _CT_RE.match(ct):
      raise errors.KeyBackendError(
          f'Vault transit encrypt with {self.key_id} returned no usable '
          'ciphertext; check that the URI names a transit mount')
    return Stanza(STANZA_TYPE, self.key_id, {'ct': ct})

  def unwrap(self, stanza: Stanza, context: WrapContext) -> bytes:
    if not self.matches(stanza):
      raise errors.NoMatchingKeyError(
          f'the recipient stanza is for {stanza.key_id!r} ({stanza.type}), '
          f'not for {self.key_id}')
    ct = stanza.body.get('ct')
    if set(stanza.body) != {'ct'} or not _CT_RE.match(ct or ''):
      raise errors.TamperedPackageError(
          f'the {STANZA_TYPE} stanza for {self.key_id} is malformed; the '
          'package is corrupt or was modified')
    aad = b64e(context.aad())

    def call():
      return self._vault().secrets.transit.decrypt_data(
          name=self.name, ciphertext=ct, associated_data=aad,
          mount_point=self.mount)

    resp = self._call('decrypt', call)
    plaintext = ((resp or {}).get('data') or {}).get('plaintext')
    if not isinstance(plaintext, str):
      raise errors.KeyBackendError(
          f'Vault transit decrypt with {self.key_id} returned no plaintext')
    return b64d(plaintext, 'Vault plaintext')

  # -- signing (tfx_encrypt.keys._signing) ----------------------------------
  def _public_cache_key(self):
    return ('hcvault', self.base_url, self.mount, self.name,
            os.environ.get('VAULT_NAMESPACE') or '')

  def _fetch_public_key(self) -> _signing.PublicKeyInfo:
    resp = self._call('read key', lambda: self._vault().secrets.transit
                      .read_key(name=self.name, mount_point=self.mount))
    data = (resp or {}).get('data') if isinstance(resp, dict) else None
    if not isinstance(data, dict):
      raise errors.KeyBackendError(
          f'Vault transit read key {self.key_id} returned no key data; check '
          'that the URI names a transit mount')
    kind = str(data.get('type') or '?')
    if kind not in SIGNING_TYPES or data.get('derived'):
      raise errors.UsageError(
          f'{self.key_id} is a{" derived" if data.get("derived") else ""} '
          f'{_retry.short(kind, 40)} transit key; signing needs an '
          'ecdsa-p256 or ed25519 key, not derived (vault write '
          f'{self.mount}/keys/{self.name} type=ecdsa-p256)')
    version = str(data.get('latest_version') or '')
    entry = (data.get('keys') or {}).get(version)
    public = entry.get('public_key') if isinstance(entry, dict) else None
    if not version.isdigit() or not isinstance(public, str) or not public:
      raise errors.KeyBackendError(
          f'Vault transit read key {self.key_id} returned no public key for '
          'its latest version')
    if kind == 'ecdsa-p256':   # PEM SubjectPublicKeyInfo
      info = _signing.PublicKeyInfo.from_pem(public, self.key_id, version)
    else:                      # base64 of the raw 32-byte key
      from cryptography.hazmat.primitives.asymmetric import ed25519  # pylint: disable=g-import-not-at-top
      try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(
            base64.b64decode(public, validate=True))
      except (binascii.Error, ValueError):
        raise errors.KeyBackendError(
            f'Vault transit read key {self.key_id} returned a malformed '
            'ed25519 public key') from None
      info = _signing.PublicKeyInfo(key, self.key_id, version)
    if info.alg != SIGNING_TYPES[kind]:
      raise errors.KeyBackendError(
          f'Vault transit read key {self.key_id} returned a public key that '
          f'is not {kind}')
    return info

  def _sign_remote(self, info: _signing.PublicKeyInfo,
                   message: bytes) -> bytes:
    if info.alg == _signing.ECDSA_P256:
      kwargs = dict(hash_input=b64e(_signing.sha256(message)),
                    hash_algorithm='sha2-256', prehashed=True,
                    marshaling_algorithm='asn1')
    else:
      kwargs = dict(hash_input=b64e(message))

    def call():
      return self._vault().secrets.transit.sign_data(
          name=self.name, key_version=int(info.native_id),
          mount_point=self.mount, **kwargs)

    resp = self._call('sign', call)
    text = ((resp or {}).get('data') or {}).get('signature')
    m = _SIG_RE.match(text) if isinstance(text, str) else None
    if not m:
      raise errors.KeyBackendError(
          f'Vault transit sign with {self.key_id} returned no usable '
          'signature')
    if m.group(1) != info.native_id:
      raise errors.KeyBackendError(
          f'Vault transit sign with {self.key_id} used key version '
          f'{m.group(1)}, not {info.native_id}')
    try:
      return base64.b64decode(m.group(2), validate=True)
    except binascii.Error:
      raise errors.KeyBackendError(
          f'Vault transit sign with {self.key_id} returned a malformed '
          'signature') from None

  # -- errors ---------------------------------------------------------------
  def _call(self, op: str, fn: Callable[[], Any]) -> Any:
    what = f'Vault transit {op} with {self.key_id}'
    return self.retry.call(lambda: self._translate(op, what, fn), what=what)

  def _translate(self, op: str, what: str, fn: Callable[[], Any]) -> Any:
    import requests  # pylint: disable=g-import-not-at-top
    from hvac import exceptions as hex_  # pylint: disable=g-import-not-at-top
    try:
      return fn()
    except hex_.VaultError as e:
      raise self._vault_error(op, what, e) from None
    except requests.exceptions.SSLError:
      raise errors.BackendUnavailableError(
          f'{what}: TLS verification of {self.base_url} failed; point '
          'VAULT_CACERT at the CA certificate of the Vault server') from None
    except (requests.exceptions.ConnectionError,
            requests.exceptions.Timeout) as e:
      raise _retry.TransientError(
          f'cannot reach Vault ({type(e).__name__})',
          errors.BackendUnavailableError(
              f'{what}: Vault at {self.base_url} is unreachable. Check the '
              'host and port in the key URI and network access.')) from None

  def _vault_error(self, op: str, what: str, e) -> Exception:
    msgs = getattr(e, 'errors', None) or [e.args[0] if e.args else '']
    msg = _retry.redact(_retry.short('; '.join(str(m) for m in msgs)),
                        self._secret())
    name = type(e).__name__
    from hvac import exceptions as hex_  # pylint: disable=g-import-not-at-top
    if isinstance(e, (hex_.RateLimitExceeded, hex_.InternalServerError,
                      hex_.BadGateway, hex_.VaultDown)):
      return _retry.TransientError(
          f'{name} ({msg})',
          errors.BackendUnavailableError(
              f'{what} kept failing ({name}: {msg}); Vault is throttling, '
              'sealed or unavailable. Retry later.'))
    if isinstance(e, (hex_.Unauthorized, hex_.Forbidden)):
      capability, path = (('read', 'keys') if op == 'read key' else
                          ('update', op))
      return errors.KeyAccessDeniedError(
          f'{what} was denied ({msg}). The token needs the "{capability}" '
          f'capability on {self.mount}/{path}/{self.name}; check VAULT_TOKEN '
          'and VAULT_NAMESPACE, and that the token has not expired.')
    if isinstance(e, hex_.InvalidPath):
      return errors.KeyNotFoundError(
          f'{what} failed: no such transit mount or key ({msg}). Check the '
          'mount and key name in the URI.')
    lowered = msg.lower()
    if 'key not found' in lowered or 'no existing key' in lowered:
      return errors.KeyNotFoundError(
          f'{what} failed: Vault has no transit key {self.name!r} under '
          f'{self.mount!r} ({msg}).')
    if 'disallowed by policy' in lowered or 'too old' in lowered:
      return errors.KeyDisabledError(
          f'{what} failed: the key version that wrapped this package is '
          f'below the key\'s min_decryption_version ({msg}). Lower it, or '
          'rewrap the package while the version is still allowed.')
    if isinstance(e, hex_.InvalidRequest) and op == 'decrypt' and (
        'authentication failed' in lowered or 'invalid ciphertext' in lowered
        or 'unable to decrypt' in lowered or 'invalid' in lowered):
      return errors.TamperedPackageError(
          f'{what} failed: Vault rejected the wrapped data key or the '
          f'encryption context ({msg}); the package header was modified, '
          'or the stanza belongs to another package')
    if isinstance(e, hex_.InvalidRequest) and 'associated' in lowered:
      return errors.UsageError(
          f'{what} failed ({msg}); the transit key must be an AEAD key '
          '(aes256-gcm96, aes128-gcm96 or chacha20-poly1305), not derived')
    return errors.KeyBackendError(f'{what} failed ({name}: {msg})')
