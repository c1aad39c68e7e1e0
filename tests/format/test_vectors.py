"""The committed test vectors (tests/testdata/vectors/) against the library
and against an independent from-scratch implementation of docs/FORMAT.md.

The `_ref_*` functions below re-implement §3–§9 directly from FORMAT.md with
only `cryptography`'s primitives (HKDF, AESGCM, ChaCha20Poly1305, X25519,
Ed25519, ECDSA) and the standard library: they do not import
tfx_encrypt.format, so a bug there cannot hide by also being in the
reference. The whole-package vectors (packages.json) are read by both.
Google Tink's own check of the AES vectors is in tests/interop/test_tink_interop.py
(Tink cannot be told a salt or nonce prefix, so it decrypts them rather
than reproducing them). Negative vectors: tests/format/test_negative_vectors.py.
"""

import base64
import hashlib
import hmac
import json
import os
import struct
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

import tfx_encrypt as te
from tests import _util
from tests.testdata import make_vectors
from tests.testdata import package_vectors
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
  out = make_vectors.outputs()
  for path, data in out.items():
    assert path.exists() and path.read_bytes() == data, (
        f'{path} differs from a fresh build; if the format changed on '
        'purpose, rerun tests/testdata/make_vectors.py and say so in the '
        'commit')
  assert make_vectors.stale_files(out) == []


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


# --- whole packages (FORMAT.md §2-§10), independently -------------------------

PACKAGES = json.loads(package_vectors.PACKAGES_FILE.read_text())['vectors']
VECTOR_DIR = package_vectors.VECTOR_DIR
_BODY_KEYS = {'format', 'suite', 'hash', 'package_id', 'created', 'context',
              'recipients', 'threshold', 'commitment', 'fingerprint',
              'payloads', 'file_table', 'signer'}
_ED25519_L = 2**252 + 27742317777372353535851937790883648493
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _ref_pem(name, private=False):
  kind = 'key' if private else 'pub'
  path = VECTOR_DIR / 'package-keys' / f'{name}.{kind}.pem'
  data = path.read_bytes()
  if private:
    return serialization.load_pem_private_key(data, password=None)
  return serialization.load_pem_public_key(data)


def _ref_key_id(public_key):
  """§7: sha256: + hex(SHA-256(SubjectPublicKeyInfo DER))."""
  der = public_key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
  return 'sha256:' + hashlib.sha256(der).hexdigest()


def _ref_split_header(data):
  """§3: magic, u32 body_len, body, 32-byte MAC, u32 sig_len, signature."""
  assert data[:8] == b'TFXENC\x00\x02'
  (blen,) = struct.unpack('>I', data[8:12])
  assert 1 <= blen <= 16 << 20
  mac_at = 12 + blen
  (slen,) = struct.unpack('>I', data[mac_at + 32:mac_at + 36])
  assert slen in (0, 64)
  end = mac_at + 36 + slen
  assert len(data) >= end
  return {'signed_part': data[:mac_at], 'body': data[12:mac_at],
          'mac': data[mac_at:mac_at + 32], 'sig_len': slen,
          'sig': data[mac_at + 36:end], 'length': end}


def _ref_b64(text):
  """§4: standard base64, padded, canonical (zero padding bits)."""
  raw = base64.b64decode(text, validate=True)
  assert base64.b64encode(raw).decode('ascii') == text
  return raw


def _ref_strict_json(data):
  def no_dupes(pairs):
    assert len({k for k, _ in pairs}) == len(pairs), 'duplicate key'
    return dict(pairs)
  def refuse(x):
    raise AssertionError(f'not allowed in canonical JSON: {x}')
  obj = json.loads(data.decode('ascii'), object_pairs_hook=no_dupes,
                   parse_float=refuse, parse_constant=refuse)
  assert _ref_canonical_json(obj) == data, 'not canonical JSON'
  return obj


def _ref_decrypt_stream(suite, ikm, aad, stream):
  """§6, any number of segments."""
  assert stream[0] == 40
  salt, prefix = stream[1:33], stream[33:40]
  aead = _REF_AEAD[suite](_ref_hkdf(ikm, salt, aad))
  body, out, i = stream[40:], [], 0
  seg = 1048576 - 40
  while True:
    chunk, body = body[:seg], body[seg:]
    last = not body
    nonce = prefix + struct.pack('>I', i) + (b'\x01' if last else b'\x00')
    out.append(aead.decrypt(nonce, chunk, None))
    if last:
      return b''.join(out)
    i, seg = i + 1, 1048576


