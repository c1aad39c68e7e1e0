"""Round trips of the package format: shapes, suites, forms, keys, signatures."""

import json
import os
import stat

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.keys import local
from tests import _util

MiB = 1 << 20
FIRST = streaming.FIRST_PLAINTEXT_SEGMENT_SIZE
SEG = streaming.PLAINTEXT_SEGMENT_SIZE


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


EDGE_FILES = {
    'empty.bin': b'',
    'one.bin': b'x',
    'mib.bin': MiB,
    'mib_minus_1.bin': MiB - 1,
    'mib_plus_1.bin': MiB + 1,
    'first_seg.bin': FIRST,
    'first_seg_plus_1.bin': FIRST + 1,
    'two_segs.bin': FIRST + SEG,
    'two_segs_plus_1.bin': FIRST + SEG + 1,
    'a/b/c/d/e/f/g/h/deep.txt': b'deep',
    'unicode/caf\u00e9.txt': b'nfc name',
    'saved_model.pb': b'\x08\x01',  # a model, so encrypt takes it
}


@pytest.mark.parametrize('bundle', [False, True], ids=['dir', 'bundle'])
@pytest.mark.parametrize('cipher', ['aes-256-gcm', 'chacha20-poly1305'])
def test_round_trip_edge_sizes(tmp_path, keys, bundle, cipher):
  src = _util.make_tree(tmp_path / 'm', EDGE_FILES)
  os.makedirs(tmp_path / 'm' / 'assets')  # empty dir survives
  pkg = tmp_path / ('p.tfxe' if bundle else 'p')
  info = te.encrypt_model(src, pkg, recipients=[keys.pub('x')],
                          signer=keys.priv('ed'), cipher=cipher, bundle=bundle,
                          context={'model': 'edge', 'version': '7'})
  assert info.file_count == len(EDGE_FILES)
  assert info.plaintext_bytes == sum(
      len(v) if isinstance(v, bytes) else v for v in EDGE_FILES.values())
  assert os.path.isfile(pkg) == bundle
  out = tmp_path / 'out'
  dinfo = te.decrypt_model(pkg, out, identities=[keys.priv('x')],
                           trusted=[keys.pub('ed')])
  assert dinfo.signature_verified
  assert dinfo.fingerprint == info.fingerprint
  assert _util.read_tree(out) == _util.read_tree(src)
  assert _util.leftovers(tmp_path, 'out') == []
  assert _util.leftovers(tmp_path, pkg.name) == []


def test_payload_sizes_follow_format(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', EDGE_FILES)
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  info = te.inspect_package(tmp_path / 'p')
  h, _ = header_lib.Header.read(open(tmp_path / 'p' / 'tfxe.header', 'rb'))
  sizes = sorted(len(v) if isinstance(v, bytes) else v
                 for v in EDGE_FILES.values())
  assert sorted(s for s, _ in h.payloads) == sorted(
      streaming.ciphertext_size(s) for s in sizes)
  # Empty file: header + one tag. Exactly one full first segment: 1 MiB.
  assert streaming.ciphertext_size(0) == 56
  assert streaming.ciphertext_size(FIRST) == MiB
  assert streaming.ciphertext_size(FIRST + 1) == MiB + 1 + 16
  assert info.file_count == len(EDGE_FILES)


def test_directory_and_bundle_carry_the_same_bytes(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'a': 3 * MiB, 'b/c': b'hello',
                                         'saved_model.pb': 10})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  d = tmp_path / 'p'
  # A bundle is header || payloads; concatenating the directory form gives a
  # valid bundle.
  parts = [open(d / 'tfxe.header', 'rb').read()]
  for name in sorted(os.listdir(d / 'payload')):
    parts.append(open(d / 'payload' / name, 'rb').read())
  (tmp_path / 'cat.tfxe').write_bytes(b''.join(parts))
  te.decrypt_model(tmp_path / 'cat.tfxe', tmp_path / 'out',
                   identities=[keys.priv('x')], allow_unsigned=True)
  assert _util.read_tree(tmp_path / 'out') == _util.read_tree(src)


