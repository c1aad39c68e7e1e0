"""Packages built from parts, byte by byte: test vectors and hostile packages.

The writer (`encrypt_model`) writes valid packages only. Tests of the reader
need packages that are valid except for one defect, built the way someone
holding some of the secrets could build them: the data key (a recipient can
compute any MAC), a signing key (the publisher, or an attacker with a key of
their own), or nothing at all (anyone can edit bytes). `build` assembles a
package from `Parts`, with a hook at each step of docs/FORMAT.md §3-§8, and
returns its header and payload bytes; `write` stores them in directory or
bundle form (§2). tests/_craft.py is the older one-call variant.

Randomness (data key, package id, stream salts and nonce prefixes, HPKE
ephemeral keys, Shamir coefficients) comes from `Rand`: os.urandom, or, for
test vectors, bytes derived from a seed, so that the same parts give the
same bytes. The HPKE seal below is RFC 9180 base mode written out, so that
its ephemeral key can be fixed. ECDSA signatures are randomized; a `Signer`
can be given a store that keeps the first valid signature of each message
(tests/testdata/make_vectors.py).
"""

import copy
import dataclasses
import hashlib
import hmac
import itertools
import os
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from tfx_encrypt import package as package_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.keys import local
from tfx_encrypt.keys.base import WrapContext, b64e, spki_key_id

MAGIC = header_lib.MAGIC
AES = streaming.AES256_GCM_HKDF_1MB
CHACHA = streaming.CHACHA20_POLY1305_HKDF_1MB
SIGNATURE_LABEL = b'tfxe2 header signature\x00'
#: Group orders: Ed25519's L (RFC 8032), P-256's n (SEC 2).
ED25519_L = 2**252 + 27742317777372353535851937790883648493
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
DIRECTORY, BUNDLE = 'directory', 'bundle'
FORMS = (DIRECTORY, BUNDLE)


class Rand:
  """os.urandom, or (with a seed) bytes derived from the seed and a label."""

  def __init__(self, seed: Optional[str] = None):
    self.seed = seed

  def __call__(self, label: str, n: int) -> bytes:
    if self.seed is None:
      return os.urandom(n)
    return hashlib.shake_256(
        f'tfx-encrypt forge\x00{self.seed}\x00{label}'.encode()).digest(n)

  def source(self, label: str) -> Callable[[int], bytes]:
    """A randbytes(n) function (Shamir coefficients) drawing from `label`."""
    counter = itertools.count()
    return lambda n: self(f'{label}/{next(counter)}', n)


# --- HPKE base mode seal (RFC 9180 §4-§6), fixed ephemeral key ---------------

_KEM_ID = b'KEM\x00\x20'  # DHKEM(X25519, HKDF-SHA256)
_SUITE_ID = b'HPKE\x00\x20\x00\x01\x00\x02'  # ... HKDF-SHA256, AES-256-GCM


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes,
                     ikm: bytes) -> bytes:
  return hmac.new(salt, b'HPKE-v1' + suite_id + label + ikm,
                  hashlib.sha256).digest()


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes,
                    n: int) -> bytes:
  return HKDFExpand(hashes.SHA256(), n, struct.pack('>H', n) + b'HPKE-v1' +
                    suite_id + label + info).derive(prk)


def hpke_seal(recipient: x25519.X25519PublicKey, info: bytes, plaintext: bytes,
              ephemeral: bytes) -> bytes:
  """enc || AES-256-GCM ciphertext, single-shot, empty aad (FORMAT.md §7)."""
  sk_e = x25519.X25519PrivateKey.from_private_bytes(ephemeral)
  enc = sk_e.public_key().public_bytes_raw()
  dh = sk_e.exchange(recipient)
  eae_prk = _labeled_extract(_KEM_ID, b'', b'eae_prk', dh)
  shared = _labeled_expand(_KEM_ID, eae_prk, b'shared_secret',
                           enc + recipient.public_bytes_raw(), 32)
  context = (b'\x00' + _labeled_extract(_SUITE_ID, b'', b'psk_id_hash', b'') +
             _labeled_extract(_SUITE_ID, b'', b'info_hash', info))
  secret = _labeled_extract(_SUITE_ID, shared, b'secret', b'')
  key = _labeled_expand(_SUITE_ID, secret, b'key', context, 32)
  nonce = _labeled_expand(_SUITE_ID, secret, b'base_nonce', context, 12)
  return enc + AESGCM(key).encrypt(nonce, plaintext, b'')


