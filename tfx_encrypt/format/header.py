"""Header codec, key derivation, commitment, MAC and signature message.

Implements docs/FORMAT.md §3–§5 and §8–§9 on bytes only. The parser is
strict and bounded: it never runs a code-executing loader, rejects unknown
or duplicate keys, floats, NaN, and anything over the documented limits.
"""

import base64
import binascii
import hashlib
import hmac
import json
import re
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import paths as paths_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.format.stanza import Stanza

MAGIC = b'TFXENC\x00\x02'
FORMAT_NAME = 'tfx-encrypt/2'
FORMAT_VERSION = 2

MAX_BODY = 16 << 20
#: Raw signature bytes (§8): Ed25519 R || S, ECDSA P-256 r || s (low S).
SIG_SIZE = 64
MAX_SIG = SIG_SIZE
MAC_SIZE = 32
PREFIX_SIZE = len(MAGIC) + 4
MAX_HEADER = PREFIX_SIZE + MAX_BODY + MAC_SIZE + 4 + MAX_SIG
MAX_RECIPIENTS = 64
MAX_KEY_GROUPS = 16
MAX_FILES = 100_000
MAX_DIRS = 100_000
MAX_CONTEXT = 64
MAX_CONTEXT_KEY = 128
MAX_CONTEXT_VALUE = 1024
MAX_FILE_SIZE = 1 << 50  # 1 PiB; far below the 2^32-segment stream limit
MAX_FILE_TABLE = 12 << 20

_BODY_KEYS = {'format', 'suite', 'hash', 'package_id', 'created', 'context',
              'recipients', 'threshold', 'commitment', 'fingerprint',
              'payloads', 'file_table', 'signer'}
_THRESHOLD_KEYS = {'k', 'groups'}
_SIGNER_KEYS = {'alg', 'key_id'}
SIGNATURE_ALGS = ('ed25519', 'ecdsa-p256-sha256')
MAX_SIGNER_KEY_ID = 1024
# Group orders: Ed25519's L (RFC 8032) and P-256's n (SEC 2).
_ED25519_L = 2**252 + 27742317777372353535851937790883648493
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# Matched with fullmatch (a `$` would also accept a trailing newline).
_HEX64 = re.compile(r'[0-9a-f]{64}')
_HEX32 = re.compile(r'[0-9a-f]{32}')
_CREATED = re.compile(r'[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z')
# The fingerprint root is SHA-256 whatever `hash` is (§9, model_signing's rule).
_FINGERPRINT = re.compile(r'sha256:[0-9a-f]{64}')
#: Context keys with this prefix are reserved for tfx-encrypt (§4): a writer
#: refuses them, and a reader refuses any it does not know (today: all of
#: them; `tfxe:package-id` and `tfxe:share-group` exist only in wrap
#: contexts, never in the header).
RESERVED_CONTEXT_PREFIX = 'tfxe:'
KNOWN_RESERVED_CONTEXT_KEYS = frozenset()


def _bad(what: str) -> errors.TamperedPackageError:
  return errors.TamperedPackageError(
      f'package header is invalid ({what}); the package is corrupt or was '
      'modified. Fetch a fresh copy from the publisher.')


# --- canonical JSON ---------------------------------------------------------

def canonical_json(obj) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(',', ':'),
                    ensure_ascii=True, allow_nan=False).encode('ascii')


def _no_dupes(pairs):
  d = {}
  for k, v in pairs:
    if k in d:
      raise _bad(f'duplicate key {_text.quoted(k, 64)}')
    d[k] = v
  return d


def _reject_float(_):
  raise _bad('floating-point number')


def _reject_constant(name):
  raise _bad(f'non-finite number {name}')


def strict_json(data: bytes, what: str):
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError:
    raise _bad(f'{what} is not UTF-8') from None
  try:
    return json.loads(text, object_pairs_hook=_no_dupes,
                      parse_float=_reject_float,
                      parse_constant=_reject_constant)
  except errors.TamperedPackageError:
    raise
  except (ValueError, RecursionError):
    raise _bad(f'{what} is not valid JSON') from None


