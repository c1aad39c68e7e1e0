"""One test per security check that mutation testing found unguarded.

Each test fails when the check it is named for is removed or weakened: its
docstring names the mutant it kills (docs/TESTING.md lists the mutation
runs and how each test was shown to kill its mutant). Hostile packages are
built as an insider could build them, with the data key and, where it
matters, a signing key the test holds (tests/_craft.py, or a header
re-sealed through `package.seal_header`), so that nothing but the check
under test can refuse them. Real keys, real packages, a real registry; no
mocks.
"""

import base64
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import urllib.request

import pytest

import tfx_encrypt as te
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt import package as package_lib
from tfx_encrypt.distribution import oci
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import paths
from tfx_encrypt.format import streaming
from tfx_encrypt.format.stanza import Stanza
from tfx_encrypt.format.stanza import WrapContext
from tfx_encrypt.keys import local
from tfx_encrypt.keys import shamir
from tfx_encrypt.runtime import serving
from tests import _craft
from tests import _util

V1, V2, V3 = '1700000001', '1700000002', '1700000003'
SUITE = _craft.SUITE


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  return _util.make_tree(tmp_path_factory.mktemp('model') / 'm', {
      'saved_model.pb': 900,
      'variables/variables.index': 120,
      'variables/variables.data-00000-of-00001': 70_000,
  })


def _read_header(pkg_dir):
  with open(os.path.join(pkg_dir, package_lib.HEADER_NAME), 'rb') as f:
    h, _ = header_lib.Header.read(f)
  return h


def _write_header(pkg_dir, h):
  with open(os.path.join(pkg_dir, package_lib.HEADER_NAME), 'wb') as f:
    f.write(h.serialize())


def _tree_digest(path):
  """SHA-256 over every name and byte of a directory package."""
  h = hashlib.sha256()
  for d, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      p = os.path.join(d, name)
      h.update(os.path.relpath(p, path).encode() + b'\0')
      with open(p, 'rb') as f:
        h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def _assert_nothing_at(out):
  assert not os.path.lexists(out), 'no output may exist after a refusal'
  assert _util.leftovers(os.path.dirname(str(out)),
                         os.path.basename(str(out))) == []


# --- rewrap: the old data key and the whole header first ----------------------

def test_rewrap_remove_recipient_needs_the_data_key(keys, model, tmp_path):
  """Kills: rewrap --remove-recipient proceeding without unwrapping the data
  key (an identity that opens no stanza must not be able to rewrite the
  recipient list, even of an unsigned package)."""
  pkg = tmp_path / 'p'
  te.encrypt_model(model, pkg, recipients=[keys.pub('x'), keys.pub('x2')])
  before = _tree_digest(pkg)
  with pytest.raises(errors.NoMatchingKeyError):
    te.rewrap_package(pkg, identities=[keys.priv('rsa')],
                      remove_recipients=[keys.pub('x2')], allow_unsigned=True)
  assert _tree_digest(pkg) == before
  # Control: with the data key the same removal goes through.
  te.rewrap_package(pkg, identities=[keys.priv('x')],
                    remove_recipients=[keys.pub('x2')], allow_unsigned=True)
  assert [r['key_id'] for r in te.inspect_package(pkg).recipients] == [
      local.LocalKey(keys.pub('x')).key_id]


def test_rewrap_remove_recipient_checks_header_mac_first(keys, model,
                                                         tmp_path):
  """Kills: rewrap skipping `h.check_mac` before it re-MACs: a header
  modified without the data key (here its `created` time) must be refused,
  not laundered into a valid MAC."""
  pkg = tmp_path / 'p'
  te.encrypt_model(model, pkg, recipients=[keys.pub('x'), keys.pub('x2')])
  h = _read_header(pkg)
  mac = h.mac
  h.created = '2001-01-01T00:00:00Z'
  h.invalidate()
  h.mac = mac  # the old MAC: whoever edited this had no data key
  _write_header(pkg, h)
  before = _tree_digest(pkg)
  with pytest.raises(errors.TamperedPackageError, match='MAC'):
    te.rewrap_package(pkg, identities=[keys.priv('x')],
                      remove_recipients=[keys.pub('x2')], allow_unsigned=True)
  assert _tree_digest(pkg) == before


def test_rewrap_authenticates_file_table_before_resealing(keys, tmp_path):
  """Kills: rewrap skipping `_decrypt_file_table` before it re-MACs and
  re-signs: a package whose file table contradicts its fingerprint is
  refused, not re-signed by the rewrapper."""
  pkg = _craft.craft(
      tmp_path / 'p', keys.pub('x'), [('saved_model.pb', b'graph')],
      signer_priv=keys.priv('ed'),
      fingerprint=digest_lib.root_digest('sha256', ['00' * 32]))
  before = _tree_digest(pkg)
  with pytest.raises(errors.TamperedPackageError, match='fingerprint'):
    te.rewrap_package(pkg, identities=[keys.priv('x')],
                      add_recipients=[keys.pub('x2')],
                      trusted=[keys.pub('ed')], signer=keys.priv('ed'))
  assert _tree_digest(pkg) == before


