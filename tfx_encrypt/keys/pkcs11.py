"""PKCS#11 (HSM, smart card, SoftHSM) key backend, RFC 7512 URIs.

URI form::

    pkcs11:token=T;object=O?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/secrets/pin

Path attributes select the token (``token``, ``manufacturer``, ``model``,
``serial``, ``slot-id``, ...) and the key (``object`` = CKA_LABEL, ``id`` =
CKA_ID, percent-encoded). Query attributes: ``module-path`` (or
``module-name``, or env ``TFXE_PKCS11_MODULE``), and the user PIN from
``pin-source`` (a ``file:`` URI or path), ``pin-value`` (discouraged: it
puts the PIN in command lines and shell history), or env
``TFXE_PKCS11_PIN``.

The data key is wrapped *inside the token*; private and secret keys never
leave it:

* an AES secret key object: ``CKM_AES_GCM`` encryption of the DEK with a
  random 96-bit IV, 128-bit tag and AAD = the package wrap context
  (stanza type ``pkcs11-aes-gcm``);
* an RSA key pair: ``CKM_RSA_PKCS_OAEP`` (stanza type ``pkcs11-rsa-oaep``)
  in one of three modes, chosen when wrapping and recorded in the stanza's
  ``oaep`` field: ``sha256+label`` (SHA-256/MGF1-SHA-256, the wrap context
  as OAEP label) where the token can; ``sha256`` (SHA-256, no label) for
  TPM 2.0 tokens (tpm2-pkcs11), whose RSA decryption cannot take the
  context as label; ``sha1`` (SHA-1, no label) for tokens that implement
  nothing else (SoftHSM2 2.6). Without a label the context is bound by the
  package header MAC only. Wrapping needs only the public key object (no
  PIN, if the token lets it be read without login) or an exported copy of
  it (``x-public-key=`` with ``x-oaep=``, for enrolling a device whose
  token the publisher cannot reach); unwrapping needs the private key and
  the PIN.

An EC P-256 key pair signs (``--sign-with``): ``CKM_ECDSA`` over
SHA-256(message), one token call per signature; its public key is read
from the token once and also serves as a trust anchor (``--trust``).

``key_id`` is ``pkcs11:token=T;object=O`` (plus ``id=`` if given): no module
path, no PIN source and never a PIN. A signature names its signer by the
``sha256:`` id of the public key (SubjectPublicKeyInfo), as a PEM key does.
"""

import hashlib
import logging
import os
import re
import threading
import urllib.parse
from typing import Dict, List, Optional, Tuple

from tfx_encrypt import errors
from tfx_encrypt.keys import _retry
from tfx_encrypt.keys.base import KeyBackend, Stanza, WrapContext, b64d, b64e, spki_key_id

_LOG = logging.getLogger('tfx_encrypt.keys.pkcs11')

AES_GCM = 'pkcs11-aes-gcm'
RSA_OAEP = 'pkcs11-rsa-oaep'
# RSA-OAEP modes, recorded in a pkcs11-rsa-oaep stanza's `oaep` field.
OAEP_SHA256_LABEL = 'sha256+label'   # SHA-256, MGF1-SHA-256, label = context
OAEP_SHA256_NO_LABEL = 'sha256'      # SHA-256, MGF1-SHA-256, no label (TPM 2.0)
OAEP_SHA1 = 'sha1'                   # SHA-1, MGF1-SHA-1, no label (SoftHSM2)
OAEP_SHA256 = OAEP_SHA256_LABEL      # the name before the TPM mode existed
OAEP_MODES = (OAEP_SHA256_LABEL, OAEP_SHA256_NO_LABEL, OAEP_SHA1)

#: RSA-OAEP mode to wrap with for keys of a PKCS#11 library that reports
#: itself (C_GetInfo manufacturerID) as one whose OAEP decryption cannot take
#: the wrap context as label. A probe cannot tell: these libraries encrypt
#: with any label in software and fail only when the token decrypts.
#: tpm2-pkcs11: the TPM's RSA_Decrypt takes a label of at most 64 bytes that
#: ends in a zero byte (the wrap context is longer), and tpm2-pkcs11 1.9 does
#: not keep the label across the two calls of C_Decrypt.
OAEP_BY_LIBRARY = {
    'tpm2-software.github.io': OAEP_SHA256_NO_LABEL,
}

SIG_ECDSA_P256 = 'ecdsa-p256-sha256'
# DER of the P-256 curve OID (CKA_EC_PARAMS of a P-256 key).
_P256_PARAMS = bytes.fromhex('06082a8648ce3d030107')

_PATH_ATTRS = ('token', 'manufacturer', 'serial', 'model',
               'library-manufacturer', 'library-description',
               'library-version', 'slot-manufacturer', 'slot-description',
               'slot-id', 'object', 'type', 'id')
_QUERY_ATTRS = ('pin-source', 'pin-value', 'module-name', 'module-path')
_TYPES = ('public', 'private', 'secret-key', 'cert', 'data')

