"""Local PEM keys: recipients, identities and signers (docs/FORMAT.md §7-§8).

A key URI is a filesystem path or a ``file://`` URI to a PEM file:

* RSA (>= 3072 bits) public or private key: RSA-OAEP-SHA256 key wrapping;
* X25519 public or private key: HPKE (RFC 9180) base mode,
  DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM;
* Ed25519 or ECDSA P-256 private key: signing; public key: verification.

The URI ``-`` reads one PEM private key from standard input (an identity
piped in, as age's ``-i -``); standard input is read at most once per
process and never when it is a terminal.

Private keys may be encrypted PKCS#8 PEM (``tfx-encrypt keygen
--passphrase``). The passphrase is never part of the URI; it comes from, in
this order: the environment variable named by ``TFXE_KEY_PASSPHRASE_ENV``
(default ``TFXE_KEY_PASSPHRASE``); the first line of the file named by
``TFXE_KEY_PASSPHRASE_FILE``; a hidden prompt when standard input and
standard error are terminals (see :func:`set_passphrase_prompt`). It is only
looked for when a key is encrypted, and never echoed or logged.
"""

import getpass
import os
import stat
import sys
import threading
import urllib.parse
from typing import Callable, Optional, Tuple, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.keys.base import KeyBackend, Stanza, WrapContext, b64d, b64e, spki_key_id, redact_uri

X25519_HPKE = 'x25519-hpke'
RSA_OAEP = 'rsa-oaep-sha256'
MIN_RSA_BITS = 3072
MAX_PEM_BYTES = 64 << 10
KEY_KINDS = ('rsa', 'x25519', 'ed25519', 'ecdsa-p256')
KIND_NAMES = {'rsa': 'RSA', 'x25519': 'X25519', 'ed25519': 'Ed25519',
              'ecdsa-p256': 'ECDSA P-256'}
ENCRYPTION_KINDS = ('rsa', 'x25519')
SIGNATURE_KINDS = ('ed25519', 'ecdsa-p256')
STDIN = '-'
#: Environment: the passphrase itself, the name of the variable holding it,
#: and a file whose first line is the passphrase.
PASSPHRASE_ENV = 'TFXE_KEY_PASSPHRASE'
PASSPHRASE_ENV_ENV = 'TFXE_KEY_PASSPHRASE_ENV'
PASSPHRASE_FILE_ENV = 'TFXE_KEY_PASSPHRASE_FILE'
PASSPHRASE_HELP = (f'set {PASSPHRASE_ENV}, or {PASSPHRASE_FILE_ENV}=FILE '
                   '(first line), or run on a terminal to be asked')

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


# -- passphrases ---------------------------------------------------------------

#: prompt(text) -> passphrase; None means getpass on the terminal.
_prompt_hook: Optional[Callable[[str], str]] = None


def set_passphrase_prompt(prompt: Optional[Callable[[str], str]]) -> None:
  """Install how a passphrase is asked on a terminal (None: getpass).

  The CLI installs a click prompt; the core itself depends on the standard
  library only. The hook is called only when stdin and stderr are
  terminals, with a prompt naming the key; it must not echo the input.
  """
  global _prompt_hook
  _prompt_hook = prompt


def read_passphrase_file(path: str, what: str) -> bytes:
  """The first line of `path` (without its line break), as UTF-8 bytes.

  A file rather than an argument, because arguments are visible to every
  user of the machine (ps, /proc) and end up in shell history.
  """
  try:
    with open(path, 'rb') as f:
      line = f.readline(MAX_PEM_BYTES)
  except FileNotFoundError:
    raise errors.UsageError(f'{what} {path} does not exist') from None
  except OSError as e:
    raise errors.UsageError(
        f'cannot read {what} {path}: {e.strerror or e}') from None
  line = line.rstrip(b'\r\n')
  if not line:
    raise errors.UsageError(
        f'{what} {path} is empty; its first line must be the passphrase')
  return line