def _int(v, lo: int, hi: int, what: str) -> int:
  if type(v) is not int or not lo <= v <= hi:  # pylint: disable=unidiomatic-typecheck
    raise _bad(f'{what} out of range')
  return v


def _str(v, what: str, max_len: int = 4096, pattern=None) -> str:
  if not isinstance(v, str) or len(v) > max_len:
    raise _bad(what)
  if pattern is not None and not pattern.fullmatch(v):
    raise _bad(what)
  return v


def _b64(v, what: str, max_len: int) -> bytes:
  _str(v, what, max_len * 4 // 3 + 4)
  try:
    out = base64.b64decode(v.encode('ascii'), validate=True)
  except (binascii.Error, ValueError):
    raise _bad(f'{what} is not base64') from None
  # One byte form only: padding bits must be zero (RFC 4648 §3.5).
  if base64.b64encode(out).decode('ascii') != v:
    raise _bad(f'{what} is not canonical base64')
  return out


# --- context ----------------------------------------------------------------

def check_context(context) -> Dict[str, str]:
  """Validate a user encryption context; raises UsageError."""
  if context is None:
    return {}
  if not isinstance(context, dict):
    raise errors.UsageError('encryption context must be a mapping of strings')
  if len(context) > MAX_CONTEXT:
    raise errors.UsageError(
        f'encryption context has more than {MAX_CONTEXT} entries')
  for k, v in context.items():
    if not (isinstance(k, str) and isinstance(v, str)):
      raise errors.UsageError(
          'encryption context entries must be strings: '
          f'{_text.printable(repr(k), 64)}={_text.printable(repr(v), 64)}')
    if not 0 < len(k) <= MAX_CONTEXT_KEY or len(v) > MAX_CONTEXT_VALUE:
      raise errors.UsageError(
          f'encryption context key must be 1-{MAX_CONTEXT_KEY} characters '
          f'and value at most {MAX_CONTEXT_VALUE}: {_text.quoted(k, 40)}')
  return dict(context)


def context_digest(context: Dict[str, str]) -> bytes:
  return hashlib.sha256(canonical_json(context)).digest()


# --- derived keys -------------------------------------------------------------

class DerivedKeys:
  """Keys derived from a DEK for one package (§5)."""

  __slots__ = ('commitment', 'mac_key', 'stream_key')

  def __init__(self, dek: bytes, package_id: bytes, suite: str):
    if len(dek) != 32:
      raise errors.TamperedPackageError('unwrapped data key has wrong length')
    h = streaming.hkdf
    self.commitment = h(dek, package_id, b'tfxe1 key commitment')
    self.mac_key = h(dek, package_id, b'tfxe1 header mac')
    self.stream_key = h(dek, package_id,
                        b'tfxe1 payload key\x00' + suite.encode('ascii'))


def payload_aad(package_id: bytes, index: int, ctx_digest: bytes) -> bytes:
  return (b'tfxe1 payload\x00' + package_id + struct.pack('>I', index) +
          ctx_digest)


def file_table_aad(package_id: bytes, ctx_digest: bytes) -> bytes:
  return b'tfxe1 file table\x00' + package_id + ctx_digest


# --- signature (§8) -------------------------------------------------------------

class SignerRef:
  """The body's `signer` field: which key signs the header, under the MAC."""

  __slots__ = ('alg', 'key_id')

  def __init__(self, alg: str, key_id: str):
    self.alg, self.key_id = alg, key_id

  def to_json(self) -> Dict[str, str]:
    return {'alg': self.alg, 'key_id': self.key_id}

  @classmethod
  def parse(cls, obj) -> Optional['SignerRef']:
    if obj is None:
      return None
    if not isinstance(obj, dict) or set(obj) != _SIGNER_KEYS:
      raise _bad('signer fields')
    alg = _str(obj['alg'], 'signature algorithm', 64)
    if alg not in SIGNATURE_ALGS:
      raise errors.UnsupportedFormatError(
          f'unsupported signature algorithm {_text.quoted(alg, 64)}; upgrade '
          'tfx-encrypt')
    key_id = _str(obj['key_id'], 'signer key id', MAX_SIGNER_KEY_ID)
    if not key_id:
      raise _bad('signer key id')
    return cls(alg, key_id)


class SignatureBlock:
  """A header's signature: the body's signer and the raw signature bytes."""

  __slots__ = ('alg', 'key_id', 'sig')

  def __init__(self, alg: str, key_id: str, sig: bytes):
    self.alg, self.key_id, self.sig = alg, key_id, sig


def check_raw_signature(alg: str, sig: bytes) -> None:
  """Refuse every byte form of a signature but the canonical one (§8).

  Ed25519: S < L (RFC 8032 §5.1.7; a non-canonical R fails verification).
  ECDSA P-256: 1 <= r < n and 1 <= s <= n/2 (low S, as Bitcoin's BIP 62
  and Ethereum require): (r, n - s) would verify too, so only one is valid.
  """
  if len(sig) != SIG_SIZE:
    raise _bad('signature length')
  if alg == 'ed25519':
    if int.from_bytes(sig[32:], 'little') >= _ED25519_L:
      raise _bad('non-canonical Ed25519 signature (S >= L)')
    return
  r, s = int.from_bytes(sig[:32], 'big'), int.from_bytes(sig[32:], 'big')
  if not (0 < r < _P256_N and 0 < s <= _P256_N // 2):
    raise _bad('non-canonical ECDSA signature (r or s out of range, or high '
               'S)')


def ecdsa_der_to_raw(der: bytes) -> bytes:
  """A DER ECDSA P-256 signature (what signers return) as raw r || low-S s."""
  from cryptography.hazmat.primitives.asymmetric import utils  # pylint: disable=g-import-not-at-top
  r, s = utils.decode_dss_signature(der)
  if s > _P256_N // 2:
    s = _P256_N - s
  return r.to_bytes(32, 'big') + s.to_bytes(32, 'big')


def ecdsa_raw_to_der(raw: bytes) -> bytes:
  from cryptography.hazmat.primitives.asymmetric import utils  # pylint: disable=g-import-not-at-top
  return utils.encode_dss_signature(int.from_bytes(raw[:32], 'big'),
                                    int.from_bytes(raw[32:], 'big'))


# --- key groups (k of n) ----------------------------------------------------

class KeyGroups:
  """The header's `threshold` field (§7.1): k of n groups of stanzas.

  `groups[i]` lists the indices (ascending) of the recipient stanzas that
  wrap Shamir share i of the DEK; every stanza is in exactly one group, and
  shares from any `k` distinct groups rebuild the DEK.
  """

  __slots__ = ('k', 'groups')

  def __init__(self, k: int, groups: Sequence[Sequence[int]]):
    self.k = k
    self.groups = [list(g) for g in groups]

  @property
  def n(self) -> int:
    return len(self.groups)

  def to_json(self) -> Dict[str, Any]:
    return {'k': self.k, 'groups': [list(g) for g in self.groups]}

  def __eq__(self, other):
    return isinstance(other, KeyGroups) and self.to_json() == other.to_json()

  def __repr__(self):
    return f'KeyGroups(k={self.k}, groups={self.groups!r})'

  @classmethod
  def parse(cls, obj, stanza_count: int) -> Optional['KeyGroups']:
    """Strictly validate a header `threshold` value (None stays None)."""
    if obj is None:
      return None
    if not isinstance(obj, dict) or set(obj) != _THRESHOLD_KEYS:
      raise _bad('threshold fields')
    groups = obj['groups']
    if not isinstance(groups, list) or not 2 <= len(groups) <= MAX_KEY_GROUPS:
      raise _bad('key group count')
    k = _int(obj['k'], 2, len(groups), 'key group threshold')
    seen = []
    for g in groups:
      if not isinstance(g, list) or not g:
        raise _bad('empty key group')
      prev = -1
      for idx in g:
        idx = _int(idx, 0, stanza_count - 1, 'key group stanza index')
        if idx <= prev:
          raise _bad('key group stanza indices are not ascending')
        prev = idx
        seen.append(idx)
    if sorted(seen) != list(range(stanza_count)):
      raise _bad('every recipient stanza must be in exactly one key group')
    return cls(k, groups)


# --- header -------------------------------------------------------------------

class Header:
  """A parsed or to-be-written package header."""

  def __init__(self, *, suite: str, hash_alg: str, package_id: bytes,
               created: str, context: Dict[str, str],
               recipients: List[Stanza], commitment: bytes, fingerprint: str,
               payloads: List[Tuple[int, str]], file_table: bytes,
               mac: bytes = b'', signature: Optional[SignatureBlock] = None,
               body: Optional[bytes] = None,
               threshold: Optional[KeyGroups] = None,
               signer: Optional[SignerRef] = None):
    self.suite = suite
    self.hash_alg = hash_alg
    self.package_id = package_id
    self.created = created
    self.context = context
    self.recipients = recipients
    self.threshold = threshold  # None: any one recipient opens the package
    self.commitment = commitment
    self.fingerprint = fingerprint
    self.payloads = payloads
    self.file_table = file_table
    self.mac = mac
    self.signer = signer  # in the body: who signs (None: unsigned)
    self.signature = signature  # the signature itself, after the MAC
    self._body = body  # raw received bytes, when parsed

  # -- encoding ---------------------------------------------------------------
  def body_json(self) -> Dict[str, Any]:
    return {
        'format': FORMAT_NAME,
        'suite': self.suite,
        'hash': self.hash_alg,
        'package_id': self.package_id.hex(),
        'created': self.created,
        'context': self.context,
        'recipients': [s.to_json() for s in self.recipients],
        'threshold': (None if self.threshold is None else
                      self.threshold.to_json()),
        'commitment': base64.b64encode(self.commitment).decode('ascii'),
        'fingerprint': self.fingerprint,
        'payloads': [[s, d] for s, d in self.payloads],
        'file_table': base64.b64encode(self.file_table).decode('ascii'),
        'signer': None if self.signer is None else self.signer.to_json(),
    }

  def body(self) -> bytes:
    if self._body is None:
      self._body = canonical_json(self.body_json())
      if len(self._body) > MAX_BODY:
        raise errors.UsageError(
            'package header would exceed 16 MiB; the model has too many '
            'files or too large an encryption context')
    return self._body

  def invalidate(self):
    """Forget cached body bytes after a field changed (rewrap)."""
    self._body = None
    self.mac = b''
    self.signature = None

  def signed_part(self) -> bytes:
    body = self.body()
    return MAGIC + struct.pack('>I', len(body)) + body

  def signature_message(self) -> bytes:
    return (b'tfxe2 header signature\x00' +
            hashlib.sha256(self.signed_part()).digest())

  def compute_mac(self, mac_key: bytes) -> bytes:
    return hmac.new(mac_key, self.signed_part(), hashlib.sha256).digest()

  def check_mac(self, mac_key: bytes):
    if not hmac.compare_digest(self.compute_mac(mac_key), self.mac):
      raise errors.TamperedPackageError(
          'package header failed authentication (MAC mismatch): its '
          'recipients, context or file list were modified. Fetch a fresh '
          'copy from the publisher.')

  def serialize(self) -> bytes:
    if len(self.mac) != MAC_SIZE:
      raise ValueError('header MAC not set')
    sig = b''
    if self.signer is not None:
      if (self.signature is None or self.signature.alg != self.signer.alg or
          self.signature.key_id != self.signer.key_id):
        raise ValueError('the header names a signer but is not signed by it')
      sig = self.signature.sig
      check_raw_signature(self.signer.alg, sig)
    return self.signed_part() + self.mac + struct.pack('>I', len(sig)) + sig

  @property
  def ctx_digest(self) -> bytes:
    return context_digest(self.context)

  @property
  def ciphertext_bytes(self) -> int:
    return sum(s for s, _ in self.payloads)

  def payload_digest(self) -> str:
    return digest_lib.root_digest(self.hash_alg, (d for _, d in self.payloads))

  # -- parsing ------------------------------------------------------------------
  @classmethod
  def read(cls, f) -> Tuple['Header', int]:
    """Read a header from a binary file object; returns (header, length)."""
    prefix = _read_exact(f, PREFIX_SIZE, 'header')
    if prefix[:7] != MAGIC[:7]:
      raise errors.UnsupportedFormatError(
          'not a tfx-encrypt package (bad magic); check the path')
    if prefix[:8] != MAGIC:
      if prefix[7] < FORMAT_VERSION:  # FORMAT.md "Versions": v1 was dropped
        raise errors.UnsupportedFormatError(
            f'tfx-encrypt package format version {prefix[7]} is not supported '
            f'any more (this version reads version {FORMAT_VERSION}); '
            're-encrypt the model with this version')
      raise errors.UnsupportedFormatError(
          f'tfx-encrypt package format version {prefix[7]} is not supported '
          f'by this version (reads version {FORMAT_VERSION}); upgrade '
          'tfx-encrypt')
    (body_len,) = struct.unpack('>I', prefix[8:])
    if not 0 < body_len <= MAX_BODY:
      raise _bad('header body length')
    body = _read_exact(f, body_len, 'header body')
    mac = _read_exact(f, MAC_SIZE, 'header MAC')
    (sig_len,) = struct.unpack('>I', _read_exact(f, 4, 'signature length'))
    if sig_len not in (0, SIG_SIZE):
      raise _bad('signature length')
    sig = _read_exact(f, sig_len, 'signature') if sig_len else b''
    h = cls.parse_body(body)
    h.mac = mac
    # The body says whether the package is signed, under the MAC (as the
    # AWS Encryption SDK's signed suites do): a signature cannot be
    # stripped, or added, without changing the body.
    if (h.signer is None) != (sig_len == 0):
      raise _bad('the signature does not match the signer the header names'
                 if sig_len == 0 else 'a signature on an unsigned header')
    if h.signer is not None:
      check_raw_signature(h.signer.alg, sig)
      h.signature = SignatureBlock(h.signer.alg, h.signer.key_id, sig)
    return h, PREFIX_SIZE + body_len + MAC_SIZE + 4 + sig_len

  @classmethod
  def parse_body(cls, body: bytes) -> 'Header':
    obj = strict_json(body, 'header body')
    if not isinstance(obj, dict) or set(obj) != _BODY_KEYS:
      raise _bad('unexpected or missing fields')
    if obj['format'] != FORMAT_NAME:
      raise errors.UnsupportedFormatError(
          f'unsupported package format {_text.quoted(obj["format"], 64)}; '
          'upgrade tfx-encrypt')
    suite = obj['suite']
    if not isinstance(suite, str) or suite not in streaming.SUITES:
      raise errors.UnsupportedFormatError(
          f'unsupported cipher suite {_text.quoted(suite, 64)}; upgrade '
          'tfx-encrypt')
    hash_alg = obj['hash']
    if not isinstance(hash_alg, str) or hash_alg not in digest_lib.HASHES:
      raise errors.UnsupportedFormatError(
          f'unsupported hash {_text.quoted(hash_alg, 64)}; upgrade '
          'tfx-encrypt')
    digest_lib.require_for_reading(hash_alg)
    package_id = bytes.fromhex(_str(obj['package_id'], 'package id', 32,
                                    _HEX32))
    created = _str(obj['created'], 'creation time', 20, _CREATED)
    ctx = obj['context']
    try:
      ctx = check_context(ctx)
    except errors.UsageError:
      raise _bad('encryption context') from None
    for k in ctx:
      if (k.startswith(RESERVED_CONTEXT_PREFIX) and
          k not in KNOWN_RESERVED_CONTEXT_KEYS):
        raise errors.UnsupportedFormatError(
            f'package context key {_text.quoted(k, 64)} uses the reserved '
            f'prefix {RESERVED_CONTEXT_PREFIX!r} and is unknown to this '
            'version; upgrade tfx-encrypt')
    recips = obj['recipients']
    if not isinstance(recips, list) or not 0 < len(recips) <= MAX_RECIPIENTS:
      raise _bad('recipient count')
    recipients = [Stanza.from_json(r) for r in recips]
    threshold = KeyGroups.parse(obj['threshold'], len(recipients))
    commitment = _b64(obj['commitment'], 'commitment', 32)
    if len(commitment) != 32:
      raise _bad('commitment length')
    fingerprint = _str(obj['fingerprint'], 'fingerprint', 80, _FINGERPRINT)
    pl = obj['payloads']
    if not isinstance(pl, list) or not 0 < len(pl) <= MAX_FILES:
      raise _bad('payload count')
    payloads = []
    max_ct = streaming.ciphertext_size(MAX_FILE_SIZE)
    for p in pl:
      if not isinstance(p, list) or len(p) != 2:
        raise _bad('payload entry')
      size = _int(p[0], streaming.HEADER_SIZE + streaming.TAG_SIZE, max_ct,
                  'payload size')
      streaming.segments_of_ciphertext(size)
      payloads.append((size, _str(p[1], 'payload digest', 64, _HEX64)))
    file_table = _b64(obj['file_table'], 'file table', MAX_FILE_TABLE)
    signer = SignerRef.parse(obj['signer'])
    # One byte form per header (§4): the body must be exactly what a writer
    # produces, so a package's bytes (and its OCI digest) cannot be varied.
    if canonical_json(obj) != body:
      raise _bad('header body is not canonical JSON')
    return cls(suite=suite, hash_alg=hash_alg, package_id=package_id,
               created=created, context=ctx, recipients=recipients,
               threshold=threshold, commitment=commitment,
               fingerprint=fingerprint,
               payloads=payloads, file_table=file_table, body=body,
               signer=signer)


def _read_exact(f, n: int, what: str) -> bytes:
  data = f.read(n)
  if len(data) != n:
    raise errors.TamperedPackageError(
        f'package is truncated (while reading the {what}); fetch a fresh copy')
  return data


# --- file table -----------------------------------------------------------------

class FileEntry:
  __slots__ = ('path', 'size', 'digest')

  def __init__(self, path: str, size: int, digest: str):
    self.path, self.size, self.digest = path, size, digest

  def __repr__(self):
    return f'FileEntry({self.path!r}, {self.size})'


def encode_file_table(files: Sequence[FileEntry], dirs: Sequence[str]) -> bytes:
  return canonical_json({
      'dirs': sorted(dirs),
      'files': [{'path': e.path, 'size': e.size, 'digest': e.digest}
                for e in files],
  })


def decode_file_table(data: bytes, payload_count: int
                      ) -> Tuple[List[FileEntry], List[str]]:
  obj = strict_json(data, 'file table')
  if not isinstance(obj, dict) or set(obj) != {'dirs', 'files'}:
    raise _bad('file table fields')
  if canonical_json(obj) != data:
    raise _bad('file table is not canonical JSON')
  files, dirs = obj['files'], obj['dirs']
  if not isinstance(files, list) or len(files) != payload_count:
    raise _bad('file table does not match the payload list')
  if not isinstance(dirs, list) or len(dirs) > MAX_DIRS:
    raise _bad('directory list')
  entries = []
  for f in files:
    if not isinstance(f, dict) or set(f) != {'path', 'size', 'digest'}:
      raise _bad('file entry')
    entries.append(FileEntry(
        _str(f['path'], 'file path', paths_lib.MAX_PATH_BYTES),
        _int(f['size'], 0, MAX_FILE_SIZE, 'file size'),
        _str(f['digest'], 'file digest', 64, _HEX64)))
  for d in dirs:
    _str(d, 'directory path', paths_lib.MAX_PATH_BYTES)
  dir_list = paths_lib.check_tree([e.path for e in entries], dirs)
  if dir_list != dirs:
    raise _bad('directory list is not sorted')
  return entries, dir_list
