"""k-of-n key groups (docs/FORMAT.md §7.1): Shamir-split data key.

Local keys only. Covers round trips for every pair of groups, too few
groups, the number of unwrap calls, tampering with stanzas, group indices,
the threshold and forged shares, signed and bundle packages, rotate, rewrap
and the CLI.
"""

import itertools
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt import package as pkg_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.keys import local
from tfx_encrypt.keys import shamir
from tests import _util

TYPED = (errors.TamperedPackageError, errors.UnsupportedFormatError,
         errors.UntrustedSignerError, errors.NoMatchingKeyError,
         errors.UnsafePathError)


class _Keys:
  """x25519 keys a..f, one RSA key and an Ed25519 signer."""

  def __init__(self, d):
    self.dir = str(d)
    for name in 'abcdef':
      local.keygen('x25519', os.path.join(self.dir, name))
    local.keygen('rsa', os.path.join(self.dir, 'rsa'))
    local.keygen('ed25519', os.path.join(self.dir, 'ed'))

  def pub(self, name):
    return os.path.join(self.dir, name + '.pub.pem')

  def priv(self, name):
    return os.path.join(self.dir, name + '.key.pem')

  def key_id(self, name):
    return local.LocalKey(self.pub(name)).key_id


# Group 0: a, rsa; group 1: b; group 2: c, d.
GROUPS = (('a', 'rsa'), ('b',), ('c', 'd'))


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  d = tmp_path_factory.mktemp('model')
  return _util.make_tree(d / 'm', {
      'saved_model.pb': 900,
      'variables/variables.index': 300,
      'variables/variables.data-00000-of-00001': (1 << 20) + 77,
      'assets/vocab.txt': b'a\nb\n',
  })


def _groups(keys, groups=GROUPS):
  return [[keys.pub(n) for n in g] for g in groups]


@pytest.fixture(scope='module')
def grouped(tmp_path_factory, keys, model):
  d = tmp_path_factory.mktemp('pkg')
  te.encrypt_model(model, d / 'p', key_groups=_groups(keys), threshold=2,
                   context={'model': 'm'})
  te.encrypt_model(model, d / 's.tfxe', key_groups=_groups(keys), threshold=2,
                   signer=keys.priv('ed'), bundle=True)
  te.encrypt_model(model, d / 'k3', key_groups=_groups(keys), threshold=3)
  return d


def _copy(src, dst):
  if os.path.isdir(src):
    shutil.copytree(src, dst)
  else:
    shutil.copyfile(src, dst)
  return dst


def _decrypt(pkg, out, keys, names, **kw):
  kw.setdefault('allow_unsigned', True)
  return te.decrypt_model(pkg, out, identities=[keys.priv(n) for n in names],
                          **kw)


def _assert_rejected(pkg, out, keys, names=('a', 'b', 'c'), expect=TYPED, **kw):
  with pytest.raises(expect) as ei:
    _decrypt(pkg, out, keys, names, **kw)
  assert not os.path.lexists(out), 'output must not exist after a failure'
  assert _util.leftovers(os.path.dirname(str(out)),
                         os.path.basename(str(out))) == []
  return ei.value


def _body(pkg_dir):
  data = (pkg_dir / 'tfxe.header').read_bytes()
  (blen,) = struct.unpack('>I', data[8:12])
  return json.loads(data[12:12 + blen])


def _rewrite_body(pkg_dir, edit):
  """Re-serialise the header body after `edit(obj)`, keeping MAC and sig."""
  hp = pkg_dir / 'tfxe.header'
  data = hp.read_bytes()
  (blen,) = struct.unpack('>I', data[8:12])
  obj = json.loads(data[12:12 + blen])
  edit(obj)
  body = header_lib.canonical_json(obj)
  hp.write_bytes(header_lib.MAGIC + struct.pack('>I', len(body)) + body +
                 data[12 + blen:])


# --- Shamir helpers -----------------------------------------------------------