def passphrase_from_environment() -> Optional[Tuple[bytes, str]]:
  """(passphrase, where it came from) from the environment, or None.

  TFXE_KEY_PASSPHRASE_ENV names the variable to read (for systems whose
  secret store injects a fixed variable name); default TFXE_KEY_PASSPHRASE.
  Then TFXE_KEY_PASSPHRASE_FILE names a file whose first line is used.
  """
  env = os.environ.get(PASSPHRASE_ENV_ENV) or PASSPHRASE_ENV
  value = os.environ.get(env)
  if value:
    return value.encode('utf-8'), env
  path = os.environ.get(PASSPHRASE_FILE_ENV)
  if path:
    return (read_passphrase_file(path, f'{PASSPHRASE_FILE_ENV} file'),
            f'{PASSPHRASE_FILE_ENV} ({path})')
  return None


def _can_prompt() -> bool:
  try:
    return bool(sys.stdin and sys.stdin.isatty() and
                sys.stderr and sys.stderr.isatty())
  except (AttributeError, ValueError):  # closed or replaced streams
    return False


def _passphrase(shown: str) -> Tuple[bytes, str]:
  """The passphrase of the encrypted key `shown`, and where it came from."""
  found = passphrase_from_environment()
  if found is not None:
    return found
  if not _can_prompt():
    raise errors.InvalidKeyUriError(
        f'private key {shown} is encrypted and no passphrase is available: '
        f'{PASSPHRASE_HELP}')
  text = f'Passphrase for {shown}: '
  if _prompt_hook is not None:
    value = _prompt_hook(text)
  else:
    value = getpass.getpass(text, stream=sys.stderr)
  if not value:
    raise errors.InvalidKeyUriError(
        f'no passphrase entered for the encrypted private key {shown}')
  return value.encode('utf-8'), 'the prompt'


# -- standard input ---------------------------------------------------------------

_stdin_lock = threading.Lock()
# The sys.stdin object last read, its PEM bytes and, once parsed, the
# (private, public) pair. Keyed by the stream object so that a replaced
# sys.stdin (tests) is read anew, while one process never reads its
# standard input twice (serve-sync resolves identities on every sync).
_stdin_cache = None


def _stdin_pem() -> bytes:
  """One PEM private key from standard input; refuses a terminal."""
  stream = sys.stdin
  if stream is None:
    raise errors.UsageError(
        '--identity - reads the key from standard input, which is closed; '
        'pipe the key: ... --identity - < KEY.key.pem')
  if stream.isatty():
    raise errors.UsageError(
        '--identity - reads the key from standard input, which is a '
        'terminal; pipe the key: ... --identity - < KEY.key.pem')
  data = getattr(stream, 'buffer', stream).read(MAX_PEM_BYTES + 1)
  if isinstance(data, str):
    data = data.encode('utf-8')
  if len(data) > MAX_PEM_BYTES:
    raise errors.InvalidKeyUriError(
        'the key on standard input (-) is too large for a PEM key')
  return data


def _load_stdin():
  """(private, public) from standard input, read once per process."""
  global _stdin_cache
  with _stdin_lock:
    stream = sys.stdin
    if _stdin_cache is None or _stdin_cache[0] is not stream:
      _stdin_cache = (stream, _stdin_pem(), None)
    _, data, keys = _stdin_cache
    if keys is not None:
      return keys
    if not data.strip():
      raise errors.InvalidKeyUriError(
          'standard input (-) is empty; pipe the private key: ... '
          '--identity - < KEY.key.pem')
    if b'PRIVATE KEY' not in data:
      raise errors.KeyRoleError(
          '--identity - (standard input) is not a PEM private key; an '
          'identity must be a private key: pipe KEY.key.pem')
    keys = _parse_pem(data, '- (stdin)')
    _stdin_cache = (stream, data, keys)
    return keys


def _parse_private(data: bytes, shown: str):
  try:
    return serialization.load_pem_private_key(data, password=None)
  except TypeError:
    pass  # encrypted: now, and only now, look for its passphrase
  except ValueError:
    raise errors.InvalidKeyUriError(
        f'{shown} is not a supported PEM private key') from None
  passphrase, source = _passphrase(shown)
  try:
    return serialization.load_pem_private_key(data, password=passphrase)
  except (TypeError, ValueError):
    raise errors.InvalidKeyUriError(
        f'cannot decrypt the private key {shown} with the passphrase from '
        f'{source}: wrong passphrase (or not a supported key)') from None