_MODULE_DIRS = ('/usr/lib/x86_64-linux-gnu/pkcs11', '/usr/lib/x86_64-linux-gnu',
                '/usr/lib/aarch64-linux-gnu/pkcs11', '/usr/lib/aarch64-linux-gnu',
                '/usr/lib/pkcs11', '/usr/lib/softhsm', '/usr/lib',
                '/usr/local/lib/softhsm', '/usr/local/lib', '/usr/lib64/pkcs11',
                '/usr/lib64')

# One loaded library per module path, and a lock per token: PKCS#11 login
# state is per application and token, so operations are serialised.
_MODULES: Dict[str, object] = {}
_MODULES_LOCK = threading.Lock()
_TOKEN_LOCKS: Dict[Tuple[str, str], threading.Lock] = {}
_SHA1_WARNED = set()


def _pct_decode(value: str, what: str) -> bytes:
  if re.search(r'%(?![0-9A-Fa-f]{2})', value):
    raise errors.InvalidKeyUriError(
        f'bad percent-encoding in the {what} attribute of a pkcs11: URI')
  return urllib.parse.unquote_to_bytes(value)


def parse_uri(uri: str) -> Tuple[Dict[str, str], Dict[str, str], bytes]:
  """Parses an RFC 7512 URI into (path attrs, query attrs, raw id bytes).

  Values are percent-decoded (text attributes as UTF-8). Unknown attributes
  are rejected unless vendor-specific (``x-...``).
  """
  if not isinstance(uri, str) or not uri.startswith('pkcs11:'):
    raise errors.InvalidKeyUriError('a PKCS#11 key URI starts with "pkcs11:"')
  rest = uri[len('pkcs11:'):]
  path_part, _, query_part = rest.partition('?')
  path: Dict[str, str] = {}
  query: Dict[str, str] = {}
  raw_id = b''
  for part_text, allowed, out, sep in ((path_part, _PATH_ATTRS, path, ';'),
                                       (query_part, _QUERY_ATTRS, query, '&')):
    if not part_text:
      continue
    for item in part_text.split(sep):
      if not item:
        continue
      name, eq, value = item.partition('=')
      if not eq or not name:
        raise errors.InvalidKeyUriError(
            f'malformed attribute {_attr_for_msg(name)!r} in a pkcs11: URI '
            '(expected name=value)')
      if name not in allowed and not name.startswith('x-'):
        raise errors.InvalidKeyUriError(
            f'unknown attribute {_attr_for_msg(name)!r} in a pkcs11: URI; '
            f'path attributes: {", ".join(_PATH_ATTRS)}; query attributes: '
            f'{", ".join(_QUERY_ATTRS)}')
      if name in out:
        raise errors.InvalidKeyUriError(
            f'attribute {name!r} appears twice in a pkcs11: URI')
      raw = _pct_decode(value, name)
      if name == 'id':
        raw_id = raw
        out[name] = raw.hex()
      else:
        try:
          out[name] = raw.decode('utf-8')
        except UnicodeDecodeError as e:
          raise errors.InvalidKeyUriError(
              f'the {name} attribute of a pkcs11: URI is not UTF-8') from e
  return path, query, raw_id


def _attr_for_msg(name: str) -> str:
  # Never echo a value; names are short and not secret.
  return name[:40]


def _canonical_key_id(path: Dict[str, str]) -> str:
  parts = ['token=' + urllib.parse.quote(path['token'], safe='')]
  if 'object' in path:
    parts.append('object=' + urllib.parse.quote(path['object'], safe=''))
  if 'id' in path:
    raw = bytes.fromhex(path['id'])
    parts.append('id=' + ''.join(f'%{b:02x}' for b in raw))
  return 'pkcs11:' + ';'.join(parts)


def redact_uri(uri: str) -> str:
  """`uri` with any pin-value removed (safe to log and show)."""
  head, sep, query = uri.partition('?')
  if not sep:
    return uri
  kept = [item for item in query.split('&')
          if not item.startswith('pin-value=')]
  return head + ('?' + '&'.join(kept) if kept else '')


def load_module(path: str):
  """The initialised python-pkcs11 library for a module path (cached)."""
  pkcs11 = _retry.import_sdk('pkcs11', 'pkcs11', 'pkcs11')
  real = os.path.realpath(path)
  with _MODULES_LOCK:
    lib = _MODULES.get(real)
    if lib is None:
      if not os.path.isfile(real):
        raise errors.BackendUnavailableError(
            f'PKCS#11 module {path} does not exist; install the token\'s '
            'PKCS#11 library or fix module-path')
      try:
        lib = pkcs11.lib(real)
      except pkcs11.exceptions.PKCS11Error as e:
        raise errors.BackendUnavailableError(
            f'cannot load PKCS#11 module {path} ({type(e).__name__}: '
            f'{_retry.short(e, 200)})') from None
      _MODULES[real] = lib
    return lib


