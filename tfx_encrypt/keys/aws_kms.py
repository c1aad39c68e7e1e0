"""AWS KMS key backend: ``aws-kms://arn:aws:kms:REGION:ACCOUNT:key/ID``.

The data key is wrapped with KMS ``Encrypt`` and unwrapped with ``Decrypt``
(symmetric KMS keys, ``SYMMETRIC_DEFAULT``). The package's wrap context is
passed as the KMS ``EncryptionContext``, so it is authenticated by KMS,
appears in CloudTrail and can be used in key-policy conditions
(``kms:EncryptionContext:...``).

Credentials come from boto3's standard chain (environment, shared config and
credentials files, SSO, container and instance roles). The region is the
one in the ARN. The endpoint honours ``AWS_ENDPOINT_URL_KMS`` and
``AWS_ENDPOINT_URL`` (botocore's service-specific endpoint configuration),
which is how tests point it at a local moto server.

botocore's own retries are switched off (``total_max_attempts=1``); retries
of throttling, 5xx and connection failures are done by
:mod:`tfx_encrypt.keys._retry`, so a successful wrap or unwrap is exactly
one request.

Signing (``--sign-with`` / ``--trust``, :mod:`tfx_encrypt.keys._signing`):
an asymmetric ``SIGN_VERIFY`` key with key spec ``ECC_NIST_P256``.
``GetPublicKey`` once per key and process; then one ``Sign`` per signature
with ``SigningAlgorithm=ECDSA_SHA_256`` and ``MessageType=RAW`` over the
55-byte signature message itself (FORMAT.md §8), so KMS hashes it with
SHA-256 exactly as a local ECDSA P-256 key does, and CloudTrail shows the
message. The signer id is the public key's ``sha256:`` id.
"""

import re
from typing import Any, Callable, Dict, Optional

from tfx_encrypt import errors
from tfx_encrypt.keys import _retry
from tfx_encrypt.keys import _signing
from tfx_encrypt.keys.base import KeyBackend, Stanza, WrapContext, b64d, b64e

STANZA_TYPE = 'aws-kms'
SIGNING_ALGORITHM = 'ECDSA_SHA_256'
_SIGNING_OPS = ('Sign', 'GetPublicKey')

_URI_RE = re.compile(
    r'^aws-kms://(?P<arn>arn:(?P<partition>aws[a-z-]*):kms:'
    r'(?P<region>[a-z]{2}(?:-[a-z0-9]+)+-\d+):(?P<account>\d{12}):'
    r'(?P<kind>key|alias)/(?P<name>[A-Za-z0-9/_+=.@-]{1,256}))$')

# Error codes KMS (and the AWS front end) use for throttling or transient
# server-side trouble. Anything with an HTTP status >= 500 is also retried.
_TRANSIENT_CODES = frozenset({
    'ThrottlingException', 'Throttling', 'ThrottledException',
    'TooManyRequestsException', 'RequestLimitExceeded',
    'ProvisionedThroughputExceededException', 'RequestThrottled',
    'RequestThrottledException', 'SlowDown', 'KMSInternalException',
    'DependencyTimeoutException', 'KeyUnavailableException',
    'InternalFailure', 'InternalError', 'ServiceUnavailable',
    'ServiceUnavailableException', 'RequestTimeout', 'RequestTimeoutException',
})
_DENIED_CODES = frozenset({
    'AccessDeniedException', 'AccessDenied', 'UnrecognizedClientException',
    'InvalidClientTokenId', 'InvalidSignatureException', 'SignatureDoesNotMatch',
    'ExpiredTokenException', 'ExpiredToken', 'MissingAuthenticationToken',
    'IncompleteSignature', 'AuthFailure',
})

_XML_ERROR_RE = re.compile(
    r'<Code>([^<]{1,100})</Code>\s*<Message>([^<]{0,1000})</Message>')


