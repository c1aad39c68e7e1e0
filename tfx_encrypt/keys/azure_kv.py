"""Azure Key Vault key backend (RSA keys, RSA-OAEP-256).

URI: ``azure-kv://VAULT.vault.azure.net/keys/NAME[/VERSION]`` (sovereign
clouds and Managed HSM hosts work the same way).

* **Wrap** is one request: ``GET /keys/NAME[/VERSION]`` (the public key, its
  current version, enabled state and permitted operations), after which
  azure-keyvault-keys' ``CryptographyClient.wrap_key`` does RSA-OAEP-256
  with that public key locally, as the SDK does by default for public-key
  operations. Needs the ``keys/get`` permission (role "Key Vault Crypto
  Service Encryption User" has it).
* **Unwrap** is one request: ``POST /keys/NAME/VERSION/unwrapkey``, for the
  key version recorded in the stanza. The private key never leaves Key
  Vault. Needs ``keys/unwrapKey``.

Key Vault's wrap has no associated data, so the package's wrap context is
*not* bound by Key Vault; it is bound by the package header MAC (keyed from
the DEK), which every reader checks before using the header. The stanza
records the key version and the public modulus/exponent it was wrapped
under (public data, used to build the SDK's key object without a GET).

Credential: ``azure.identity.DefaultAzureCredential`` unless one is passed
(``AzureKeyVaultKey(uri, credential=...)``).

Test / private-endpoint overrides (key ids keep the public vault name):
``TFXE_AZURE_KV_ENDPOINT=https://host:port`` replaces the vault URL (and
turns off the SDK's challenge-resource check, which cannot match a custom
host); ``TFXE_AZURE_KV_CA_BUNDLE=/path/ca.pem`` sets the CA bundle.

The SDK's retry policy is disabled (``retry_total=0``); throttling (429),
5xx and connection failures are retried by :mod:`tfx_encrypt.keys._retry`.

Signing (``--sign-with`` / ``--trust``; :mod:`tfx_encrypt.keys._signing`):
an EC key on curve P-256 (``EC`` or ``EC-HSM``). ``GET /keys/NAME[/VERSION]``
once per key and process gives the public key and the version; each
signature is one ``POST /keys/NAME/VERSION/sign`` with ``alg=ES256`` over
SHA-256 of the signature message, for that version. Key Vault answers raw
``r || s``; :meth:`AzureKeyVaultKey.sign` returns DER, as every signer
does. Permissions: ``keys/get`` and ``keys/sign`` (role "Key Vault Crypto
User"); ``keys/get`` alone to verify.
"""

import datetime
import os
import re
from typing import Any, Callable, Dict, Optional
from urllib.parse import urlparse

from tfx_encrypt import errors
from tfx_encrypt.keys import _retry
from tfx_encrypt.keys import _signing
from tfx_encrypt.keys.base import KeyBackend, Stanza, WrapContext, b64d, b64e

STANZA_TYPE = 'azure-kv-rsa-oaep-256'
ALGORITHM = 'RSA-OAEP-256'

_URI_RE = re.compile(
    r'^azure-kv://(?P<host>(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
    r'\.){2,}[A-Za-z]{2,63})/keys/(?P<name>[A-Za-z0-9-]{1,127})'
    r'(?:/(?P<version>[A-Za-z0-9]{1,64}))?$')
_VERSION_RE = re.compile(r'^[A-Za-z0-9]{1,64}$')


def parse_uri(uri: str) -> Dict[str, Optional[str]]:
  m = _URI_RE.match(uri or '')
  if not m:
    raise errors.InvalidKeyUriError(
        'an Azure Key Vault key URI must look like azure-kv://VAULT.vault.'
        'azure.net/keys/NAME[/VERSION]; got '
        f'{str(uri).split("?", 1)[0][:300]!r}')
  parts = m.groupdict()
  parts['host'] = parts['host'].lower()
  return parts


def _int_bytes(value: bytes) -> bytes:
  return bytes(value).lstrip(b'\x00') or b'\x00'


