"""Google Cloud KMS key backend.

URI: ``gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K`` (Tink's
form). The data key is wrapped with ``Encrypt`` and unwrapped with
``Decrypt`` of a symmetric ``ENCRYPT_DECRYPT`` key, with the package wrap
context as ``additional_authenticated_data``.

Signing (``--sign-with`` / ``--trust``) names a key *version*:
``gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K/
cryptoKeyVersions/N`` of an ``EC_SIGN_P256_SHA256`` (or ``EC_SIGN_ED25519``)
key. ``GetPublicKey`` once per version and process, then one
``AsymmetricSign`` per signature, over ``digest.sha256`` = SHA-256 of the
signature message (ECDSA) or over the message itself as ``data``
(Ed25519); see :mod:`tfx_encrypt.keys._signing`. A CryptoKey URI cannot
sign and a version URI cannot wrap (KeyRoleError). Every request and response
carries the CRC32C integrity fields, checked as Google recommends
(https://cloud.google.com/kms/docs/data-integrity-guidelines); a mismatch
is treated as corruption in transit and retried.

Credentials are Application Default Credentials
(``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default
login``, workload identity, the metadata server).

Endpoint override (tests, emulators, private endpoints):

* ``TFXE_GCP_KMS_ENDPOINT=host:port`` sends requests there, with TLS and the
  usual credentials;
* with also ``TFXE_GCP_KMS_INSECURE=1`` the channel is plaintext gRPC without
  credentials. Only for a local test server; never set it in production.

The client library's own retries are disabled (``retry=None``); retries of
throttling, unavailability and integrity failures follow
:mod:`tfx_encrypt.keys._retry`.
"""

import logging
import os
import re
from typing import Any, Callable, Dict, Optional

from tfx_encrypt import errors
from tfx_encrypt.keys import _retry
from tfx_encrypt.keys import _signing
from tfx_encrypt.keys.base import KeyBackend, Stanza, WrapContext, b64d, b64e

_LOG = logging.getLogger('tfx_encrypt.keys.gcp_kms')

STANZA_TYPE = 'gcp-kms'

_URI_RE = re.compile(
    r'^gcp-kms://(?P<name>projects/(?P<project>[A-Za-z0-9._:-]{1,100})/'
    r'locations/(?P<location>[a-z0-9-]{1,64})/'
    r'keyRings/(?P<ring>[A-Za-z0-9_-]{1,63})/'
    r'cryptoKeys/(?P<key>[A-Za-z0-9_-]{1,63})'
    r'(?:/cryptoKeyVersions/(?P<version>[1-9][0-9]{0,9}))?)$')

#: Cloud KMS algorithms a key version may sign packages with.
SIGNING_ALGORITHMS = {'EC_SIGN_P256_SHA256': _signing.ECDSA_P256,
                      'EC_SIGN_ED25519': _signing.ED25519}
# Permission (and a role granting it) each operation needs.
_PERMISSIONS = {
    'Encrypt': ('cloudkms.cryptoKeyVersions.useToEncrypt',
                'roles/cloudkms.cryptoKeyEncrypterDecrypter'),
    'Decrypt': ('cloudkms.cryptoKeyVersions.useToDecrypt',
                'roles/cloudkms.cryptoKeyEncrypterDecrypter'),
    'AsymmetricSign': ('cloudkms.cryptoKeyVersions.useToSign',
                       'roles/cloudkms.signer'),
    'GetPublicKey': ('cloudkms.cryptoKeyVersions.viewPublicKey',
                     'roles/cloudkms.publicKeyViewer'),
}


def parse_uri(uri: str) -> Dict[str, str]:
  m = _URI_RE.match(uri or '')
  if not m:
    raise errors.InvalidKeyUriError(
        'a GCP KMS key URI must look like gcp-kms://projects/PROJECT/'
        'locations/LOCATION/keyRings/RING/cryptoKeys/KEY (a CryptoKey, to '
        'wrap keys), or .../cryptoKeys/KEY/cryptoKeyVersions/N (a '
        f'CryptoKeyVersion, to sign); got {str(uri).split("?", 1)[0][:300]!r}')
  return m.groupdict()


