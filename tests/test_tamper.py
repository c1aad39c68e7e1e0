"""Tamper matrix: every modification ends in a typed error and no output.

Covers bit flips anywhere, truncation at and between segment boundaries,
extension, swapping files within and between packages, swapping headers,
removing a recipient, editing the context, stripping or forging the
signature, substituted key stanzas, and a disk-full failure mid-decrypt.
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.keys import local
from tfx_encrypt.keys.base import WrapContext
from tests import _util

MiB = 1 << 20
TYPED = (errors.TamperedPackageError, errors.UnsupportedFormatError,
         errors.UntrustedSignerError, errors.NoMatchingKeyError,
         errors.UnsafePathError)


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  d = tmp_path_factory.mktemp('model')
  return _util.make_tree(d / 'm', {
      'variables/variables.data-00000-of-00001': 2 * MiB + 12345,
      'variables/variables.index': 700,
      'saved_model.pb': 700,  # same size as the index: swappable payloads
  })


@pytest.fixture(scope='module')
def signed_pkg(tmp_path_factory, keys, model):
  d = tmp_path_factory.mktemp('pkg')
  te.encrypt_model(model, d / 'p', recipients=[keys.pub('x'), keys.pub('rsa')],
                   signer=keys.priv('ed'), context={'model': 'm', 'run': '1'})
  te.encrypt_model(model, d / 'p.tfxe', recipients=[keys.pub('x')],
                   signer=keys.priv('ed'), bundle=True)
  te.encrypt_model(model, d / 'u', recipients=[keys.pub('x')],
                   context={'model': 'm'})
  return d


def _copy(src, dst):
  if os.path.isdir(src):
    shutil.copytree(src, dst)
  else:
    shutil.copyfile(src, dst)
  return dst


def _assert_rejected(pkg, out, keys, *, signed=True, expect=TYPED):
  kwargs = ({'trusted': [keys.pub('ed')]} if signed else
            {'allow_unsigned': True})
  with pytest.raises(expect) as ei:
    te.decrypt_model(pkg, out, identities=[keys.priv('x')], **kwargs)
  assert not os.path.lexists(out), 'output must not exist after a failure'
  parent = os.path.dirname(str(out))
  assert _util.leftovers(parent, os.path.basename(str(out))) == []
  return ei.value


def _flip(path, offset, bit=0):
  with open(path, 'r+b') as f:
    f.seek(offset)
    b = f.read(1)
    f.seek(offset)
    f.write(bytes([b[0] ^ (1 << bit)]))


def _header_regions(path):
  data = open(path, 'rb').read()
  (blen,) = struct.unpack('>I', data[8:12])
  mac_at = 12 + blen
  (slen,) = struct.unpack('>I', data[mac_at + 32:mac_at + 36])
  return data, blen, mac_at, slen


def _flip_offsets(size, n=40):
  step = max(1, size // n)
  return sorted(set(list(range(0, size, step)) + [size - 1]))


def test_bit_flips_everywhere_in_header(tmp_path, signed_pkg, keys):
  src = signed_pkg / 'p' / 'tfxe.header'
  size = os.path.getsize(src)
  for k, off in enumerate(_flip_offsets(size, 60)):
    pkg = _copy(signed_pkg / 'p', tmp_path / f'p{k}')
    _flip(pkg / 'tfxe.header', off, bit=k % 8)
    _assert_rejected(pkg, tmp_path / f'o{k}', keys)


def test_bit_flips_in_header_of_unsigned_package(tmp_path, signed_pkg, keys):
  src = signed_pkg / 'u' / 'tfxe.header'
  size = os.path.getsize(src)
  for k, off in enumerate(_flip_offsets(size, 40)):
    pkg = _copy(signed_pkg / 'u', tmp_path / f'p{k}')
    _flip(pkg / 'tfxe.header', off, bit=(k * 3) % 8)
    _assert_rejected(pkg, tmp_path / f'o{k}', keys, signed=False)


@pytest.mark.parametrize('index', [0, 1, 2])
def test_bit_flips_everywhere_in_payloads(tmp_path, signed_pkg, keys, index):
  name = f'{index:08d}'
  size = os.path.getsize(signed_pkg / 'p' / 'payload' / name)
  offs = _flip_offsets(size, 25)
  offs += [o for o in (0, 1, 39, 40, MiB - 17, MiB - 1, MiB, MiB + 1,
                       2 * MiB) if o < size]
  for k, off in enumerate(sorted(set(offs))):
    pkg = _copy(signed_pkg / 'p', tmp_path / f'p{k}')
    _flip(pkg / 'payload' / name, off, bit=k % 8)
    e = _assert_rejected(pkg, tmp_path / f'o{k}', keys)
    assert isinstance(e, errors.TamperedPackageError)


def test_bit_flips_in_bundle(tmp_path, signed_pkg, keys):
  size = os.path.getsize(signed_pkg / 'p.tfxe')
  for k, off in enumerate(_flip_offsets(size, 40)):
    pkg = _copy(signed_pkg / 'p.tfxe', tmp_path / f'p{k}.tfxe')
    _flip(pkg, off, bit=k % 8)
    _assert_rejected(pkg, tmp_path / f'o{k}', keys)


def _big_payload(pkg):
  sizes = {n: os.path.getsize(pkg / 'payload' / n)
           for n in os.listdir(pkg / 'payload')}
  return max(sizes, key=sizes.get)


@pytest.mark.parametrize('new_size', [
    0, 39, 40, 56, MiB - 1, MiB, MiB + 1, 2 * MiB, 2 * MiB + 16, -1])
def test_truncation_at_and_between_segment_boundaries(tmp_path, signed_pkg,
                                                      keys, new_size):
  pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
  target = pkg / 'payload' / _big_payload(pkg)
  size = os.path.getsize(target)
  os.truncate(target, size - 1 if new_size == -1 else new_size)
  e = _assert_rejected(pkg, tmp_path / 'o', keys)
  assert isinstance(e, errors.TamperedPackageError)


@pytest.mark.parametrize('extra', [b'\x00', b'x' * 16, None])
def test_extension(tmp_path, signed_pkg, keys, extra):
  pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
  target = pkg / 'payload' / _big_payload(pkg)
  data = target.read_bytes()
  # None: append a copy of a whole valid segment.
  target.write_bytes(data + (extra if extra is not None else data[MiB:2 * MiB]))
  _assert_rejected(pkg, tmp_path / 'o', keys)


def test_bundle_truncated_and_extended(tmp_path, signed_pkg, keys):
  data = (signed_pkg / 'p.tfxe').read_bytes()
  for k, cut in enumerate([10, 100, len(data) // 2, len(data) - 1]):
    p = tmp_path / f't{k}.tfxe'
    p.write_bytes(data[:cut])
    _assert_rejected(p, tmp_path / f'o{k}', keys)
  p = tmp_path / 'x.tfxe'
  p.write_bytes(data + b'\x00')
  _assert_rejected(p, tmp_path / 'ox', keys)


def test_swap_payloads_within_package(tmp_path, signed_pkg, keys):
  pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
  small = [n for n in sorted(os.listdir(pkg / 'payload'))
           if n != _big_payload(pkg)]
  a, b = (pkg / 'payload' / n for n in small)
  assert os.path.getsize(a) == os.path.getsize(b)
  da, db = a.read_bytes(), b.read_bytes()
  a.write_bytes(db)
  b.write_bytes(da)
  e = _assert_rejected(pkg, tmp_path / 'o', keys)
  assert isinstance(e, errors.TamperedPackageError)


def test_swap_payloads_between_packages(tmp_path, keys, model, signed_pkg):
  te.encrypt_model(model, tmp_path / 'p2', recipients=[keys.pub('x')],
                   signer=keys.priv('ed'), context={'model': 'm', 'run': '1'})
  pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
  name = _big_payload(pkg)
  shutil.copyfile(tmp_path / 'p2' / 'payload' / name, pkg / 'payload' / name)
  e = _assert_rejected(pkg, tmp_path / 'o', keys)
  assert isinstance(e, errors.TamperedPackageError)


def test_swap_headers_between_packages(tmp_path, keys, model, signed_pkg):
  te.encrypt_model(model, tmp_path / 'p2', recipients=[keys.pub('x')],
                   signer=keys.priv('ed'), context={'model': 'm', 'run': '1'})
  pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
  shutil.copyfile(tmp_path / 'p2' / 'tfxe.header', pkg / 'tfxe.header')
  e = _assert_rejected(pkg, tmp_path / 'o', keys)
  assert isinstance(e, errors.TamperedPackageError)


def _rewrite_body(pkg_dir, edit, keep_sig=True):
  """Re-serialise the header body after `edit(obj)`, keeping MAC and sig."""
  hp = pkg_dir / 'tfxe.header'
  data, blen, mac_at, slen = _header_regions(hp)
  obj = json.loads(data[12:12 + blen])
  edit(obj)
  body = header_lib.canonical_json(obj)
  mac = data[mac_at:mac_at + 32]
  sig = data[mac_at + 36:mac_at + 36 + slen] if keep_sig else b''
  hp.write_bytes(header_lib.MAGIC + struct.pack('>I', len(body)) + body + mac +
                 struct.pack('>I', len(sig)) + sig)


@pytest.mark.parametrize('signed', [True, False])
def test_remove_recipient(tmp_path, signed_pkg, keys, signed):
  pkg = _copy(signed_pkg / ('p' if signed else 'u'), tmp_path / 'p')
  if signed:  # keep the X25519 stanza the identity needs, drop RSA
    _rewrite_body(pkg, lambda o: o['recipients'].pop(1))
  else:  # add nothing, remove nothing usable: duplicate then drop
    _rewrite_body(pkg, lambda o: o['recipients'].append(o['recipients'][0]))
  e = _assert_rejected(pkg, tmp_path / 'o', keys, signed=signed)
  assert isinstance(e, errors.TamperedPackageError)


@pytest.mark.parametrize('signed', [True, False])
def test_edit_context(tmp_path, signed_pkg, keys, signed):
  pkg = _copy(signed_pkg / ('p' if signed else 'u'), tmp_path / 'p')
  _rewrite_body(pkg, lambda o: o['context'].update(model='other'))
  e = _assert_rejected(pkg, tmp_path / 'o', keys, signed=signed)
  assert isinstance(e, errors.TamperedPackageError)


@pytest.mark.parametrize('trust', [True, False])
def test_strip_signature(tmp_path, signed_pkg, keys, trust):
  # The body names the signer under the MAC (§3, §8): dropping the
  # signature bytes alone is a malformed header, and also saying "unsigned"
  # in the body breaks the MAC, whatever allow_unsigned says.
  for edit in (lambda o: None, lambda o: o.update(signer=None)):
    pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
    _rewrite_body(pkg, edit, keep_sig=False)
    kwargs = {'allow_unsigned': True}
    if trust:
      kwargs['trusted'] = [keys.pub('ed')]
    with pytest.raises(errors.TamperedPackageError):
      te.decrypt_model(pkg, tmp_path / 'o', identities=[keys.priv('x')],
                       **kwargs)
    assert not os.path.lexists(tmp_path / 'o')
    _util.leftovers(tmp_path, 'o') == []  # pylint: disable=expression-not-assigned
    shutil.rmtree(pkg)


def _resign(pkg_dir, signer_key, claimed_id):
  """Re-sign the header as `claimed_id` with `signer_key` (no DEK needed:
  the body, and so the MAC, stay as they are)."""
  hp = pkg_dir / 'tfxe.header'
  with open(hp, 'rb') as f:
    h, _ = header_lib.Header.read(f)
  sig = signer_key.sign(h.signature_message())
  h.signature = header_lib.SignatureBlock(h.signer.alg, h.signer.key_id, sig)
  hp.write_bytes(h.serialize())
  if claimed_id != h.signer.key_id:  # naming another signer changes the body
    _rewrite_body(pkg_dir, lambda o: o['signer'].update(key_id=claimed_id))


def test_forged_signature_claiming_trusted_key(tmp_path, signed_pkg, keys):
  pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
  trusted_id = local.LocalKey(keys.pub('ed')).key_id
  _resign(pkg, local.LocalKey(keys.priv('evil')), trusted_id)
  e = _assert_rejected(pkg, tmp_path / 'o', keys)
  assert isinstance(e, errors.TamperedPackageError)
  assert 'INVALID' in str(e)


def test_signature_by_untrusted_key(tmp_path, signed_pkg, keys):
  pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
  evil = local.LocalKey(keys.priv('evil'))
  _resign(pkg, evil, evil.key_id)
  e = _assert_rejected(pkg, tmp_path / 'o', keys)
  assert isinstance(e, errors.UntrustedSignerError)


def test_substituted_stanza_fails_key_commitment(tmp_path, signed_pkg, keys):
  """A stanza wrapping some other DEK for the same recipient is caught."""
  pkg = _copy(signed_pkg / 'u', tmp_path / 'p')
  with open(pkg / 'tfxe.header', 'rb') as f:
    h, _ = header_lib.Header.read(f)
  forged = local.LocalKey(keys.pub('x')).wrap(
      os.urandom(32), WrapContext(h.package_id, h.context))
  _rewrite_body(pkg, lambda o: o['recipients'].__setitem__(0, forged.to_json()))
  e = _assert_rejected(pkg, tmp_path / 'o', keys, signed=False)
  assert isinstance(e, errors.TamperedPackageError)
  assert 'commitment' in str(e)


def test_unknown_version_and_garbage(tmp_path, signed_pkg, keys):
  pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
  _flip(pkg / 'tfxe.header', 7, bit=1)  # version byte
  e = _assert_rejected(pkg, tmp_path / 'o', keys)
  assert isinstance(e, errors.UnsupportedFormatError)
  g = tmp_path / 'g.tfxe'
  g.write_bytes(b'PK\x03\x04 not a package')
  e = _assert_rejected(g, tmp_path / 'o2', keys)
  assert isinstance(e, errors.UnsupportedFormatError)


def test_extra_file_in_package_dir(tmp_path, signed_pkg, keys):
  pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
  (pkg / 'payload' / '00000099').write_bytes(b'x' * 100)
  _assert_rejected(pkg, tmp_path / 'o', keys)
  pkg2 = _copy(signed_pkg / 'p', tmp_path / 'p2')
  (pkg2 / 'evil.sh').write_text('rm -rf /')
  _assert_rejected(pkg2, tmp_path / 'o2', keys)


def test_payload_symlink_refused(tmp_path, signed_pkg, keys):
  pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
  name = _big_payload(pkg)
  real = tmp_path / 'elsewhere'
  os.rename(pkg / 'payload' / name, real)
  os.symlink(real, pkg / 'payload' / name)
  _assert_rejected(pkg, tmp_path / 'o', keys)


def test_disk_full_mid_decrypt_leaves_nothing(tmp_path, signed_pkg, keys):
  """RLIMIT_FSIZE makes the 2 MiB file's write fail half way (EFBIG)."""
  script = f'''
import os, resource, signal, sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({MiB}, {MiB}))
import tfx_encrypt as te
try:
  te.decrypt_model({str(signed_pkg / 'p')!r}, {str(tmp_path / 'o')!r},
                   identities=[{keys.priv('x')!r}], trusted=[{keys.pub('ed')!r}])
except OSError as e:
  print('OSERROR', e.errno)
  sys.exit(3)
'''
  r = subprocess.run([sys.executable, '-c', script], capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 3, r.stdout + r.stderr
  assert 'OSERROR' in r.stdout
  assert not os.path.exists(tmp_path / 'o')
  assert _util.leftovers(str(tmp_path), 'o') == []


# --- hostile file tables (decrypt-side path safety) -----------------------------

class _PkgPath(type(__import__('pathlib').Path())):
  """A Path that can carry the crafted package's secrets for the test."""


def _craft(tmp_path, keys, files, dirs):
  """Build a package whose file table lists `files` (path, bytes) verbatim."""
  suite = streaming.AES256_GCM_HKDF_1MB
  dek, pid = os.urandom(32), os.urandom(16)
  k = header_lib.DerivedKeys(dek, pid, suite)
  ctx = {}
  cd = header_lib.context_digest(ctx)
  pkg = _PkgPath(tmp_path / 'evil_pkg')
  os.makedirs(pkg / 'payload')
  entries, payloads = [], []
  from tfx_encrypt.format import digest as digest_lib
  for i, (path, data) in enumerate(files):
    ct = streaming.encrypt_bytes(suite, k.stream_key,
                                 header_lib.payload_aad(pid, i, cd), data)
    (pkg / 'payload' / f'{i:08d}').write_bytes(ct)
    d = digest_lib.new_hash('sha256')
    d.update(data)
    entries.append(header_lib.FileEntry(path, len(data), d.hexdigest()))
    cd2 = digest_lib.new_hash('sha256')
    cd2.update(ct)
    payloads.append((len(ct), cd2.hexdigest()))
  table = header_lib.canonical_json({
      'dirs': dirs,
      'files': [{'path': e.path, 'size': e.size, 'digest': e.digest}
                for e in entries]})
  h = header_lib.Header(
      suite=suite, hash_alg='sha256', package_id=pid,
      created='2026-01-01T00:00:00Z', context=ctx,
      recipients=[local.LocalKey(keys.pub('x')).wrap(dek, WrapContext(pid, ctx))],
      commitment=k.commitment,
      fingerprint=digest_lib.root_digest('sha256', (e.digest for e in entries)),
      payloads=payloads,
      file_table=streaming.encrypt_bytes(
          suite, k.stream_key, header_lib.file_table_aad(pid, cd), table))
  h.mac = h.compute_mac(k.mac_key)
  (pkg / 'tfxe.header').write_bytes(h.serialize())
  pkg.keys, pkg.package_id, pkg.ctx_digest = k, pid, cd
  return pkg


@pytest.mark.parametrize('files,dirs', [
    ([('../evil', b'x')], []),
    ([('/tmp/evil', b'x')], []),
    ([('a/../../evil', b'x')], ['a']),
    ([('./evil', b'x')], []),
    ([('a', b'1'), ('a', b'2')], []),
    ([('A', b'1'), ('a', b'2')], []),
    ([('a', b'1'), ('a/b', b'2')], ['a']),
    ([('d/x', b'1')], []),  # parent directory not listed
    ([('evil\x00.txt', b'x')], []),
    ([('b', b'1'), ('a', b'2')], []),  # unsorted
    ([('e\u0301vil', b'x')], []),  # not NFC
    ([('x\\..\\evil', b'x')], []),
])
def test_hostile_file_table_rejected(tmp_path, keys, files, dirs):
  (tmp_path / 'out').mkdir()
  pkg = _craft(tmp_path, keys, files, dirs)
  e = _assert_rejected(pkg, tmp_path / 'out' / 'o', keys, signed=False,
                       expect=(errors.UnsafePathError,
                               errors.TamperedPackageError))
  del e
  assert not os.path.exists(tmp_path / 'evil')
  assert not os.path.exists('/tmp/evil')


def test_crafted_benign_package_decrypts(tmp_path, keys):
  """Control for the hostile cases: the crafting helper itself is sound."""
  (tmp_path / 'out').mkdir()
  pkg = _craft(tmp_path, keys, [('a/b', b'hello'), ('c', b'')], ['a'])
  te.decrypt_model(pkg, tmp_path / 'out' / 'o', identities=[keys.priv('x')],
                   allow_unsigned=True)
  assert (tmp_path / 'out' / 'o' / 'a' / 'b').read_bytes() == b'hello'


def test_insider_payload_substitution_caught_by_digest(tmp_path, keys):
  """A DEK holder re-encrypts other bytes validly; the file digest catches it."""
  (tmp_path / 'out').mkdir()
  pkg = _craft(tmp_path, keys, [('a', b'good model'), ('b', b'x')], [])
  ct = streaming.encrypt_bytes(
      streaming.AES256_GCM_HKDF_1MB, pkg.keys.stream_key,
      header_lib.payload_aad(pkg.package_id, 0, pkg.ctx_digest), b'evil model')
  (pkg / 'payload' / '00000000').write_bytes(ct)
  e = _assert_rejected(pkg, tmp_path / 'out' / 'o', keys, signed=False)
  assert isinstance(e, errors.TamperedPackageError)
  assert 'digest' in str(e)


def _reencrypt_payload(pkg_dir, keys, index=0):
  """What a recipient can do: same plaintext, fresh stream header (salt,
  nonce prefix) under the package's own stream key."""
  from tfx_encrypt import package as pkg_lib  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.format import streaming  # pylint: disable=g-import-not-at-top
  hp = pkg_dir / 'tfxe.header'
  with open(hp, 'rb') as f:
    h, _ = header_lib.Header.read(f)
  _, dk = pkg_lib.unwrap_data_key(
      [local.LocalKey(keys.priv('x'))], h.recipients, h.package_id,
      h.context, h.suite, h.commitment)
  aad = header_lib.payload_aad(h.package_id, index, h.ctx_digest)
  path = pkg_dir / 'payload' / f'{index:08d}'
  old = path.read_bytes()
  plain = streaming.decrypt_bytes(h.suite, dk.stream_key, aad, old)
  new = streaming.encrypt_bytes(h.suite, dk.stream_key, aad, plain)
  assert new != old and len(new) == len(old)
  path.write_bytes(new)


def test_recipient_cannot_reencrypt_a_payload_of_a_signed_package(
    tmp_path, signed_pkg, keys):
  # The payload still decrypts and its plaintext digest still matches, but
  # its ciphertext is not the one the signature covers (FORMAT.md §10).
  pkg = _copy(signed_pkg / 'p', tmp_path / 'p')
  _reencrypt_payload(pkg, keys)
  e = _assert_rejected(pkg, tmp_path / 'o', keys)
  assert isinstance(e, errors.TamperedPackageError)
  assert 'ciphertext digest' in str(e)
  with pytest.raises(errors.TamperedPackageError, match='ciphertext digest'):
    list(te.iter_decrypted_files(pkg, identities=[keys.priv('x')],
                                 trusted=[keys.pub('ed')]))
  with pytest.raises(errors.TamperedPackageError, match='ciphertext digest'):
    te.rotate_package(pkg, tmp_path / 'r', identities=[keys.priv('x')],
                      recipients=[keys.pub('x')], trusted=[keys.pub('ed')])
  assert not os.path.lexists(tmp_path / 'r')
  with pytest.raises(errors.TamperedPackageError):
    te.verify_package(pkg, trusted=[keys.pub('ed')])