def _parse_pem(data: bytes, shown: str):
  """Return (private_key or None, public_key) of PEM `data`."""
  if b'PRIVATE KEY' in data:
    priv = _parse_private(data, shown)
    return priv, priv.public_key()
  try:
    return None, serialization.load_pem_public_key(data)
  except ValueError:
    raise errors.InvalidKeyUriError(
        f'{shown} is not a PEM public or private key') from None


def _load_pem(path: str, shown: Optional[str] = None):
  """Return (private_key or None, public_key) of the PEM file `path`."""
  shown = shown or repr(path)
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
  return _parse_pem(data, shown)


class LocalKey(KeyBackend):
  """A key held in a local PEM file, or piped in on standard input (``-``)."""

  scheme = 'file'
  stanza_types = (X25519_HPKE, RSA_OAEP)

  def __init__(self, uri: str):
    super().__init__(uri)
    self.from_stdin = uri == STDIN
    if self.from_stdin:
      self.path = STDIN
      self._private, self._public = _load_stdin()
    else:
      self.path = uri_to_path(uri)
      self._private, self._public = _load_pem(
          self.path, _text.quoted(redact_uri(uri)))
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

  # -- how messages name the key, and its roles ---------------------------------
  @property
  def display(self) -> str:
    return '- (stdin)' if self.from_stdin else super().display

  def describe(self) -> str:
    if self.from_stdin:
      return f'- (stdin, {self.key_id})'
    return super().describe()

  @property
  def kind_text(self) -> str:
    """E.g. 'an X25519 private key', 'an Ed25519 public key'."""
    half = 'private' if self.is_private else 'public'
    return f'an {KIND_NAMES[self.kind]} {half} key'  # all start with a vowel

  def _other_half(self, want_private: bool) -> str:
    """What to pass instead: the typed path of the other half, if it exists.

    keygen writes PREFIX.key.pem and PREFIX.pub.pem side by side, so the
    other half of a key named that way is named in the message.
    """
    if self.from_stdin:
      return ('pipe the private key instead' if want_private else
              'pass the public key file instead')
    have, want = (('.pub.pem', '.key.pem') if want_private else
                  ('.key.pem', '.pub.pem'))
    if self.uri.endswith(have):
      other = self.uri[:-len(have)] + want
      if os.path.isfile(uri_to_path(other)):
        return (f'pass {_text.printable(other)} (tfx-encrypt keygen writes '
                'both)')
    half = 'private' if want_private else 'public'
    return (f'pass its {half} key (tfx-encrypt keygen writes both '
            f'PREFIX.key.pem and PREFIX.pub.pem)')

  def role_problem(self, role: str) -> Optional[str]:
    """Local keys play exactly one role per kind and half.

    Recipients and trust anchors must be public keys: a private key there
    works by accident (its public half is used) but means the secret is
    copied to every host that encrypts or verifies; age refuses it too.
    Identities and signers must be private keys.
    """
    what = self.kind_text
    encryption = self.kind in ENCRYPTION_KINDS
    if role == 'recipient':
      if not encryption:
        return (f'is {what}, a signing key; a recipient must be an X25519 or '
                'RSA public key (tfx-encrypt keygen x25519 PREFIX)')
      if self.is_private:
        return (f'is {what}; a recipient must be a public key: '
                f'{self._other_half(want_private=False)}')
    elif role == 'identity':
      if not encryption:
        return (f'is {what}, a signing key, which cannot decrypt; an identity '
                'must be an X25519 or RSA private key, or a KMS/HSM key URI')
      if not self.is_private:
        return (f'is {what}; an identity must be a private key: '
                f'{self._other_half(want_private=True)}')
    elif role == 'trust':
      if encryption:
        return (f'is {what}, an encryption key, which cannot verify '
                "signatures; a trust anchor must be the publisher's Ed25519 "
                'or ECDSA P-256 public key')
      if self.is_private:
        return (f'is {what}; a trust anchor must be a public key: '
                f'{self._other_half(want_private=False)}')
    elif role == 'signer':
      if encryption:
        return (f'is {what}, an encryption key, which cannot sign; a signer '
                'must be an Ed25519 or ECDSA P-256 private key '
                '(tfx-encrypt keygen ed25519 PREFIX)')
      if not self.is_private:
        return (f'is {what}; a signer must be a private key: '
                f'{self._other_half(want_private=True)}')
    else:
      return super().role_problem(role)
    return None

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
      raise errors.KeyRoleError(
          f'{self.display} is a public key; decryption needs the matching '
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
          f'the recipient stanza for key {self.describe()} failed to decrypt: '
          'the package header or its encryption context was modified') from None

  def matches(self, stanza: Stanza) -> bool:
    want = X25519_HPKE if self.kind == 'x25519' else RSA_OAEP
    return stanza.type == want and stanza.key_id == self.key_id

  def public_key_pem(self) -> bytes:
    return self._public.public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo)

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