# --- keys ---------------------------------------------------------------------

def load_private(key):
  """A private key object, from a PEM file path or as given."""
  if not isinstance(key, (str, os.PathLike)):
    return key
  with open(key, 'rb') as f:
    return serialization.load_pem_private_key(f.read(), password=None)


def load_public(key):
  """A public key object, from a PEM file path (public or private) or a key
  object (a private key gives its public half)."""
  if not isinstance(key, (str, os.PathLike)):
    return key.public_key() if hasattr(key, 'private_bytes') else key
  with open(key, 'rb') as f:
    data = f.read()
  if b'PRIVATE KEY' in data:
    return serialization.load_pem_private_key(data, password=None).public_key()
  return serialization.load_pem_public_key(data)


def key_id(key) -> str:
  """The key id (§7) of a key (file path or object)."""
  return spki_key_id(load_public(key))


def pem_pair(private_key) -> Tuple[bytes, bytes]:
  """(PKCS#8 private PEM, SubjectPublicKeyInfo PEM); deterministic."""
  return (private_key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()),
          private_key.public_key().public_bytes(
              serialization.Encoding.PEM,
              serialization.PublicFormat.SubjectPublicKeyInfo))


def ecdsa_raw(der: bytes) -> bytes:
  """A DER ECDSA P-256 signature as raw r || s with low s (§8)."""
  r, s = asym_utils.decode_dss_signature(der)
  s = min(s, P256_N - s)
  return r.to_bytes(32, 'big') + s.to_bytes(32, 'big')


def ecdsa_der(raw: bytes) -> bytes:
  return asym_utils.encode_dss_signature(int.from_bytes(raw[:32], 'big'),
                                         int.from_bytes(raw[32:], 'big'))


def high_s(raw: bytes) -> bytes:
  """(r, n - s): the other ECDSA signature of the same message."""
  s = int.from_bytes(raw[32:], 'big')
  return raw[:32] + (P256_N - s).to_bytes(32, 'big')


def s_plus_l(raw: bytes) -> bytes:
  """Ed25519 R || (S + L): the non-canonical twin of a signature."""
  s = int.from_bytes(raw[32:], 'little')
  return raw[:32] + (s + ED25519_L).to_bytes(32, 'little')


class Signer:
  """Signs headers with the private `key` (Ed25519 or ECDSA P-256; a PEM
  file path or a key object).

  `key_id` and `alg` are what the body's `signer` claims (default: the
  key's own). `store`, if given, is a dict {message sha256 hex: raw
  signature} whose entries are reused when they verify, so that re-running
  a generator keeps its ECDSA signatures; new signatures are added to it.
  """

  def __init__(self, key, *, key_id: Optional[str] = None,
               alg: Optional[str] = None,
               store: Optional[Dict[str, bytes]] = None):
    self.key = load_private(key)
    self.ecdsa = isinstance(self.key, ec.EllipticCurvePrivateKey)
    self.own_alg = 'ecdsa-p256-sha256' if self.ecdsa else 'ed25519'
    self.alg = alg or self.own_alg
    self.key_id = key_id or spki_key_id(self.key.public_key())
    self.store = store

  def ref(self) -> Dict[str, str]:
    return {'alg': self.alg, 'key_id': self.key_id}

  def verify(self, message: bytes, raw: bytes) -> bool:
    try:
      if self.ecdsa:
        if int.from_bytes(raw[32:], 'big') > P256_N // 2:
          return False
        self.key.public_key().verify(ecdsa_der(raw), message,
                                     ec.ECDSA(hashes.SHA256()))
      else:
        self.key.public_key().verify(raw, message)
      return True
    except (InvalidSignature, ValueError):
      return False

  def sign(self, message: bytes) -> bytes:
    if not self.ecdsa:
      return self.key.sign(message)
    name = hashlib.sha256(message).hexdigest()
    if self.store is not None:
      old = self.store.get(name)
      if old is not None and self.verify(message, old):
        return old
    raw = ecdsa_raw(self.key.sign(message, ec.ECDSA(hashes.SHA256())))
    if self.store is not None:
      self.store[name] = raw
    return raw