@pytest.mark.parametrize('n,k', [(2, 2), (3, 2), (5, 3), (16, 16)])
def test_split_key_shares_combine_and_interpolate(n, k):
  secret = os.urandom(32)
  shares = pkg_lib.split_key(secret, n, k)
  assert [s[-1] for s in shares] == list(range(1, n + 1))
  assert all(len(s) == pkg_lib.SHARE_SIZE for s in shares)
  subsets = list(itertools.combinations(range(n), k))[:40]
  for subset in subsets:
    picked = [shares[i] for i in subset]
    assert shamir.combine(picked) == secret
    assert shamir.interpolate(picked, 0) == secret + b'\0'
    for i in range(n):  # any k shares give every other share
      assert shamir.interpolate(picked, i + 1) == shares[i]
  if k > 2:
    assert shamir.combine(shares[:k - 1]) != secret


def test_split_key_bounds():
  for n, k in [(3, 1), (2, 3), (17, 2), (1, 1)]:
    with pytest.raises(errors.UsageError):
      pkg_lib.split_key(b'x' * 32, n, k)


# --- round trips --------------------------------------------------------------

def test_two_of_three_every_pair_of_groups(tmp_path, keys, model, grouped):
  want = _util.read_tree(model)
  for n, (g1, g2) in enumerate(itertools.combinations(range(3), 2)):
    for m1, m2 in itertools.product(GROUPS[g1], GROUPS[g2]):
      out = tmp_path / f'o{n}{m1}{m2}'
      _decrypt(grouped / 'p', out, keys, [m1, m2])
      assert _util.read_tree(out) == want


def test_header_records_groups(grouped, keys):
  info = te.inspect_package(grouped / 'p')
  assert info.threshold == {
      'k': 2, 'groups': [[keys.key_id(n) for n in g] for g in GROUPS]}
  body = _body(grouped / 'p')
  assert body['threshold'] == {'k': 2, 'groups': [[0, 1], [2], [3, 4]]}
  assert [r['key_id'] for r in body['recipients']] == [
      keys.key_id(n) for g in GROUPS for n in g]


def test_ungrouped_header_has_null_threshold(tmp_path, keys, model):
  info = te.encrypt_model(model, tmp_path / 'p', recipients=[keys.pub('a')])
  assert info.threshold is None
  assert _body(tmp_path / 'p')['threshold'] is None
  assert b'"threshold":null' in (tmp_path / 'p' / 'tfxe.header').read_bytes()


@pytest.mark.parametrize('names', [('a',), ('a', 'rsa'), ('c', 'd'),
                                   ('b', 'e'), ('e', 'f')])
def test_one_group_is_not_enough(tmp_path, keys, grouped, names):
  e = _assert_rejected(grouped / 'p', tmp_path / 'o', keys, names,
                       expect=errors.NoMatchingKeyError)
  got = 0 if set(names) == {'e', 'f'} else 1
  assert f'2 of 3 key groups needed, got {got}' in str(e)


def test_all_groups_make_at_most_k_unwraps(tmp_path, keys, model, grouped):
  idents = [_util.CountingKey(local.LocalKey(keys.priv(n)))
            for n in ('a', 'rsa', 'b', 'c', 'd')]
  te.decrypt_model(grouped / 'p', tmp_path / 'o', identities=idents,
                   allow_unsigned=True)
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)
  assert sum(i.ok for i in idents) == 2
  assert sum(i.calls for i in idents) == 2
  idents = [_util.CountingKey(local.LocalKey(keys.priv(n))) for n in 'abcd']
  te.decrypt_model(grouped / 'k3', tmp_path / 'o3', identities=idents,
                   allow_unsigned=True)
  assert sum(i.ok for i in idents) == 3 and sum(i.calls for i in idents) == 3


def test_three_of_three(tmp_path, keys, model, grouped):
  _decrypt(grouped / 'k3', tmp_path / 'o', keys, ['rsa', 'b', 'd'])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)
  e = _assert_rejected(grouped / 'k3', tmp_path / 'o2', keys, ['a', 'b'],
                       expect=errors.NoMatchingKeyError)
  assert '3 of 3 key groups needed, got 2' in str(e)