def test_thousands_of_small_files(tmp_path, keys):
  files = {f'd{i % 17}/f{i:05d}.txt': f'file {i}\n'.encode() for i in range(3000)}
  src = _util.make_tree(tmp_path / 'm', files)
  info = te.encrypt_model(src, tmp_path / 'p.tfxe', bundle=True,
                          recipients=[keys.pub('x')], any_dir=True)
  assert info.file_count == 3000
  te.decrypt_model(tmp_path / 'p.tfxe', tmp_path / 'out',
                   identities=[keys.priv('x')], allow_unsigned=True)
  assert _util.read_tree(tmp_path / 'out') == _util.read_tree(src)


def test_empty_model_is_a_clear_error(tmp_path, keys):
  os.makedirs(tmp_path / 'm' / 'variables')
  with pytest.raises(errors.EmptyModelError, match='contains no files'):
    te.encrypt_model(tmp_path / 'm', tmp_path / 'p', recipients=[keys.pub('x')])
  assert not os.path.exists(tmp_path / 'p')
  assert _util.leftovers(tmp_path, 'p') == []


@pytest.mark.parametrize('recipient,identity', [
    ('x', 'x'), ('rsa', 'rsa')])
def test_local_recipient_kinds(tmp_path, keys, recipient, identity):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 1000})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub(recipient)])
  info = te.inspect_package(tmp_path / 'p')
  assert info.recipients[0]['type'] == {'x': 'x25519-hpke',
                                        'rsa': 'rsa-oaep-sha256'}[recipient]
  te.decrypt_model(tmp_path / 'p', tmp_path / 'o',
                   identities=[keys.priv(identity)], allow_unsigned=True)


def test_multiple_recipients_any_one_decrypts(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 1000})
  te.encrypt_model(src, tmp_path / 'p',
                   recipients=[keys.pub('x'), keys.pub('rsa'), keys.pub('x2')])
  for i, ident in enumerate(['x', 'rsa', 'x2']):
    te.decrypt_model(tmp_path / 'p', tmp_path / f'o{i}',
                     identities=[keys.priv(ident)], allow_unsigned=True)
  other, _ = local.keygen('x25519', str(tmp_path / 'other'))
  with pytest.raises(errors.NoMatchingKeyError):
    te.decrypt_model(tmp_path / 'p', tmp_path / 'o9',
                     identities=[other], allow_unsigned=True)
  with pytest.raises(errors.KeyRoleError, match='signing key'):
    te.decrypt_model(tmp_path / 'p', tmp_path / 'o9',
                     identities=[keys.priv('ed')], allow_unsigned=True)


@pytest.mark.parametrize('signer', ['ed', 'ec'])
def test_signatures(tmp_path, keys, signer):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 1000})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')],
                   signer=keys.priv(signer))
  info = te.inspect_package(tmp_path / 'p')
  assert info.signature_alg == {'ed': 'ed25519', 'ec': 'ecdsa-p256-sha256'}[signer]
  assert not info.signature_verified  # inspect never verifies
  te.decrypt_model(tmp_path / 'p', tmp_path / 'o', identities=[keys.priv('x')],
                   trusted=[keys.pub(signer)])
  with pytest.raises(errors.UntrustedSignerError, match='not among the trusted'):
    te.decrypt_model(tmp_path / 'p', tmp_path / 'o2',
                     identities=[keys.priv('x')], trusted=[keys.pub('evil')])
  with pytest.raises(errors.UntrustedSignerError, match='no trusted key'):
    te.decrypt_model(tmp_path / 'p', tmp_path / 'o3',
                     identities=[keys.priv('x')])
  assert not any(os.path.exists(tmp_path / o) for o in ('o2', 'o3'))


def test_unsigned_refused_unless_allowed(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 10})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  with pytest.raises(errors.UntrustedSignerError, match='not signed'):
    te.decrypt_model(tmp_path / 'p', tmp_path / 'o', identities=[keys.priv('x')],
                     trusted=[keys.pub('ed')])
  assert not os.path.exists(tmp_path / 'o')