# --- packages from parts ------------------------------------------------------

@dataclasses.dataclass
class Parts:
  """What a package is made of. `files` and `dirs` go into the file table
  verbatim (order kept, no path checks); `recipients` and the members of
  `key_groups` (k, [[key, ...], ...]) are X25519 keys (files or objects;
  sealed here, deterministically with a seeded `rand`) or RSA public key
  files."""
  files: Sequence[Tuple[str, bytes]]
  dirs: Sequence[str] = ()
  recipients: Sequence[str] = ()
  key_groups: Optional[Tuple[int, Sequence[Sequence[str]]]] = None
  context: Dict[str, str] = dataclasses.field(default_factory=dict)
  signer: Optional[Signer] = None
  suite: str = AES
  hash_alg: str = 'sha256'
  created: str = '2026-01-01T00:00:00Z'
  rand: Rand = dataclasses.field(default_factory=Rand)
  dek: Optional[bytes] = None
  package_id: Optional[bytes] = None

  def replace(self, **changes) -> 'Parts':
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class Built:
  """A built package: its bytes and how they were made."""
  header: bytes
  payloads: List[bytes]
  body: dict  # the body object, after edit_body
  body_bytes: bytes  # what the header holds (after body_bytes hook)
  signed_part: bytes
  mac: bytes
  sig: bytes
  dek: bytes
  package_id: bytes
  keys: header_lib.DerivedKeys
  table: bytes  # file table plaintext
  parts: Parts

  def bundle(self) -> bytes:
    return self.header + b''.join(self.payloads)

  @property
  def message(self) -> bytes:
    return SIGNATURE_LABEL + hashlib.sha256(self.signed_part).digest()


def _hash(name: str, data: bytes) -> str:
  assert name == 'sha256', 'vectors and hostile packages use SHA-256'
  return hashlib.sha256(data).hexdigest()


def stream(suite: str, stream_key: bytes, aad: bytes, plaintext: bytes,
           rand: Rand, label: str) -> bytes:
  """One §6 stream with its salt and nonce prefix drawn from `rand`."""
  sc = streaming.StreamCipher(suite, stream_key, aad, rand(label + '/salt', 32),
                              rand(label + '/nonce_prefix', 7))
  return streaming.encrypt_bytes(suite, stream_key, aad, plaintext, cipher=sc)


def wrap(recipient, secret: bytes, wctx: WrapContext, rand: Rand,
         label: str) -> dict:
  """A recipient stanza (§7) wrapping `secret` for `recipient` (X25519 key
  file or object, or RSA key file)."""
  pub = load_public(recipient)
  if isinstance(pub, x25519.X25519PublicKey):
    ct = hpke_seal(pub, wctx.aad(), secret, rand(label + '/ephemeral', 32))
    return {'type': local.X25519_HPKE, 'key_id': spki_key_id(pub),
            'body': {'ct': b64e(ct)}}
  return local.LocalKey(recipient).wrap(secret, wctx).to_json()


