"""Segmented streaming AEAD: Tink's AES-GCM-HKDF streaming (docs/FORMAT.md §6).

Byte-compatible with Tink's ``AES256_GCM_HKDF_1MB`` template: a stream is
``0x28 || salt(32) || nonce_prefix(7)`` followed by 1 MiB ciphertext
segments, each sealed with the key ``HKDF-SHA256(ikm, salt, info=aad)`` and
nonce ``nonce_prefix || u32(i) || last``. ChaCha20-Poly1305 is available as a
second suite with the same framing.

Pure bytes in, bytes out: nothing here touches files or key sources.
Segments may be processed in any order and in parallel; callers reuse
buffers through :meth:`StreamCipher.encrypt_into` / :meth:`decrypt_into`.
"""

import os
import struct
from typing import Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tfx_encrypt import errors

AES256_GCM_HKDF_1MB = 'AES256_GCM_HKDF_1MB'
CHACHA20_POLY1305_HKDF_1MB = 'CHACHA20_POLY1305_HKDF_1MB'
SUITES = {
    AES256_GCM_HKDF_1MB: AESGCM,
    CHACHA20_POLY1305_HKDF_1MB: ChaCha20Poly1305,
}
# User-facing cipher names (CLI --cipher) -> suite ids.
CIPHERS = {
    'aes-256-gcm': AES256_GCM_HKDF_1MB,
    'chacha20-poly1305': CHACHA20_POLY1305_HKDF_1MB,
}
CIPHER_OF_SUITE = {v: k for k, v in CIPHERS.items()}

KEY_SIZE = 32
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
TAG_SIZE = 16
HEADER_SIZE = 1 + SALT_SIZE + NONCE_PREFIX_SIZE  # 40
SEGMENT_SIZE = 1 << 20  # ciphertext segment size
PLAINTEXT_SEGMENT_SIZE = SEGMENT_SIZE - TAG_SIZE  # 1048560
FIRST_PLAINTEXT_SEGMENT_SIZE = PLAINTEXT_SEGMENT_SIZE - HEADER_SIZE  # 1048520
FIRST_CIPHERTEXT_SEGMENT_SIZE = SEGMENT_SIZE - HEADER_SIZE  # 1048536
MAX_SEGMENTS = 2**32 - 1


def suite_for_cipher(cipher: str) -> str:
  try:
    return CIPHERS[cipher]
  except KeyError:
    raise errors.UsageError(
        f'unknown cipher {cipher!r}; choose one of {", ".join(CIPHERS)}'
    ) from None


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
  return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt,
              info=info).derive(ikm)