def parse_uri(uri: str) -> Dict[str, str]:
  """Split an ``aws-kms://`` URI into arn, partition, region, account, ..."""
  m = _URI_RE.match(uri or '')
  if not m:
    raise errors.InvalidKeyUriError(
        'an AWS KMS key URI must look like '
        'aws-kms://arn:aws:kms:REGION:ACCOUNT:key/KEY_ID (a full key ARN, '
        f'or an alias ARN ...:alias/NAME); got {_safe(uri)!r}')
  return m.groupdict()


def _safe(uri: str) -> str:
  """The URI without any query string (which we never expect anyway)."""
  return str(uri).split('?', 1)[0][:300]


def role_form_problem(uri: str, role: Optional[str]) -> Optional[str]:
  """Why the URI's form cannot play `role`, or None; no I/O, no SDK.

  A key ARN or an alias ARN serves every role: whether the key is
  symmetric (wrap) or SIGN_VERIFY (sign) is known only to KMS.
  """
  del role
  parse_uri(uri)
  return None


class AwsKmsKey(_signing.RemoteSigner, KeyBackend):
  """An AWS KMS key: a symmetric one wraps the package data key, an
  ECC_NIST_P256 SIGN_VERIFY one signs packages."""

  scheme = 'aws-kms'
  stanza_types = (STANZA_TYPE,)

  def __init__(self, uri: str, *, client: Any = None,
               retry: Optional[_retry.RetryPolicy] = None):
    """Creates the backend; no network access happens here.

    Args:
      uri: ``aws-kms://arn:aws:kms:REGION:ACCOUNT:key/ID``.
      client: an already configured boto3 KMS client (optional). When given,
        it is used as is, including its own retry configuration.
      retry: the retry policy; by default :meth:`RetryPolicy.from_env`.
    """
    parts = parse_uri(uri)
    super().__init__(uri)
    self.arn = parts['arn']
    self.region = parts['region']
    self.is_alias = parts['kind'] == 'alias'
    self._client = client
    self.retry = retry or _retry.RetryPolicy.from_env()
    if client is None:
      _retry.import_sdk('boto3', self.scheme, 'aws')

  @property
  def key_id(self) -> str:
    return 'aws-kms://' + self.arn

  # -- client ---------------------------------------------------------------
  def _kms(self):
    if self._client is None:
      import boto3  # pylint: disable=g-import-not-at-top
      from botocore.config import Config  # pylint: disable=g-import-not-at-top
      config = Config(
          retries={'total_max_attempts': 1, 'mode': 'standard'},
          connect_timeout=self.retry.request_timeout,
          read_timeout=self.retry.request_timeout,
          user_agent_extra='tfx-encrypt')
      # boto3 resolves AWS_ENDPOINT_URL_KMS / AWS_ENDPOINT_URL itself.
      self._client = boto3.session.Session().client(
          'kms', region_name=self.region, config=config)
    return self._client

  # -- wrapping -------------------------------------------------------------
  def wrap(self, dek: bytes, context: WrapContext) -> Stanza:
    _check_dek(dek)
    enc_ctx = context.as_dict()

    def call():
      return self._kms().encrypt(KeyId=self.arn, Plaintext=bytes(dek),
                                 EncryptionContext=enc_ctx)

    resp = self._call('Encrypt', call)
    blob = resp.get('CiphertextBlob')
    if not isinstance(blob, (bytes, bytearray)) or not blob:
      raise errors.KeyBackendError(
          f'AWS KMS Encrypt with {self.key_id} returned no ciphertext; '
          'check the endpoint (AWS_ENDPOINT_URL) points at AWS KMS')
    return Stanza(STANZA_TYPE, self.key_id, {'ct': b64e(bytes(blob))})

  def unwrap(self, stanza: Stanza, context: WrapContext) -> bytes:
    if not self.matches(stanza):
      raise errors.NoMatchingKeyError(
          f'the recipient stanza is for {stanza.key_id!r} ({stanza.type}), '
          f'not for {self.key_id}')
    if set(stanza.body) != {'ct'}:
      raise errors.TamperedPackageError(
          f'the {STANZA_TYPE} stanza for {self.key_id} is malformed; the '
          'package is corrupt or was modified')
    blob = b64d(stanza.body['ct'], f'{STANZA_TYPE} ciphertext')
    enc_ctx = context.as_dict()

    def call():
      return self._kms().decrypt(CiphertextBlob=blob, KeyId=self.arn,
                                 EncryptionContext=enc_ctx)

    resp = self._call('Decrypt', call)
    used = resp.get('KeyId')
    if not self.is_alias and used and used != self.arn:
      raise errors.NoMatchingKeyError(
          f'AWS KMS decrypted the data key with {used}, not with '
          f'{self.arn}; the package stanza is not for this key')
    plaintext = resp.get('Plaintext')
    if not isinstance(plaintext, (bytes, bytearray)):
      raise errors.KeyBackendError(
          f'AWS KMS Decrypt with {self.key_id} returned no plaintext')
    return bytes(plaintext)

  # -- signing (tfx_encrypt.keys._signing) ----------------------------------
  def _public_cache_key(self):
    return ('aws-kms', self.arn, str(self._kms().meta.endpoint_url))

  def _fetch_public_key(self) -> _signing.PublicKeyInfo:
    resp = self._call('GetPublicKey',
                      lambda: self._kms().get_public_key(KeyId=self.arn))
    usage = resp.get('KeyUsage')
    algorithms = resp.get('SigningAlgorithms') or []
    if (usage and usage != 'SIGN_VERIFY') or (
        SIGNING_ALGORITHM not in algorithms):
      spec = resp.get('KeySpec') or resp.get('CustomerMasterKeySpec') or '?'
      raise errors.UsageError(
          f'{self.key_id} is a {usage or "?"} key with key spec {spec}; '
          'signing needs an asymmetric SIGN_VERIFY key with key spec '
          'ECC_NIST_P256 (aws kms create-key --key-usage SIGN_VERIFY '
          '--key-spec ECC_NIST_P256)')
    der = resp.get('PublicKey')
    if not isinstance(der, (bytes, bytearray)) or not der:
      raise errors.KeyBackendError(
          f'AWS KMS GetPublicKey with {self.key_id} returned no public key; '
          'check the endpoint (AWS_ENDPOINT_URL) points at AWS KMS')
    return _signing.PublicKeyInfo.from_der(
        der, self.key_id, native_id=str(resp.get('KeyId') or ''))

  def _sign_remote(self, info: _signing.PublicKeyInfo,
                   message: bytes) -> bytes:
    def call():
      return self._kms().sign(KeyId=self.arn, Message=message,
                              MessageType='RAW',
                              SigningAlgorithm=SIGNING_ALGORITHM)

    resp = self._call('Sign', call)
    used = resp.get('KeyId')
    if info.native_id and used and _bare_key_id(used) != _bare_key_id(
        info.native_id):
      raise errors.KeyBackendError(
          f'AWS KMS signed with {used}, not with {info.native_id} whose '
          f'public key {self.key_id} named earlier in this process; the '
          'alias was re-pointed while in use. Run the command again')
    signature = resp.get('Signature')
    if not isinstance(signature, (bytes, bytearray)) or not signature:
      raise errors.KeyBackendError(
          f'AWS KMS Sign with {self.key_id} returned no signature')
    return bytes(signature)

  # -- errors ---------------------------------------------------------------
  def _call(self, op: str, fn: Callable[[], Any]) -> Any:
    what = f'AWS KMS {op} with {self.key_id}'
    return self.retry.call(lambda: self._translate(op, what, fn), what=what)

  def _translate(self, op: str, what: str, fn: Callable[[], Any]) -> Any:
    """Runs one request; maps botocore exceptions to typed errors."""
    from botocore import exceptions as bex  # pylint: disable=g-import-not-at-top
    try:
      return fn()
    except bex.ClientError as e:
      raise self._client_error(op, what, e) from None
    except (bex.NoCredentialsError, bex.PartialCredentialsError,
            bex.CredentialRetrievalError, bex.NoAuthTokenError,
            bex.TokenRetrievalError) as e:
      raise errors.KeyAccessDeniedError(
          f'{what}: no usable AWS credentials ({type(e).__name__}). '
          'Configure the standard AWS credential chain: AWS_PROFILE, '
          'AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, SSO, or an instance/'
          'container role.') from None
    except bex.ParamValidationError as e:
      raise errors.UsageError(
          f'{what}: invalid request: {_retry.short(e)}') from None
    except (bex.ConnectionError, bex.HTTPClientError) as e:
      raise _retry.TransientError(
          f'cannot reach the AWS KMS endpoint ({type(e).__name__}: '
          f'{_retry.short(e, 200)})',
          errors.BackendUnavailableError(
              f'{what}: the AWS KMS endpoint is unreachable. Check network '
              'access, the region in the key ARN and AWS_ENDPOINT_URL.')
      ) from None

  def _client_error(self, op: str, what: str, e) -> Exception:
    err = e.response.get('Error', {}) or {}
    code = str(err.get('Code', '') or '')
    raw_msg = str(err.get('Message', '') or '')
    # Some front ends answer a JSON-protocol call with an XML error
    # document; botocore then leaves it whole in Message.
    m = _XML_ERROR_RE.search(raw_msg)
    if m:
      code, raw_msg = m.group(1), m.group(2)
    msg = _retry.short(raw_msg)
    status = int((e.response.get('ResponseMetadata') or {}).get(
        'HTTPStatusCode', 0) or 0)
    detail = f'({code}: {msg})' if msg else f'({code})'
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
      return _retry.TransientError(
          f'{code or "HTTP " + str(status)}',
          errors.BackendUnavailableError(
              f'{what} kept failing {detail}; AWS KMS is throttling or '
              'unavailable. Retry later, or raise the account\'s KMS request '
              'quota.'))
    if code in _DENIED_CODES or status in (401, 403):
      return errors.KeyAccessDeniedError(
          f'{what} was denied {detail}. Grant the caller kms:{op} on the '
          'key in its key policy or IAM policy (including any '
          'kms:EncryptionContext conditions), and check the credentials in '
          'use (aws sts get-caller-identity).')
    if code in ('DisabledException', 'KMSInvalidStateException'):
      return errors.KeyDisabledError(
          f'{what} failed: the key is disabled or pending deletion {detail}. '
          'Enable it (aws kms enable-key / cancel-key-deletion) or use '
          'another recipient.')
    if code == 'NotFoundException':
      return errors.KeyNotFoundError(
          f'{what} failed: AWS KMS does not know this key {detail}. Check '
          'the key ARN, the region and the account.')
    if code == 'InvalidCiphertextException':
      return errors.TamperedPackageError(
          f'{what} failed: KMS rejected the wrapped data key or the '
          'encryption context (InvalidCiphertextException); the package '
          'header was modified, or the stanza belongs to another package')
    if code == 'IncorrectKeyException':
      return errors.NoMatchingKeyError(
          f'{what} failed: the wrapped data key was not produced by this '
          'KMS key (IncorrectKeyException)')
    signing = op in _SIGNING_OPS
    if code in ('InvalidKeyUsageException', 'UnsupportedOperationException') or (
        signing and code == 'ValidationException' and 'SIGN_VERIFY' in msg):
      need = ('an asymmetric SIGN_VERIFY key with key spec ECC_NIST_P256'
              if signing else 'a symmetric ENCRYPT_DECRYPT KMS key')
      return errors.UsageError(f'{what} failed {detail}: the key must be {need}')
    if code in ('ValidationException', 'InvalidArnException'):
      return errors.InvalidKeyUriError(f'{what} failed {detail}')
    return errors.KeyBackendError(f'{what} failed {detail}')


def _bare_key_id(key_id: str) -> str:
  """'1234abcd-...' of a key ARN or a bare key id (KMS answers either)."""
  return str(key_id).rsplit(':key/', 1)[-1]


def _check_dek(dek: bytes) -> None:
  if not isinstance(dek, (bytes, bytearray)) or not 16 <= len(dek) <= 64:
    raise errors.UsageError('the data key to wrap must be 16 to 64 bytes')
