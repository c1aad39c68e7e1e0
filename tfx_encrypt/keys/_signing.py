"""Package signatures made by a key service: the private key never leaves it.

AWS KMS, Cloud KMS, Vault transit and Azure Key Vault sign through
:class:`RemoteSigner`, a mixin for :class:`~tfx_encrypt.keys.base.KeyBackend`
subclasses (docs/BACKENDS.md, "Signing"). A backend supplies two remote
calls, `_fetch_public_key` (GetPublicKey, or the service's public-key
endpoint) and `_sign_remote` (Sign); the mixin provides the rest:

* The signer id recorded in the header (``signer.key_id``, FORMAT.md §8)
  is the public key's id, ``sha256:`` + hex(SHA-256(SubjectPublicKeyInfo
  DER)), exactly as for a local PEM key: the same key has the same id
  whether it is named by its URI or by its exported ``.pub.pem``
  (``tfx-encrypt pubkey URI``). It never depends on the URI's spelling
  (alias or key ARN, endpoint).
* The public key is fetched once per key and process, and cached in memory
  with its id and algorithm (:func:`clear_cache` forgets it). The header
  names its signer before it is signed, so the first signature of a process
  costs one public-key fetch plus one ``Sign``; every further signature
  exactly one ``Sign``.
* Every signature the service returns is verified locally against that
  public key before it is used, so a key changed while in use (an alias
  re-pointed, a key version rotated) fails with KeyBackendError instead of
  producing a package nobody can verify.
* As a trust anchor, the key verifies locally with the cached public key:
  no remote call per verification, and none at all after the first fetch.

ECDSA P-256 signatures are returned as DER (``package.seal_header``
converts them to the raw low-S form), Ed25519 signatures as raw 64 bytes.
"""

import hashlib
import threading
from typing import Any, ClassVar, Dict, Hashable, Optional, Tuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tfx_encrypt import errors
from tfx_encrypt.keys.base import spki_key_id

ECDSA_P256 = 'ecdsa-p256-sha256'
ED25519 = 'ed25519'
ALG_NAMES = {ECDSA_P256: 'ECDSA P-256', ED25519: 'Ed25519'}


def sha256(data: bytes) -> bytes:
  return hashlib.sha256(data).digest()


def alg_of(public_key) -> Optional[str]:
  """'ecdsa-p256-sha256', 'ed25519', or None for any other key."""
  if isinstance(public_key, ed25519.Ed25519PublicKey):
    return ED25519
  if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
      public_key.curve, ec.SECP256R1):
    return ECDSA_P256
  return None


class PublicKeyInfo:
  """A service key's public half, its key id and algorithm.

  Attributes:
    public_key: the `cryptography` public key.
    alg: ECDSA_P256 or ED25519.
    key_id: ``sha256:`` id of its SubjectPublicKeyInfo (the signer id).
    native_id: what the service calls the exact key the public key belongs
      to (a key ARN, a version number), used to sign with that same key and
      to check the service answered for it; '' when the URI says it already.
  """

  __slots__ = ('public_key', 'alg', 'key_id', 'native_id')

  def __init__(self, public_key, what: str, native_id: str = ''):
    alg = alg_of(public_key)
    if alg is None:
      raise errors.UsageError(
          f'{what} is not an ECDSA P-256 or Ed25519 key; a package signer '
          'must be one of those (see docs/BACKENDS.md, "Signing")')
    self.public_key = public_key
    self.alg = alg
    self.key_id = spki_key_id(public_key)
    self.native_id = native_id

  @classmethod
  def from_der(cls, der: Any, what: str,
               native_id: str = '') -> 'PublicKeyInfo':
    try:
      public_key = serialization.load_der_public_key(bytes(der))
    except (TypeError, ValueError):
      raise errors.KeyBackendError(
          f'{what}: the service returned a public key that is not a DER '
          'SubjectPublicKeyInfo') from None
    return cls(public_key, what, native_id)

  @classmethod
  def from_pem(cls, pem: Any, what: str,
               native_id: str = '') -> 'PublicKeyInfo':
    if isinstance(pem, str):
      pem = pem.encode('ascii', 'replace')
    try:
      public_key = serialization.load_pem_public_key(bytes(pem))
    except (TypeError, ValueError):
      raise errors.KeyBackendError(
          f'{what}: the service returned a public key that is not a PEM '
          'SubjectPublicKeyInfo') from None
    return cls(public_key, what, native_id)

  def pem(self) -> bytes:
    return self.public_key.public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo)