# --- header framing (FORMAT.md §3) --------------------------------------------

def test_header_framing_limits_are_exact(keys, model, tmp_path):
  """Kills: the header framing moved at its bounds: a body of 1 to 16 MiB
  (a longer or empty one refused from the length alone, before any of it
  is read), the magic's version byte (older: re-encrypt; newer: upgrade),
  and the format version a package reports (the magic's last byte)."""
  magic = header_lib.MAGIC
  for body_len, what in ((0, 'header body length'),
                         ((16 << 20) + 1, 'header body length'),
                         (16 << 20, 'truncated'), (1, 'truncated')):
    with pytest.raises(errors.TamperedPackageError, match=what):
      header_lib.Header.read(io.BytesIO(magic + struct.pack('>I', body_len)))
  for version, what in ((magic[7] - 1, 'any more'), (magic[7] + 1, 'upgrade')):
    with pytest.raises(errors.UnsupportedFormatError, match=what):
      header_lib.Header.read(io.BytesIO(
          magic[:7] + bytes([version]) + struct.pack('>I', 1)))
  pkg = tmp_path / 'p'
  te.encrypt_model(model, pkg, recipients=[keys.pub('x')])
  assert te.inspect_package(pkg).format_version == magic[7]


def test_header_count_limits_are_exact(keys, model, tmp_path):
  """Kills: the header's count limits moved by one (FORMAT.md §11): 1 to 64
  recipient stanzas, 1 to 100 000 payloads, at most 100 000 directories in
  the file table; the parser refuses one more (or none) from the counts
  alone."""
  pkg = tmp_path / 'p'
  te.encrypt_model(model, pkg, recipients=[keys.pub('x')])
  h = _read_header(pkg)
  stanza, payload = h.recipients[0], h.payloads[0]
  for field, count, ok in (('recipients', 64, True), ('recipients', 65, False),
                           ('recipients', 0, False),
                           ('payloads', 100_000, True),
                           ('payloads', 100_001, False),
                           ('payloads', 0, False)):
    h.invalidate()
    if field == 'recipients':
      h.recipients, h.payloads = [stanza] * count, [payload]
    else:
      h.recipients, h.payloads = [stanza], [payload] * count
    if ok:
      assert len(getattr(header_lib.Header.parse_body(h.body()), field)) == (
          count)
    else:
      with pytest.raises(errors.TamperedPackageError,
                         match=field[:-1] + ' count'):
        header_lib.Header.parse_body(h.body())
  # The file table: at most 100 000 directories.
  dirs = [f'd{i:06d}' for i in range(100_001)]
  table = {'dirs': dirs[:-1], 'files': []}
  assert header_lib.decode_file_table(header_lib.canonical_json(table), 0)[
      1] == dirs[:-1]
  table['dirs'] = dirs
  with pytest.raises(errors.TamperedPackageError, match='directory list'):
    header_lib.decode_file_table(header_lib.canonical_json(table), 0)


# --- the file table's fingerprint ---------------------------------------------

def test_fingerprint_compared_with_file_table(keys, tmp_path):
  """Kills: `_decrypt_file_table` not comparing the root of the file
  table's digests with the header's `fingerprint` (which inspect, lineage
  and serve-sync's marker report as the model's identity)."""
  claimed = digest_lib.root_digest('sha256', ['00' * 32])
  pkg = _craft.craft(tmp_path / 'p', keys.pub('x'),
                     [('saved_model.pb', b'graph')],
                     signer_priv=keys.priv('ed'), fingerprint=claimed)
  assert te.inspect_package(pkg).fingerprint == claimed
  out = tmp_path / 'o'
  with pytest.raises(errors.TamperedPackageError, match='fingerprint'):
    te.decrypt_model(pkg, out, identities=[keys.priv('x')],
                     trusted=[keys.pub('ed')])
  _assert_nothing_at(out)
  with pytest.raises(errors.TamperedPackageError, match='fingerprint'):
    list(te.iter_decrypted_files(pkg, identities=[keys.priv('x')],
                                 trusted=[keys.pub('ed')]))


# --- payload streams ----------------------------------------------------------

TWO_SEGMENTS = (streaming.FIRST_PLAINTEXT_SEGMENT_SIZE +
                streaming.PLAINTEXT_SEGMENT_SIZE)


def _cut_after_two_segments(i, key, aad, plaintext):
  """seal() for _craft: the writer sealed three segments (so segment 1 is
  not the last one); the stream was cut at the end of segment 1."""
  del i
  full = streaming.encrypt_bytes(SUITE, key, aad, plaintext + b'rest')
  assert streaming.segments_of_ciphertext(len(full)) == 3
  return full[:streaming.ciphertext_size(len(plaintext))]