def generate(kind: str, passphrase: Optional[bytes] = None
             ) -> Tuple[bytes, bytes]:
  """Generate a key pair; returns (private PEM, public PEM).

  With `passphrase`, the private key is encrypted PKCS#8
  (BestAvailableEncryption: PBES2, PBKDF2-HMAC-SHA256, AES-256-CBC, as
  OpenSSL writes it), so a copied key file alone does not decrypt models.
  OpenSSL's PBKDF2 iteration count is low (2048), so the passphrase itself
  must be strong (docs/BACKENDS.md).
  """
  if passphrase is not None and not passphrase:
    raise errors.UsageError('the passphrase is empty; choose a non-empty one')
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
  encryption = (serialization.BestAvailableEncryption(passphrase)
                if passphrase else serialization.NoEncryption())
  priv = key.private_bytes(serialization.Encoding.PEM,
                           serialization.PrivateFormat.PKCS8, encryption)
  pub = key.public_key().public_bytes(
      serialization.Encoding.PEM,
      serialization.PublicFormat.SubjectPublicKeyInfo)
  return priv, pub


def keygen(kind: str, out_prefix: str, force: bool = False,
           passphrase: Union[bytes, Callable[[], bytes], None] = None
           ) -> Tuple[str, str]:
  """Write OUT_PREFIX.key.pem (0600) and OUT_PREFIX.pub.pem atomically.

  With `passphrase` (bytes, or a function returning them, called only after
  the outputs are known to be writable, so that nobody types a passphrase
  twice to learn the prefix is taken), OUT_PREFIX.key.pem is encrypted
  with it (see :func:`generate`); loading it then needs the passphrase
  (module docstring).
  """
  if kind not in KEY_KINDS:
    generate(kind)  # raises the UsageError listing the kinds
  priv_path, pub_path = out_prefix + '.key.pem', out_prefix + '.pub.pem'
  for p in (priv_path, pub_path):
    if os.path.lexists(p) and not force:
      raise errors.OutputExistsError(
          f'{p} already exists; choose another prefix or remove it')
    if os.path.lexists(p) and not _is_pem_key_file(p):
      raise errors.UnsafeOverwriteError(
          f'--force will not replace {p}: it is not a PEM key file. Remove it '
          'yourself if you mean to replace it, or choose another prefix')
  if callable(passphrase):
    passphrase = passphrase()
  priv, pub = generate(kind, passphrase)
  _write_atomic(priv_path, priv, 0o600)
  _write_atomic(pub_path, pub, 0o644)
  return priv_path, pub_path


def _is_pem_key_file(path: str) -> bool:
  """What keygen --force may replace: a regular file holding a PEM key."""
  try:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_PEM_BYTES:
      return False
    with open(path, 'rb') as f:
      head = f.read(MAX_PEM_BYTES)
  except OSError:
    return False
  return head.startswith(b'-----BEGIN ') and b' KEY-----' in head


def _write_atomic(path: str, data: bytes, mode: int):
  """Write `path` through an owned temporary sibling (docs/SECURITY.md)."""
  from tfx_encrypt import _fsutil  # pylint: disable=g-import-not-at-top
  tmp = _fsutil.temp_sibling(path)
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                 getattr(os, 'O_NOFOLLOW', 0), mode)
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, mode)
    _fsutil.replace_checked(tmp, path)
  except BaseException:
    _fsutil.remove_tree(tmp)
    raise