def role_form_problem(uri: str, role: Optional[str]) -> Optional[str]:
  """Why the URI's form cannot play `role`, or None; no I/O, no SDK.

  Cloud KMS wraps with a CryptoKey (its primary version) and signs with
  one CryptoKeyVersion, so the URI's form decides the roles it can play.
  """
  versioned = parse_uri(uri)['version'] is not None
  if role in ('signer', 'trust') and not versioned:
    return ('names a CryptoKey; a Cloud KMS signing key must name a key '
            'version: append /cryptoKeyVersions/N (an EC_SIGN_P256_SHA256 '
            'key version)')
  if role in ('recipient', 'identity') and versioned:
    return ('names a CryptoKeyVersion, which signs; a Cloud KMS recipient or '
            'identity must name the CryptoKey (drop /cryptoKeyVersions/N)')
  return None


# -- CRC32C (Castagnoli) ----------------------------------------------------

def _make_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = None


def crc32c(data: bytes) -> int:
  """CRC32C of `data` (google-crc32c when installed, else pure Python)."""
  try:
    import google_crc32c  # pylint: disable=g-import-not-at-top
    return int(google_crc32c.value(bytes(data)))
  except ImportError:
    pass
  global _CRC_TABLE
  if _CRC_TABLE is None:
    _CRC_TABLE = _make_table()
  crc = 0xFFFFFFFF
  for b in bytes(data):
    crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
  return crc ^ 0xFFFFFFFF