def test_last_segment_flag_refuses_stream_cut_at_segment_boundary(
    keys, tmp_path):
  """Kills: the payload path (decrypt's `_decrypt_payload`, rotate's
  `_segment_opener`) opening segment i without the right last-segment
  flag. A stream cut exactly at a segment boundary, described consistently
  by a (signed) header, must still be refused: its final segment was not
  sealed as the last one."""
  data = _util.pattern(TWO_SEGMENTS)
  files = [('saved_model.pb', data)]
  good = _craft.craft(tmp_path / 'good', keys.pub('x'), files,
                      signer_priv=keys.priv('ed'))
  cut = _craft.craft(tmp_path / 'cut', keys.pub('x'), files,
                     signer_priv=keys.priv('ed'),
                     seal=_cut_after_two_segments)
  assert (os.path.getsize(os.path.join(cut, 'payload', '00000000')) ==
          os.path.getsize(os.path.join(good, 'payload', '00000000')))
  kw = {'identities': [keys.priv('x')], 'trusted': [keys.pub('ed')]}
  # Control: the same bytes, sealed as two segments, decrypt.
  te.decrypt_model(good, tmp_path / 'ok', **kw)
  assert (tmp_path / 'ok' / 'saved_model.pb').read_bytes() == data

  out = tmp_path / 'o'
  with pytest.raises(errors.TamperedPackageError, match='segment 1'):
    te.decrypt_model(cut, out, **kw)
  _assert_nothing_at(out)
  with pytest.raises(errors.TamperedPackageError, match='segment 1'):
    list(te.iter_decrypted_files(cut, **kw))
  with pytest.raises(errors.TamperedPackageError, match='segment 1'):
    te.rotate_package(cut, tmp_path / 'r', recipients=[keys.pub('x2')], **kw)
  _assert_nothing_at(tmp_path / 'r')


def test_stream_size_and_segment_count_limits_are_exact():
  """Kills: the stream arithmetic of FORMAT.md §6 moved by one at its
  bounds: a stream whose last segment is only a tag is valid and one byte
  less ends inside the tag (`segments_of_ciphertext`, for 3 and 4
  segments); the segment counter stops below 2^32 (`nonce`); a stream has
  at most 2^32 - 1 segments (`ciphertext_size`); a stream header is 0x28
  and 39 bytes, a stream key 32 bytes (`StreamCipher`)."""
  head, tag = streaming.HEADER_SIZE, streaming.TAG_SIZE
  seg = streaming.SEGMENT_SIZE
  size = head + streaming.FIRST_CIPHERTEXT_SEGMENT_SIZE + seg + tag
  for n in (3, 4):
    assert streaming.segments_of_ciphertext(size) == n
    with pytest.raises(errors.TamperedPackageError, match='inside a segment'):
      streaming.segments_of_ciphertext(size - 1)
    size += seg
  sc = streaming.StreamCipher.new(SUITE, bytes(32), b'')
  assert sc.nonce(2**32 - 2, True)[7:] == b'\xff\xff\xff\xfe\x01'
  with pytest.raises(errors.TamperedPackageError, match='counter'):
    sc.nonce(2**32 - 1, True)
  largest = (streaming.FIRST_PLAINTEXT_SEGMENT_SIZE +
             (2**32 - 2) * streaming.PLAINTEXT_SEGMENT_SIZE)
  assert streaming.num_segments(largest) == 2**32 - 1
  assert streaming.ciphertext_size(largest) == (
      head + largest + tag * (2**32 - 1))
  with pytest.raises(errors.UsageError, match='2\\^32 segments'):
    streaming.ciphertext_size(largest + 1)
  # The stream header: 0x28, then a 32-byte salt and a 7-byte nonce prefix.
  with pytest.raises(errors.TamperedPackageError, match='malformed header'):
    streaming.StreamCipher.from_header(SUITE, bytes(32), b'',
                                       b'\x29' + bytes(39))
  with pytest.raises(errors.TamperedPackageError, match='malformed header'):
    streaming.StreamCipher.from_header(SUITE, bytes(32), b'',
                                       b'\x28' + bytes(40))
  for ikm, salt, prefix in [(bytes(31), bytes(32), bytes(7)),
                            (bytes(32), bytes(31), bytes(7)),
                            (bytes(32), bytes(32), bytes(8))]:
    with pytest.raises(ValueError, match='length'):
      streaming.StreamCipher(SUITE, ikm, b'', salt, prefix)


def _substitute_first_payload(i, key, aad, plaintext):
  """seal() for _craft: payload 0 holds other bytes of the same length; the
  file table still lists the digest of `plaintext`."""
  if i == 0:
    plaintext = b'E' * len(plaintext)
  return streaming.encrypt_bytes(SUITE, key, aad, plaintext)