def test_signed_bundle_verifies_and_decrypts(tmp_path, keys, model, grouped):
  info = te.verify_package(grouped / 's.tfxe', trusted=[keys.pub('ed')])
  assert info.signature_verified and info.bundle
  info = _decrypt(grouped / 's.tfxe', tmp_path / 'o', keys, ['b', 'd'],
                  trusted=[keys.pub('ed')], allow_unsigned=False)
  assert info.signature_verified and info.threshold['k'] == 2
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)
  files = dict(te.iter_decrypted_files(
      grouped / 's.tfxe', identities=[keys.priv('a'), keys.priv('c')],
      trusted=[keys.pub('ed')]))
  assert files['saved_model.pb'] == _util.read_tree(model)['saved_model.pb']


# --- usage errors -------------------------------------------------------------

@pytest.mark.parametrize('kwargs', [
    {'key_groups': [['a'], ['b']], 'threshold': 2, 'recipients': ['c']},
    {'key_groups': [['a'], ['b']]},
    {'key_groups': [['a'], ['b']], 'threshold': 3},
    {'key_groups': [['a'], ['b']], 'threshold': 1},
    {'key_groups': [['a'], ['b']], 'threshold': True},
    {'key_groups': [['a']], 'threshold': 2},
    {'key_groups': [['a'], []], 'threshold': 2},
    {'key_groups': [['a'], ['a', 'b']], 'threshold': 2},
    {'key_groups': [[n] for n in 'abcdef' * 3], 'threshold': 2},
    {'recipients': ['a'], 'threshold': 2},
])
def test_usage_errors(tmp_path, keys, model, kwargs):
  kw = dict(kwargs)
  if 'key_groups' in kw:
    kw['key_groups'] = [[keys.pub(n) for n in g] for g in kw['key_groups']]
  if 'recipients' in kw:
    kw['recipients'] = [keys.pub(n) for n in kw['recipients']]
  with pytest.raises(errors.UsageError):
    te.encrypt_model(model, tmp_path / 'p', **kw)
  assert not os.path.lexists(tmp_path / 'p')


# --- tampering ----------------------------------------------------------------

def _swap_stanzas(i, j):
  def edit(o):
    r = o['recipients']
    r[i], r[j] = r[j], r[i]
  return edit


def _set_threshold(value):
  def edit(o):
    o['threshold'] = value
  return edit


def _set_k(k):
  def edit(o):
    o['threshold']['k'] = k
  return edit


@pytest.mark.parametrize('edit,names', [
    # a's share moved into group 1's slot, b's into group 0's.
    (_swap_stanzas(0, 2), ('a', 'b', 'c')),
    # c's stanza (group 2) swapped with rsa's (group 0).
    (_swap_stanzas(1, 3), ('rsa', 'c')),
    # group indices swapped: stanzas 0,1 claim group 1, stanza 2 group 0.
    (_set_threshold({'k': 2, 'groups': [[2], [0, 1], [3, 4]]}),
     ('a', 'b', 'c')),
    # rsa moved from group 0 to group 2 (a and c still open their groups:
    # the DEK is right, so the header MAC catches the change).
    (_set_threshold({'k': 2, 'groups': [[0], [2], [1, 3, 4]]}), ('a', 'c')),
    (_set_threshold({'k': 2, 'groups': [[0], [2], [1, 3, 4]]}), ('rsa', 'c')),
    # k raised: three shares still give the DEK; the MAC catches it.
    (_set_k(3), ('a', 'b', 'c')),
    # groups dropped: each stanza is then read as a whole DEK wrap.
    (_set_threshold(None), ('a', 'b', 'c')),
])
def test_tampered_groups(tmp_path, keys, grouped, edit, names):
  pkg = _copy(grouped / 'p', tmp_path / 'p')
  _rewrite_body(pkg, edit)
  e = _assert_rejected(pkg, tmp_path / 'o', keys, names)
  assert isinstance(e, errors.TamperedPackageError), e


