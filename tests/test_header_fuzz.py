"""Mutation fuzzing of the strict parsers: any input either parses or raises
a typed TfxEncryptError -- never another exception, never a hang."""

import json
import os
import random

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt.format import header as header_lib
from tests import _util


@pytest.fixture(scope='module')
def header_bytes(tmp_path_factory):
  d = tmp_path_factory.mktemp('fz')
  (d / 'k').mkdir()
  keys = _util.Keys(d / 'k')
  src = _util.make_tree(d / 'm', {'saved_model.pb': 100, 'v/a': 5, 'v/b': 7})
  te.encrypt_model(src, d / 'p', recipients=[keys.pub('x'), keys.pub('rsa')],
                   signer=keys.priv('ed'), context={'k': 'v'})
  return (d / 'p' / 'tfxe.header').read_bytes()


def _mutate(rng, data):
  data = bytearray(data)
  for _ in range(rng.randint(1, 4)):
    op = rng.randrange(5)
    pos = rng.randrange(len(data)) if data else 0
    if op == 0 and data:
      data[pos] ^= 1 << rng.randrange(8)
    elif op == 1:
      data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == 2:
      del data[pos:pos + rng.randint(1, 16)]
    elif op == 3:
      data = data[:pos]
    elif data:
      data[pos] = rng.choice(b'{}[]",:0123456789-eE.\\ntfalsenull\x00\xff')
  return bytes(data)


def test_header_parser_mutations(header_bytes):
  import io
  rng = random.Random(1234)
  parsed = 0
  for _ in range(3000):
    data = _mutate(rng, header_bytes)
    try:
      header_lib.Header.read(io.BytesIO(data))
      parsed += 1
    except errors.TfxEncryptError:
      pass
  # Mutations that still parse are possible (e.g. in the MAC or signature
  # bytes); authentication, not parsing, rejects those (test_tamper.py).
  assert parsed < 3000


def _body(header_bytes):
  n = int.from_bytes(header_bytes[8:12], 'big')
  return header_bytes[12:12 + n]


def test_body_parser_mutations(header_bytes):
  rng = random.Random(99)
  body = _body(header_bytes)
  for _ in range(3000):
    try:
      header_lib.Header.parse_body(_mutate(rng, body))
    except errors.TfxEncryptError:
      pass


@pytest.mark.parametrize('value', [
    [], {}, None, 1, 'x', 1.5, [[1, 'a']], {'files': [], 'dirs': []},
    {'files': [{'path': 'a', 'size': -1, 'digest': '0' * 64}], 'dirs': []},
    {'files': [{'path': 'a', 'size': True, 'digest': '0' * 64}], 'dirs': []},
    {'files': [{'path': 'a', 'size': 1, 'digest': 'g' * 64}], 'dirs': []},
    {'files': [{'path': 'a' * 5000, 'size': 1, 'digest': '0' * 64}],
     'dirs': []},
    {'files': [{'path': 'a', 'size': 1, 'digest': '0' * 64, 'x': 1}],
     'dirs': []},
    {'files': [{'path': 'a', 'size': 10 ** 30, 'digest': '0' * 64}],
     'dirs': []},
])
def test_file_table_rejects_malformed(value):
  with pytest.raises((errors.TamperedPackageError, errors.UnsafePathError)):
    header_lib.decode_file_table(json.dumps(value).encode(), 1)


def test_deeply_nested_json_is_a_typed_error():
  with pytest.raises(errors.TamperedPackageError):
    header_lib.strict_json(b'[' * 100000 + b']' * 100000, 'x')


def test_duplicate_keys_nan_and_floats_rejected():
  for bad in (b'{"a":1,"a":2}', b'{"a":NaN}', b'{"a":1.0}', b'{"a":1e3}',
              b'\xff\xfe'):
    with pytest.raises(errors.TamperedPackageError):
      header_lib.strict_json(bad, 'x')
