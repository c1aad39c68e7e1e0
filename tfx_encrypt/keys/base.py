"""The key-backend interface.

A backend turns a key URI into an object that can wrap and unwrap the
package data key (DEK) and, optionally, sign and verify. Backends never see
the payload; they see the 32-byte DEK and the encryption context only.

Rules every backend follows (see docs/BACKENDS.md):

* `key_id` is public. It is recorded in the package header and in MLMD, so
  it must never contain a secret (no PIN, no token, no private key).
* `wrap` makes exactly one remote call; `unwrap` at most one; `sign` one
  (plus one public-key fetch per key and process, keys/_signing.py).
* Errors are the typed errors of :mod:`tfx_encrypt.errors`; their messages
  never contain secrets.
"""

import abc
import hashlib
import urllib.parse
from typing import ClassVar, Dict, Mapping, Optional, Tuple

from tfx_encrypt import _text
from tfx_encrypt import errors
# The stanza, its wrap context and limits are format (FORMAT.md §7); keys
# build on them. Re-exported here for the backends.
from tfx_encrypt.format.stanza import (  # pylint: disable=unused-import
    MAX_KEY_ID_LEN, MAX_STANZA_BODY_FIELDS, MAX_STANZA_FIELD_LEN,
    MAX_STANZA_TYPE_LEN, Stanza, WrapContext, b64d, b64e)


#: The roles a key can be given in, and the CLI option that gives each one.
#: A key is checked against its role when it is resolved, before any key or
#: package operation (see :func:`tfx_encrypt.keys.check_role`).
ROLE_OPTIONS: Dict[str, str] = {
    'recipient': '--recipient',
    'identity': '--identity',
    'trust': '--trust',
    'signer': '--sign-with',
}
ROLES = tuple(ROLE_OPTIONS)

#: Query parameters of a key URI that may hold a secret; never shown.
SECRET_QUERY_PARAMS = frozenset(
    {'pin-value', 'password', 'passphrase', 'secret', 'token', 'access-token'})

# What each role requires, said when a key cannot play it.
_ROLE_NEEDS = {
    'recipient': ('wrap keys', 'a recipient must be a public key (X25519, '
                  'RSA >= 3072) or a KMS/HSM key URI'),
    'identity': ('unwrap keys', 'an identity must be a private key (X25519, '
                 'RSA) or a KMS/HSM key URI'),
    'trust': ('verify signatures', "a trust anchor must be the publisher's "
              'Ed25519 or ECDSA P-256 public key'),
    'signer': ('sign', 'a signer must be an Ed25519 or ECDSA P-256 private '
               'key'),
}


def redact_uri(uri: str) -> str:
  """`uri` without secret query parameters (pin-value, token, ...).

  Messages show keys as the user typed them, so that "which key?" is
  answered at a glance; a PIN or token typed into the URI must not follow.
  """
  head, sep, query = uri.partition('?')
  if not sep:
    return uri
  kept = [item for item in query.split('&')
          if urllib.parse.unquote(item.partition('=')[0]).lower()
          not in SECRET_QUERY_PARAMS]
  return head + ('?' + '&'.join(kept) if kept else '')


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

  # -- how messages name the key ------------------------------------------
  @property
  def display(self) -> str:
    """The key as the user typed it (path or URI), secrets removed.

    Key ids alone (``sha256:...``) do not tell a user which of their files
    is meant; the typed form does. Secret query parameters are stripped and
    terminal control characters escaped, so the result is safe to print.
    """
    return _text.printable(redact_uri(self.uri))

  def describe(self) -> str:
    """`display (key_id)`: the form every message naming this key uses."""
    shown, key_id = self.display, _text.printable(self.key_id)
    return shown if shown == key_id else f'{shown} ({key_id})'

  # -- roles ------------------------------------------------------------------
  def role_problem(self, role: str) -> Optional[str]:
    """Why this key cannot be used as `role` (one of ROLES), or None.

    The text continues a sentence that starts with the key's option and
    display form (see :func:`tfx_encrypt.keys.check_role`). This default
    judges by capability: a backend serves a role iff it overrides the
    method that role needs. LocalKey is stricter (see there): it also
    refuses a private key where a public one must be given.
    """
    method = {'recipient': 'wrap', 'identity': 'unwrap', 'trust': 'verify',
              'signer': 'sign'}[role]
    if getattr(type(self), method) is not getattr(KeyBackend, method):
      return None
    verb, need = _ROLE_NEEDS[role]
    backend = self.scheme or type(self).__name__
    return f'is a key of the {backend!r} backend, which cannot {verb}; {need}'

  # -- key wrapping -------------------------------------------------------
  def wrap(self, dek: bytes, context: WrapContext) -> Stanza:
    raise errors.KeyRoleError(
        f'key {self.describe()} cannot be used as a recipient (it cannot '
        'wrap keys); pass a public or KMS key with --recipient')

  def unwrap(self, stanza: Stanza, context: WrapContext) -> bytes:
    raise errors.KeyRoleError(
        f'key {self.describe()} cannot be used as an identity (it cannot '
        'unwrap keys); pass a private or KMS key with --identity')

  def matches(self, stanza: Stanza) -> bool:
    """True if this key could unwrap the stanza, decided without any call."""
    return stanza.type in self.stanza_types and stanza.key_id == self.key_id

  # -- signatures -----------------------------------------------------------
  #: Signature algorithm name ('ed25519', 'ecdsa-p256-sha256') or None.
  signature_alg: Optional[str] = None

  def sign(self, message: bytes) -> bytes:
    raise errors.KeyRoleError(
        f'key {self.describe()} cannot sign; pass an Ed25519 or ECDSA P-256 '
        'private key with --sign-with')

  def verify(self, message: bytes, signature: bytes, alg: str) -> bool:
    """Return True iff `signature` is valid for `message` under this key."""
    raise errors.KeyRoleError(
        f'key {self.describe()} cannot verify signatures; pass an Ed25519 or '
        'ECDSA P-256 public key with --trust')

  @property
  def signer_id(self) -> str:
    """Id recorded in a signature block; by default the key id."""
    return self.key_id

  def public_key_pem(self) -> bytes:
    """The public key as PEM SubjectPublicKeyInfo (tfx-encrypt pubkey)."""
    raise errors.KeyRoleError(
        f'key {self.describe()} has no public key to export; pass a key file '
        'or the URI of a KMS signing key')

  def __repr__(self):
    return f'{type(self).__name__}({self.key_id!r})'


def spki_key_id(public_key) -> str:
  """Key id of a public key: SHA-256 of its SubjectPublicKeyInfo DER."""
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  der = public_key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
  return 'sha256:' + hashlib.sha256(der).hexdigest()
