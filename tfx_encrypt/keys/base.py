"""The key-backend interface.

A backend turns a key URI into an object that can wrap and unwrap the
package data key (DEK) and, optionally, sign and verify. Backends never see
the payload; they see the 32-byte DEK and the encryption context only.

Rules every backend follows (see docs/BACKENDS.md):

* `key_id` is public. It is recorded in the package header and in MLMD, so
  it must never contain a secret (no PIN, no token, no private key).
* `wrap` makes exactly one remote call; `unwrap` at most one.
* Errors are the typed errors of :mod:`tfx_encrypt.errors`; their messages
  never contain secrets.
"""

import abc
import base64
import hashlib
import json
from typing import ClassVar, Dict, Mapping, Optional, Tuple

from tfx_encrypt import errors

# Limits a stanza must respect; enforced when a header is parsed.
MAX_STANZA_TYPE_LEN = 64
MAX_KEY_ID_LEN = 1024
MAX_STANZA_BODY_FIELDS = 16
MAX_STANZA_FIELD_LEN = 16384


def b64e(data: bytes) -> str:
  return base64.b64encode(data).decode('ascii')


def b64d(text: str, what: str = 'field') -> bytes:
  try:
    return base64.b64decode(text.encode('ascii'), validate=True)
  except (ValueError, UnicodeEncodeError) as e:
    raise errors.TamperedPackageError(
        f'package header {what} is not valid base64; the package is '
        'corrupt or was modified') from e


class WrapContext:
  """What a key wrap is bound to: the package id and the encryption context.

  `aad()` is the canonical byte string that backends with an associated-data
  input (RSA-OAEP label, HPKE info, GCP KMS AAD, Vault associated_data) bind
  to. Backends with a key/value context (AWS KMS EncryptionContext) use
  `as_dict()` instead.
  """

  def __init__(self, package_id: bytes, pairs: Mapping[str, str]):
    self.package_id = bytes(package_id)
    self.pairs = dict(pairs)

  def as_dict(self) -> Dict[str, str]:
    d = dict(self.pairs)
    d['tfxe:package-id'] = self.package_id.hex()
    return d

  def aad(self) -> bytes:
    return b'tfxe1 wrap\x00' + json.dumps(
        self.as_dict(), sort_keys=True, separators=(',', ':'),
        ensure_ascii=True).encode('ascii')


class Stanza:
  """One recipient's wrapped copy of the DEK, as stored in the header."""

  __slots__ = ('type', 'key_id', 'body')

  def __init__(self, type: str, key_id: str, body: Mapping[str, str]):  # pylint: disable=redefined-builtin
    self.type = type
    self.key_id = key_id
    self.body = dict(body)

  def to_json(self) -> dict:
    return {'type': self.type, 'key_id': self.key_id, 'body': dict(self.body)}

  @classmethod
  def from_json(cls, obj) -> 'Stanza':
    bad = errors.TamperedPackageError(
        'a recipient stanza in the package header is malformed; the package '
        'is corrupt or was modified')
    if not isinstance(obj, dict) or set(obj) != {'type', 'key_id', 'body'}:
      raise bad
    t, k, body = obj['type'], obj['key_id'], obj['body']
    if not (isinstance(t, str) and 0 < len(t) <= MAX_STANZA_TYPE_LEN and
            isinstance(k, str) and 0 < len(k) <= MAX_KEY_ID_LEN and
            isinstance(body, dict) and len(body) <= MAX_STANZA_BODY_FIELDS):
      raise bad
    for bk, bv in body.items():
      if not (isinstance(bk, str) and isinstance(bv, str) and
              len(bk) <= 64 and len(bv) <= MAX_STANZA_FIELD_LEN):
        raise bad
    return cls(t, k, body)

  def __eq__(self, other):
    return isinstance(other, Stanza) and self.to_json() == other.to_json()

  def __repr__(self):
    return f'Stanza(type={self.type!r}, key_id={self.key_id!r})'


class KeyBackend(abc.ABC):
  """A key named by a URI. Subclasses implement some of wrap/unwrap/sign."""

  #: URI scheme this backend serves ('file', 'aws-kms', 'pkcs11', ...).
  scheme: ClassVar[str] = ''
  #: Stanza types this backend can unwrap.
  stanza_types: ClassVar[Tuple[str, ...]] = ()

  def __init__(self, uri: str):
    self.uri = uri

  @property
  @abc.abstractmethod
  def key_id(self) -> str:
    """A stable, public identifier of this key. Never secret."""

  # -- key wrapping -------------------------------------------------------
  def wrap(self, dek: bytes, context: WrapContext) -> Stanza:
    raise errors.UsageError(
        f'key {self.key_id} cannot be used as a recipient (it cannot wrap '
        'keys); pass a public or KMS key with --recipient')

  def unwrap(self, stanza: Stanza, context: WrapContext) -> bytes:
    raise errors.UsageError(
        f'key {self.key_id} cannot be used as an identity (it cannot unwrap '
        'keys); pass a private or KMS key with --identity')

  def matches(self, stanza: Stanza) -> bool:
    """True if this key could unwrap the stanza, decided without any call."""
    return stanza.type in self.stanza_types and stanza.key_id == self.key_id

  # -- signatures -----------------------------------------------------------
  #: Signature algorithm name ('ed25519', 'ecdsa-p256-sha256') or None.
  signature_alg: Optional[str] = None

  def sign(self, message: bytes) -> bytes:
    raise errors.UsageError(
        f'key {self.key_id} cannot sign; pass an Ed25519 or ECDSA P-256 '
        'private key with --sign-with')

  def verify(self, message: bytes, signature: bytes, alg: str) -> bool:
    """Return True iff `signature` is valid for `message` under this key."""
    raise errors.UsageError(
        f'key {self.key_id} cannot verify signatures; pass an Ed25519 or '
        'ECDSA P-256 public key with --trust')

  @property
  def signer_id(self) -> str:
    """Id recorded in a signature block; by default the key id."""
    return self.key_id

  def __repr__(self):
    return f'{type(self).__name__}({self.key_id!r})'


def spki_key_id(public_key) -> str:
  """Key id of a public key: SHA-256 of its SubjectPublicKeyInfo DER."""
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  der = public_key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
  return 'sha256:' + hashlib.sha256(der).hexdigest()
