"""The committed test vectors (tests/testdata/vectors/) against the library
and against an independent from-scratch implementation of docs/FORMAT.md.

The `_ref_*` functions below re-implement §4–§6 directly from FORMAT.md with
only `cryptography`'s HKDF, AESGCM and ChaCha20Poly1305 and the standard
library: they do not import tfx_encrypt.format, so a bug there cannot hide
by also being in the reference. Google Tink's own check of the AES vectors
is in tests/test_tink_interop.py (Tink cannot be told a salt or nonce
prefix, so it decrypts them rather than reproducing them).
"""

import hashlib
import json
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.testdata import make_vectors
from tfx_encrypt import errors
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming

STREAMING = json.loads(make_vectors.STREAMING_FILE.read_text())
KEYS = json.loads(make_vectors.KEYS_FILE.read_text())
STREAM_VECTORS = STREAMING['vectors']


def _ids(vectors):
  return [f'{v["suite"]}-{v["name"]}' for v in vectors]


# --- independent reference implementation (FORMAT.md §4-§6) -----------------

_REF_AEAD = {'AES256_GCM_HKDF_1MB': AESGCM,
             'CHACHA20_POLY1305_HKDF_1MB': ChaCha20Poly1305}


def _ref_hkdf(ikm, salt, info):
  return HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)


def _ref_encrypt_stream(suite, ikm, aad, salt, nonce_prefix, pt):
  """FORMAT.md §6: 0x28 || salt || prefix, then 1 MiB ciphertext segments."""
  aead = _REF_AEAD[suite](_ref_hkdf(ikm, salt, aad))
  sizes = [1048576 - 40 - 16]  # segment 0 leaves room for the header
  while sum(sizes) < len(pt):
    sizes.append(1048576 - 16)
  out, pos = [bytes([40]) + salt + nonce_prefix], 0
  for i, size in enumerate(sizes):
    last = i == len(sizes) - 1
    nonce = nonce_prefix + struct.pack('>I', i) + (b'\x01' if last else b'\x00')
    out.append(aead.encrypt(nonce, pt[pos:pos + size], None))
    pos += size
  return b''.join(out)


def _ref_canonical_json(obj):
  return json.dumps(obj, sort_keys=True, separators=(',', ':'),
                    ensure_ascii=True).encode('utf-8')


def _ref_counter(size):
  return bytes(i % 251 for i in range(size))


# --- stream vectors ----------------------------------------------------------


def _plaintext(v):
  return make_vectors.plaintext_of(v['plaintext'])


def _cipher(v):
  return streaming.StreamCipher(
      v['suite'], bytes.fromhex(v['ikm']), bytes.fromhex(v['aad']),
      bytes.fromhex(v['salt']), bytes.fromhex(v['nonce_prefix']))


def test_vector_files_are_up_to_date():
  for path, text in make_vectors.outputs().items():
    assert path.read_text() == text, (
        f'{path} differs from a fresh build; if the format changed on '
        'purpose, rerun tests/testdata/make_vectors.py and say so in the '
        'commit')


def test_vectors_cover_both_suites_and_segment_boundaries():
  suites = {v['suite'] for v in STREAM_VECTORS}
  assert suites == {streaming.AES256_GCM_HKDF_1MB,
                    streaming.CHACHA20_POLY1305_HKDF_1MB}
  for suite in suites:
    sizes = {v['plaintext']['size'] for v in STREAM_VECTORS
             if v['suite'] == suite}
    assert {0, 1, 1048520, 1048521} <= sizes
    assert max(v['segments'] for v in STREAM_VECTORS
               if v['suite'] == suite) >= 3


def test_counter_pattern_matches_its_definition():
  for size in (0, 1, 250, 251, 252, 1000):
    assert make_vectors.counter_pattern(size) == _ref_counter(size)
  big = make_vectors.counter_pattern(600_000)
  assert big[::251] == b'\x00' * len(big[::251])
  assert big[250::251] == b'\xfa' * len(big[250::251])


@pytest.mark.parametrize('v', STREAM_VECTORS, ids=_ids(STREAM_VECTORS))
def test_library_reproduces_stream_vector(v):
  pt = _plaintext(v)
  ct = streaming.encrypt_bytes(v['suite'], bytes.fromhex(v['ikm']),
                               bytes.fromhex(v['aad']), pt, cipher=_cipher(v))
  assert len(ct) == v['ciphertext_size'] == streaming.ciphertext_size(len(pt))
  assert streaming.num_segments(len(pt)) == v['segments']
  assert ct[:streaming.HEADER_SIZE].hex() == v['header_hex']
  assert v['header_hex'] == '28' + v['salt'] + v['nonce_prefix']
  assert make_vectors.segment_tags(ct) == v['segment_tags']
  assert hashlib.sha256(ct).hexdigest() == v['ciphertext_sha256']
  if 'ciphertext_hex' in v:
    assert ct.hex() == v['ciphertext_hex']