def role_form_problem(uri: str, role: Optional[str]) -> Optional[str]:
  """Why the URI's form cannot play `role`, or None; no I/O, no SDK.

  One URI form serves every role: the key type (RSA wraps, EC P-256
  signs) is known only to Key Vault.
  """
  del role
  parse_uri(uri)
  return None


class AzureKeyVaultKey(_signing.RemoteSigner, KeyBackend):
  """A key in Azure Key Vault: an RSA key wraps the package data key, an EC
  P-256 key signs packages."""

  scheme = 'azure-kv'
  stanza_types = (STANZA_TYPE,)

  def __init__(self, uri: str, *, credential: Any = None,
               vault_url: Optional[str] = None,
               connection_verify: Any = None,
               retry: Optional[_retry.RetryPolicy] = None):
    """Creates the backend; no network access happens here.

    Args:
      uri: ``azure-kv://VAULT.vault.azure.net/keys/NAME[/VERSION]``.
      credential: an azure-core TokenCredential; by default
        DefaultAzureCredential.
      vault_url: where to send requests instead of ``https://VAULT...``
        (private endpoint, test server); default TFXE_AZURE_KV_ENDPOINT.
      connection_verify: CA bundle path (or True); default
        TFXE_AZURE_KV_CA_BUNDLE, else the system CAs.
      retry: the retry policy; by default :meth:`RetryPolicy.from_env`.
    """
    parts = parse_uri(uri)
    super().__init__(uri)
    self.host = parts['host']
    self.name = parts['name']
    self.version = parts['version']
    self._credential = credential
    override = vault_url or os.environ.get('TFXE_AZURE_KV_ENDPOINT') or None
    if override:
      parsed = urlparse(override)
      if parsed.scheme != 'https' or not parsed.netloc or parsed.path not in (
          '', '/'):
        raise errors.UsageError(
            'the Azure Key Vault endpoint override must be an https:// URL '
            'without a path (Key Vault bearer tokens are only sent over TLS)')
      override = f'https://{parsed.netloc}'
    self._override = override
    self._verify = (connection_verify if connection_verify is not None else
                    os.environ.get('TFXE_AZURE_KV_CA_BUNDLE') or True)
    self.retry = retry or _retry.RetryPolicy.from_env()
    self._key_client = None
    _retry.import_sdk('azure.keyvault.keys', self.scheme, 'azure')

  @property
  def key_id(self) -> str:
    version = f'/{self.version}' if self.version else ''
    return f'azure-kv://{self.host}/keys/{self.name}{version}'

  @property
  def vault_url(self) -> str:
    """Where requests go: the override, or the vault's public URL."""
    return self._override or f'https://{self.host}'

  # -- clients --------------------------------------------------------------
  def _get_credential(self):
    if self._credential is None:
      identity = _retry.import_sdk('azure.identity', self.scheme, 'azure')
      self._credential = identity.DefaultAzureCredential()
    return self._credential

  def _client_kwargs(self) -> Dict[str, Any]:
    kwargs = dict(retry_total=0, connection_verify=self._verify,
                  connection_timeout=self.retry.request_timeout,
                  read_timeout=self.retry.request_timeout)
    if self._override:
      kwargs['verify_challenge_resource'] = False
    return kwargs

  def _keys(self):
    if self._key_client is None:
      from azure.keyvault.keys import KeyClient  # pylint: disable=g-import-not-at-top
      self._key_client = KeyClient(self.vault_url, self._get_credential(),
                                   **self._client_kwargs())
    return self._key_client

  def _crypto(self, key):
    from azure.keyvault.keys.crypto import CryptographyClient  # pylint: disable=g-import-not-at-top
    return CryptographyClient(key, self._get_credential(),
                              **self._client_kwargs())

  def _kid(self, version: str) -> str:
    return f'{self.vault_url}/keys/{self.name}/{version}'

  # -- wrapping -------------------------------------------------------------
  def wrap(self, dek: bytes, context: WrapContext) -> Stanza:
    del context  # bound by the package header MAC; Key Vault has no AAD
    if not isinstance(dek, (bytes, bytearray)) or not 16 <= len(dek) <= 64:
      raise errors.UsageError('the data key to wrap must be 16 to 64 bytes')
    from azure.keyvault.keys import KeyVaultKey  # pylint: disable=g-import-not-at-top
    from azure.keyvault.keys.crypto import KeyWrapAlgorithm  # pylint: disable=g-import-not-at-top

    key = self._call('get key', lambda: self._keys().get_key(
        self.name, self.version))
    version = self._check_key(key)
    jwk = key.key
    # Same key object, re-rooted at the URL we talk to; the SDK wraps
    # locally with the public key (no second request).
    local = KeyVaultKey(key_id=self._kid(version),
                        jwk={'kid': self._kid(version), 'kty': 'RSA',
                             'n': jwk.n, 'e': jwk.e,
                             'key_ops': ['wrapKey', 'unwrapKey']})
    result = self._call('wrap', lambda: self._crypto(local).wrap_key(
        KeyWrapAlgorithm.rsa_oaep_256, bytes(dek)))
    return Stanza(STANZA_TYPE, self.key_id, {
        'ver': version, 'alg': ALGORITHM, 'ct': b64e(result.encrypted_key),
        'n': b64e(_int_bytes(jwk.n)), 'e': b64e(_int_bytes(jwk.e))})

  def _check_key(self, key) -> str:
    """Validates what GET key returned; returns the key version."""
    version = self._key_version(key)
    jwk = key.key
    kty = _enum_value(jwk.kty)
    if kty not in ('RSA', 'RSA-HSM'):
      raise errors.UsageError(
          f'{self.key_id} is a {kty} key; wrapping needs an RSA key '
          '(RSA or RSA-HSM, 2048 bits or more)')
    if not jwk.n or len(_int_bytes(jwk.n)) < 256:
      raise errors.UsageError(
          f'{self.key_id} is smaller than 2048 bits; use a larger RSA key')
    ops = [_enum_value(o) for o in (key.key_operations or [])]
    if ops and not {'wrapKey', 'unwrapKey'} <= set(ops):
      raise errors.UsageError(
          f'{self.key_id} does not permit wrapKey and unwrapKey (it allows '
          f'{", ".join(ops)}); update the key\'s permitted operations')
    self._check_valid(key)
    return version

  def _key_version(self, key) -> str:
    """The version of what GET key returned, checked to be this key's."""
    kid = urlparse(str(key.id or ''))
    segments = kid.path.strip('/').split('/')
    if (kid.hostname or '').lower() != self.host or len(
        segments) != 3 or segments[:2] != ['keys', self.name] or not (
            _VERSION_RE.match(segments[2])):
      raise errors.KeyBackendError(
          f'Azure Key Vault answered for another key ({_retry.short(kid.geturl(), 200)}) '
          f'when asked for {self.key_id}; check TFXE_AZURE_KV_ENDPOINT')
    version = segments[2]
    if self.version and version != self.version:
      raise errors.KeyBackendError(
          f'Azure Key Vault returned version {version} for {self.key_id}')
    return version

  def _check_valid(self, key) -> None:
    """Refuses a disabled, expired or not yet valid key."""
    props = key.properties
    if props.enabled is False:
      raise errors.KeyDisabledError(
          f'{self.key_id} is disabled in Key Vault; enable it or use '
          'another recipient')
    now = datetime.datetime.now(datetime.timezone.utc)
    if props.expires_on is not None and props.expires_on <= now:
      raise errors.KeyDisabledError(
          f'{self.key_id} expired on {props.expires_on.isoformat()}; extend '
          'its expiry or use another recipient')
    if props.not_before is not None and props.not_before > now:
      raise errors.KeyDisabledError(
          f'{self.key_id} is not valid before '
          f'{props.not_before.isoformat()}')

  def unwrap(self, stanza: Stanza, context: WrapContext) -> bytes:
    del context  # see wrap
    if not self.matches(stanza):
      raise errors.NoMatchingKeyError(
          f'the recipient stanza is for {stanza.key_id!r} ({stanza.type}), '
          f'not for {self.key_id}')
    body = stanza.body
    if (set(body) != {'ver', 'alg', 'ct', 'n', 'e'} or
        body['alg'] != ALGORITHM or not _VERSION_RE.match(body['ver']) or
        (self.version and body['ver'] != self.version)):
      raise errors.TamperedPackageError(
          f'the {STANZA_TYPE} stanza for {self.key_id} is malformed; the '
          'package is corrupt or was modified')
    ct = b64d(body['ct'], 'Azure wrapped key')
    n, e = b64d(body['n'], 'RSA modulus'), b64d(body['e'], 'RSA exponent')
    from azure.keyvault.keys import KeyVaultKey  # pylint: disable=g-import-not-at-top
    from azure.keyvault.keys.crypto import KeyWrapAlgorithm  # pylint: disable=g-import-not-at-top
    kid = self._kid(body['ver'])
    # A key object with the public half only: the SDK cannot unwrap
    # locally, so it sends exactly one unwrapkey request for this version.
    key = KeyVaultKey(key_id=kid, jwk={'kid': kid, 'kty': 'RSA', 'n': n,
                                       'e': e,
                                       'key_ops': ['wrapKey', 'unwrapKey']})
    result = self._call('unwrap', lambda: self._crypto(key).unwrap_key(
        KeyWrapAlgorithm.rsa_oaep_256, ct))
    return bytes(result.key)

  # -- signing (tfx_encrypt.keys._signing) ----------------------------------
  def _public_cache_key(self):
    return ('azure-kv', self.vault_url, self.host, self.name,
            self.version or '')

  def _fetch_public_key(self) -> _signing.PublicKeyInfo:
    from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
    key = self._call('get key', lambda: self._keys().get_key(
        self.name, self.version))
    version = self._key_version(key)
    jwk = key.key
    kty = _enum_value(jwk.kty)
    crv = _enum_value(jwk.crv) if getattr(jwk, 'crv', None) else ''
    if kty not in ('EC', 'EC-HSM') or crv != 'P-256':
      curve = f' on curve {crv}' if crv else ''
      raise errors.UsageError(
          f'{self.key_id} is a {kty} key{curve}; signing needs an EC key on '
          'curve P-256 (az keyvault key create --kty EC --curve P-256)')
    ops = [_enum_value(o) for o in (key.key_operations or [])]
    if ops and not {'sign', 'verify'} <= set(ops):
      raise errors.UsageError(
          f'{self.key_id} does not permit sign and verify (it allows '
          f'{", ".join(ops)}); update the key\'s permitted operations')
    self._check_valid(key)
    try:
      public_key = ec.EllipticCurvePublicNumbers(
          int.from_bytes(bytes(jwk.x), 'big'),
          int.from_bytes(bytes(jwk.y), 'big'), ec.SECP256R1()).public_key()
    except (TypeError, ValueError):
      raise errors.KeyBackendError(
          f'Azure Key Vault get key {self.key_id} returned a malformed EC '
          'public key') from None
    return _signing.PublicKeyInfo(public_key, self.key_id, version)

  def _sign_remote(self, info: _signing.PublicKeyInfo,
                   message: bytes) -> bytes:
    from azure.keyvault.keys import KeyVaultKey  # pylint: disable=g-import-not-at-top
    from azure.keyvault.keys.crypto import SignatureAlgorithm  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives.asymmetric import utils  # pylint: disable=g-import-not-at-top
    nums = info.public_key.public_numbers()
    kid = self._kid(info.native_id)
    # The public half only, re-rooted at the URL we talk to: the SDK cannot
    # sign locally, so it sends exactly one sign request for this version.
    key = KeyVaultKey(key_id=kid, jwk={
        'kid': kid, 'kty': 'EC', 'crv': 'P-256',
        'x': nums.x.to_bytes(32, 'big'), 'y': nums.y.to_bytes(32, 'big'),
        'key_ops': ['sign', 'verify']})
    digest = _signing.sha256(message)
    result = self._call('sign', lambda: self._crypto(key).sign(
        SignatureAlgorithm.es256, digest))
    raw = bytes(result.signature or b'')
    if len(raw) != 64:
      raise errors.KeyBackendError(
          f'Azure Key Vault sign with {self.key_id} returned a signature of '
          f'{len(raw)} bytes; ES256 signatures are 64 (r || s)')
    return utils.encode_dss_signature(int.from_bytes(raw[:32], 'big'),
                                      int.from_bytes(raw[32:], 'big'))

  # -- errors ---------------------------------------------------------------
  def _call(self, op: str, fn: Callable[[], Any]) -> Any:
    what = f'Azure Key Vault {op} with {self.key_id}'
    return self.retry.call(lambda: self._translate(op, what, fn), what=what)

  def _translate(self, op: str, what: str, fn: Callable[[], Any]) -> Any:
    from azure.core import exceptions as aex  # pylint: disable=g-import-not-at-top
    try:
      return fn()
    except aex.ClientAuthenticationError as e:
      raise errors.KeyAccessDeniedError(
          f'{what}: authentication failed ({_msg(e)}). Configure '
          'DefaultAzureCredential (AZURE_CLIENT_ID/AZURE_TENANT_ID/'
          'AZURE_CLIENT_SECRET, workload or managed identity, or az login).'
      ) from None
    except aex.ResourceNotFoundError as e:
      raise errors.KeyNotFoundError(
          f'{what} failed: the vault has no such key or version ({_msg(e)}). '
          'Check the vault, key name and version in the URI.') from None
    except aex.HttpResponseError as e:
      raise self._http_error(op, what, e) from None
    except (aex.ServiceRequestError, aex.ServiceResponseError) as e:
      text = _msg(e).lower()
      if 'certificate' in text or 'ssl' in text:
        raise errors.BackendUnavailableError(
            f'{what}: TLS verification of {self.vault_url} failed; set '
            'TFXE_AZURE_KV_CA_BUNDLE to the server\'s CA bundle') from None
      raise _retry.TransientError(
          f'cannot reach Key Vault ({type(e).__name__})',
          errors.BackendUnavailableError(
              f'{what}: Key Vault at {self.vault_url} is unreachable. Check '
              'network access and the vault name.')) from None
    except ValueError as e:   # the SDK's challenge-resource check, bad JWK
      raise errors.KeyBackendError(f'{what} failed: {_msg(e)}') from None

  def _http_error(self, op: str, what: str, e) -> Exception:
    status = getattr(e, 'status_code', None) or 0
    msg = _msg(e)
    inner = ''
    err = getattr(e, 'error', None)
    if err is not None:
      inner = ' '.join(str(x) for x in (getattr(err, 'code', ''),
                                        getattr(getattr(err, 'innererror',
                                                        None), 'code', '')
                                        if hasattr(err, 'innererror') else ''))
    text = f'{msg} {inner}'.lower()
    if status == 429 or status >= 500:
      return _retry.TransientError(
          f'HTTP {status}',
          errors.BackendUnavailableError(
              f'{what} kept failing (HTTP {status}: {msg}); Key Vault is '
              'throttling or unavailable. Retry later.'))
    if 'disabled' in text:
      return errors.KeyDisabledError(
          f'{what} failed: the key is disabled ({msg}). Enable it, or use '
          'another recipient.')
    if status in (401, 403):
      perm = {'get key': 'keys/get', 'unwrap': 'keys/unwrapKey',
              'sign': 'keys/sign'}.get(op, 'keys/wrapKey')
      role = ('Key Vault Crypto User' if op == 'sign' else
              'Key Vault Crypto Service Encryption User')
      return errors.KeyAccessDeniedError(
          f'{what} was denied ({msg}). Grant the identity {perm} on the '
          f'vault (access policy) or the role "{role}".')
    if status == 400 and op == 'unwrap':
      return errors.TamperedPackageError(
          f'{what} failed: Key Vault could not unwrap the data key ({msg}); '
          'the package header was modified, or the stanza belongs to another '
          'key')
    return errors.KeyBackendError(f'{what} failed (HTTP {status}: {msg})')


def _enum_value(value) -> str:
  """'RSA' for KeyType.rsa (the SDK's str-enums) or for 'RSA'."""
  return str(getattr(value, 'value', value))


def _msg(e) -> str:
  text = getattr(e, 'message', None) or str(e)
  # azure-core puts "Content: ..." and headers into some messages.
  text = str(text).split('\nContent:', 1)[0]
  return _retry.short(text, 300)