def test_existing_output_needs_force(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 10})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  with pytest.raises(errors.OutputExistsError):
    te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  # --force replaces what tfx-encrypt wrote (a package, a decrypted tree),
  # never a directory of the user's (docs/SECURITY.md).
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x2')],
                   force=True)
  os.makedirs(tmp_path / 'o')
  (tmp_path / 'o' / 'old.txt').write_text('old')
  with pytest.raises(errors.OutputExistsError):
    te.decrypt_model(tmp_path / 'p', tmp_path / 'o', identities=[keys.priv('x2')],
                     allow_unsigned=True)
  with pytest.raises(errors.UnsafeOverwriteError):
    te.decrypt_model(tmp_path / 'p', tmp_path / 'o', identities=[keys.priv('x2')],
                     allow_unsigned=True, force=True)
  assert (tmp_path / 'o' / 'old.txt').read_text() == 'old'
  os.remove(tmp_path / 'o' / 'old.txt')  # an empty directory may be replaced
  te.decrypt_model(tmp_path / 'p', tmp_path / 'o', identities=[keys.priv('x2')],
                   allow_unsigned=True, force=True)
  assert sorted(os.listdir(tmp_path / 'o')) == ['saved_model.pb']
  # ... and so may the tree it just decrypted
  te.decrypt_model(tmp_path / 'p', tmp_path / 'o', identities=[keys.priv('x2')],
                   allow_unsigned=True, force=True)
  assert _util.leftovers(tmp_path, 'o') == []


def test_plaintext_output_is_private(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'v/x': 10, 'saved_model.pb': 10})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  te.decrypt_model(tmp_path / 'p', tmp_path / 'o', identities=[keys.priv('x')],
                   allow_unsigned=True)
  assert stat.S_IMODE(os.stat(tmp_path / 'o').st_mode) == 0o700
  assert stat.S_IMODE(os.stat(tmp_path / 'o' / 'v' / 'x').st_mode) == 0o600


def test_context_is_recorded_and_reserved_prefix_rejected(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 1})
  info = te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')],
                          context={'pipeline': 'taxi', 'run': '42'})
  assert te.inspect_package(tmp_path / 'p').context == {'pipeline': 'taxi',
                                                        'run': '42'}
  assert info.context == {'pipeline': 'taxi', 'run': '42'}
  with pytest.raises(errors.UsageError, match='reserved'):
    te.encrypt_model(src, tmp_path / 'q', recipients=[keys.pub('x')],
                     context={'tfxe:package-id': 'x'})


def test_no_key_material_in_header(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 100})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('rsa')],
                   signer=keys.priv('ed'))
  header = (tmp_path / 'p' / 'tfxe.header').read_bytes()
  for name in ('rsa', 'ed'):
    pem = open(keys.priv(name), 'rb').read()
    body = b''.join(pem.split(b'\n')[1:-2])
    assert body[:40] not in header
  assert b'PRIVATE' not in header


@pytest.mark.parametrize('hash_alg', [None, 'blake3', 'sha256'])
def test_fingerprint_matches_model_signing_manifest_rule(tmp_path, keys,
                                                         hash_alg):
  """Files hashed with H (BLAKE3 by default); the root is SHA-256 always."""
  import hashlib
  import blake3
  files = {'saved_model.pb': 500, 'variables/variables.index': 20,
           'variables/variables.data-00000-of-00001': 3000}
  src = _util.make_tree(tmp_path / 'm', files)
  kwargs = {} if hash_alg is None else {'hash_alg': hash_alg}
  info = te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')],
                          **kwargs)
  assert info.hash_alg == (hash_alg or 'blake3')
  file_hash = hashlib.sha256 if info.hash_alg == 'sha256' else blake3.blake3
  digests = b''.join(
      file_hash(open(os.path.join(src, p), 'rb').read()).digest()
      for p in sorted(files))
  assert info.fingerprint == 'sha256:' + hashlib.sha256(digests).hexdigest()


def test_inspect_json_is_serialisable(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 100})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  json.dumps(te.inspect_package(tmp_path / 'p').to_dict())