def _ref_labeled_extract(suite_id, salt, label, ikm):
  """RFC 9180 §4: Extract(salt, "HPKE-v1" || suite_id || label || ikm)."""
  return hmac.new(salt or bytes(32), b'HPKE-v1' + suite_id + label + ikm,
                  hashlib.sha256).digest()


def _ref_labeled_expand(suite_id, prk, label, info, length):
  return HKDFExpand(hashes.SHA256(), length,
                    length.to_bytes(2, 'big') + b'HPKE-v1' + suite_id + label +
                    info).derive(prk)


def _ref_hpke_open(sk_r, enc_and_ct, info):
  """§7 x25519-hpke: HPKE base mode open, DHKEM(X25519, HKDF-SHA256),
  HKDF-SHA256, AES-256-GCM, empty aad (RFC 9180 §4.1, §5.1, §5.2)."""
  enc, ct = enc_and_ct[:32], enc_and_ct[32:]
  kem = b'KEM' + (0x20).to_bytes(2, 'big')
  suite = b'HPKE' + b''.join(i.to_bytes(2, 'big') for i in (0x20, 1, 2))
  dh = sk_r.exchange(x25519.X25519PublicKey.from_public_bytes(enc))
  kem_context = enc + sk_r.public_key().public_bytes_raw()
  eae_prk = _ref_labeled_extract(kem, b'', b'eae_prk', dh)
  shared = _ref_labeled_expand(kem, eae_prk, b'shared_secret', kem_context, 32)
  ks_context = (b'\x00' +
                _ref_labeled_extract(suite, b'', b'psk_id_hash', b'') +
                _ref_labeled_extract(suite, b'', b'info_hash', info))
  secret = _ref_labeled_extract(suite, shared, b'secret', b'')
  key = _ref_labeled_expand(suite, secret, b'key', ks_context, 32)
  nonce = _ref_labeled_expand(suite, secret, b'base_nonce', ks_context, 12)
  return AESGCM(key).decrypt(nonce, ct, b'')


def _ref_gf_mul(a, b):
  """GF(2^8) with x^8 + x^4 + x^3 + x + 1 (§7.1)."""
  p = 0
  while b:
    if b & 1:
      p ^= a
    a = ((a << 1) ^ 0x11b) if a & 0x80 else a << 1
    b >>= 1
  return p


def _ref_gf_inv(a):
  r = 1
  for _ in range(254):  # a^254 = a^-1
    r = _ref_gf_mul(r, a)
  return r


def _ref_shamir_combine(shares):
  """§7.1: Lagrange interpolation at 0 of shares y_0..y_31 || x."""
  xs = [s[-1] for s in shares]
  out = bytearray(len(shares[0]) - 1)
  for i, share in enumerate(shares):
    num = den = 1
    for m, xm in enumerate(xs):
      if m != i:
        num = _ref_gf_mul(num, xm)
        den = _ref_gf_mul(den, xm ^ xs[i])
    coef = _ref_gf_mul(num, _ref_gf_inv(den))
    for j in range(len(out)):
      out[j] ^= _ref_gf_mul(share[j], coef)
  return bytes(out)


def _ref_verify_signature(v, h, body):
  """§8: message = label || SHA-256(signed_part); raw canonical signature."""
  message = (b'tfxe2 header signature\x00' +
             hashlib.sha256(h['signed_part']).digest())
  assert message.hex() == v['signature_message']
  key = _ref_pem(v['signer']['key'])
  assert body['signer'] == {'alg': v['signer']['alg'],
                            'key_id': _ref_key_id(key)}
  sig = h['sig']
  if body['signer']['alg'] == 'ed25519':
    assert isinstance(key, ed25519.Ed25519PublicKey)
    assert int.from_bytes(sig[32:], 'little') < _ED25519_L
    key.verify(sig, message)
  else:
    assert body['signer']['alg'] == 'ecdsa-p256-sha256'
    r, s = int.from_bytes(sig[:32], 'big'), int.from_bytes(sig[32:], 'big')
    assert 0 < r < _P256_N and 0 < s <= _P256_N // 2  # low S
    key.verify(asym_utils.encode_dss_signature(r, s), message,
               ec.ECDSA(hashes.SHA256()))