def build(parts: Parts, *,
          table: Optional[bytes] = None,
          seal: Optional[Callable[[int, bytes, bytes, bytes], bytes]] = None,
          edit_body: Optional[Callable[[dict], None]] = None,
          body_bytes: Optional[Callable[[bytes], bytes]] = None,
          magic: bytes = MAGIC,
          body_len: Optional[int] = None,
          edit_mac: Optional[Callable[[bytes], bytes]] = None,
          edit_sig: Optional[Callable[[bytes], bytes]] = None,
          sig_len: Optional[int] = None) -> Built:
  """Build a package; each hook changes one step, later steps follow it.

  Args:
    parts: what goes in.
    table: the file table plaintext, verbatim (default: canonical JSON of
      parts.files and parts.dirs).
    seal: seal(index, stream_key, aad, plaintext) -> the payload stream
      (default: a fresh stream); the header describes what it returns.
    edit_body: edits the body object before it is serialised.
    body_bytes: rewrites the serialised body (non-canonical forms).
    magic: the header's first 8 bytes.
    body_len: the u32 written before the body (default: its length).
    edit_mac: rewrites the MAC (computed with the data key).
    edit_sig: rewrites the signature (made by parts.signer, or b'').
    sig_len: the u32 written before the signature (default: its length).

  Returns:
    The package; MAC and signature are valid for whatever the hooks made,
    unless edit_mac or edit_sig changed them.
  """
  p, rand = parts, parts.rand
  dek = p.dek if p.dek is not None else rand('dek', 32)
  pid = p.package_id if p.package_id is not None else rand('package_id', 16)
  keys = header_lib.DerivedKeys(dek, pid, p.suite)
  cd = header_lib.context_digest(p.context)
  payloads, table_files, digests = [], [], []
  for i, (path, data) in enumerate(p.files):
    aad = header_lib.payload_aad(pid, i, cd)
    payloads.append(seal(i, keys.stream_key, aad, data) if seal else
                    stream(p.suite, keys.stream_key, aad, data, rand,
                           f'payload/{i}'))
    digests.append(_hash(p.hash_alg, data))
    table_files.append({'path': path, 'size': len(data),
                        'digest': digests[-1]})
  if table is None:
    table = header_lib.canonical_json({'dirs': list(p.dirs),
                                       'files': table_files})
  stanzas, threshold = [], None
  if p.key_groups is None:
    for n, r in enumerate(p.recipients):
      stanzas.append(wrap(r, dek, WrapContext(pid, p.context), rand,
                          f'stanza/{n}'))
  else:
    k, groups = p.key_groups
    shares = package_lib.split_key(dek, len(groups), k,
                                   randbytes=rand.source('shamir'))
    indices = []
    for gi, members in enumerate(groups):
      wctx = package_lib.share_context(pid, p.context, gi)
      indices.append(list(range(len(stanzas), len(stanzas) + len(members))))
      for r in members:
        stanzas.append(wrap(r, shares[gi], wctx, rand,
                            f'stanza/{len(stanzas)}'))
    threshold = {'k': k, 'groups': indices}
  body = {
      'format': header_lib.FORMAT_NAME,
      'suite': p.suite,
      'hash': p.hash_alg,
      'package_id': pid.hex(),
      'created': p.created,
      'context': dict(p.context),
      'recipients': stanzas,
      'threshold': threshold,
      'commitment': b64e(keys.commitment),
      'fingerprint': f'{p.hash_alg}:' + _hash(
          p.hash_alg, b''.join(bytes.fromhex(d) for d in digests)),
      'payloads': [[len(c), _hash(p.hash_alg, c)] for c in payloads],
      'file_table': b64e(stream(p.suite, keys.stream_key,
                                header_lib.file_table_aad(pid, cd), table,
                                rand, 'file_table')),
      'signer': p.signer.ref() if p.signer else None,
  }
  if edit_body is not None:
    edit_body(body)
  raw = header_lib.canonical_json(body)
  if body_bytes is not None:
    raw = body_bytes(raw)
  signed_part = magic + struct.pack(
      '>I', len(raw) if body_len is None else body_len) + raw
  mac = hmac.new(keys.mac_key, signed_part, hashlib.sha256).digest()
  if edit_mac is not None:
    mac = edit_mac(mac)
  sig = b''
  if p.signer is not None:
    sig = p.signer.sign(SIGNATURE_LABEL + hashlib.sha256(signed_part).digest())
  if edit_sig is not None:
    sig = edit_sig(sig)
  header = (signed_part + mac +
            struct.pack('>I', len(sig) if sig_len is None else sig_len) + sig)
  return Built(header=header, payloads=payloads, body=body, body_bytes=raw,
               signed_part=signed_part, mac=mac, sig=sig, dek=dek,
               package_id=pid, keys=keys, table=table, parts=p)