class GcpKmsKey(_signing.RemoteSigner, KeyBackend):
  """A Cloud KMS key: a symmetric CryptoKey wraps the package data key, an
  asymmetric CryptoKeyVersion signs packages."""

  signing_algs = (_signing.ECDSA_P256, _signing.ED25519)

  scheme = 'gcp-kms'
  stanza_types = (STANZA_TYPE,)

  def __init__(self, uri: str, *, client: Any = None,
               retry: Optional[_retry.RetryPolicy] = None):
    """Creates the backend; no network access happens here.

    Args:
      uri: ``gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K``
        (wraps), or ``.../cryptoKeys/K/cryptoKeyVersions/N`` (signs).
      client: a ``google.cloud.kms_v1.KeyManagementServiceClient`` to use
        instead of building one (optional).
      retry: the retry policy; by default :meth:`RetryPolicy.from_env`.
    """
    parts = parse_uri(uri)
    super().__init__(uri)
    self.name = parts['name']
    self.version = parts['version']
    self._client = client
    self.retry = retry or _retry.RetryPolicy.from_env()
    if client is None:
      _retry.import_sdk('google.cloud.kms_v1', self.scheme, 'gcp')

  @property
  def key_id(self) -> str:
    return 'gcp-kms://' + self.name

  def _kms(self):
    if self._client is None:
      from google.cloud import kms_v1  # pylint: disable=g-import-not-at-top
      endpoint = os.environ.get('TFXE_GCP_KMS_ENDPOINT', '').strip()
      insecure = os.environ.get('TFXE_GCP_KMS_INSECURE', '') == '1'
      if endpoint and insecure:
        import grpc  # pylint: disable=g-import-not-at-top
        from google.cloud.kms_v1.services.key_management_service import transports  # pylint: disable=g-import-not-at-top
        _LOG.warning('GCP KMS: using a plaintext gRPC channel to %s '
                     '(TFXE_GCP_KMS_INSECURE=1); for local tests only',
                     endpoint)
        transport = transports.KeyManagementServiceGrpcTransport(
            channel=grpc.insecure_channel(endpoint))
        self._client = kms_v1.KeyManagementServiceClient(transport=transport)
      elif endpoint:
        self._client = kms_v1.KeyManagementServiceClient(
            client_options={'api_endpoint': endpoint})
      else:
        self._client = kms_v1.KeyManagementServiceClient()
    return self._client

  def role_problem(self, role: str) -> Optional[str]:
    return role_form_problem(self.uri, role) or super().role_problem(role)

  def _need_form(self, role: str) -> None:
    """The role check for callers that skipped it (Python API objects)."""
    problem = role_form_problem(self.uri, role)
    if problem:
      raise errors.KeyRoleError(f'{self.display} {problem}')

  # -- wrapping -------------------------------------------------------------
  def wrap(self, dek: bytes, context: WrapContext) -> Stanza:
    self._need_form('recipient')
    if not isinstance(dek, (bytes, bytearray)) or not 16 <= len(dek) <= 64:
      raise errors.UsageError('the data key to wrap must be 16 to 64 bytes')
    dek = bytes(dek)
    aad = context.aad()
    request = {
        'name': self.name,
        'plaintext': dek,
        'plaintext_crc32c': crc32c(dek),
        'additional_authenticated_data': aad,
        'additional_authenticated_data_crc32c': crc32c(aad),
    }

    def call():
      resp = self._kms().encrypt(request=request, retry=None,
                                 timeout=self.retry.request_timeout)
      if not (resp.verified_plaintext_crc32c and
              resp.verified_additional_authenticated_data_crc32c):
        raise _retry.TransientError(
            'the Encrypt request was corrupted in transit (CRC32C not '
            'verified by the server)')
      if resp.ciphertext_crc32c != crc32c(resp.ciphertext):
        raise _retry.TransientError(
            'the Encrypt response was corrupted in transit (CRC32C '
            'mismatch)')
      return resp

    resp = self._call('Encrypt', call)
    if not str(resp.name).startswith(self.name + '/cryptoKeyVersions/'):
      raise errors.KeyBackendError(
          f'GCP KMS Encrypt with {self.key_id} answered for another key '
          f'({_retry.short(resp.name, 200)}); check TFXE_GCP_KMS_ENDPOINT')
    return Stanza(STANZA_TYPE, self.key_id, {'ct': b64e(resp.ciphertext)})

  def unwrap(self, stanza: Stanza, context: WrapContext) -> bytes:
    if not self.matches(stanza):
      raise errors.NoMatchingKeyError(
          f'the recipient stanza is for {stanza.key_id!r} ({stanza.type}), '
          f'not for {self.key_id}')
    if set(stanza.body) != {'ct'}:
      raise errors.TamperedPackageError(
          f'the {STANZA_TYPE} stanza for {self.key_id} is malformed; the '
          'package is corrupt or was modified')
    self._need_form('identity')
    ct = b64d(stanza.body['ct'], f'{STANZA_TYPE} ciphertext')
    aad = context.aad()
    request = {
        'name': self.name,
        'ciphertext': ct,
        'ciphertext_crc32c': crc32c(ct),
        'additional_authenticated_data': aad,
        'additional_authenticated_data_crc32c': crc32c(aad),
    }

    def call():
      resp = self._kms().decrypt(request=request, retry=None,
                                 timeout=self.retry.request_timeout)
      if resp.plaintext_crc32c != crc32c(resp.plaintext):
        raise _retry.TransientError(
            'the Decrypt response was corrupted in transit (CRC32C '
            'mismatch)')
      return resp

    return bytes(self._call('Decrypt', call).plaintext)

  # -- signing (tfx_encrypt.keys._signing) ----------------------------------
  def _public_cache_key(self):
    endpoint = os.environ.get('TFXE_GCP_KMS_ENDPOINT', '').strip()
    return ('gcp-kms', self.name, endpoint)

  def _fetch_public_key(self) -> _signing.PublicKeyInfo:
    self._need_form('signer')

    def call():
      resp = self._kms().get_public_key(request={'name': self.name},
                                        retry=None,
                                        timeout=self.retry.request_timeout)
      if resp.pem_crc32c != crc32c(resp.pem.encode('utf-8')):
        raise _retry.TransientError(
            'the GetPublicKey response was corrupted in transit (CRC32C '
            'mismatch)')
      return resp

    resp = self._call('GetPublicKey', call)
    self._check_name('GetPublicKey', resp.name)
    algorithm = getattr(resp.algorithm, 'name', str(resp.algorithm))
    if algorithm not in SIGNING_ALGORITHMS:
      raise errors.UsageError(
          f'{self.key_id} is a {algorithm} key version; signing needs an '
          'EC_SIGN_P256_SHA256 (or EC_SIGN_ED25519) key version')
    info = _signing.PublicKeyInfo.from_pem(resp.pem, self.key_id)
    if info.alg != SIGNING_ALGORITHMS[algorithm]:
      raise errors.KeyBackendError(
          f'GCP KMS GetPublicKey with {self.key_id} returned a public key '
          f'that is not {algorithm}')
    return info

  def _sign_remote(self, info: _signing.PublicKeyInfo,
                   message: bytes) -> bytes:
    if info.alg == _signing.ECDSA_P256:
      digest = _signing.sha256(message)
      request = {'name': self.name, 'digest': {'sha256': digest},
                 'digest_crc32c': crc32c(digest)}
      verified = 'verified_digest_crc32c'
    else:
      request = {'name': self.name, 'data': message,
                 'data_crc32c': crc32c(message)}
      verified = 'verified_data_crc32c'

    def call():
      resp = self._kms().asymmetric_sign(request=request, retry=None,
                                         timeout=self.retry.request_timeout)
      if not getattr(resp, verified):
        raise _retry.TransientError(
            'the AsymmetricSign request was corrupted in transit (CRC32C not '
            'verified by the server)')
      if resp.signature_crc32c != crc32c(resp.signature):
        raise _retry.TransientError(
            'the AsymmetricSign response was corrupted in transit (CRC32C '
            'mismatch)')
      return resp

    resp = self._call('AsymmetricSign', call)
    self._check_name('AsymmetricSign', resp.name)
    return bytes(resp.signature)

  def _check_name(self, op: str, name: str) -> None:
    if name and str(name) != self.name:
      raise errors.KeyBackendError(
          f'GCP KMS {op} with {self.key_id} answered for another key '
          f'({_retry.short(name, 200)}); check TFXE_GCP_KMS_ENDPOINT')

  # -- errors ---------------------------------------------------------------
  def _call(self, op: str, fn: Callable[[], Any]) -> Any:
    what = f'GCP KMS {op} with {self.key_id}'
    return self.retry.call(lambda: self._translate(op, what, fn), what=what)

  def _translate(self, op: str, what: str, fn: Callable[[], Any]) -> Any:
    from google.api_core import exceptions as gex  # pylint: disable=g-import-not-at-top
    from google.auth import exceptions as aex  # pylint: disable=g-import-not-at-top
    try:
      return fn()
    except (gex.TooManyRequests, gex.ServiceUnavailable,
            gex.InternalServerError, gex.GatewayTimeout, gex.BadGateway,
            gex.Aborted, gex.Cancelled, gex.Unknown) as e:
      raise _retry.TransientError(
          f'{type(e).__name__} ({_retry.short(e.message, 200)})',
          errors.BackendUnavailableError(
              f'{what} kept failing ({type(e).__name__}: '
              f'{_retry.short(e.message, 200)}); Cloud KMS is throttling or '
              'unreachable. Check network access and TFXE_GCP_KMS_ENDPOINT, '
              'or retry later.')) from None
    except (gex.PermissionDenied, gex.Unauthenticated) as e:
      permission, role = _PERMISSIONS[op]
      raise errors.KeyAccessDeniedError(
          f'{what} was denied ({type(e).__name__}: '
          f'{_retry.short(e.message)}). Grant the caller {permission} '
          f'(role {role}) on the key; '
          'Cloud KMS also answers this way for a key that does not exist.'
      ) from None
    except gex.NotFound as e:
      raise errors.KeyNotFoundError(
          f'{what} failed: Cloud KMS does not know this key '
          f'({_retry.short(e.message)}). Check project, location, key ring '
          'and key names.') from None
    except gex.FailedPrecondition as e:
      if 'purpose' in str(e.message).lower():
        need = ('an EC_SIGN_P256_SHA256 (or EC_SIGN_ED25519) key version'
                if op in ('AsymmetricSign', 'GetPublicKey') else
                'a symmetric ENCRYPT_DECRYPT CryptoKey')
        raise errors.UsageError(
            f'{what} failed ({_retry.short(e.message)}); the key must be '
            f'{need}') from None
      raise errors.KeyDisabledError(
          f'{what} failed: the key version is not enabled '
          f'({_retry.short(e.message)}). Enable or restore the '
          'CryptoKeyVersion, or use another key.') from None
    except gex.InvalidArgument as e:
      if op == 'Decrypt':
        raise errors.TamperedPackageError(
            f'{what} failed: Cloud KMS rejected the wrapped data key or the '
            f'encryption context ({_retry.short(e.message)}); the package '
            'header was modified, or the stanza belongs to another package'
        ) from None
      need = ('symmetric ENCRYPT_DECRYPT CryptoKey' if op == 'Encrypt' else
              'EC_SIGN_P256_SHA256 (or EC_SIGN_ED25519) key version')
      raise errors.UsageError(
          f'{what} failed ({_retry.short(e.message)}); the key must be a '
          f'{need}') from None
    except aex.DefaultCredentialsError as e:
      raise errors.KeyAccessDeniedError(
          f'{what}: no Google Cloud credentials ({_retry.short(e, 200)}). Set '
          'GOOGLE_APPLICATION_CREDENTIALS or run gcloud auth '
          'application-default login.') from None
    except aex.TransportError as e:
      raise _retry.TransientError(
          f'credential refresh failed ({type(e).__name__})',
          errors.BackendUnavailableError(
              f'{what}: cannot refresh Google credentials (network)')
      ) from None
    except aex.RefreshError as e:
      raise errors.KeyAccessDeniedError(
          f'{what}: Google credentials were refused '
          f'({_retry.short(e, 200)})') from None
    except gex.GoogleAPICallError as e:
      raise errors.KeyBackendError(
          f'{what} failed ({type(e).__name__}: {_retry.short(e.message)})'
      ) from None