@pytest.mark.parametrize('v', STREAM_VECTORS, ids=_ids(STREAM_VECTORS))
def test_library_decrypts_stream_vector(v):
  ikm, aad = bytes.fromhex(v['ikm']), bytes.fromhex(v['aad'])
  pt = _plaintext(v)
  ct = _ref_encrypt_stream(v['suite'], ikm, aad, bytes.fromhex(v['salt']),
                           bytes.fromhex(v['nonce_prefix']), pt)
  assert hashlib.sha256(ct).hexdigest() == v['ciphertext_sha256']
  assert streaming.decrypt_bytes(v['suite'], ikm, aad, ct) == pt
  # The library reads a stream in any order, segment by segment, too.
  sc = streaming.StreamCipher.from_header(v['suite'], ikm, aad,
                                          ct[:streaming.HEADER_SIZE])
  n = streaming.segments_of_ciphertext(len(ct))
  parts = {}
  for i in reversed(range(n)):
    off, ln = streaming.ciphertext_segment(i, len(ct))
    parts[i] = sc.decrypt(i, i == n - 1, ct[off:off + ln])
  assert b''.join(parts[i] for i in range(n)) == pt
  # ...and rejects it when its last byte, its aad or its suite changes.
  bad = bytearray(ct)
  bad[-1] ^= 0x01
  with pytest.raises(errors.TamperedPackageError):
    streaming.decrypt_bytes(v['suite'], ikm, aad, bytes(bad))
  with pytest.raises(errors.TamperedPackageError):
    streaming.decrypt_bytes(v['suite'], ikm, aad + b'\x00', ct)
  other = next(s for s in streaming.SUITES if s != v['suite'])
  with pytest.raises(errors.TamperedPackageError):
    streaming.decrypt_bytes(other, ikm, aad, ct)


@pytest.mark.parametrize('v', STREAM_VECTORS, ids=_ids(STREAM_VECTORS))
def test_reference_implementation_reproduces_stream_vector(v):
  ct = _ref_encrypt_stream(v['suite'], bytes.fromhex(v['ikm']),
                           bytes.fromhex(v['aad']), bytes.fromhex(v['salt']),
                           bytes.fromhex(v['nonce_prefix']),
                           _ref_counter(v['plaintext']['size']))
  assert len(ct) == v['ciphertext_size']
  assert ct[:40].hex() == v['header_hex']
  assert hashlib.sha256(ct).hexdigest() == v['ciphertext_sha256']
  if 'ciphertext_hex' in v:
    assert ct.hex() == v['ciphertext_hex']


# --- key derivation and associated data --------------------------------------


@pytest.mark.parametrize('v', KEYS['derived_keys'],
                         ids=[f'{v["suite"]}-{v["dek"][:8]}'
                              for v in KEYS['derived_keys']])
def test_derived_keys(v):
  dek, package_id = bytes.fromhex(v['dek']), bytes.fromhex(v['package_id'])
  keys = header_lib.DerivedKeys(dek, package_id, v['suite'])
  assert keys.commitment.hex() == v['commitment']
  assert keys.mac_key.hex() == v['mac_key']
  assert keys.stream_key.hex() == v['stream_key']
  # FORMAT.md §5, independently.
  assert _ref_hkdf(dek, package_id,
                   b'tfxe1 key commitment').hex() == v['commitment']
  assert _ref_hkdf(dek, package_id, b'tfxe1 header mac').hex() == v['mac_key']
  assert _ref_hkdf(dek, package_id, b'tfxe1 payload key\x00' +
                   v['suite'].encode()).hex() == v['stream_key']


def test_derived_keys_differ_between_suites_and_purposes():
  seen = set()
  for v in KEYS['derived_keys']:
    for k in ('commitment', 'mac_key', 'stream_key'):
      assert v[k] not in seen
      seen.add(v[k])


@pytest.mark.parametrize('v', KEYS['payload_aad'],
                         ids=[f'ctx{n}-i{v["index"]}'
                              for n, v in enumerate(KEYS['payload_aad'])])
def test_payload_aad(v):
  package_id = bytes.fromhex(v['package_id'])
  digest = header_lib.context_digest(v['context'])
  assert digest.hex() == v['context_digest']
  assert hashlib.sha256(_ref_canonical_json(
      v['context'])).hexdigest() == v['context_digest']
  aad = header_lib.payload_aad(package_id, v['index'], digest)
  assert aad.hex() == v['aad']
  assert (b'tfxe1 payload\x00' + package_id + struct.pack('>I', v['index']) +
          digest).hex() == v['aad']


@pytest.mark.parametrize('v', KEYS['file_table_aad'],
                         ids=[f'ctx{n}'
                              for n in range(len(KEYS['file_table_aad']))])
def test_file_table_aad(v):
  package_id = bytes.fromhex(v['package_id'])
  digest = header_lib.context_digest(v['context'])
  assert digest.hex() == v['context_digest']
  assert hashlib.sha256(_ref_canonical_json(
      v['context'])).hexdigest() == v['context_digest']
  aad = header_lib.file_table_aad(package_id, digest)
  assert aad.hex() == v['aad']
  assert (b'tfxe1 file table\x00' + package_id + digest).hex() == v['aad']