def _substituted(keys, tmp_path):
  return _craft.craft(
      tmp_path / 'p', keys.pub('x'),
      [('saved_model.pb', b'the real graph'), ('variables/variables.index',
                                               b'index')],
      dirs=['variables'], signer_priv=keys.priv('ed'),
      seal=_substitute_first_payload)


def test_decrypt_checks_plaintext_digest(keys, tmp_path):
  """Kills: `_decrypt_payload` not comparing a payload's plaintext digest
  with the file table. The payload's ciphertext digest is the one the
  signed header names, so only the plaintext digest tells."""
  pkg = _substituted(keys, tmp_path)
  kw = {'identities': [keys.priv('x')], 'trusted': [keys.pub('ed')]}
  out = tmp_path / 'o'
  with pytest.raises(errors.TamperedPackageError, match='plaintext digest'):
    te.decrypt_model(pkg, out, **kw)
  _assert_nothing_at(out)
  with pytest.raises(errors.TamperedPackageError, match='plaintext digest'):
    dict(te.iter_decrypted_files(pkg, **kw))


def test_rotate_checks_plaintext_digest(keys, tmp_path):
  """Kills: rotate not comparing each re-encrypted file's plaintext digest
  with the file table: it would re-encrypt and re-sign a payload that is
  not the signed model's."""
  pkg = _substituted(keys, tmp_path)
  out = tmp_path / 'rotated'
  with pytest.raises(errors.TamperedPackageError, match='plaintext digest'):
    te.rotate_package(pkg, out, identities=[keys.priv('x')],
                      recipients=[keys.pub('x2')], trusted=[keys.pub('ed')],
                      signer=keys.priv('ed'))
  _assert_nothing_at(out)


# --- path rules ---------------------------------------------------------------

def test_dotdot_rule_refuses_dotdot_when_no_other_rule_does():
  """Kills: '..' accepted by the component rule of `check_relpath`. The
  parent of 'a/..' is listed, so only that rule can refuse it (in
  tests/format/test_path_rules.py another rule would refuse it too)."""
  with pytest.raises(errors.UnsafePathError, match='".." component'):
    paths.check_relpath('..')
  with pytest.raises(errors.UnsafePathError, match='".." component'):
    paths.check_tree(['a/..'], ['a'])
  with pytest.raises(errors.UnsafePathError, match='".." component'):
    paths.check_tree([], ['a', 'a/..'])
  # The reader's path: an (authenticated) file table naming 'a/..'.
  table = header_lib.canonical_json({
      'dirs': ['a'],
      'files': [{'path': 'a/..', 'size': 0, 'digest': '00' * 32}]})
  with pytest.raises(errors.UnsafePathError, match='".." component'):
    header_lib.decode_file_table(table, 1)
  # Control: the same shape with a plain name is accepted.
  assert paths.check_tree(['a/b'], ['a']) == ['a']


# --- stanza limits (FORMAT.md §11) --------------------------------------------

@pytest.mark.parametrize('field, at_limit, over', [
    ('type', {'type': 't' * 64}, {'type': 't' * 65}),
    ('key_id', {'key_id': 'k' * 1024}, {'key_id': 'k' * 1025}),
    ('body fields', {'body': {f'f{i}': '' for i in range(16)}},
     {'body': {f'f{i}': '' for i in range(17)}}),
    ('body field name', {'body': {'n' * 64: ''}}, {'body': {'n' * 65: ''}}),
    ('body field value', {'body': {'ct': 'v' * 16384}},
     {'body': {'ct': 'v' * 16385}}),
    ('empty type', {'type': 't'}, {'type': ''}),
    ('empty key_id', {'key_id': 'k'}, {'key_id': ''}),
])
def test_stanza_limits_are_exact(field, at_limit, over):
  """Kills: a stanza limit of the header parser moved by one (type 1-64,
  key id 1-1024 characters, 16 body fields, field name 64 and value 16 384
  characters): the documented bound is accepted, one more (or an empty
  type or key id) is refused; stanzas compare equal by content."""
  del field
  base = {'type': 'x25519-hpke', 'key_id': 'sha256:' + '0' * 64,
          'body': {'ct': 'AAAA'}}
  assert Stanza.from_json(dict(base, **at_limit)).to_json() == dict(
      base, **at_limit)
  with pytest.raises(errors.TamperedPackageError, match='stanza'):
    Stanza.from_json(dict(base, **over))
  assert Stanza.from_json(base) == Stanza.from_json(dict(base))
  assert Stanza.from_json(base) != Stanza.from_json(dict(base, **at_limit))


# --- the package on disk (`_Source`) ------------------------------------------

