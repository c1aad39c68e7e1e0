"""Shamir secret sharing over GF(2^8), for k-of-n recipient groups.

Byte-compatible with HashiCorp Vault's ``shamir`` package, which sops uses
for its key groups: each byte of the secret is the constant term of its own
random polynomial of degree ``threshold - 1`` over GF(2^8) (the AES field,
x^8 + x^4 + x^3 + x + 1); a share is the polynomials' values at one
non-zero point x followed by x itself (``len(share) = len(secret) + 1``);
the x coordinates of a split are distinct and chosen at random.

Combining fewer than ``threshold`` shares returns a wrong value without
any error (that is the scheme's secrecy), so callers must check the
result: the package format's key commitment does exactly that.

The package format's k-of-n key groups (docs/FORMAT.md §7.1) use this
module with fixed x coordinates (share i at x = i + 1, ``xs=``) so that a
share of any group can be recomputed from any k shares (`interpolate`).
"""

import os
import secrets
from typing import Callable, List, Optional, Sequence

from tfx_encrypt import errors

#: Bytes a share has beyond the secret (the x coordinate).
SHARE_OVERHEAD = 1


def gf_mul(a: int, b: int) -> int:
  """Product in GF(2^8) mod x^8+x^4+x^3+x+1, without data-dependent branches."""
  r = 0
  for _ in range(8):
    r ^= -(b & 1) & a
    carry = -((a >> 7) & 1) & 0x1B
    a = ((a << 1) & 0xFF) ^ carry
    b >>= 1
  return r & 0xFF


def gf_inv(a: int) -> int:
  """Multiplicative inverse (a^254); gf_inv(0) is 0 by convention."""
  result, base, e = 1, a, 254
  while e:
    if e & 1:
      result = gf_mul(result, base)
    base = gf_mul(base, base)
    e >>= 1
  return result


def _eval(coeffs: Sequence[int], x: int) -> int:
  """Horner evaluation of sum(coeffs[i] * x^i)."""
  acc = 0
  for c in reversed(coeffs):
    acc = gf_mul(acc, x) ^ c
  return acc


def split(secret: bytes, parts: int, threshold: int, *,
          randbytes: Callable[[int], bytes] = os.urandom,
          xs: Optional[Sequence[int]] = None) -> List[bytes]:
  """Splits `secret` into `parts` shares, any `threshold` of which rebuild it.

  Args:
    secret: the bytes to share (e.g. the 32-byte DEK).
    parts: number of shares, 2..255.
    threshold: shares needed, 2..parts.
    randbytes: source of randomness (tests pass a deterministic one).
    xs: the shares' x coordinates (distinct, 1..255); by default distinct
      random ones, as Vault does. Their secrecy is not needed for security.

  Returns:
    `parts` shares of ``len(secret) + 1`` bytes each.
  """
  if not isinstance(secret, (bytes, bytearray)) or not secret:
    raise errors.UsageError('the secret to split must be non-empty bytes')
  if not 2 <= threshold <= parts <= 255:
    raise errors.UsageError(
        f'Shamir needs 2 <= threshold <= parts <= 255 (got threshold '
        f'{threshold}, parts {parts})')
  if xs is None:
    xs = list(range(1, 256))
    _shuffle(xs, randbytes)
    xs = xs[:parts]
  xs = list(xs)
  if len(xs) != parts or len(set(xs)) != parts or not all(
      1 <= x <= 255 for x in xs):
    raise errors.UsageError('Shamir x coordinates must be distinct, 1..255')
  shares = [bytearray() for _ in range(parts)]
  for byte in bytes(secret):
    coeffs = [byte] + list(randbytes(threshold - 1))
    for share, x in zip(shares, xs):
      share.append(_eval(coeffs, x))
  for share, x in zip(shares, xs):
    share.append(x)
  return [bytes(s) for s in shares]


def combine(shares: Sequence[bytes]) -> bytes:
  """Rebuilds the secret from shares (at least the split's threshold).

  Raises:
    UsageError: fewer than two shares, unequal lengths, or repeated x.
  """
  return interpolate(shares, 0)[:-SHARE_OVERHEAD]


def interpolate(shares: Sequence[bytes], x: int) -> bytes:
  """The share at `x` of the polynomials through `shares` (Lagrange).

  `shares` must number at least the split's threshold. ``x = 0`` gives the
  secret (followed by the zero x byte); any other x recomputes that share.

  Raises:
    UsageError: fewer than two shares, unequal lengths, or repeated x.
  """
  shares = [bytes(s) for s in shares]
  if len(shares) < 2:
    raise errors.UsageError('at least two Shamir shares are needed')
  length = len(shares[0])
  if length < 2 or any(len(s) != length for s in shares):
    raise errors.UsageError('Shamir shares must all have the same length (>= 2)')
  xs = [s[-1] for s in shares]
  if len(set(xs)) != len(xs) or 0 in xs:
    raise errors.UsageError('Shamir shares have repeated or zero x coordinates')
  if not 0 <= x <= 255:
    raise errors.UsageError('a Shamir x coordinate is a byte')
  # Lagrange basis values at x: l_i(x) = prod_{j != i} (x - x_j) / (x_i - x_j);
  # in GF(2^8) subtraction is XOR.
  basis = []
  for i, xi in enumerate(xs):
    num, den = 1, 1
    for j, xj in enumerate(xs):
      if i != j:
        num = gf_mul(num, x ^ xj)
        den = gf_mul(den, xi ^ xj)
    basis.append(gf_mul(num, gf_inv(den)))
  out = bytearray()
  for pos in range(length - SHARE_OVERHEAD):
    acc = 0
    for share, li in zip(shares, basis):
      acc ^= gf_mul(share[pos], li)
    out.append(acc)
  out.append(x)
  return bytes(out)


def _shuffle(items: List[int], randbytes: Callable[[int], bytes]) -> None:
  """Fisher-Yates with unbiased draws from `randbytes`."""
  if randbytes is os.urandom:
    for i in range(len(items) - 1, 0, -1):
      j = secrets.randbelow(i + 1)
      items[i], items[j] = items[j], items[i]
    return
  for i in range(len(items) - 1, 0, -1):
    while True:   # rejection sampling over one byte
      r = randbytes(1)[0]
      limit = 256 - 256 % (i + 1)
      if r < limit:
        break
    j = r % (i + 1)
    items[i], items[j] = items[j], items[i]