def reencrypt(built: Built, index: int, plaintext: Optional[bytes] = None,
              rand: Optional[Rand] = None) -> bytes:
  """What a recipient can do: payload `index` sealed again under the
  package's stream key with a fresh stream header (same plaintext unless
  given). The header is left alone."""
  p = built.parts
  aad = header_lib.payload_aad(built.package_id, index,
                               header_lib.context_digest(p.context))
  if plaintext is None:
    plaintext = p.files[index][1]
  return stream(p.suite, built.keys.stream_key, aad, plaintext,
                rand or Rand(), f'reencrypt/{index}')


KEEP = object()  # reseal: keep the old signature bytes


def reseal(built: Built, edit_body: Optional[Callable[[dict], None]] = None,
           *, mac_key: Optional[bytes] = None, signer=KEEP) -> bytes:
  """`built`'s header with its body edited, as a party holding some of the
  secrets re-seals it.

  Args:
    built: the package whose body is edited (its other bytes are kept).
    edit_body: edits a copy of the body object.
    mac_key: recompute the MAC with this key (built.keys.mac_key is what a
      recipient holds); None keeps the old MAC (anyone).
    signer: KEEP keeps the old signature bytes, None drops them (sig_len
      0), a Signer signs the new header.

  Returns:
    The new header bytes.
  """
  body = copy.deepcopy(built.body)
  if edit_body is not None:
    edit_body(body)
  raw = header_lib.canonical_json(body)
  signed_part = built.signed_part[:8] + struct.pack('>I', len(raw)) + raw
  mac = (built.mac if mac_key is None else
         hmac.new(mac_key, signed_part, hashlib.sha256).digest())
  if signer is KEEP:
    sig = built.sig
  elif signer is None:
    sig = b''
  else:
    sig = signer.sign(SIGNATURE_LABEL + hashlib.sha256(signed_part).digest())
  return signed_part + mac + struct.pack('>I', len(sig)) + sig


def split_header(data: bytes) -> Dict[str, object]:
  """The fields of a well-framed header (§3), without any check."""
  (blen,) = struct.unpack('>I', data[8:12])
  mac_at = 12 + blen
  (slen,) = struct.unpack('>I', data[mac_at + 32:mac_at + 36])
  return {'magic': data[:8], 'body_len': blen, 'body': data[12:mac_at],
          'mac': data[mac_at:mac_at + 32], 'sig_len': slen,
          'sig': data[mac_at + 36:mac_at + 36 + slen],
          'length': mac_at + 36 + slen}


# --- on disk ------------------------------------------------------------------

def write_directory(path, header: bytes, payloads: Sequence[bytes],
                    extra: Optional[Dict[str, bytes]] = None) -> str:
  """PKG/tfxe.header and PKG/payload/NNNNNNNN (§2); `extra` adds files
  (relative paths) to the directory."""
  path = os.fspath(path)
  os.makedirs(os.path.join(path, 'payload'))
  with open(os.path.join(path, 'tfxe.header'), 'wb') as f:
    f.write(header)
  for i, data in enumerate(payloads):
    with open(os.path.join(path, 'payload', f'{i:08d}'), 'wb') as f:
      f.write(data)
  for rel, data in (extra or {}).items():
    with open(os.path.join(path, *rel.split('/')), 'wb') as f:
      f.write(data)
  return path


def write_bundle(path, data: bytes) -> str:
  path = os.fspath(path)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def write(path, built: Built, form: str) -> str:
  """`built` in directory form at `path`, or as the bundle `path`.tfxe."""
  path = os.fspath(path)
  if form == DIRECTORY:
    return write_directory(path, built.header, built.payloads)
  return write_bundle(path + '.tfxe', built.bundle())