def num_segments(plaintext_size: int) -> int:
  """Number of segments the writer emits for a plaintext of this size."""
  if plaintext_size < 0:
    raise ValueError('negative size')
  if plaintext_size <= FIRST_PLAINTEXT_SEGMENT_SIZE:
    return 1
  rest = plaintext_size - FIRST_PLAINTEXT_SEGMENT_SIZE
  return 1 + -(-rest // PLAINTEXT_SEGMENT_SIZE)


def ciphertext_size(plaintext_size: int) -> int:
  n = num_segments(plaintext_size)
  if n > MAX_SEGMENTS:
    raise errors.UsageError('file too large for one stream (2^32 segments)')
  return HEADER_SIZE + plaintext_size + TAG_SIZE * n


def segments_of_ciphertext(ct_size: int) -> int:
  """Number of segments in a stream of this total size (any valid writer)."""
  body = ct_size - HEADER_SIZE
  if body < TAG_SIZE:
    raise errors.TamperedPackageError(
        'encrypted stream is shorter than its header and one tag; the '
        'package was truncated')
  if body <= FIRST_CIPHERTEXT_SEGMENT_SIZE:
    return 1
  rest = body - FIRST_CIPHERTEXT_SEGMENT_SIZE
  n = 1 + -(-rest // SEGMENT_SIZE)
  last = rest - (n - 2) * SEGMENT_SIZE
  if last < TAG_SIZE:
    raise errors.TamperedPackageError(
        'encrypted stream ends inside a segment tag; the package was '
        'truncated or extended')
  return n


def plaintext_segment(i: int, plaintext_size: int) -> Tuple[int, int]:
  """(offset, length) of plaintext segment i in a plaintext of this size."""
  if i == 0:
    return 0, min(plaintext_size, FIRST_PLAINTEXT_SEGMENT_SIZE)
  start = FIRST_PLAINTEXT_SEGMENT_SIZE + (i - 1) * PLAINTEXT_SEGMENT_SIZE
  return start, min(plaintext_size - start, PLAINTEXT_SEGMENT_SIZE)


def ciphertext_segment_offset(i: int) -> int:
  """Offset of ciphertext segment i from the start of the stream."""
  if i == 0:
    return HEADER_SIZE
  return SEGMENT_SIZE + (i - 1) * SEGMENT_SIZE


def ciphertext_segment(i: int, ct_size: int) -> Tuple[int, int]:
  """(offset, length) of ciphertext segment i in a stream of this size."""
  off = ciphertext_segment_offset(i)
  cap = FIRST_CIPHERTEXT_SEGMENT_SIZE if i == 0 else SEGMENT_SIZE
  return off, min(ct_size - off, cap)


class StreamCipher:
  """One stream: its header and per-segment seal/open.

  Use :meth:`new` to start a stream for writing (fresh random salt and nonce
  prefix) and :meth:`from_header` to read one.
  """

  __slots__ = ('suite', 'header', '_aead', '_prefix', '_into')

  def __init__(self, suite: str, ikm: bytes, aad: bytes, salt: bytes,
               nonce_prefix: bytes):
    if suite not in SUITES:
      raise errors.UnsupportedFormatError(
          f'unknown stream suite {suite!r}; upgrade tfx-encrypt')
    if len(ikm) != KEY_SIZE or len(salt) != SALT_SIZE or len(
        nonce_prefix) != NONCE_PREFIX_SIZE:
      raise ValueError('bad stream key, salt or nonce prefix length')
    self.suite = suite
    self.header = bytes([HEADER_SIZE]) + salt + nonce_prefix
    self._aead = SUITES[suite](hkdf(ikm, salt, aad, KEY_SIZE))
    self._prefix = nonce_prefix
    self._into = hasattr(self._aead, 'encrypt_into')

  @classmethod
  def new(cls, suite: str, ikm: bytes, aad: bytes) -> 'StreamCipher':
    return cls(suite, ikm, aad, os.urandom(SALT_SIZE),
               os.urandom(NONCE_PREFIX_SIZE))

  @classmethod
  def from_header(cls, suite: str, ikm: bytes, aad: bytes,
                  header: bytes) -> 'StreamCipher':
    if len(header) != HEADER_SIZE or header[0] != HEADER_SIZE:
      raise errors.TamperedPackageError(
          'encrypted stream has a malformed header; the package is corrupt '
          'or was modified')
    return cls(suite, ikm, aad, bytes(header[1:1 + SALT_SIZE]),
               bytes(header[1 + SALT_SIZE:]))

  def nonce(self, i: int, last: bool) -> bytes:
    if not 0 <= i < MAX_SEGMENTS:
      raise errors.TamperedPackageError('segment counter out of range')
    return self._prefix + struct.pack('>IB', i, 1 if last else 0)

  def encrypt(self, i: int, last: bool, plaintext) -> bytes:
    return self._aead.encrypt(self.nonce(i, last), bytes(plaintext), None)

  def encrypt_into(self, i: int, last: bool, plaintext, out) -> int:
    """Seal `plaintext` into `out` (len(plaintext)+16 bytes); return length."""
    if self._into:
      return self._aead.encrypt_into(self.nonce(i, last), plaintext, None,
                                     memoryview(out)[:len(plaintext) +
                                                     TAG_SIZE])
    ct = self.encrypt(i, last, plaintext)
    out[:len(ct)] = ct
    return len(ct)

  def decrypt(self, i: int, last: bool, ciphertext) -> bytes:
    try:
      return self._aead.decrypt(self.nonce(i, last), bytes(ciphertext), None)
    except InvalidTag:
      raise _segment_error(i) from None

  def decrypt_into(self, i: int, last: bool, ciphertext, out) -> int:
    """Open `ciphertext` into `out` (len-16 bytes); return plaintext length."""
    try:
      if self._into:
        return self._aead.decrypt_into(
            self.nonce(i, last), ciphertext, None,
            memoryview(out)[:max(0, len(ciphertext) - TAG_SIZE)])
      pt = self._aead.decrypt(self.nonce(i, last), bytes(ciphertext), None)
    except InvalidTag:
      raise _segment_error(i) from None
    out[:len(pt)] = pt
    return len(pt)


def _segment_error(i: int) -> errors.TamperedPackageError:
  return errors.TamperedPackageError(
      f'segment {i} of an encrypted stream failed authentication: the package '
      'was modified, truncated, reordered or mixed with another package (or '
      'the wrong key was used). Fetch a fresh copy from the publisher.')


def encrypt_bytes(suite: str, ikm: bytes, aad: bytes, plaintext: bytes,
                  cipher: Optional[StreamCipher] = None) -> bytes:
  """Encrypt a whole in-memory plaintext as one stream."""
  sc = cipher or StreamCipher.new(suite, ikm, aad)
  n = num_segments(len(plaintext))
  parts = [sc.header]
  mv = memoryview(plaintext)
  for i in range(n):
    off, ln = plaintext_segment(i, len(plaintext))
    parts.append(sc.encrypt(i, i == n - 1, mv[off:off + ln]))
  return b''.join(parts)


def decrypt_bytes(suite: str, ikm: bytes, aad: bytes, stream: bytes) -> bytes:
  """Decrypt a whole in-memory stream written by any conforming writer."""
  n = segments_of_ciphertext(len(stream))
  sc = StreamCipher.from_header(suite, ikm, aad, stream[:HEADER_SIZE])
  mv = memoryview(stream)
  out = []
  for i in range(n):
    off, ln = ciphertext_segment(i, len(stream))
    out.append(sc.decrypt(i, i == n - 1, mv[off:off + ln]))
  return b''.join(out)