@pytest.mark.parametrize('count, tail', [(6, ' and 1 more]'), (5, ']')])
def test_unexpected_entries_in_package_dir_are_refused_and_listed(
    keys, model, tmp_path, count, tail):
  """Kills: `_Source._check_dir` misreporting the entries a package
  directory must not have: the first five, sorted, quoted and cut at 64
  characters, then "and N more" (one of these mutants, `+=` -> `-=`, made
  a directory with six extra entries raise TypeError instead of
  TamperedPackageError)."""
  pkg = tmp_path / 'p'
  te.encrypt_model(model, pkg, recipients=[keys.pub('x')])
  names = ['a' * 100] + [f'extra{i}' for i in range(count - 1)]
  for name in names:
    (pkg / name).write_bytes(b'')
  with pytest.raises(errors.TamperedPackageError) as ei:
    te.inspect_package(pkg)
  shown = ', '.join(_text.quoted(n, 64) for n in sorted(names)[:5])
  assert f'unexpected entries [{shown}{tail}' in str(ei.value)


def test_unsafe_path_errors_name_the_package_file(keys, model, tmp_path):
  """Kills: `_Source` naming the wrong file when it refuses a link: the
  bundle itself, a directory package's header, or (swapped after the
  first check) a payload file or the bundle when a payload is opened."""
  bundle = tmp_path / 'm.tfxe'
  te.encrypt_model(model, bundle, recipients=[keys.pub('x')], bundle=True)
  (tmp_path / 'link.tfxe').symlink_to(bundle)
  with pytest.raises(errors.UnsafePathError,
                     match='^bundle .*link.tfxe.* is a symbolic link'):
    te.inspect_package(tmp_path / 'link.tfxe')
  pkg = tmp_path / 'p'
  te.encrypt_model(model, pkg, recipients=[keys.pub('x')])
  header = pkg / package_lib.HEADER_NAME
  os.rename(header, tmp_path / 'header.bin')
  header.symlink_to(tmp_path / 'header.bin')
  with pytest.raises(errors.UnsafePathError,
                     match='^package header .* is a symbolic link'):
    te.inspect_package(pkg)
  # A payload file, or the bundle, swapped for a link after the package was
  # first checked: caught when it is opened for reading (FORMAT.md §2).
  os.replace(tmp_path / 'header.bin', header)
  src = package_lib._Source(str(pkg))  # pylint: disable=protected-access
  payload = pkg / package_lib.PAYLOAD_DIR / package_lib.payload_name(0)
  os.rename(payload, tmp_path / 'payload.bin')
  payload.symlink_to(tmp_path / 'payload.bin')
  with pytest.raises(errors.UnsafePathError,
                     match='^payload file .* is a symbolic link'):
    src.open_payload(0)
  src = package_lib._Source(str(bundle))  # pylint: disable=protected-access
  os.rename(bundle, tmp_path / 'bundle.bin')
  bundle.symlink_to(tmp_path / 'bundle.bin')
  with pytest.raises(errors.UnsafePathError,
                     match='^bundle .* is a symbolic link'):
    src.open_payload(0)


# --- key groups: a share is tagged with its group -----------------------------

def test_key_group_share_tag_must_match_group(keys, model, tmp_path):
  """Kills: `open_key_groups` not checking a share's x byte against its
  group (`share[-1] != gi + 1`). A DEK holder puts group 1's genuine share
  into group 2's stanza and re-MACs the header: combined with group 0's
  share it rebuilds the right DEK, so only the tag check refuses it."""
  pkg = tmp_path / 'p'
  te.encrypt_model(model, pkg, threshold=2, key_groups=[
      [keys.pub('x')], [keys.pub('x2')], [keys.pub('rsa')]])
  h = _read_header(pkg)
  assert h.threshold.groups == [[0], [1], [2]]
  pid, ctx = h.package_id, h.context
  share0 = local.LocalKey(keys.priv('x')).unwrap(
      h.recipients[0], package_lib.share_context(pid, ctx, 0))
  share1 = local.LocalKey(keys.priv('x2')).unwrap(
      h.recipients[1], package_lib.share_context(pid, ctx, 1))
  assert (share0[-1], share1[-1]) == (1, 2)
  dek = shamir.combine([share0, share1])
  h.recipients[2] = local.LocalKey(keys.pub('rsa')).wrap(
      share1, package_lib.share_context(pid, ctx, 2))
  package_lib.seal_header(h, header_lib.DerivedKeys(dek, pid, h.suite).mac_key,
                          None)
  _write_header(pkg, h)
  # Control: groups 0 and 1 are untouched and still open the package.
  te.decrypt_model(pkg, tmp_path / 'ok', allow_unsigned=True,
                   identities=[keys.priv('x'), keys.priv('x2')])
  out = tmp_path / 'o'
  with pytest.raises(errors.TamperedPackageError, match='key group 2'):
    te.decrypt_model(pkg, out, allow_unsigned=True,
                     identities=[keys.priv('x'), keys.priv('rsa')])
  _assert_nothing_at(out)