def refresh_modules() -> None:
  """Re-initialises every loaded module (C_Finalize + C_Initialize).

  Tokens created or removed by another process after a module was loaded
  (``softhsm2-util --init-token``, a card inserted) become visible.
  Sessions are opened per operation, so none is left dangling.
  """
  with _MODULES_LOCK:
    for lib in _MODULES.values():
      lib.reinitialize()


def _token_lock(module: str, token: str) -> threading.Lock:
  with _MODULES_LOCK:
    return _TOKEN_LOCKS.setdefault((module, token), threading.Lock())


class Pkcs11Key(KeyBackend):
  """A key in a PKCS#11 token: AES (GCM) or RSA (OAEP) wraps, EC P-256 signs.

  Or, with ``x-public-key=``, an exported RSA public key of such a token,
  which wraps for it without the token (device enrolment).
  """

  scheme = 'pkcs11'
  stanza_types = (AES_GCM, RSA_OAEP)

  def __init__(self, uri: str, *, pin: Optional[str] = None,
               module_path: Optional[str] = None):
    """Parses the URI and finds the module and the PIN; does not log in.

    Args:
      uri: an RFC 7512 ``pkcs11:`` URI with at least ``token`` and
        ``object`` (or ``id``).
      pin: the user PIN, overriding every other source (for programmatic
        use; never logged).
      module_path: the PKCS#11 module, overriding the URI and environment.
    """
    path, query, raw_id = parse_uri(uri)
    super().__init__(redact_uri(uri))
    if 'token' not in path:
      raise errors.InvalidKeyUriError(
          'a pkcs11: key URI must name the token: pkcs11:token=LABEL;'
          'object=KEY_LABEL?module-path=...')
    if 'object' not in path and not raw_id:
      raise errors.InvalidKeyUriError(
          'a pkcs11: key URI must name the key with object=LABEL (or id=)')
    if path.get('type') and path['type'] not in _TYPES:
      raise errors.InvalidKeyUriError(
          f'unknown type {path["type"]!r} in a pkcs11: URI; one of '
          f'{", ".join(_TYPES)}')
    if 'pin-value' in query and 'pin-source' in query:
      raise errors.InvalidKeyUriError(
          'a pkcs11: URI may have pin-value or pin-source, not both')
    self._oaep_choice = query.get('x-oaep')
    if self._oaep_choice is not None and self._oaep_choice not in OAEP_MODES:
      raise errors.InvalidKeyUriError(
          f'x-oaep in a pkcs11: URI must be one of {", ".join(OAEP_MODES)} '
          '(sha256 for a TPM 2.0 key, sha256+label where the token supports '
          'OAEP labels)')
    self._public_file = query.get('x-public-key')
    if self._public_file is not None and self._oaep_choice is None:
      raise errors.InvalidKeyUriError(
          'a pkcs11: URI with x-public-key= must say how the token unwraps: '
          'add x-oaep=sha256 for a TPM 2.0 key (tpm2-pkcs11), x-oaep='
          'sha256+label for a token that supports OAEP labels, x-oaep=sha1 '
          'for SoftHSM2')
    self._path = path
    self._raw_id = raw_id
    self._public_key = None   # read from the token (or file) once
    self._public_read = False
    if module_path or self._public_file is None:
      self._module_path = module_path or self._find_module(query)
    else:  # an exported public key only: wraps and verifies, no token
      self._module_path = (self._find_module(query)
                           if ('module-path' in query or
                               'module-name' in query) else None)
    self._pin_arg = pin
    self._pin_source = query.get('pin-source')
    self._pin_value = query.get('pin-value')
    if self._pin_value is not None and pin is None:
      _LOG.warning('%s: pin-value in a key URI is discouraged (it ends up in '
                   'command lines and logs of other tools); use pin-source='
                   'file:... or TFXE_PKCS11_PIN', self.key_id)

  # -- identity -------------------------------------------------------------
  @property
  def key_id(self) -> str:
    return _canonical_key_id(self._path)

  @property
  def module_path(self) -> Optional[str]:
    return self._module_path

  def _find_module(self, query: Dict[str, str]) -> str:
    if query.get('module-path'):
      path = query['module-path']
      if os.path.isdir(path) and query.get('module-name'):
        return self._search_module(query['module-name'], (path,))
      return path
    if query.get('module-name'):
      return self._search_module(query['module-name'], _MODULE_DIRS)
    env = os.environ.get('TFXE_PKCS11_MODULE')
    if env:
      return env
    raise errors.InvalidKeyUriError(
        f'{self.key_id}: no PKCS#11 module: add module-path=/path/to/'
        'module.so to the URI or set TFXE_PKCS11_MODULE')

  @staticmethod
  def _search_module(name: str, dirs) -> str:
    if '/' in name or name in ('.', '..'):
      raise errors.InvalidKeyUriError('module-name must be a bare name')
    for d in dirs:
      for candidate in (name, name + '.so', 'lib' + name + '.so'):
        p = os.path.join(d, candidate)
        if os.path.isfile(p):
          return p
    raise errors.InvalidKeyUriError(
        f'PKCS#11 module {name!r} not found in {", ".join(dirs)}; use '
        'module-path=')

  def _pin(self, required: bool) -> Optional[str]:
    """The user PIN, or None. Never logged, never put in a message."""
    if self._pin_arg is not None:
      return self._pin_arg
    if self._pin_value is not None:
      return self._pin_value
    if self._pin_source:
      src = _local_path(self._pin_source, 'pin-source')
      try:
        with open(src, 'r', encoding='utf-8') as f:
          pin = f.read().rstrip('\r\n')
      except OSError as e:
        raise errors.KeyAccessDeniedError(
            f'{self.key_id}: cannot read the PIN file named by pin-source '
            f'({e.strerror})') from None
      return pin
    env = os.environ.get('TFXE_PKCS11_PIN')
    if env:
      return env
    if required:
      raise errors.KeyAccessDeniedError(
          f'{self.key_id}: the token needs a user PIN: set TFXE_PKCS11_PIN, '
          'or add pin-source=file:/path/to/pin to the URI')
    return None

  # -- token access ---------------------------------------------------------
  def _token(self, lib):
    slots = lib.get_slots(token_present=True)
    found = []
    for slot in slots:
      token = slot.get_token()
      if token.label != self._path['token']:
        continue
      if 'slot-id' in self._path and str(slot.slot_id) != self._path['slot-id']:
        continue
      if ('serial' in self._path and
          _text(token.serial) != self._path['serial']):
        continue
      if ('manufacturer' in self._path and
          token.manufacturer_id != self._path['manufacturer']):
        continue
      if 'model' in self._path and _text(token.model) != self._path['model']:
        continue
      found.append(token)
    if not found:
      raise errors.KeyNotFoundError(
          f'{self.key_id}: no token labelled {self._path["token"]!r} in '
          f'PKCS#11 module {self._module_path} (is the token present and '
          'initialised?)')
    if len(found) > 1:
      raise errors.UsageError(
          f'{self.key_id}: several tokens match; add serial= or slot-id= to '
          'the URI')
    return found[0]

  def _find(self, session, object_class, key_type=None):
    """All objects of a class (and type) with our label/id."""
    from pkcs11 import Attribute  # pylint: disable=g-import-not-at-top
    attrs = {Attribute.CLASS: object_class}
    if key_type is not None:
      attrs[Attribute.KEY_TYPE] = key_type
    if 'object' in self._path:
      attrs[Attribute.LABEL] = self._path['object']
    if self._raw_id:
      attrs[Attribute.ID] = self._raw_id
    return list(session.get_objects(attrs))

  def _one(self, objs: List, what: str):
    if not objs:
      return None
    if len(objs) > 1:
      raise errors.UsageError(
          f'{self.key_id}: {len(objs)} {what} objects match; add id= to the '
          'URI to pick one')
    return objs[0]

  def _run(self, op: str, fn, need_private: bool):
    """Opens a session (logged in when there is a PIN) and runs fn(session)."""
    if self._module_path is None:
      raise errors.KeyRoleError(
          f'{self.describe()} names an exported public key (x-public-key) '
          f'and no PKCS#11 module, so it cannot {op}: on the host with the '
          'token, add module-path=... (or set TFXE_PKCS11_MODULE) and drop '
          'x-public-key')
    pkcs11 = _retry.import_sdk('pkcs11', 'pkcs11', 'pkcs11')
    exc = pkcs11.exceptions
    lib = load_module(self._module_path)
    pin = self._pin(required=need_private)
    lock = _token_lock(os.path.realpath(self._module_path),
                       self._path['token'])
    try:
      with lock:
        token = self._token(lib)
        with token.open(user_pin=pin) as session:
          return fn(session)
    except errors.TfxEncryptError:
      raise
    except (exc.PinIncorrect, exc.PinInvalid, exc.PinLenRange) as e:
      raise errors.KeyAccessDeniedError(
          f'{self.key_id}: the token rejected the PIN ({type(e).__name__}); '
          'check TFXE_PKCS11_PIN / pin-source. Repeated failures lock the '
          'token.') from None
    except (exc.PinLocked, exc.PinExpired, exc.UserPinNotInitialized) as e:
      raise errors.KeyAccessDeniedError(
          f'{self.key_id}: the user PIN is locked, expired or not set '
          f'({type(e).__name__}); ask the token\'s security officer to reset '
          'it') from None
    except (exc.UserNotLoggedIn, exc.FunctionRejected) as e:
      raise errors.KeyAccessDeniedError(
          f'{self.key_id}: the token refused {op} ({type(e).__name__}); '
          'provide the PIN and check the key allows it') from None
    except (exc.TokenNotPresent, exc.TokenNotRecognised, exc.DeviceRemoved,
            exc.DeviceError, exc.DeviceMemory, exc.SessionCount,
            exc.SessionClosed, exc.SessionHandleInvalid,
            exc.SlotIDInvalid) as e:
      raise errors.BackendUnavailableError(
          f'{self.key_id}: the PKCS#11 token is unavailable during {op} '
          f'({type(e).__name__}); check the device / module') from None
    except (exc.MechanismInvalid, exc.FunctionNotSupported,
            exc.KeyTypeInconsistent) as e:
      need = ('an EC P-256 key pair (CKM_ECDSA)' if op == 'sign' else
              'an AES-256 secret key (CKM_AES_GCM) or an RSA key pair '
              '(CKM_RSA_PKCS_OAEP)')
      raise errors.UsageError(
          f'{self.key_id}: the token does not support {op} with this key '
          f'({type(e).__name__}); use {need}') from None
    except exc.PKCS11Error as e:
      detail = _retry.short(e, 100)
      hint = ('; the key is not allowed to do this (CKR_KEY_FUNCTION_NOT_'
              'PERMITTED): it needs CKA_ENCRYPT and CKA_DECRYPT'
              if '0x68' in detail else '')
      raise errors.KeyBackendError(
          f'{self.key_id}: PKCS#11 {op} failed ({type(e).__name__}'
          f'{": " + detail if detail else ""}){hint}') from None

  # -- roles ----------------------------------------------------------------
  def role_problem(self, role: str) -> Optional[str]:
    """Refuses, without any token call, what the URI itself rules out.

    What kind of key the object is (AES, RSA, EC) is known only once the
    token is asked; a key of the wrong kind fails at first use with a
    typed error instead.
    """
    kind = self._path.get('type')
    public_only = self._module_path is None
    if role in ('identity', 'signer') and public_only:
      return ('names an exported public key (x-public-key) and no PKCS#11 '
              'module; an identity or signer must be a key inside a token: '
              'add module-path=... and drop x-public-key')
    if role == 'signer' and kind in ('public', 'secret-key', 'cert', 'data'):
      return (f'has type={kind}; a signer must be the private key of an EC '
              'P-256 key pair in the token (type=private, or no type=)')
    if role == 'trust' and kind in ('secret-key', 'data'):
      return (f'has type={kind}; a trust anchor must be the public key of '
              'an EC P-256 key pair (type=public, or no type=)')
    if role == 'identity' and kind in ('public', 'cert', 'data'):
      return (f'has type={kind}; an identity must be a private or secret '
              'key in the token (type=private or type=secret-key, or no '
              'type=)')
    return super().role_problem(role)

  # -- the public key (signatures, exported recipients) -----------------------
  def public_key(self):
    """The key pair's public key (a `cryptography` object), read once.

    From the ``x-public-key`` file when the URI names one, else from the
    token's public key object with this label/id (no PIN needed when the
    token lets public objects be read without login). Use it to export the
    key: ``public_key().public_bytes(Encoding.PEM,
    PublicFormat.SubjectPublicKeyInfo)``.

    Raises:
      KeyNotFoundError: no public key object with this label/id.
      UsageError: the public key is neither RSA nor EC P-256.
    """
    if not self._public_read:
      if self._public_file is not None:
        self._public_key = self._load_public_file()
      else:
        self._public_key = self._run('read the public key',
                                     self._read_public, need_private=False)
      self._public_read = True
    return self._public_key

  def public_key_pem(self) -> bytes:
    """The public key as PEM SubjectPublicKeyInfo (``tfx-encrypt pubkey``)."""
    from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
    return self.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo)

  def _load_public_file(self):
    from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
    path = _local_path(self._public_file, 'x-public-key')
    try:
      with open(path, 'rb') as f:
        data = f.read(1 << 16)
    except OSError as e:
      raise errors.InvalidKeyUriError(
          f'{self.key_id}: cannot read the public key file named by '
          f'x-public-key ({e.strerror})') from None
    try:
      if b'-----BEGIN' in data:
        pub = serialization.load_pem_public_key(data)
      else:
        pub = serialization.load_der_public_key(data)
    except (ValueError, TypeError):
      raise errors.InvalidKeyUriError(
          f'{self.key_id}: the x-public-key file is not a PEM or DER '
          'public key (SubjectPublicKeyInfo, as `pkcs11-tool --read-object '
          '--type pubkey` or `tfx-encrypt pubkey` write it)') from None
    return _check_public(pub, self.key_id)

  def _read_public(self, session):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa  # pylint: disable=g-import-not-at-top
    from pkcs11 import Attribute, KeyType, ObjectClass  # pylint: disable=g-import-not-at-top
    obj = self._one(self._find(session, ObjectClass.PUBLIC_KEY), 'public key')
    if obj is None:
      raise _NoPublicKeyError(
          f'{self.key_id}: the token has no public key object with this '
          'label/id (an AES key has none; a signer or trust anchor must be '
          'an EC P-256 key pair)')
    key_type = obj[Attribute.KEY_TYPE]
    if key_type == KeyType.RSA:
      n = int.from_bytes(bytes(obj[Attribute.MODULUS]), 'big')
      e = int.from_bytes(bytes(obj[Attribute.PUBLIC_EXPONENT]), 'big')
      return _check_public(rsa.RSAPublicNumbers(e, n).public_key(),
                           self.key_id)
    if key_type == KeyType.EC:
      if bytes(obj[Attribute.EC_PARAMS]) != _P256_PARAMS:
        raise errors.UsageError(
            f'{self.key_id}: the EC key in the token is not on curve P-256; '
            'a signer must be an EC P-256 (secp256r1) key pair')
      point = bytes(obj[Attribute.EC_POINT])
      # CKA_EC_POINT is a DER OCTET STRING (PKCS#11 2.40); some tokens
      # return the bare uncompressed point instead.
      if len(point) == 67 and point[:2] == b'\x04\x41':
        point = point[2:]
      try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                            point)
      except ValueError:
        raise errors.KeyBackendError(
            f'{self.key_id}: the token returned a malformed EC point for the '
            'public key') from None
    raise errors.UsageError(
        f'{self.key_id}: the public key in the token is neither RSA nor EC '
        'P-256')

  # -- wrapping -------------------------------------------------------------
  def wrap(self, dek: bytes, context: WrapContext) -> Stanza:
    if not isinstance(dek, (bytes, bytearray)) or not 16 <= len(dek) <= 64:
      raise errors.UsageError('the data key to wrap must be 16 to 64 bytes')
    dek = bytes(dek)
    aad = context.aad()
    if self._public_file is not None:
      return self._wrap_exported(dek, aad)
    have_pin = self._pin(required=False) is not None

    def op(session):
      from pkcs11 import KeyType, ObjectClass  # pylint: disable=g-import-not-at-top
      if have_pin:
        secret = self._one(self._find(session, ObjectClass.SECRET_KEY,
                                      KeyType.AES), 'AES secret key')
        if secret is not None:
          return self._wrap_aes(secret, dek, aad)
      public = self._one(self._find(session, ObjectClass.PUBLIC_KEY,
                                    KeyType.RSA), 'RSA public key')
      if public is not None:
        return self._wrap_rsa(session, public, dek, aad)
      raise errors.KeyNotFoundError(
          f'{self.key_id}: no AES secret key or RSA public key with this '
          'label/id in the token' +
          ('' if have_pin else ' (without a PIN only public objects are '
           'visible; set TFXE_PKCS11_PIN or pin-source for an AES key)'))

    return self._run('wrap', op, need_private=False)

  def _wrap_aes(self, key, dek: bytes, aad: bytes) -> Stanza:
    from pkcs11 import Mechanism  # pylint: disable=g-import-not-at-top
    from pkcs11.mechanisms import GCMParams  # pylint: disable=g-import-not-at-top
    iv = os.urandom(12)
    ct = key.encrypt(dek, mechanism=Mechanism.AES_GCM,
                     mechanism_param=GCMParams(iv, aad, 128))
    return Stanza(AES_GCM, self.key_id, {'iv': b64e(iv), 'ct': b64e(ct)})

  def _library_oaep(self, session) -> Optional[str]:
    """The OAEP mode the token's library is known to need, or None."""
    from pkcs11 import Mechanism  # pylint: disable=g-import-not-at-top
    lib = load_module(self._module_path)
    mode = OAEP_BY_LIBRARY.get(_text(lib.manufacturer_id))
    slot = session.token.slot
    if Mechanism.RSA_PKCS_OAEP not in set(slot.get_mechanisms()):
      raise errors.UsageError(
          f'{self.key_id}: the token does not implement CKM_RSA_PKCS_OAEP, '
          'so it could not unwrap a data key wrapped for this RSA key; use '
          'an AES-256 secret key or another token')
    return mode

  def _wrap_rsa(self, session, key, dek: bytes, aad: bytes) -> Stanza:
    from pkcs11 import MGF, Mechanism  # pylint: disable=g-import-not-at-top
    from pkcs11 import exceptions as exc  # pylint: disable=g-import-not-at-top
    mode = self._oaep_choice or self._library_oaep(session)
    if mode is None:
      try:
        ct = key.encrypt(dek, mechanism=Mechanism.RSA_PKCS_OAEP,
                         mechanism_param=_oaep_param(OAEP_SHA256_LABEL, aad))
        mode = OAEP_SHA256_LABEL
      except (exc.ArgumentsBad, exc.MechanismParamInvalid):
        # The token implements OAEP with SHA-1 and no label only (SoftHSM2).
        mode = OAEP_SHA1
        ct = key.encrypt(dek, mechanism=Mechanism.RSA_PKCS_OAEP,
                         mechanism_param=_oaep_param(mode, aad))
    else:
      ct = key.encrypt(dek, mechanism=Mechanism.RSA_PKCS_OAEP,
                       mechanism_param=_oaep_param(mode, aad))
    self._note_no_label(mode)
    return Stanza(RSA_OAEP, self.key_id, {'oaep': mode, 'ct': b64e(ct)})

  def _wrap_exported(self, dek: bytes, aad: bytes) -> Stanza:
    """Wraps for an exported public key: no token, no call (enrolment)."""
    from cryptography.hazmat.primitives import hashes  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives.asymmetric import padding, rsa  # pylint: disable=g-import-not-at-top
    pub = self.public_key()
    if not isinstance(pub, rsa.RSAPublicKey):
      raise errors.KeyRoleError(
          f'{self.describe()}: the x-public-key file holds an EC key, which '
          'cannot wrap keys; a recipient must be an RSA key pair (or an AES '
          'key in a reachable token)')
    mode = self._oaep_choice
    algo = hashes.SHA1() if mode == OAEP_SHA1 else hashes.SHA256()
    label = aad if mode == OAEP_SHA256_LABEL else None
    ct = pub.encrypt(dek, padding.OAEP(mgf=padding.MGF1(algorithm=algo),
                                       algorithm=algo, label=label))
    self._note_no_label(mode)
    return Stanza(RSA_OAEP, self.key_id, {'oaep': mode, 'ct': b64e(ct)})

  def _note_no_label(self, mode: str) -> None:
    if mode == OAEP_SHA256_LABEL:
      return
    where = self._module_path or 'x-public-key'
    if (where, mode) in _SHA1_WARNED:
      return
    _SHA1_WARNED.add((where, mode))
    if mode == OAEP_SHA1:
      _LOG.warning(
          '%s: the token supports RSA-OAEP only with SHA-1 and no label; '
          'the wrap context is bound by the package header MAC only',
          self.key_id)
    else:
      _LOG.info(
          '%s: RSA-OAEP with SHA-256 and no label (TPM 2.0 tokens cannot '
          'take the wrap context as label); the context is bound by the '
          'package header MAC', self.key_id)

  def unwrap(self, stanza: Stanza, context: WrapContext) -> bytes:
    if not self.matches(stanza):
      raise errors.NoMatchingKeyError(
          f'the recipient stanza is for {stanza.key_id!r} ({stanza.type}), '
          f'not for {self.key_id}')
    bad = errors.TamperedPackageError(
        f'the {stanza.type} stanza for {self.key_id} is malformed; the '
        'package is corrupt or was modified')
    if stanza.type == AES_GCM:
      if set(stanza.body) != {'iv', 'ct'}:
        raise bad
      iv = b64d(stanza.body['iv'], 'PKCS#11 IV')
      ct = b64d(stanza.body['ct'], 'PKCS#11 ciphertext')
      if len(iv) != 12 or len(ct) < 16 + 16:
        raise bad
    else:
      if (set(stanza.body) != {'oaep', 'ct'} or
          stanza.body['oaep'] not in OAEP_MODES):
        raise bad
      iv = b''
      ct = b64d(stanza.body['ct'], 'PKCS#11 ciphertext')
    aad = context.aad()

    def op(session):
      from pkcs11 import KeyType, Mechanism, ObjectClass  # pylint: disable=g-import-not-at-top
      from pkcs11 import exceptions as exc  # pylint: disable=g-import-not-at-top
      from pkcs11.mechanisms import GCMParams  # pylint: disable=g-import-not-at-top
      if stanza.type == AES_GCM:
        key = self._one(self._find(session, ObjectClass.SECRET_KEY,
                                   KeyType.AES), 'AES secret key')
        kwargs = dict(mechanism=Mechanism.AES_GCM,
                      mechanism_param=GCMParams(iv, aad, 128))
      else:
        key = self._one(self._find(session, ObjectClass.PRIVATE_KEY,
                                   KeyType.RSA), 'RSA private key')
        kwargs = dict(mechanism=Mechanism.RSA_PKCS_OAEP,
                      mechanism_param=_oaep_param(stanza.body['oaep'], aad))
      if key is None:
        raise errors.KeyNotFoundError(
            f'{self.key_id}: the token has no '
            f'{"AES secret" if stanza.type == AES_GCM else "RSA private"} '
            'key with this label/id (it may have been deleted, or the '
            'PIN belongs to another user)')
      try:
        return bytes(key.decrypt(ct, **kwargs))
      except (exc.MechanismParamInvalid, exc.ArgumentsBad):
        raise errors.KeyBackendError(
            f'{self.key_id}: the token cannot decrypt with the RSA-OAEP mode '
            f'{stanza.body.get("oaep", "")!r} this stanza was wrapped with '
            '(a TPM 2.0 token unwraps only "sha256", without a label): '
            'wrap for it again with x-oaep=sha256, e.g. `tfx-encrypt rewrap '
            '--remove-recipient KEY_ID --add-recipient URI`') from None
      except (exc.EncryptedDataInvalid, exc.EncryptedDataLenRange,
              exc.DataInvalid, exc.DataLenRange, exc.GeneralError,
              exc.FunctionFailed) as e:
        raise errors.TamperedPackageError(
            f'{self.key_id}: the token could not authenticate the wrapped '
            f'data key ({type(e).__name__}); the package header or its '
            'encryption context was modified, or the stanza was made with '
            'another key of the same label') from None

    return self._run('unwrap', op, need_private=True)

  # -- signatures -------------------------------------------------------------
  @property
  def signature_alg(self) -> Optional[str]:
    """'ecdsa-p256-sha256' for an EC P-256 key pair, else None.

    Reads the public key from the token the first time (no PIN needed when
    public objects are readable); a token without a public key object with
    this label/id (an AES key) gives None.
    """
    from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
    try:
      pub = self.public_key()
    except _NoPublicKeyError:  # the token is there; the key is AES (or none)
      return None
    if isinstance(pub, ec.EllipticCurvePublicKey):
      return SIG_ECDSA_P256
    return None

  @property
  def signer_id(self) -> str:
    """The ``sha256:`` id of the public key, as its exported PEM would have."""
    return spki_key_id(self.public_key())

  def sign(self, message: bytes) -> bytes:
    """ECDSA P-256/SHA-256 in the token: one C_Sign; returns DER (r, s).

    The message is hashed here and the token signs the digest with
    CKM_ECDSA (supported by every token with EC keys), which returns raw
    r || s; package.seal_header stores it in its raw low-S form.
    """
    from cryptography.exceptions import InvalidSignature  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives import hashes  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives.asymmetric import ec, utils  # pylint: disable=g-import-not-at-top
    if self.signature_alg != SIG_ECDSA_P256:
      raise errors.KeyRoleError(
          f'--sign-with {self.display}: the token holds no EC P-256 key pair '
          'with this label/id (an RSA or AES key cannot sign packages); a '
          'signer must be an Ed25519 or ECDSA P-256 private key, or an EC '
          'P-256 key pair in a token')
    digest = hashlib.sha256(message).digest()

    def op(session):
      from pkcs11 import KeyType, Mechanism, ObjectClass  # pylint: disable=g-import-not-at-top
      key = self._one(self._find(session, ObjectClass.PRIVATE_KEY,
                                 KeyType.EC), 'EC private key')
      if key is None:
        raise errors.KeyNotFoundError(
            f'{self.key_id}: the token has no EC private key with this '
            'label/id (only its public key is visible: check the PIN and '
            'the label)')
      return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))

    raw = self._run('sign', op, need_private=True)
    if len(raw) != 64:
      raise errors.KeyBackendError(
          f'{self.key_id}: the token returned a {len(raw)}-byte ECDSA '
          'signature; CKM_ECDSA on P-256 returns r || s, 64 bytes')
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], 'big'),
                                     int.from_bytes(raw[32:], 'big'))
    try:  # local check, no token call: the halves belong together
      self.public_key().verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
      raise errors.KeyBackendError(
          f'{self.key_id}: the token\'s signature does not verify under the '
          'public key object with the same label/id; the token holds '
          'mismatched key halves under this label (add id= to the URI)'
      ) from None
    return der

  def verify(self, message: bytes, signature: bytes, alg: str) -> bool:
    """Verifies locally against the public key (read from the token once)."""
    from cryptography.exceptions import InvalidSignature  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives import hashes  # pylint: disable=g-import-not-at-top
    from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
    if alg != SIG_ECDSA_P256 or self.signature_alg != SIG_ECDSA_P256:
      return False
    try:
      self.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))
      return True
    except InvalidSignature:
      return False


