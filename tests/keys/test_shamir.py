"""Shamir secret sharing (tfx_encrypt/keys/shamir.py) against known vectors."""

import base64
import itertools
import os
import random

import pytest

from tfx_encrypt import errors
from tfx_encrypt.keys import shamir

# Shares made by HashiCorp Vault's shamir package (the one sops uses), as
# printed by a small public CLI around it: `split -threshold 5 -parts 8` of
# the file "I've never been to Spain.\n", and 2 of 3 shares of
# "Three can keep a secret if two are dead.\n".
VAULT_SPAIN = [base64.b64decode(s) for s in (
    'jZYqqJaCxt4kZjh/xCAakXIG0XKdnlxY89/S',
    '1yubXvs8GdSqO8GPX9Xwk4fV22MJ/4F8wxh9',
    'fuVQmRhkVeKQGzpPVT0eNwvLXHxrQmQjFLGH',
    'Yggxmz2bmtTNPAX9ctHffwqsw4Ds8GZHDpa1',
    'Nyns0pAKCfeqLCrzxV+TpoJCvDJKTqJmR2kG',
    'a//rC1IRcRow60BY5SQV+6bZXLFbUxt221zy',
    'uB34M0pUB5vljgIfdItDHetEfKqxDQea6A93',
    'OUQe8CwZBHTbwt0Za/IRLUlLfB39smrEIEpt',
)]
VAULT_DEAD = [base64.b64decode(s) for s in (
    'upOiLkD7A/va03FStBD+NV9feBlKooE8imH7JJ/CXbbV3pQ3EHxZCQ3z',
    'dfJ2ID7zuNNQY+Zqkqvhu2QCBzVLJyuxg4nzT0rSmYrrbR5RBQNPiOVD',
)]


def test_field_vectors():
  # FIPS-197 section 4.2: {57} . {83} = {c1}, {57} . {13} = {fe}.
  assert shamir.gf_mul(0x57, 0x83) == 0xC1
  assert shamir.gf_mul(0x57, 0x13) == 0xFE
  assert shamir.gf_mul(3, 7) == 9
  assert shamir.gf_mul(0, 0xAB) == 0 and shamir.gf_mul(0xAB, 1) == 0xAB
  # FIPS-197 section 4.2: the inverse of {53} is {ca}.
  assert shamir.gf_inv(0x53) == 0xCA
  for a in range(1, 256):
    assert shamir.gf_mul(a, shamir.gf_inv(a)) == 1


def test_vault_vectors_combine():
  want = b"I've never been to Spain.\n"
  for subset in itertools.combinations(VAULT_SPAIN, 5):
    assert shamir.combine(subset) == want
  # 4 of a 5-threshold split give something else (and no error).
  assert shamir.combine(VAULT_SPAIN[:4]) != want
  assert shamir.combine(VAULT_DEAD) == (
      b'Three can keep a secret if two are dead.\n')


def test_hand_computed_vector():
  # f(x) = 0x42 + 0x17 x: f(1) = 0x55, f(2) = 0x42 ^ (0x17 * 2) = 0x6c.
  assert shamir.combine([bytes([0x55, 1]), bytes([0x6C, 2])]) == b'\x42'


@pytest.mark.parametrize('parts,threshold', [(2, 2), (3, 2), (5, 3), (7, 7)])
def test_split_combine_every_subset(parts, threshold):
  secret = os.urandom(32)
  shares = shamir.split(secret, parts, threshold)
  assert len(shares) == parts
  assert all(len(s) == 33 for s in shares)
  assert len({s[-1] for s in shares}) == parts and all(s[-1] for s in shares)
  for k in range(threshold, parts + 1):
    for subset in itertools.combinations(shares, k):
      assert shamir.combine(subset) == secret
  for subset in itertools.combinations(shares, threshold - 1):
    if len(subset) >= 2:
      assert shamir.combine(subset) != secret


def test_deterministic_randomness_is_used():
  rng = random.Random(5)
  a = shamir.split(b'dek', 3, 2, randbytes=rng.randbytes)
  rng = random.Random(5)
  b = shamir.split(b'dek', 3, 2, randbytes=rng.randbytes)
  assert a == b and shamir.combine(a[1:]) == b'dek'


def test_errors():
  with pytest.raises(errors.UsageError):
    shamir.split(b'', 3, 2)
  with pytest.raises(errors.UsageError):
    shamir.split(b'x', 3, 1)
  with pytest.raises(errors.UsageError):
    shamir.split(b'x', 2, 3)
  with pytest.raises(errors.UsageError):
    shamir.split(b'x', 256, 2)
  s = shamir.split(b'secret', 3, 2)
  with pytest.raises(errors.UsageError):
    shamir.combine(s[:1])
  with pytest.raises(errors.UsageError):
    shamir.combine([s[0], s[0]])
  with pytest.raises(errors.UsageError):
    shamir.combine([s[0], s[1][:-2] + s[1][-1:]])