def test_iter_decrypted_files_in_memory(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'a': 2 * MiB + 3, 'b/c': b'x',
                                         'saved_model.pb': 10})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')],
                   signer=keys.priv('ed'))
  got = dict(te.iter_decrypted_files(tmp_path / 'p', identities=[keys.priv('x')],
                                     trusted=[keys.pub('ed')]))
  assert got == {k: v for k, v in _util.read_tree(src).items()}


def test_verify_without_key(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'a': 2 * MiB, 'b': 10,
                                         'saved_model.pb': 10})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')],
                   signer=keys.priv('ed'))
  assert te.verify_package(tmp_path / 'p', trusted=[keys.pub('ed')]
                           ).signature_verified
  p = tmp_path / 'p' / 'payload' / '00000000'
  data = bytearray(p.read_bytes())
  data[MiB] ^= 1
  p.write_bytes(bytes(data))
  with pytest.raises(errors.TamperedPackageError, match='digest'):
    te.verify_package(tmp_path / 'p', trusted=[keys.pub('ed')])


@pytest.mark.parametrize('bundle', [False, True], ids=['dir', 'bundle'])
def test_rewrap_changes_recipients_not_payload(tmp_path, keys, bundle):
  src = _util.make_tree(tmp_path / 'm', {'a': 2 * MiB, 'b': 10,
                                         'saved_model.pb': 10})
  pkg = tmp_path / ('p.tfxe' if bundle else 'p')
  before = te.encrypt_model(src, pkg, recipients=[keys.pub('x')],
                            signer=keys.priv('ed'), bundle=bundle)
  payload_before = (None if bundle else
                    (pkg / 'payload' / '00000000').read_bytes())
  with pytest.raises(errors.UsageError, match='sign-with'):
    te.rewrap_package(pkg, identities=[keys.priv('x')],
                      add_recipients=[keys.pub('rsa')],
                      trusted=[keys.pub('ed')])
  after = te.rewrap_package(pkg, identities=[keys.priv('x')],
                            add_recipients=[keys.pub('rsa')],
                            remove_recipients=[keys.pub('x')],
                            signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert [r['type'] for r in after.recipients] == ['rsa-oaep-sha256']
  assert after.payload_digest == before.payload_digest
  assert after.fingerprint == before.fingerprint
  if not bundle:
    assert (pkg / 'payload' / '00000000').read_bytes() == payload_before
  with pytest.raises(errors.NoMatchingKeyError):
    te.decrypt_model(pkg, tmp_path / 'o1', identities=[keys.priv('x')],
                     trusted=[keys.pub('ed')])
  te.decrypt_model(pkg, tmp_path / 'o2', identities=[keys.priv('rsa')],
                   trusted=[keys.pub('ed')])
  assert _util.read_tree(tmp_path / 'o2') == _util.read_tree(src)
  # Refused before any key is used: even a useless identity gets the
  # usage error, not NoMatchingKeyError.
  with pytest.raises(errors.UsageError, match='no recipient'):
    te.rewrap_package(pkg, identities=[keys.priv('x2')],
                      remove_recipients=[keys.pub('rsa')],
                      signer=keys.priv('ed'), trusted=[keys.pub('ed')])


def test_rotate_new_dek_same_model(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'a': 2 * MiB + 5, 'b/c': 10, 'e': b'',
                                         'saved_model.pb': 10})
  old = te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')],
                         signer=keys.priv('ed'))
  new = te.rotate_package(tmp_path / 'p', tmp_path / 'q',
                          identities=[keys.priv('x')],
                          recipients=[keys.pub('rsa')],
                          trusted=[keys.pub('ed')], signer=keys.priv('ec'))
  assert new.package_id != old.package_id
  assert new.fingerprint == old.fingerprint
  assert new.payload_digest != old.payload_digest
  te.decrypt_model(tmp_path / 'q', tmp_path / 'o', identities=[keys.priv('rsa')],
                   trusted=[keys.pub('ec')])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(src)
  # The old DEK cannot open the new package: its stanza is gone.
  with pytest.raises(errors.NoMatchingKeyError):
    te.decrypt_model(tmp_path / 'q', tmp_path / 'o2',
                     identities=[keys.priv('x')], trusted=[keys.pub('ec')])


