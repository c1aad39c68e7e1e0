"""Generates the test vectors in tests/testdata/vectors/ (docs/FORMAT.md).

  vectors/streaming.json  payload streams (§6) for both suites, with fixed
                          stream key (ikm), associated data, salt and nonce
                          prefix.
  vectors/keys.json       keys derived from a DEK (§5), the context digest
                          (§4) and the associated data of payload and
                          file-table streams (§6).
  vectors/packages.json, vectors/packages/, vectors/negative.json,
  vectors/package-keys/, vectors/ecdsa-signatures.json
                          whole packages, valid and hostile, with fixed
                          keys: see tests/testdata/package_vectors.py.

Everything is deterministic: the fixed inputs are SHA-256 of a label, and a
plaintext is described by a generator instead of being stored:
{"pattern": "counter", "size": N} is the N bytes ``i % 251`` for
i = 0 … N-1. A stream vector stores the SHA-256 of the whole ciphertext, the
16-byte tag of every segment, and the full ciphertext hex only when it is at
most HEX_LIMIT bytes.

tests/format/test_vectors.py checks that the library reproduces every vector and
that an independent from-scratch implementation of §3–§9 (cryptography's
primitives only) agrees; tests/interop/test_tink_interop.py has Google Tink decrypt
the AES256_GCM_HKDF_1MB vectors; tests/format/test_negative_vectors.py feeds every
negative vector to the reader and the CLI. ECDSA signatures are randomized:
a stored one is reused while it verifies, so `--check` verifies them rather
than making new ones.

Regenerate (only when the format deliberately changes) with the project's
venv, from the repository root:

  PYTHONPATH=. .venv/bin/python tests/testdata/make_vectors.py
  PYTHONPATH=. .venv/bin/python tests/testdata/make_vectors.py --check
"""

import argparse
import hashlib
import json
import pathlib
import sys

from tests.testdata import package_vectors
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming

VECTOR_DIR = pathlib.Path(__file__).resolve().parent / 'vectors'
STREAMING_FILE = VECTOR_DIR / 'streaming.json'
KEYS_FILE = VECTOR_DIR / 'keys.json'

HEX_LIMIT = 1024  # store the full ciphertext hex of streams up to this size
SUITES = (streaming.AES256_GCM_HKDF_1MB, streaming.CHACHA20_POLY1305_HKDF_1MB)

_FIRST = 1048520  # plaintext bytes in segment 0
_LATER = 1048560  # plaintext bytes in each later segment

# (name, plaintext size, associated data label or None for empty aad)
STREAM_CASES = (
    ('empty', 0, 'aad'),
    ('one-byte', 1, 'aad'),
    ('one-byte-empty-aad', 1, None),
    ('small', 300, 'aad'),
    ('first-segment-full', _FIRST, 'aad'),
    ('first-segment-plus-one', _FIRST + 1, 'aad'),
    ('three-segments', _FIRST + _LATER + 4321, 'aad'),
)

CONTEXTS = (
    {},
    {'model': 'resnet50', 'stage': 'prod'},
    {'owner': 'Zo\u00eb', 'tfxe-note': 'a "quoted" value\n'},
)
PAYLOAD_INDEXES = (0, 1, 99_999)


def fixed(label: str, n: int) -> bytes:
  """n deterministic bytes for a label (n <= 32)."""
  return hashlib.sha256(b'tfx-encrypt test vector\x00' +
                        label.encode()).digest()[:n]


