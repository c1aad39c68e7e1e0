"""Tamper matrix: every modification ends in a typed error and no output.

Covers, on packages from the real writer: bit flips in payloads and
bundles, truncation at and between segment boundaries, extension, swapping
files within a package, swapping headers, removing a recipient, editing
the context, a re-encrypted payload, and a disk-full failure mid-decrypt.
Every header bit: tests/format/test_bit_flips.py. Forged, stripped and re-signed
signatures, swapped payloads and file tables, substituted stanzas and
hostile paths, built by each party: tests/package/test_hostile_packages.py and
tests/format/test_negative_vectors.py.
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
from tfx_encrypt.keys import local
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
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))!r})
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