# --- unwrapping: every stanza an identity matches, every identity -------------

def _stanza_variants(h, keys):
  """(bad stanza, good stanza) for x: the bad one fails to authenticate."""
  good = h.recipients[0]
  ct = bytearray(base64.b64decode(good.body['ct']))
  ct[-1] ^= 1
  return {
      # the key cannot open it: TamperedPackageError from the backend
      'fails-authentication': Stanza(good.type, good.key_id, {
          'ct': base64.b64encode(bytes(ct)).decode('ascii')}),
      # the key does not understand it: NoMatchingKeyError from the backend
      'unknown-body': Stanza(good.type, good.key_id,
                             dict(good.body, extra='x')),
  }


@pytest.mark.parametrize('bad', ['fails-authentication', 'unknown-body'])
def test_unwrap_tries_every_stanza_an_identity_matches(keys, model, tmp_path,
                                                       bad):
  """Kills: `_UnwrapAttempts.first` giving up on an identity after the
  first stanza it matches fails (`continue` -> `break` after a
  TamperedPackageError or a NoMatchingKeyError from the backend). FORMAT.md
  §10 step 3: each identity tries each stanza it matches, and the first DEK
  whose commitment matches wins (here a DEK holder put a stanza for the
  same key that it cannot open before the good one, and re-MACed)."""
  pkg = tmp_path / 'p'
  te.encrypt_model(model, pkg, recipients=[keys.pub('x')])
  h = _read_header(pkg)
  dek = local.LocalKey(keys.priv('x')).unwrap(
      h.recipients[0], WrapContext(h.package_id, h.context))
  h.recipients = [_stanza_variants(h, keys)[bad], h.recipients[0]]
  package_lib.seal_header(
      h, header_lib.DerivedKeys(dek, h.package_id, h.suite).mac_key, None)
  _write_header(pkg, h)
  te.decrypt_model(pkg, tmp_path / 'o', identities=[keys.priv('x')],
                   allow_unsigned=True)
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)


def test_no_matching_key_names_identities_and_recipients(keys, model,
                                                         tmp_path):
  """Kills: `unwrap_data_key` dropping what its NoMatchingKeyError reports
  (the identities tried, and the key ids the package is encrypted for):
  the only clue an operator has for which key to use."""
  pkg = tmp_path / 'p'
  te.encrypt_model(model, pkg, recipients=[keys.pub('x'), keys.pub('rsa')])
  with pytest.raises(errors.NoMatchingKeyError) as ei:
    te.decrypt_model(pkg, tmp_path / 'o', identities=[keys.priv('x2')],
                     allow_unsigned=True)
  message = str(ei.value)
  assert local.LocalKey(keys.pub('x2')).key_id in message
  assert (f"{local.LocalKey(keys.pub('x')).key_id}, "
          f"{local.LocalKey(keys.pub('rsa')).key_id}") in message


def test_too_few_key_groups_names_the_groups_opened(keys, model, tmp_path):
  """Kills: `open_key_groups` misreporting, when fewer than k key groups
  opened, the identities tried and the groups they opened ("open key
  groups: 0, 2", or "none")."""
  pkg = tmp_path / 'p'
  te.encrypt_model(model, pkg, threshold=3, key_groups=[
      [keys.pub('x')], [keys.pub('x2')], [keys.pub('rsa')]])
  with pytest.raises(errors.NoMatchingKeyError,
                     match='3 of 3 key groups needed, got 2') as ei:
    te.decrypt_model(pkg, tmp_path / 'o', allow_unsigned=True,
                     identities=[keys.priv('x'), keys.priv('rsa')])
  assert 'open key groups: 0, 2.' in str(ei.value)
  assert local.LocalKey(keys.pub('rsa')).key_id in str(ei.value)
  local.keygen('x25519', str(tmp_path / 'stranger'))
  with pytest.raises(errors.NoMatchingKeyError,
                     match='3 of 3 key groups needed, got 0') as ei:
    te.decrypt_model(pkg, tmp_path / 'o', allow_unsigned=True,
                     identities=[str(tmp_path / 'stranger.key.pem')])
  assert 'open key groups: none.' in str(ei.value)


class _DownKms:
  """Packages with a stanza for a real AWS KMS key (moto's KMS server,
  behind a counting proxy), made while it ran; the server is then stopped,
  so every call to it fails (BackendUnavailableError)."""

  def __init__(self, tmp, keys, model, monkeypatch):
    from tests.fakes import backends as fx  # pylint: disable=g-import-not-at-top
    server = fx.start_moto()
    self.env = fx.AwsEnv(server)
    try:
      self.env.apply(monkeypatch)
      self.kms = self.env.create_key()
      self.grouped = tmp / 'grouped'
      te.encrypt_model(model, self.grouped, threshold=2, key_groups=[
          [self.kms], [keys.pub('x')], [keys.pub('x2')]])
      self.plain = tmp / 'plain'
      te.encrypt_model(model, self.plain, recipients=[self.kms,
                                                      keys.pub('x')])
    finally:
      server.stop()

  def kms_calls(self):
    return self.env.counts().get('Decrypt', 0)


