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
"""

import re
from typing import Any, Callable, Dict, Optional

from tfx_encrypt import errors
from tfx_encrypt.keys import _retry
from tfx_encrypt.keys.base import KeyBackend, Stanza, WrapContext, b64d, b64e

STANZA_TYPE = 'aws-kms'

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


class AwsKmsKey(KeyBackend):
  """A symmetric AWS KMS key used to wrap the package data key."""

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
    if code in ('InvalidKeyUsageException', 'UnsupportedOperationException'):
      return errors.UsageError(
          f'{what} failed {detail}: the key must be a symmetric '
          'ENCRYPT_DECRYPT KMS key')
    if code in ('ValidationException', 'InvalidArnException'):
      return errors.InvalidKeyUriError(f'{what} failed {detail}')
    return errors.KeyBackendError(f'{what} failed {detail}')


def _check_dek(dek: bytes) -> None:
  if not isinstance(dek, (bytes, bytearray)) or not 16 <= len(dek) <= 64:
    raise errors.UsageError('the data key to wrap must be 16 to 64 bytes')