class _NoPublicKeyError(errors.KeyNotFoundError):
  """The token is there but holds no public key object with this label/id."""


def _oaep_param(mode: str, aad: bytes):
  from pkcs11 import MGF, Mechanism  # pylint: disable=g-import-not-at-top
  if mode == OAEP_SHA256_LABEL:
    return (Mechanism.SHA256, MGF.SHA256, aad)
  if mode == OAEP_SHA256_NO_LABEL:
    return (Mechanism.SHA256, MGF.SHA256, None)
  return (Mechanism.SHA_1, MGF.SHA1, None)


def _check_public(pub, key_id: str):
  from cryptography.hazmat.primitives.asymmetric import ec, rsa  # pylint: disable=g-import-not-at-top
  if isinstance(pub, rsa.RSAPublicKey):
    return pub
  if isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(
      pub.curve, ec.SECP256R1):
    return pub
  raise errors.UsageError(
      f'{key_id}: the public key is neither RSA nor EC P-256')


def _local_path(src: str, what: str) -> str:
  """A local path from a ``file:`` URI or an absolute path (pin-source...)."""
  if src.startswith('file:'):
    parsed = urllib.parse.urlparse(src)
    if parsed.netloc not in ('', 'localhost'):
      raise errors.InvalidKeyUriError(f'{what} must be a local file: URI')
    return urllib.parse.unquote(parsed.path)
  if '://' in src or src.startswith('|'):
    raise errors.InvalidKeyUriError(
        f'{what} must be a file: URI or an absolute path')
  return src


def _text(value) -> str:
  if isinstance(value, bytes):
    value = value.decode('utf-8', 'replace')
  return str(value).strip()
