"""Every single-bit flip of a package header is refused.

The smallest package the writer makes (one 1-byte file, one X25519
recipient, a one-entry context) keeps the header near 1 KB, so flipping each
of its ~9 000 bits one at a time and running the real `decrypt_model` on
each (with trust given) takes a few seconds: a flip in the magic, lengths or
body fails parsing or the signature, a flip in the MAC fails the MAC check
after the unwrap, a flip in the signature fails its canonical form or
verification. The same is done to the header bytes at the start of the
bundle form (where a changed body length also moves the payloads), and to
an unsigned package read with --allow-unsigned, where the MAC alone must
catch every body flip. Every flip must raise a typed error and leave no
output; the counts by region and error class are printed (pytest -s).
"""

import collections
import os
import shutil
import struct

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt import package as package_lib
from tfx_encrypt.format import header as header_lib
from tests import _util
from tests.testdata import package_vectors as pv

# Which errors a flip in each region of the header may end in (FORMAT.md §3,
# §10): the body also holds the suite, hash and signer names (unknown ones
# are UnsupportedFormatError) and the signer's key id (another id is not
# trusted: UntrustedSignerError).
ALLOWED = {
    'magic': {'UnsupportedFormatError'},
    'body_len': {'TamperedPackageError'},
    'body': {'TamperedPackageError', 'UnsupportedFormatError',
             'UntrustedSignerError'},
    'mac': {'TamperedPackageError'},
    'sig_len': {'TamperedPackageError'},
    'sig': {'TamperedPackageError'},
}
UNSIGNED_ALLOWED = dict(ALLOWED, body=ALLOWED['body'] - {
    'UntrustedSignerError'} | {'NoMatchingKeyError'})


@pytest.fixture(scope='module')
def packages(tmp_path_factory):
  d = tmp_path_factory.mktemp('flips')
  src = _util.make_tree(d / 'm', {'saved_model.pb': b'm'})
  common = dict(recipients=[pv.pub('recipient')], context={'m': '1'})
  signer = pv.priv('publisher-ed25519')
  te.encrypt_model(src, d / 'p', signer=signer, **common)
  te.encrypt_model(src, d / 'p.tfxe', signer=signer, bundle=True, **common)
  te.encrypt_model(src, d / 'u', **common)
  return d


def _regions(header: bytes):
  (blen,) = struct.unpack('>I', header[8:12])
  mac_at = 12 + blen
  return [('magic', 0, 8), ('body_len', 8, 12), ('body', 12, mac_at),
          ('mac', mac_at, mac_at + 32), ('sig_len', mac_at + 32, mac_at + 36),
          ('sig', mac_at + 36, len(header))]


def _header_len(path):
  with open(path, 'rb') as f:
    return header_lib.Header.read(f)[1]


def flip_every_bit(pkg, target, header_len, out, **read):
  """Flip each bit of target[:header_len] in place, decrypt, restore.

  Returns ({(region, error class): count}, [accepted (offset, bit)]).
  """
  with open(target, 'rb') as f:
    header = f.read(header_len)
  counts, accepted = collections.Counter(), []
  fd = os.open(target, os.O_RDWR)
  try:
    for region, start, end in _regions(header):
      for off in range(start, end):
        orig = header[off]
        for bit in range(8):
          os.pwrite(fd, bytes([orig ^ (1 << bit)]), off)
          try:
            te.decrypt_model(pkg, out, **read)
          except errors.TfxEncryptError as e:
            counts[region, type(e).__name__] += 1
            assert not os.path.lexists(out), (region, off, bit)
          else:
            accepted.append((off, bit))
            shutil.rmtree(out)
        os.pwrite(fd, bytes([orig]), off)
  finally:
    os.close(fd)
  assert te.decrypt_model(pkg, out, **read).file_count == 1  # restored
  return counts, accepted


def _check(counts, accepted, header_len, allowed):
  print()
  for (region, name), n in sorted(counts.items()):
    print(f'  {region:8s} {name:24s} {n:6d}')
  assert accepted == [], f'flips accepted (offset, bit): {accepted[:20]}'
  assert sum(counts.values()) == 8 * header_len
  for (region, name), _ in counts.items():
    assert name in allowed[region], (region, name)


@pytest.fixture(scope='module')
def keys():
  return dict(
      identities=package_lib.resolve_keys([pv.priv('recipient')], 'identity'),
      trusted=package_lib.resolve_keys([pv.pub('publisher-ed25519')],
                                       'trust'))


def test_every_header_bit_flip_is_refused_directory_form(tmp_path, packages,
                                                         keys):
  hlen = _header_len(packages / 'p' / 'tfxe.header')
  counts, accepted = flip_every_bit(
      packages / 'p', packages / 'p' / 'tfxe.header', hlen, tmp_path / 'o',
      **keys)
  _check(counts, accepted, hlen, ALLOWED)
  # A flipped MAC bit passes parsing and the signature (which does not cover
  # the MAC): the MAC check after the unwrap refuses all 256 of them.
  assert counts['mac', 'TamperedPackageError'] == 256


def test_every_header_bit_flip_is_refused_bundle_form(tmp_path, packages,
                                                      keys):
  bundle = packages / 'p.tfxe'
  hlen = _header_len(bundle)
  counts, accepted = flip_every_bit(bundle, bundle, hlen, tmp_path / 'o',
                                    **keys)
  _check(counts, accepted, hlen, ALLOWED)


def test_every_header_bit_flip_is_refused_unsigned(tmp_path, packages, keys):
  """No signature: with --allow-unsigned the MAC (and the strict parser)
  must catch every flip; a flipped stanza or key id may also end in the
  stanza failing to unwrap or matching no identity."""
  hlen = _header_len(packages / 'u' / 'tfxe.header')
  counts, accepted = flip_every_bit(
      packages / 'u', packages / 'u' / 'tfxe.header', hlen, tmp_path / 'o',
      identities=keys['identities'], allow_unsigned=True)
  allowed = dict(UNSIGNED_ALLOWED, sig_len={'TamperedPackageError'}, sig=set())
  _check(counts, accepted, hlen, allowed)
