"""Local PEM keys: recipients, identities and signers (docs/FORMAT.md §7-§8).

A key URI is a filesystem path or a ``file://`` URI to a PEM file:

* RSA (>= 3072 bits) public or private key: RSA-OAEP-SHA256 key wrapping;
* X25519 public or private key: HPKE (RFC 9180) base mode,
  DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM;
* Ed25519 or ECDSA P-256 private key: signing; public key: verification.

Private keys may be encrypted PEM; the passphrase is read from the
environment variable named by ``TFXE_KEY_PASSPHRASE_ENV`` (default
``TFXE_KEY_PASSPHRASE``), never from the URI.
"""

import os
import stat
import urllib.parse
from typing import Tuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519

from tfx_encrypt import errors
from tfx_encrypt.keys.base import KeyBackend, Stanza, WrapContext, b64d, b64e, spki_key_id

X25519_HPKE = 'x25519-hpke'
RSA_OAEP = 'rsa-oaep-sha256'
MIN_RSA_BITS = 3072
MAX_PEM_BYTES = 64 << 10
KEY_KINDS = ('rsa', 'x25519', 'ed25519', 'ecdsa-p256')

_HPKE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def uri_to_path(uri: str) -> str:
  if uri.startswith('file:'):
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ('', 'localhost') or parsed.query or parsed.fragment:
      raise errors.InvalidKeyUriError(
          f'unsupported file key URI {uri!r}: use file:///absolute/path.pem '
          'or a plain path')
    return urllib.parse.unquote(parsed.path)
  return uri


def _passphrase():
  env = os.environ.get('TFXE_KEY_PASSPHRASE_ENV', 'TFXE_KEY_PASSPHRASE')
  value = os.environ.get(env)
  return value.encode('utf-8') if value else None


def _load_pem(path: str):
  """Return (private_key or None, public_key)."""
  try:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
      raise errors.InvalidKeyUriError(f'key file {path!r} is not a regular file')
    if st.st_size > MAX_PEM_BYTES:
      raise errors.InvalidKeyUriError(f'key file {path!r} is too large')
    with open(path, 'rb') as f:
      data = f.read(MAX_PEM_BYTES + 1)
  except FileNotFoundError:
    raise errors.InvalidKeyUriError(
        f'key file {path!r} does not exist; create one with '
        '"tfx-encrypt keygen" or fix the path') from None
  except PermissionError:
    raise errors.InvalidKeyUriError(
        f'cannot read key file {path!r}: permission denied') from None
  if b'PRIVATE KEY' in data:
    try:
      priv = serialization.load_pem_private_key(data, password=_passphrase())
    except TypeError:
      raise errors.InvalidKeyUriError(
          f'private key {path!r} is encrypted; set TFXE_KEY_PASSPHRASE to its '
          'passphrase') from None
    except ValueError:
      raise errors.InvalidKeyUriError(
          f'{path!r} is not a supported PEM private key (or the passphrase is '
          'wrong)') from None
    return priv, priv.public_key()
  try:
    return None, serialization.load_pem_public_key(data)
  except ValueError:
    raise errors.InvalidKeyUriError(
        f'{path!r} is not a PEM public or private key') from None