def counter_pattern(size: int) -> bytes:
  """{"pattern": "counter", "size": size}: byte i is i % 251."""
  block = bytes(range(251))
  return (block * (size // 251 + 1))[:size]


def plaintext_of(spec) -> bytes:
  if spec.get('pattern') != 'counter':
    raise ValueError(f'unknown plaintext pattern: {spec!r}')
  return counter_pattern(spec['size'])


def segment_tags(ct: bytes):
  n = streaming.segments_of_ciphertext(len(ct))
  tags = []
  for i in range(n):
    off, ln = streaming.ciphertext_segment(i, len(ct))
    tags.append(ct[off + ln - streaming.TAG_SIZE:off + ln].hex())
  return tags


def stream_vector(suite: str, name: str, size: int, aad_label) -> dict:
  label = f'{suite}/{name}'
  ikm = fixed(label + '/ikm', 32)
  salt = fixed(label + '/salt', 32)
  nonce_prefix = fixed(label + '/nonce_prefix', 7)
  aad = b'' if aad_label is None else b'tfxe1 vector aad\x00' + fixed(
      label + '/' + aad_label, 20)
  spec = {'pattern': 'counter', 'size': size}
  sc = streaming.StreamCipher(suite, ikm, aad, salt, nonce_prefix)
  ct = streaming.encrypt_bytes(suite, ikm, aad, plaintext_of(spec), cipher=sc)
  v = {
      'name': name,
      'suite': suite,
      'ikm': ikm.hex(),
      'aad': aad.hex(),
      'salt': salt.hex(),
      'nonce_prefix': nonce_prefix.hex(),
      'plaintext': spec,
      'segments': streaming.num_segments(size),
      'ciphertext_size': len(ct),
      'ciphertext_sha256': hashlib.sha256(ct).hexdigest(),
      'header_hex': ct[:streaming.HEADER_SIZE].hex(),
      'segment_tags': segment_tags(ct),
  }
  if len(ct) <= HEX_LIMIT:
    v['ciphertext_hex'] = ct.hex()
  return v


def build_streaming() -> dict:
  return {
      'description': (
          'Payload stream vectors, docs/FORMAT.md section 6. Plaintext '
          '{"pattern": "counter", "size": N} is bytes(i % 251 for i in '
          'range(N)). ikm is the 32-byte stream key (Tink key_value); aad is '
          'the associated data (HKDF info); header_hex is 0x28 || salt || '
          'nonce_prefix; segment_tags are the 16-byte AEAD tags of the '
          'segments in order; ciphertext_hex is present for streams of at '
          f'most {HEX_LIMIT} bytes. Generated by tests/testdata/'
          'make_vectors.py.'),
      'vectors': [
          stream_vector(suite, name, size, aad)
          for suite in SUITES
          for name, size, aad in STREAM_CASES
      ],
  }


def build_keys() -> dict:
  derived = []
  for n, suite in enumerate(SUITES * 2):
    dek = fixed(f'dek/{n}', 32)
    package_id = fixed(f'package_id/{n}', 16)
    keys = header_lib.DerivedKeys(dek, package_id, suite)
    derived.append({
        'dek': dek.hex(),
        'package_id': package_id.hex(),
        'suite': suite,
        'commitment': keys.commitment.hex(),
        'mac_key': keys.mac_key.hex(),
        'stream_key': keys.stream_key.hex(),
    })
  payload, file_table = [], []
  for n, context in enumerate(CONTEXTS):
    package_id = fixed(f'aad package_id/{n}', 16)
    digest = header_lib.context_digest(context)
    file_table.append({
        'package_id': package_id.hex(),
        'context': context,
        'context_digest': digest.hex(),
        'aad': header_lib.file_table_aad(package_id, digest).hex(),
    })
    for index in PAYLOAD_INDEXES:
      payload.append({
          'package_id': package_id.hex(),
          'index': index,
          'context': context,
          'context_digest': digest.hex(),
          'aad': header_lib.payload_aad(package_id, index, digest).hex(),
      })
  return {
      'description': (
          'Key derivation (docs/FORMAT.md section 5: commitment, mac_key, '
          'stream_key from dek with salt package_id), context digest '
          '(section 4: SHA-256 of the canonical JSON of context) and stream '
          'associated data (section 6). Generated by tests/testdata/'
          'make_vectors.py.'),
      'derived_keys': derived,
      'payload_aad': payload,
      'file_table_aad': file_table,
  }


def render(obj) -> str:
  return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True) + '\n'


def outputs():
  """{path: bytes} of every generated file."""
  out = {STREAMING_FILE: render(build_streaming()).encode(),
         KEYS_FILE: render(build_keys()).encode()}
  out.update(package_vectors.outputs())
  return out


def stale_files(out) -> list:
  """Files under the generated directories that the generator no longer
  writes (a renamed or removed vector)."""
  return sorted(set(package_vectors.owned_files()) - set(out))


def main(argv) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--check', action='store_true',
                  help='exit 1 if the files on disk differ from a fresh build')
  args = ap.parse_args(argv)
  stale = []
  out = outputs()
  for path, data in out.items():
    old = path.read_bytes() if path.exists() else None
    if old == data:
      continue
    stale.append(path)
    if not args.check:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data)
  for path in stale_files(out):
    stale.append(path)
    if not args.check:
      path.unlink()
  for path in stale:
    print(f'{"stale" if args.check else "wrote"}: {path}')
  return 1 if args.check and stale else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
