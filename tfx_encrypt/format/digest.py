"""Hash functions, the model fingerprint and the ciphertext digest (§9)."""

import hashlib
from typing import Iterable

from tfx_encrypt import errors

HASHES = ('sha256', 'blake3')


def new_hash(name: str):
  """A fresh hash object. BLAKE3 (the default) comes from the `blake3`
  package, a core dependency; an install without it reads SHA-256 only."""
  if name == 'sha256':
    return hashlib.sha256()
  if name == 'blake3':
    try:
      import blake3  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise errors.UsageError(
          'BLAKE3 digests need the blake3 module, which this install lacks '
          '(it is a dependency of tfx-encrypt: pip install blake3); or use '
          '--hash sha256') from None
    return blake3.blake3()
  raise errors.UnsupportedFormatError(
      f'unknown hash {name!r}; choose one of {", ".join(HASHES)}')


def require_for_reading(name: str) -> None:
  """A reader's check (§12): a package whose hash this install cannot
  compute is an unsupported format (exit 3), not a usage error."""
  try:
    new_hash(name)
  except errors.UsageError as e:
    raise errors.UnsupportedFormatError(str(e)) from None


def digest_size(name: str) -> int:
  if name not in HASHES:
    raise errors.UnsupportedFormatError(f'unknown hash {name!r}')
  return 32


def root_digest(name: str, hex_digests: Iterable[str]) -> str:
  """model_signing's root (§9): SHA-256 of the concatenated raw digests.

  The root is SHA-256 whatever `name`, the hash of the digests, is:
  OpenSSF model_signing computes its in-toto subject digest that way for
  every file hash it supports (sha256, blake2, blake3), so the result,
  'sha256:<hex>', equals that subject digest for either of our hashes.
  """
  if name not in HASHES:
    raise errors.UnsupportedFormatError(f'unknown hash {name!r}')
  h = hashlib.sha256()
  for d in hex_digests:
    h.update(bytes.fromhex(d))
  return f'sha256:{h.hexdigest()}'