def test_lowered_k_fails_key_commitment(tmp_path, keys, grouped):
  pkg = _copy(grouped / 'k3', tmp_path / 'p')
  _rewrite_body(pkg, _set_k(2))
  e = _assert_rejected(pkg, tmp_path / 'o', keys, ['a', 'b'],
                       expect=errors.TamperedPackageError)
  assert 'commitment' in str(e)


@pytest.mark.parametrize('bad', [
    {'k': 1, 'groups': [[0, 1], [2], [3, 4]]},
    {'k': 4, 'groups': [[0, 1], [2], [3, 4]]},
    {'k': True, 'groups': [[0, 1], [2], [3, 4]]},
    {'k': 2, 'groups': [[0, 1], [2], [3]]},           # stanza 4 in no group
    {'k': 2, 'groups': [[0, 1], [2, 1], [3, 4]]},     # not ascending, twice
    {'k': 2, 'groups': [[0, 1], [2, 2], [3, 4]]},
    {'k': 2, 'groups': [[0, 1], [], [2, 3, 4]]},
    {'k': 2, 'groups': [[0, 1, 2, 3, 4]]},
    {'k': 2, 'groups': [[0, 1], [2], [3, 5]]},
    {'k': 2, 'groups': [[0, 1], [2], [3, '4']]},
    {'k': 2, 'groups': [[0, 1], [2], [3, 4]], 'x': 1},
    {'k': 2},
    [2, [[0, 1], [2], [3, 4]]],
    2,
])
def test_malformed_threshold_rejected_by_parser(tmp_path, keys, grouped, bad):
  pkg = _copy(grouped / 'p', tmp_path / 'p')
  _rewrite_body(pkg, _set_threshold(bad))
  with pytest.raises(errors.TamperedPackageError):
    te.inspect_package(pkg)
  _assert_rejected(pkg, tmp_path / 'o', keys,
                   expect=errors.TamperedPackageError)


def test_missing_threshold_field_rejected(tmp_path, keys, grouped):
  pkg = _copy(grouped / 'p', tmp_path / 'p')
  _rewrite_body(pkg, lambda o: o.pop('threshold'))
  with pytest.raises(errors.TamperedPackageError):
    te.inspect_package(pkg)


@pytest.mark.parametrize('share', ['right-x', 'random', 'short'])
def test_forged_share_is_tampered(tmp_path, keys, grouped, share):
  """A stanza wrapping a forged share for a real recipient (c, group 2)."""
  pkg = _copy(grouped / 'p', tmp_path / 'p')
  with open(pkg / 'tfxe.header', 'rb') as f:
    h, _ = header_lib.Header.read(f)
  data = {'right-x': os.urandom(32) + b'\x03', 'random': os.urandom(33),
          'short': os.urandom(32)}[share]
  forged = local.LocalKey(keys.pub('c')).wrap(
      data, pkg_lib.share_context(h.package_id, h.context, 2))
  _rewrite_body(pkg, lambda o: o['recipients'].__setitem__(3, forged.to_json()))
  e = _assert_rejected(pkg, tmp_path / 'o', keys, ['a', 'c'],
                       expect=errors.TamperedPackageError)
  if share == 'right-x':
    assert 'commitment' in str(e)