def _ref_open_stanzas(v, body, pid):
  """§7, §7.1: every stanza opens with its recipient's private key to the
  data key, or to its group's share; any k shares rebuild the data key."""
  dek = bytes.fromhex(v['dek'])
  by_id = {_ref_key_id(_ref_pem(n)): n for n in package_vectors.KEYS}
  groups = (body['threshold'] or {}).get('groups')
  shares = {}
  for n, stanza in enumerate(body['recipients']):
    assert set(stanza) == {'type', 'key_id', 'body'}
    assert stanza['type'] == 'x25519-hpke' and set(stanza['body']) == {'ct'}
    name = by_id[stanza['key_id']]
    assert name == v['recipients'][n]
    wctx = dict(body['context'], **{'tfxe:package-id': pid.hex()})
    group = None
    if groups is not None:
      [group] = [g for g, idx in enumerate(groups) if n in idx]
      wctx['tfxe:share-group'] = str(group)
    ct = _ref_b64(stanza['body']['ct'])
    assert len(ct) == 32 + (32 if group is None else 33) + 16  # enc, tag
    plain = _ref_hpke_open(_ref_pem(name, private=True), ct,
                           b'tfxe1 wrap\x00' + _ref_canonical_json(wctx))
    if group is None:
      assert plain == dek
    else:
      assert len(plain) == 33 and plain[-1] == group + 1
      shares[group] = plain
  if groups is not None:
    k = body['threshold']['k']
    assert len(shares) == len(groups) >= k
    for first in range(len(groups) - k + 1):
      assert _ref_shamir_combine(
          [shares[g] for g in range(first, first + k)]) == dek


@pytest.mark.parametrize('v', PACKAGES, ids=[v['name'] for v in PACKAGES])
def test_reference_reads_package_vector(v):
  header = bytes.fromhex(v['header_hex'])
  pkg = VECTOR_DIR / v['directory']
  assert (pkg / 'tfxe.header').read_bytes() == header
  assert hashlib.sha256(header).hexdigest() == v['header_sha256']
  h = _ref_split_header(header)
  assert h['length'] == len(header) == v['header_size']
  assert len(h['body']) == v['body_len'] and h['mac'].hex() == v['mac']
  body = _ref_strict_json(h['body'])
  assert set(body) == _BODY_KEYS
  assert body['format'] == 'tfx-encrypt/2'
  assert (body['suite'], body['hash'], body['created'], body['context']) == (
      v['suite'], v['hash'], v['created'], v['context'])
  pid = bytes.fromhex(body['package_id'])
  assert body['package_id'] == v['package_id'] and len(pid) == 16
  # §5: keys from the data key; the commitment, then the MAC.
  dek, suite = bytes.fromhex(v['dek']), body['suite']
  commitment = _ref_hkdf(dek, pid, b'tfxe1 key commitment')
  mac_key = _ref_hkdf(dek, pid, b'tfxe1 header mac')
  stream_key = _ref_hkdf(dek, pid, b'tfxe1 payload key\x00' + suite.encode())
  assert (commitment.hex(), mac_key.hex(), stream_key.hex()) == (
      v['commitment'], v['mac_key'], v['stream_key'])
  assert _ref_b64(body['commitment']) == commitment
  assert hmac.new(mac_key, h['signed_part'],
                  hashlib.sha256).digest() == h['mac']
  # §3, §8: the body names the signer; sig_len follows it.
  if v['signer'] is None:
    assert body['signer'] is None and h['sig_len'] == 0
    assert v['signature'] is None
  else:
    assert h['sig_len'] == 64 and h['sig'].hex() == v['signature']
    _ref_verify_signature(v, h, body)
  assert body['threshold'] == v['threshold']
  _ref_open_stanzas(v, body, pid)
  # §6, §9: the file table.
  ctx_digest = hashlib.sha256(_ref_canonical_json(body['context'])).digest()
  table = _ref_decrypt_stream(suite, stream_key, b'tfxe1 file table\x00' +
                              pid + ctx_digest, _ref_b64(body['file_table']))
  assert table.decode('ascii') == v['file_table']
  tobj = _ref_strict_json(table)
  files = tobj['files']
  assert [f['path'] for f in files] == sorted(f['path'] for f in files)
  assert tobj['dirs'] == sorted(v['dirs'])
  assert [(f['path'], f['size'], f['digest']) for f in files] == [
      (f['path'], f['size'], f['sha256']) for f in v['files']]
  root = hashlib.sha256(b''.join(bytes.fromhex(f['digest']) for f in files))
  assert body['fingerprint'] == v['fingerprint'] == 'sha256:' + root.hexdigest()
  # §6, §10: payloads, their ciphertext digests and plaintexts.
  assert len(body['payloads']) == len(files) == len(v['payloads'])
  streams = []
  for i, ((size, digest), f, want) in enumerate(
      zip(body['payloads'], files, v['files'])):
    ct = (pkg / 'payload' / f'{i:08d}').read_bytes()
    streams.append(ct)
    assert ct.hex() == v['payloads'][i]['hex']
    assert len(ct) == size == 40 + f['size'] + 16  # one segment each
    assert hashlib.sha256(ct).hexdigest() == digest
    pt = _ref_decrypt_stream(suite, stream_key, b'tfxe1 payload\x00' + pid +
                             struct.pack('>I', i) + ctx_digest, ct)
    assert pt.hex() == want['hex']
    assert hashlib.sha256(pt).hexdigest() == f['digest']
  assert sorted(os.listdir(pkg / 'payload')) == [
      f'{i:08d}' for i in range(len(files))]
  assert sorted(os.listdir(pkg)) == ['payload', 'tfxe.header']
  ciphertext_root = hashlib.sha256(b''.join(
      bytes.fromhex(d) for _, d in body['payloads'])).hexdigest()
  assert v['ciphertext_digest'] == 'sha256:' + ciphertext_root
  # §2: the bundle is the header, then the payloads in order.
  bundle = (VECTOR_DIR / v['bundle']).read_bytes()
  assert bundle == header + b''.join(streams)
  assert hashlib.sha256(bundle).hexdigest() == v['bundle_sha256']