@pytest.fixture(scope='module')
def down_kms(tmp_path_factory, keys, model):
  with pytest.MonkeyPatch.context() as mp:
    kms = _DownKms(tmp_path_factory.mktemp('kms'), keys, model, mp)
    try:
      yield kms
    finally:
      kms.env.close()


@pytest.mark.integration
def test_unreachable_backend_is_skipped_in_later_key_groups(
    keys, model, tmp_path, down_kms, fast_retry):
  """Kills: `_UnwrapAttempts.first` stopping at an identity whose backend
  already failed (`continue` -> `break`): the identities after it must
  still open the later key groups, so a recovery key opens the package
  while the production KMS is down."""
  del fast_retry  # short backoffs for the failing KMS calls
  te.decrypt_model(down_kms.grouped, tmp_path / 'o', allow_unsigned=True,
                   identities=[down_kms.kms, keys.priv('x'),
                               keys.priv('x2')])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)
  # Control: without the second recovery key the KMS error is reported.
  with pytest.raises(errors.BackendUnavailableError):
    te.decrypt_model(down_kms.grouped, tmp_path / 'o2', allow_unsigned=True,
                     identities=[down_kms.kms, keys.priv('x')])


@pytest.mark.integration
def test_failed_backend_is_not_called_again(keys, model, tmp_path, down_kms,
                                            fast_retry):
  """Kills: `_UnwrapAttempts.first` going on with the other stanzas of an
  identity whose backend just failed (`break` -> `continue` after a
  KeyBackendError): a KMS that is down costs one call (with its retries)
  per decryption, however many stanzas name its key (here a DEK holder
  listed the KMS stanza twice and re-MACed)."""
  del fast_retry
  two = tmp_path / 'two'
  shutil.copytree(down_kms.plain, two)
  h = _read_header(two)
  dek = local.LocalKey(keys.priv('x')).unwrap(
      h.recipients[1], WrapContext(h.package_id, h.context))
  h.recipients = [h.recipients[0], h.recipients[0], h.recipients[1]]
  package_lib.seal_header(
      h, header_lib.DerivedKeys(dek, h.package_id, h.suite).mac_key, None)
  _write_header(two, h)

  def kms_calls(pkg, out):
    before = down_kms.kms_calls()
    te.decrypt_model(pkg, out, identities=[down_kms.kms, keys.priv('x')],
                     allow_unsigned=True)
    assert _util.read_tree(out) == _util.read_tree(model)
    return down_kms.kms_calls() - before

  calls = kms_calls(down_kms.plain, tmp_path / 'o1')
  assert calls >= 1
  assert kms_calls(two, tmp_path / 'o2') == calls


# --- serve-sync: a trust list means signed packages only ----------------------

def test_serve_sync_refuses_unsigned_package_when_trust_is_given(
    keys, model, tmp_path):
  """Kills: sync_serving/_install decrypting with allow_unsigned=True (or
  dropping `trusted`), i.e. installing an unsigned package although a trust
  list was given and allow_unsigned was not."""
  source = tmp_path / 'push'
  source.mkdir()
  te.encrypt_model(model, source / V1, recipients=[keys.pub('x')],
                   signer=keys.priv('ed'))
  te.encrypt_model(model, source / V2, recipients=[keys.pub('x')])
  te.encrypt_model(model, source / (V3 + '.tfxe'), recipients=[keys.pub('x')],
                   bundle=True)
  serving_base = tmp_path / 'serving'
  result = serving.sync_serving(source, serving_base,
                                identities=[keys.priv('x')],
                                trusted=[keys.pub('ed')], keep=1)
  assert [(a.action, a.version) for a in result.actions] == [
      ('failed', V3), ('failed', V2), ('installed', V1)]
  assert {a.error for a in result.failed} == {'UntrustedSignerError'}
  assert sorted(n for n in os.listdir(serving_base) if n.isdigit()) == [V1]
  assert set(serving.read_marker(str(serving_base))) == {V1}
  assert result.installed[0].signer == local.LocalKey(keys.pub('ed')).key_id

  # The CLI the same way (`--trust` without `--allow-unsigned`).
  p = subprocess.run(
      [sys.executable, '-m', 'tfx_encrypt', 'serve-sync', str(source),
       str(tmp_path / 'serving2'), '--identity', keys.priv('x'), '--trust',
       keys.pub('ed'), '--keep', '1', '--once', '--json'],
      capture_output=True, text=True, timeout=120, check=False)
  assert p.returncode == 1, p.stderr
  doc = json.loads(p.stdout)
  assert [(a['action'], a['version'], a.get('error'))
          for a in doc['actions']] == [
              ('failed', V3, 'UntrustedSignerError'),
              ('failed', V2, 'UntrustedSignerError'),
              ('installed', V1, None)]
  assert sorted(n for n in os.listdir(tmp_path / 'serving2')
                if n.isdigit()) == [V1]