class LocalKey(KeyBackend):
  """A key held in a local PEM file."""

  scheme = 'file'
  stanza_types = (X25519_HPKE, RSA_OAEP)

  def __init__(self, uri: str):
    super().__init__(uri)
    self.path = uri_to_path(uri)
    self._private, self._public = _load_pem(self.path)
    pub = self._public
    if isinstance(pub, rsa.RSAPublicKey):
      if pub.key_size < MIN_RSA_BITS:
        raise errors.InvalidKeyUriError(
            f'RSA key {self.path!r} has {pub.key_size} bits; at least '
            f'{MIN_RSA_BITS} are required. Generate one with '
            '"tfx-encrypt keygen rsa"')
      self.kind = 'rsa'
    elif isinstance(pub, x25519.X25519PublicKey):
      self.kind = 'x25519'
    elif isinstance(pub, ed25519.Ed25519PublicKey):
      self.kind = 'ed25519'
      self.signature_alg = 'ed25519'
    elif isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(
        pub.curve, ec.SECP256R1):
      self.kind = 'ecdsa-p256'
      self.signature_alg = 'ecdsa-p256-sha256'
    else:
      raise errors.InvalidKeyUriError(
          f'unsupported key type in {self.path!r}: use RSA (>= 3072 bits) or '
          'X25519 for encryption, Ed25519 or ECDSA P-256 for signatures')
    self._key_id = spki_key_id(pub)

  @property
  def key_id(self) -> str:
    return self._key_id

  @property
  def is_private(self) -> bool:
    return self._private is not None

  # -- wrapping -----------------------------------------------------------------
  def wrap(self, dek: bytes, context: WrapContext) -> Stanza:
    if self.kind == 'x25519':
      ct = _HPKE.encrypt(dek, self._public, info=context.aad())
      return Stanza(X25519_HPKE, self.key_id, {'ct': b64e(ct)})
    if self.kind == 'rsa':
      ct = self._public.encrypt(dek, _oaep(context.aad()))
      return Stanza(RSA_OAEP, self.key_id, {'ct': b64e(ct)})
    return super().wrap(dek, context)

  def unwrap(self, stanza: Stanza, context: WrapContext) -> bytes:
    if self.kind not in ('x25519', 'rsa'):
      return super().unwrap(stanza, context)
    if self._private is None:
      raise errors.UsageError(
          f'{self.path!r} is a public key; decryption needs the matching '
          'private key (OUT_PREFIX.key.pem) as --identity')
    if not self.matches(stanza) or set(stanza.body) != {'ct'}:
      raise errors.NoMatchingKeyError(
          f'stanza {stanza.key_id} is not for key {self.key_id}')
    ct = b64d(stanza.body['ct'], 'recipient stanza')
    try:
      if self.kind == 'x25519':
        return _HPKE.decrypt(ct, self._private, info=context.aad())
      return self._private.decrypt(ct, _oaep(context.aad()))
    except Exception:  # pylint: disable=broad-except
      # Any failure here means the stanza or its context was altered.
      raise errors.TamperedPackageError(
          f'the recipient stanza for key {self.key_id} failed to decrypt: '
          'the package header or its encryption context was modified') from None

  def matches(self, stanza: Stanza) -> bool:
    want = X25519_HPKE if self.kind == 'x25519' else RSA_OAEP
    return stanza.type == want and stanza.key_id == self.key_id

  # -- signatures ---------------------------------------------------------------
  def sign(self, message: bytes) -> bytes:
    if self._private is None or self.kind not in ('ed25519', 'ecdsa-p256'):
      return super().sign(message)
    if self.kind == 'ed25519':
      return self._private.sign(message)
    return self._private.sign(message, ec.ECDSA(hashes.SHA256()))

  def verify(self, message: bytes, signature: bytes, alg: str) -> bool:
    if self.kind not in ('ed25519', 'ecdsa-p256'):
      return super().verify(message, signature, alg)
    if alg != self.signature_alg:
      return False
    try:
      if self.kind == 'ed25519':
        self._public.verify(signature, message)
      else:
        self._public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
      return True
    except InvalidSignature:
      return False


def _oaep(label: bytes):
  return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()),
                      algorithm=hashes.SHA256(), label=label)


def generate(kind: str) -> Tuple[bytes, bytes]:
  """Generate a key pair; returns (private PEM, public PEM)."""
  if kind == 'rsa':
    key = rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
  elif kind == 'x25519':
    key = x25519.X25519PrivateKey.generate()
  elif kind == 'ed25519':
    key = ed25519.Ed25519PrivateKey.generate()
  elif kind == 'ecdsa-p256':
    key = ec.generate_private_key(ec.SECP256R1())
  else:
    raise errors.UsageError(
        f'unknown key kind {kind!r}; choose one of {", ".join(KEY_KINDS)}')
  priv = key.private_bytes(serialization.Encoding.PEM,
                           serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())
  pub = key.public_key().public_bytes(
      serialization.Encoding.PEM,
      serialization.PublicFormat.SubjectPublicKeyInfo)
  return priv, pub


def keygen(kind: str, out_prefix: str, force: bool = False) -> Tuple[str, str]:
  """Write OUT_PREFIX.key.pem (0600) and OUT_PREFIX.pub.pem atomically."""
  priv, pub = generate(kind)
  priv_path, pub_path = out_prefix + '.key.pem', out_prefix + '.pub.pem'
  for p in (priv_path, pub_path):
    if os.path.lexists(p) and not force:
      raise errors.OutputExistsError(
          f'{p} already exists; choose another prefix or remove it')
  _write_atomic(priv_path, priv, 0o600)
  _write_atomic(pub_path, pub, 0o644)
  return priv_path, pub_path


def _write_atomic(path: str, data: bytes, mode: int):
  d = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(d, f'.{os.path.basename(path)}.tmp-{os.urandom(6).hex()}')
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.unlink(tmp)
    raise