def test_package_vectors_cover_signers_suites_and_groups():
  assert {v['signer']['alg'] for v in PACKAGES if v['signer']} == {
      'ed25519', 'ecdsa-p256-sha256'}
  assert any(v['signer'] is None for v in PACKAGES)
  assert any(v['threshold'] for v in PACKAGES)
  assert {v['suite'] for v in PACKAGES} == set(_REF_AEAD)
  assert any(f['size'] == 0 for v in PACKAGES for f in v['files'])
  assert any(not f['path'].isascii() for v in PACKAGES for f in v['files'])


def _vector_keys(v):
  return dict(
      identities=[package_vectors.priv(n) for n in v['identities']],
      trusted=[package_vectors.pub(n) for n in v['trusted']],
      allow_unsigned=v['allow_unsigned'])


def _expected_tree(v):
  tree = {f['path']: bytes.fromhex(f['hex']) for f in v['files']}
  for d in v['dirs']:
    if not any(p.startswith(d + '/') for p in tree):
      tree[d + '/'] = None
  return tree


@pytest.mark.parametrize('form', ['directory', 'bundle'])
@pytest.mark.parametrize('v', PACKAGES, ids=[v['name'] for v in PACKAGES])
def test_library_reads_package_vector(tmp_path, v, form):
  path = VECTOR_DIR / v[form]
  info = te.decrypt_model(path, tmp_path / 'out', **_vector_keys(v))
  assert _util.read_tree(tmp_path / 'out') == _expected_tree(v)
  assert info.fingerprint == v['fingerprint']
  assert info.payload_digest == v['ciphertext_digest']
  assert info.signature_verified == (v['signer'] is not None)
  assert info.package_id == v['package_id']
  assert info.header_bytes == v['header_size']
  keys = _vector_keys(v)
  del keys['identities']
  assert te.verify_package(path, **keys).fingerprint == v['fingerprint']
  files = dict(te.iter_decrypted_files(path, **_vector_keys(v)))
  assert {p: bytes(d) for p, d in files.items()} == {
      f['path']: bytes.fromhex(f['hex']) for f in v['files']}
  with open(VECTOR_DIR / v['directory'] / 'tfxe.header', 'rb') as f:
    h, length = header_lib.Header.read(f)
  assert length == v['header_size'] and h.mac.hex() == v['mac']
  assert (h.signature.sig.hex() if h.signature else None) == v['signature']
  assert h.commitment.hex() == v['commitment']
  assert [list(p) for p in h.payloads] == [
      [p['size'], p['sha256']] for p in v['payloads']]


def test_cli_decrypts_package_vector(tmp_path):
  v = PACKAGES[0]
  k = _vector_keys(v)
  r = subprocess.run(
      [sys.executable, '-m', 'tfx_encrypt', 'decrypt',
       str(VECTOR_DIR / v['bundle']), str(tmp_path / 'out'),
       '--identity', k['identities'][0], '--trust', k['trusted'][0]],
      capture_output=True, text=True, timeout=120, check=False,
      env=dict(os.environ, PYTHONPATH=str(make_vectors.VECTOR_DIR.parents[2])))
  assert r.returncode == 0, r.stderr
  assert v['fingerprint'] in r.stdout and 'signed by trusted' in r.stdout
  assert _util.read_tree(tmp_path / 'out') == _expected_tree(v)