def verify(public_key, alg: str, message: bytes, signature: bytes) -> bool:
  """True iff `signature` (DER for ECDSA, raw for Ed25519) is valid."""
  try:
    if alg == ED25519:
      public_key.verify(bytes(signature), message)
    elif alg == ECDSA_P256:
      public_key.verify(bytes(signature), message, ec.ECDSA(hashes.SHA256()))
    else:
      return False
    return True
  except (InvalidSignature, ValueError, TypeError):
    return False


# -- the per-process cache ----------------------------------------------------

_lock = threading.Lock()
_cache: Dict[Hashable, PublicKeyInfo] = {}


def cached(cache_key: Hashable) -> Optional[PublicKeyInfo]:
  with _lock:
    return _cache.get(cache_key)


def remember(cache_key: Hashable, info: PublicKeyInfo) -> None:
  with _lock:
    _cache[cache_key] = info


def forget(cache_key: Hashable) -> None:
  with _lock:
    _cache.pop(cache_key, None)


def clear_cache() -> None:
  """Forget every fetched public key (the next use fetches it again)."""
  with _lock:
    _cache.clear()


class RemoteSigner:
  """Mixin: sign and verify with a key held by a key service.

  Put it before KeyBackend in the bases. Subclasses implement
  `_public_cache_key`, `_fetch_public_key` and `_sign_remote` (one remote
  call each, through the backend's retry policy and typed errors), and may
  restrict `signing_algs`.
  """

  #: Algorithms the service can sign with for tfx-encrypt.
  signing_algs: ClassVar[Tuple[str, ...]] = (ECDSA_P256,)

  # -- what subclasses provide ----------------------------------------------
  def _public_cache_key(self) -> Hashable:
    """Identifies the key (and the endpoint asked) in the process cache."""
    raise NotImplementedError

  def _fetch_public_key(self) -> PublicKeyInfo:
    """One remote call: the public key of the key that signs."""
    raise NotImplementedError

  def _sign_remote(self, info: PublicKeyInfo, message: bytes) -> bytes:
    """One remote call: the signature of `message` (DER ECDSA / raw Ed25519)."""
    raise NotImplementedError

  # -- given ------------------------------------------------------------------
  def public_key_info(self) -> PublicKeyInfo:
    """The key's public half: fetched on first use, then cached."""
    info = getattr(self, '_public_info', None)
    if info is not None:
      return info
    cache_key = self._public_cache_key()
    self._public_cache_key_used = cache_key
    info = cached(cache_key)
    if info is None:
      info = self._fetch_public_key()
      if info.alg not in self.signing_algs:
        names = ' or '.join(ALG_NAMES[a] for a in self.signing_algs)
        raise errors.UsageError(
            f'{self.key_id} holds an {ALG_NAMES[info.alg]} key; this service '
            f'signs for tfx-encrypt with {names} keys only')
      remember(cache_key, info)
    self._public_info = info
    return info

  @property
  def signature_alg(self) -> str:
    return self.public_key_info().alg

  @property
  def signer_id(self) -> str:
    return self.public_key_info().key_id

  def public_key_pem(self) -> bytes:
    return self.public_key_info().pem()

  def describe(self) -> str:
    """`URI (sha256:...)` once the public key is known, else the URI."""
    text = super().describe()
    info = getattr(self, '_public_info', None)
    return f'{text} ({info.key_id})' if info is not None else text

  def sign(self, message: bytes) -> bytes:
    info = self.public_key_info()
    signature = self._sign_remote(info, bytes(message))
    if not verify(info.public_key, info.alg, message, signature):
      forget(self._public_cache_key_used)
      self._public_info = None
      raise errors.KeyBackendError(
          f'the signature {self.key_id} returned does not verify with its '
          f'public key {info.key_id}, fetched earlier in this process: the '
          'key was changed while in use (rotated, or its alias re-pointed). '
          'Run the command again')
    return signature

  def verify(self, message: bytes, signature: bytes, alg: str) -> bool:
    info = self.public_key_info()
    if alg != info.alg:
      return False
    return verify(info.public_key, alg, message, signature)