def test_bit_flips_in_grouped_header(tmp_path, keys, grouped):
  src = grouped / 's.tfxe'
  data = src.read_bytes()
  (blen,) = struct.unpack('>I', data[8:12])
  (slen,) = struct.unpack('>I', data[12 + blen + 32:12 + blen + 36])
  hlen = 12 + blen + 36 + slen
  body = data[12:12 + blen]
  offs = set(range(0, hlen, max(1, hlen // 60)))
  # Every byte of the threshold object and a few in each stanza.
  at = body.index(b'"threshold":')
  offs.update(12 + at + i for i in range(len(b'"threshold":{"groups":'
                                              b'[[0,1],[2],[3,4]],"k":2}')))
  at = body.index(b'"recipients":')
  offs.update(12 + at + i for i in range(0, 2000, 97))
  offs = {o for o in offs if o < hlen} | {hlen - 1}
  for n, off in enumerate(sorted(offs)):
    p = tmp_path / f'p{n}.tfxe'
    buf = bytearray(data)
    buf[off] ^= 1 << (n % 8)
    p.write_bytes(bytes(buf))
    _assert_rejected(p, tmp_path / f'o{n}', keys, ['a', 'b', 'c'],
                     trusted=[keys.pub('ed')], allow_unsigned=False)
  # Unsigned: the MAC, key commitment and share bindings alone.
  hdata = (grouped / 'p' / 'tfxe.header').read_bytes()
  (blen,) = struct.unpack('>I', hdata[8:12])
  body = hdata[12:12 + blen]
  at = body.index(b'"threshold":')
  offs = set(range(0, len(hdata), max(1, len(hdata) // 40)))
  offs.update(12 + at + i for i in range(40))
  at = body.index(b'"recipients":')
  offs.update(12 + at + i for i in range(0, 2000, 89))
  for n, off in enumerate(sorted(o for o in offs if o < len(hdata))):
    p = tmp_path / f'u{n}'
    shutil.copytree(grouped / 'p', p)
    buf = bytearray(hdata)
    buf[off] ^= 1 << ((n * 3) % 8)
    (p / 'tfxe.header').write_bytes(bytes(buf))
    _assert_rejected(p, tmp_path / f'uo{n}', keys, ['a', 'b', 'c'])


# --- rotate -------------------------------------------------------------------

def test_rotate_into_and_out_of_groups(tmp_path, keys, model):
  te.encrypt_model(model, tmp_path / 'p', recipients=[keys.pub('a')],
                   signer=keys.priv('ed'))
  info = te.rotate_package(
      tmp_path / 'p', tmp_path / 'q', identities=[keys.priv('a')],
      trusted=[keys.pub('ed')], key_groups=[[keys.pub('b')], [keys.pub('c')],
                                       [keys.pub('d'), keys.pub('e')]],
      threshold=2, signer=keys.priv('ed'))
  assert info.threshold['k'] == 2 and len(info.threshold['groups']) == 3
  _decrypt(tmp_path / 'q', tmp_path / 'o', keys, ['c', 'e'],
           trusted=[keys.pub('ed')], allow_unsigned=False)
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)
  _assert_rejected(tmp_path / 'q', tmp_path / 'o1', keys, ['a', 'b'],
                   expect=errors.NoMatchingKeyError, trusted=[keys.pub('ed')])
  # ... and back to plain recipients.
  info = te.rotate_package(tmp_path / 'q', tmp_path / 'r',
                           identities=[keys.priv('b'), keys.priv('d')],
                           trusted=[keys.pub('ed')], recipients=[keys.pub('f')])
  assert info.threshold is None
  _decrypt(tmp_path / 'r', tmp_path / 'o2', keys, ['f'])
  assert _util.read_tree(tmp_path / 'o2') == _util.read_tree(model)
  with pytest.raises(errors.UsageError):
    te.rotate_package(tmp_path / 'r', tmp_path / 's',
                      identities=[keys.priv('f')], allow_unsigned=True,
                      recipients=[keys.pub('a')],
                      key_groups=[[keys.pub('b')], [keys.pub('c')]],
                      threshold=2)
  assert not os.path.lexists(tmp_path / 's')


# --- rewrap -------------------------------------------------------------------

def test_rewrap_add_to_group_not_opened(tmp_path, keys, model, grouped):
  """Identities of groups 0 and 2 add e to group 1 (share interpolated)."""
  pkg = _copy(grouped / 'p', tmp_path / 'p')
  payload_before = (pkg / 'payload' / '00000000').read_bytes()
  info = te.rewrap_package(pkg, identities=[keys.priv('a'), keys.priv('c')],
                           add_recipients=[keys.pub('e')], add_to_group=1,
                           allow_unsigned=True)
  assert info.threshold['groups'][1] == [keys.key_id('b'), keys.key_id('e')]
  assert (pkg / 'payload' / '00000000').read_bytes() == payload_before
  assert _body(pkg)['threshold'] == {'k': 2,
                                     'groups': [[0, 1], [2, 3], [4, 5]]}
  _decrypt(pkg, tmp_path / 'o', keys, ['e', 'd'])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)
  e = _assert_rejected(pkg, tmp_path / 'o2', keys, ['b', 'e'],
                       expect=errors.NoMatchingKeyError)
  assert 'got 1' in str(e)


def test_rewrap_remove_keeps_groups_non_empty(tmp_path, keys, model, grouped):
  pkg = _copy(grouped / 'p', tmp_path / 'p')
  before = (pkg / 'tfxe.header').read_bytes()
  with pytest.raises(errors.UsageError, match='group 1 with no recipient'):
    te.rewrap_package(pkg, identities=[keys.priv('a'), keys.priv('c')],
                      remove_recipients=[keys.pub('b')], allow_unsigned=True)
  assert (pkg / 'tfxe.header').read_bytes() == before
  info = te.rewrap_package(pkg, identities=[keys.priv('b'), keys.priv('c')],
                           remove_recipients=[keys.pub('rsa'),
                                              keys.key_id('d')],
                           allow_unsigned=True)
  assert info.threshold['groups'] == [[keys.key_id('a')], [keys.key_id('b')],
                                      [keys.key_id('c')]]
  assert _body(pkg)['threshold']['groups'] == [[0], [1], [2]]
  _decrypt(pkg, tmp_path / 'o', keys, ['a', 'c'])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)
  _assert_rejected(pkg, tmp_path / 'o2', keys, ['rsa', 'd'],
                   expect=errors.NoMatchingKeyError)
  # Replacing the sole member of a group in one step is fine.
  te.rewrap_package(pkg, identities=[keys.priv('a'), keys.priv('c')],
                    remove_recipients=[keys.pub('b')],
                    add_recipients=[keys.pub('f')], add_to_group=1,
                    allow_unsigned=True)
  _decrypt(pkg, tmp_path / 'o3', keys, ['f', 'a'])


@pytest.mark.parametrize('kwargs,match', [
    ({'add_recipients': ['e']}, 'add-to-group'),
    ({'add_recipients': ['e'], 'add_to_group': 3}, 'add-to-group'),
    ({'add_recipients': ['e'], 'add_to_group': -1}, 'add-to-group'),
    ({'add_recipients': ['c'], 'add_to_group': 0}, 'only one group'),
])
def test_rewrap_usage_errors(tmp_path, keys, grouped, kwargs, match):
  pkg = _copy(grouped / 'p', tmp_path / 'p')
  before = (pkg / 'tfxe.header').read_bytes()
  kw = dict(kwargs)
  kw['add_recipients'] = [keys.pub(n) for n in kw['add_recipients']]
  idents = [_util.CountingKey(local.LocalKey(keys.priv(n))) for n in 'ab']
  with pytest.raises(errors.UsageError, match=match):
    te.rewrap_package(pkg, identities=idents, allow_unsigned=True, **kw)
  assert sum(i.calls for i in idents) == 0  # refused before any key call
  assert (pkg / 'tfxe.header').read_bytes() == before


def test_rewrap_grouped_needs_k_groups(tmp_path, keys, grouped):
  pkg = _copy(grouped / 'p', tmp_path / 'p')
  with pytest.raises(errors.NoMatchingKeyError, match='got 1'):
    te.rewrap_package(pkg, identities=[keys.priv('a'), keys.priv('rsa')],
                      add_recipients=[keys.pub('e')], add_to_group=0,
                      allow_unsigned=True)


def test_rewrap_add_to_group_on_plain_package(tmp_path, keys, model):
  te.encrypt_model(model, tmp_path / 'p', recipients=[keys.pub('a')])
  with pytest.raises(errors.UsageError, match='no key groups'):
    te.rewrap_package(tmp_path / 'p', identities=[keys.priv('a')],
                      add_recipients=[keys.pub('b')], add_to_group=0,
                      allow_unsigned=True)


def test_rewrap_signed_grouped_bundle(tmp_path, keys, model, grouped):
  pkg = _copy(grouped / 's.tfxe', tmp_path / 's.tfxe')
  info = te.rewrap_package(pkg, identities=[keys.priv('b'), keys.priv('d')],
                           add_recipients=[keys.pub('f')], add_to_group=0,
                           signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert info.signature_verified
  _decrypt(pkg, tmp_path / 'o', keys, ['f', 'b'], trusted=[keys.pub('ed')],
           allow_unsigned=False)
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)


# --- CLI ----------------------------------------------------------------------

def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
                        capture_output=True, text=True, check=False)


def test_cli_key_groups_end_to_end(tmp_path, keys, model):
  p = tmp_path / 'pkg.tfxe'
  r = _cli('encrypt', model, p, '--bundle',
           '--key-group', f'{keys.pub("a")},{keys.pub("rsa")}',
           '--key-group', keys.pub('b'), '--key-group', keys.pub('c'),
           '--threshold', '2', '--sign-with', keys.priv('ed'))
  assert r.returncode == 0, r.stderr
  assert '3 key groups, 2 needed' in r.stdout
  r = _cli('inspect', p, '--json')
  assert r.returncode == 0, r.stderr
  info = json.loads(r.stdout)
  assert info['threshold'] == {
      'k': 2, 'groups': [[keys.key_id('a'), keys.key_id('rsa')],
                         [keys.key_id('b')], [keys.key_id('c')]]}
  r = _cli('inspect', p)
  assert 'threshold:   2 of 3 key groups' in r.stdout
  assert 'group 2:' in r.stdout and keys.key_id('c') in r.stdout
  r = _cli('decrypt', p, tmp_path / 'o', '-i', keys.priv('a'), '--trust',
           keys.pub('ed'))
  assert r.returncode != 0 and '2 of 3 key groups needed, got 1' in r.stderr
  assert not os.path.lexists(tmp_path / 'o')
  r = _cli('decrypt', p, tmp_path / 'o', '-i', keys.priv('rsa'), '-i',
           keys.priv('c'), '--trust', keys.pub('ed'))
  assert r.returncode == 0, r.stderr
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)
  r = _cli('rewrap', p, '-i', keys.priv('b'), '-i', keys.priv('c'),
           '--add-recipient', keys.pub('d'), '--add-to-group', '0',
           '--sign-with', keys.priv('ed'), '--trust', keys.pub('ed'))
  assert r.returncode == 0, r.stderr
  r = _cli('decrypt', p, tmp_path / 'o2', '-i', keys.priv('d'), '-i',
           keys.priv('b'), '--trust', keys.pub('ed'))
  assert r.returncode == 0, r.stderr
  r = _cli('rotate', p, tmp_path / 'q', '-i', keys.priv('d'), '-i',
           keys.priv('b'), '--trust', keys.pub('ed'), '--key-group',
           keys.pub('e'), '--key-group', keys.pub('f'), '--threshold', '2')
  assert r.returncode == 0, r.stderr
  r = _cli('decrypt', tmp_path / 'q', tmp_path / 'o3', '-i', keys.priv('e'),
           '-i', keys.priv('f'), '--allow-unsigned')
  assert r.returncode == 0, r.stderr


@pytest.mark.parametrize('args,msg', [
    (['--key-group', 'A', '--key-group', 'B'], '--threshold'),
    (['--recipient', 'A', '--threshold', '2'], '--key-group'),
    (['--key-group', 'A', '--key-group', 'B', '--threshold', '2',
      '--recipient', 'A'], 'not both'),
    (['--key-group', 'A,', '--key-group', 'B', '--threshold', '2'],
     'comma-separated'),
    ([], 'who can decrypt'),
    (['--key-group', 'A', '--threshold', '2'], '2 to 16 groups'),
])
def test_cli_usage_errors(tmp_path, keys, model, args, msg):
  args = [keys.pub('a') if a == 'A' else keys.pub('b') if a == 'B' else
          keys.pub('a') + ',' if a == 'A,' else a for a in args]
  r = _cli('encrypt', model, tmp_path / 'p', *args)
  assert r.returncode != 0
  assert msg in r.stderr, r.stderr
  assert not os.path.lexists(tmp_path / 'p')