# --- OCI pull: the manifest config must describe the package ------------------

def _upload_blob(registry, repo, data):
  digest = f'sha256:{hashlib.sha256(data).hexdigest()}'
  req = urllib.request.Request(
      f'http://{registry.host}/v2/{repo}/blobs/uploads/', method='POST',
      data=b'')
  with urllib.request.urlopen(req, timeout=10) as r:
    loc = r.headers['Location']
  if loc.startswith('/'):
    loc = f'http://{registry.host}{loc}'
  req = urllib.request.Request(
      f'{loc}{"&" if "?" in loc else "?"}digest={digest}', method='PUT',
      data=data, headers={'Content-Type': 'application/octet-stream'})
  urllib.request.urlopen(req, timeout=10).read()
  return digest


@pytest.mark.integration
def test_oci_pull_compares_config_facts_with_package(keys, model, tmp_path,
                                                     tmp_path_factory):
  """Kills: pull_package not comparing the manifest config's facts with the
  verified package. A registry (or anyone who can push a manifest) may not
  relabel a genuine, signed package: another fingerprint, package id,
  signer, recipient list, cipher or format version in the config is
  refused, and nothing is published."""
  from tests.distribution import test_oci  # pylint: disable=g-import-not-at-top
  src = tmp_path / 'm.tfxe'
  te.encrypt_model(model, src, recipients=[keys.pub('x')],
                   signer=keys.priv('ed'), bundle=True)
  other_model = _util.make_tree(tmp_path / 'other', {'saved_model.pb': 901})
  other = te.encrypt_model(other_model, tmp_path / 'other.tfxe',
                           recipients=[keys.pub('x2')],
                           signer=keys.priv('evil'), bundle=True,
                           cipher='chacha20-poly1305')
  edits = {
      'fingerprint': other.fingerprint,
      'package_id': other.package_id,
      'signer_key_id': other.signer,
      'recipient_key_ids': [r['key_id'] for r in other.recipients],
      'cipher': other.cipher,
      'format_version': header_lib.FORMAT_VERSION - 1,
  }
  running_registry = test_oci._running_registry  # pylint: disable=protected-access
  with running_registry(tmp_path_factory.mktemp('reg')) as registry:
    ref = registry.ref('models/facts:1')
    oci.push_package(src, ref, insecure=True)
    manifest = registry.manifest('models/facts', '1')
    facts = json.loads(registry.blob('models/facts',
                                     manifest['config']['digest']))
    assert facts == oci.config_facts(te.inspect_package(src))
    out = tmp_path / 'pulled.tfxe'
    # Control: the genuine config pulls.
    oci.pull_package(ref, out, trusted=[keys.pub('ed')], insecure=True)
    os.unlink(out)
    for n, (field, value) in enumerate(sorted(edits.items())):
      assert facts[field] != value, field
      config = oci._canonical(dict(facts, **{field: value}))  # pylint: disable=protected-access
      digest = _upload_blob(registry, 'models/facts', config)
      test_oci._put_manifest(  # pylint: disable=protected-access
          registry, 'models/facts', f'edit{n}',
          dict(manifest, config=dict(manifest['config'], digest=digest,
                                     size=len(config))))
      with pytest.raises(errors.TamperedPackageError,
                         match='manifest config does not describe'):
        oci.pull_package(registry.ref(f'models/facts:edit{n}'), out,
                         trusted=[keys.pub('ed')], insecure=True)
      _assert_nothing_at(out)


def test_pipelines_only_while_fewer_large_files_than_cores(monkeypatch):
  """Large files get a pipeline of threads only while fewer of them than
  cores run at once; small files and files far smaller than the largest
  do not count (docs/BENCHMARKS.md)."""
  from tfx_encrypt.package import _streams
  monkeypatch.setattr(_streams.os, 'cpu_count', lambda: 2)
  mib = 1 << 20
  help_ = _streams.pipelines_help
  assert help_([1024 * mib], 4)  # one big shard: use both cores
  assert help_([1024 * mib, 10 * mib], 4)  # plus a small asset
  assert help_([1024 * mib] + [mib] * 100, 4)  # plus many small files
  assert not help_([256 * mib] * 4, 4)  # the files fill the cores
  assert not help_([256 * mib] * 2, 4)
  assert help_([256 * mib] * 4, 1)  # one at a time: pipeline each
  assert help_([], 4) and help_([mib], 4)