def test_small_rsa_keys_rejected(tmp_path):
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import rsa
  k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
  p = tmp_path / 'small.pub.pem'
  p.write_bytes(k.public_key().public_bytes(
      serialization.Encoding.PEM,
      serialization.PublicFormat.SubjectPublicKeyInfo))
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 1})
  with pytest.raises(errors.InvalidKeyUriError, match='3072'):
    te.encrypt_model(src, tmp_path / 'p', recipients=[str(p)])


def test_file_uri_keys(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 1})
  te.encrypt_model(src, tmp_path / 'p', recipients=['file://' + keys.pub('x')])
  te.decrypt_model(tmp_path / 'p', tmp_path / 'o',
                   identities=['file://' + keys.priv('x')], allow_unsigned=True)
  with pytest.raises(errors.InvalidKeyUriError):
    te.encrypt_model(src, tmp_path / 'q',
                     recipients=['file://otherhost' + keys.pub('x')])


@pytest.mark.parametrize('size_mib', [3, 12], ids=['sequential', 'pipelined'])
def test_disk_full_mid_encrypt_leaves_nothing(tmp_path, keys, size_mib):
  """RLIMIT_FSIZE makes payload writes fail (EFBIG) part way through."""
  import subprocess
  import sys
  src = _util.make_tree(tmp_path / 'm', {'variables/data': size_mib * MiB,
                                         'saved_model.pb': 100})
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  script = f'''
import resource, signal, sys
sys.path.insert(0, {root!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({2 * MiB}, {2 * MiB}))
import tfx_encrypt as te
try:
  te.encrypt_model({src!r}, {str(tmp_path / 'p')!r},
                   recipients=[{keys.pub('x')!r}])
except OSError as e:
  print('OSERROR', e.errno)
  sys.exit(3)
'''
  r = subprocess.run([sys.executable, '-c', script], capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 3 and 'OSERROR' in r.stdout, r.stdout + r.stderr
  assert not os.path.exists(tmp_path / 'p')
  assert _util.leftovers(tmp_path, 'p') == []


def test_bundle_directory_package_gives_the_same_bytes(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'a': 2 * MiB + 1, 'b/c': b'x',
                                         'saved_model.pb': 10})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  from tfx_encrypt import package as pkg_lib
  pkg_lib.bundle_directory_package(tmp_path / 'p', tmp_path / 'p.tfxe')
  d = tmp_path / 'p'
  want = (d / 'tfxe.header').read_bytes() + b''.join(
      (d / 'payload' / n).read_bytes()
      for n in sorted(os.listdir(d / 'payload')))
  assert (tmp_path / 'p.tfxe').read_bytes() == want
  assert te.inspect_package(tmp_path / 'p.tfxe').bundle
  with pytest.raises(FileExistsError):  # never overwrites
    pkg_lib.bundle_directory_package(tmp_path / 'p', tmp_path / 'p.tfxe')
  with pytest.raises(errors.UsageError, match='already a bundle'):
    pkg_lib.bundle_directory_package(tmp_path / 'p.tfxe', tmp_path / 'q.tfxe')


def test_largest_allowed_context_binds_through_hpke_and_oaep(tmp_path, keys):
  """64 entries x (128-char key, 1 KiB value): ~74 KB of HPKE info / label."""
  ctx = {f'k{i:03d}'.ljust(128, 'x'): 'v' * 1024 for i in range(64)}
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 10})
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x'),
                                                    keys.pub('rsa')],
                   context=ctx)
  for i, ident in enumerate(('x', 'rsa')):
    te.decrypt_model(tmp_path / 'p', tmp_path / f'o{i}',
                     identities=[keys.priv(ident)], allow_unsigned=True)
  with pytest.raises(errors.UsageError, match='more than 64'):
    te.encrypt_model(src, tmp_path / 'q', recipients=[keys.pub('x')],
                     context=dict(ctx, extra='1'))
