"""Each path rule of docs/FORMAT.md §9 on its own, and the cost of checking.

tfx_encrypt.format.paths is applied by the writer (encrypt) and the reader
(decrypt, to the authenticated file table). Every test below breaks exactly
one rule. The cost tests guard against the old cubic check (tens of seconds
on a deep directory chain): a 2,048-level chain and a 100,000-entry table
must take well under the (generous) bound.
"""

import json
import os
import subprocess
import sys
import time

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import paths
from tests import _util

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOUND_S = 5.0  # a guard against a super-linear regression, not a benchmark


def refused(match, files, dirs=()):
  with pytest.raises(errors.UnsafePathError, match=match) as ei:
    paths.check_tree(files, dirs)
  return ei.value


# --- one relative path --------------------------------------------------------

@pytest.mark.parametrize('path', [
    'saved_model.pb', 'variables/variables.data-00000-of-00001',
    'modèle/日本語/ü.pb', 'a b/c~d!e@f#.g', 'x\xa0y', '.hidden/..dots../...',
    '👍🏽', 'a' * 255, 'é' * 127, '/'.join(['a'] * 2048),
])
def test_accepted(path):
  assert paths.check_relpath(path) == path


@pytest.mark.parametrize('path', ['/a', '/'])
def test_absolute(path):
  refused('absolute path', [path])


@pytest.mark.parametrize('path', ['..', '../a', 'a/..', 'a/../b'])
def test_dotdot(path):
  refused('"." or ".." component', [path])


@pytest.mark.parametrize('path', ['.', './a', 'a/.', 'a/./b'])
def test_dot(path):
  refused('"." or ".." component', [path])


@pytest.mark.parametrize('path', ['a//b', 'a/', 'a/b/'])
def test_empty_component(path):
  refused('empty component', [path])


def test_empty_path_and_not_a_string():
  refused('empty or not a string', [''])
  refused('empty or not a string', [None])
  refused('empty or not a string', [b'a'])


@pytest.mark.parametrize('path', ['a\\b', '\\', 'x\\..\\evil'])
def test_backslash(path):
  refused('backslash in name', [path])


def test_nul():
  refused('NUL in name', ['a\x00b'])


@pytest.mark.parametrize('char', [
    # C0 (TAB, LF, CR, ESC ...), DEL, C1 (NEL, CSI ...)
    '\x01', '\t', '\n', '\r', '\x1b', '\x1f', '\x7f', '\x80', '\x85', '\x9b',
    '\x9f',
    # line / paragraph separators, bidi marks, embeddings, overrides,
    # isolates
    '\u2028', '\u2029', '\u061c', '\u200e', '\u200f', '\u202a', '\u202b',
    '\u202c', '\u202d', '\u202e', '\u2066', '\u2067', '\u2068', '\u2069',
    # a lone surrogate (JSON can carry one; UTF-8 cannot)
    '\ud800',
])
def test_control_separator_bidi_and_surrogate(char):
  e = refused(f'U\\+{ord(char):04X}', [f'a{char}b'])
  assert char not in str(e)  # the message shows it escaped


def test_nfc():
  refused('not NFC', ['cafe\u0301'])  # e + COMBINING ACUTE
  refused('not NFC', ['\u212a'])  # KELVIN SIGN (NFC: K)
  paths.check_relpath('caf\u00e9')


def test_component_length():
  paths.check_relpath('a' * 255)
  refused('component longer than 255 bytes', ['a' * 256])
  paths.check_relpath('é' * 127)  # 254 bytes
  refused('component longer than 255 bytes', ['é' * 128])  # 256 bytes
  refused('component longer than 255 bytes', ['d/' + '日' * 86])  # 258


def test_path_length():
  ok = '/'.join(['a' * 254] * 16 + ['a' * 16])
  assert len(ok.encode()) == 4096
  paths.check_relpath(ok)
  refused('longer than 4096 bytes', [ok + 'a'])
  refused('longer than 4096 bytes', ['é/' * 1366])  # 4098 bytes, 2732 chars


def test_error_message_escapes_and_bounds_the_path():
  e = refused('U\\+001B', ['x' * 3000 + '\x1b'])
  assert '\x1b' not in str(e)
  assert len(str(e)) < 600  # the path is cut (200 characters shown)
  e = refused('U\\+202E', ['/\u202eevil'])
  assert "'/\\u202eevil'" in str(e)


# --- the tree -----------------------------------------------------------------

def test_valid_tree_returns_sorted_dirs():
  assert paths.check_tree(['a/b/c', 'a/x', 'z'], ['a/b', 'a', 'e']) == [
      'a', 'a/b', 'e']


@pytest.mark.parametrize('a,b', [
    ('Model.pb', 'model.pb'),
    ('STRASSE', 'straße'),  # full case folding: ß -> ss
    ('ΣΑΣ', 'σας'),  # final sigma
    ('J\u030c', '\u01f0'),  # J + caron vs ǰ (NFC both; fold + NFD equal)
    ('ﬁle', 'FILE'),  # U+FB01 LATIN SMALL LIGATURE FI folds to "fi"
])
def test_case_folding_collision(a, b):
  refused('same name ignoring case', sorted([a, b]))
  assert paths.fold(a) == paths.fold(b)


def test_case_collision_between_directories_and_files():
  refused('same name ignoring case', ['D/x', 'd/y'], ['D', 'd'])
  refused('same name ignoring case', ['A'], ['a'])


def test_no_false_case_collision():
  paths.check_tree(sorted(['a', 'b', 'ä', 'ae', 'ß/x', 'ẞx']), ['ß'])


def test_file_and_directory_collision():
  refused('both a file and a directory', ['a'], ['a'])


def test_duplicates():
  refused('listed twice', ['a', 'a'])
  refused('listed twice', [], ['d', 'd'])


def test_directory_missing_from_dirs():
  refused("parent directory 'd' is not listed", ['d/x'])
  refused("parent directory 'a' is not listed", ['a/b/x'], ['a/b'])
  refused("parent directory 'a' is not listed", [], ['a/b'])


def test_file_under_a_file():
  refused("parent 'a' is a file", ['a', 'a/b'])


def test_files_not_sorted():
  refused('file list is not sorted', ['b', 'a'])


def test_decode_file_table_requires_sorted_dirs():
  table = {'dirs': ['b', 'a'], 'files': []}
  with pytest.raises(errors.TamperedPackageError, match='not sorted'):
    header_lib.decode_file_table(header_lib.canonical_json(table), 0)


def test_decode_file_table_requires_canonical_json():
  table = {'dirs': ['a'], 'files': []}
  with pytest.raises(errors.TamperedPackageError, match='not canonical'):
    header_lib.decode_file_table(json.dumps(table).encode(), 0)


# --- cost ---------------------------------------------------------------------

def _timed(fn, *args):
  t = time.monotonic()
  out = fn(*args)
  return out, time.monotonic() - t


@pytest.mark.parametrize('depth', [1000, 2048])
def test_deep_chain_is_fast(depth):
  dirs = ['/'.join(['a'] * k) for k in range(1, depth)]
  files = [dirs[-1] + '/f']
  out, took = _timed(paths.check_tree, files, dirs)
  assert out == dirs
  assert took < BOUND_S, f'{depth}-level chain took {took:.1f}s'


def test_large_file_table_is_fast():
  """100,000 files in 1,000 directories: a 14 MB plaintext file table."""
  dirs = [f'layer_{d:03d}' for d in range(1000)]
  files = sorted(f'{d}/variables.data-{i:05d}-of-00100'
                 for i in range(100) for d in dirs)
  table = header_lib.canonical_json({
      'dirs': dirs,
      'files': [{'path': p, 'size': 1, 'digest': '0' * 64} for p in files]})
  assert len(table) > 10_000_000
  (entries, out), took = _timed(header_lib.decode_file_table, table,
                                len(files))
  assert out == dirs and len(entries) == len(files)
  assert took < BOUND_S, f'100k-entry table took {took:.1f}s'


def test_deep_case_collision_found_fast():
  dirs = ['/'.join(['a'] * k) for k in range(1, 1000)]
  files = [dirs[-1] + '/F', dirs[-1] + '/f']
  _, took = _timed(lambda: pytest.raises(
      errors.UnsafePathError, paths.check_tree, files, dirs))
  assert took < BOUND_S


# --- a deep directory chain end to end ----------------------------------------

def _make_chain(root, depth, name='a'):
  """root/saved_model.pb and root/a/a/.../a/leaf (`depth` directories)."""
  os.makedirs(root)
  with open(os.path.join(root, 'saved_model.pb'), 'wb') as f:
    f.write(b'model')
  fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
  try:
    for _ in range(depth):  # by descriptor: no PATH_MAX limit
      os.mkdir(name, dir_fd=fd)
      nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
      os.close(fd)
      fd = nfd
    leaf = os.open('leaf', os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
    os.write(leaf, b'deep')
    os.close(leaf)
  finally:
    os.close(fd)


def _remove_deep(root):
  """Remove a tree of any depth without recursion (shutil.rmtree recurses)."""
  if not os.path.lexists(root):
    return
  fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
  stack = []  # fds of the directories above the current one
  while True:
    sub = None
    for e in os.scandir(fd):
      if e.is_dir(follow_symlinks=False):
        sub = e.name
        break
      os.unlink(e.name, dir_fd=fd)
    if sub is not None:
      stack.append((fd, sub))
      fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
      continue
    os.close(fd)
    if not stack:
      break
    fd, sub = stack.pop()
    os.rmdir(sub, dir_fd=fd)
  os.rmdir(root)


@pytest.fixture
def deep(tmp_path):
  made = []
  yield made
  for p in made:
    _remove_deep(str(p))


def cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
                        capture_output=True, text=True, env=env, timeout=300)


def test_encrypt_decrypt_1000_level_chain(tmp_path, deep):
  keys = _util.Keys(tmp_path)
  src, out = tmp_path / 'm', tmp_path / 'o'
  deep.extend([src, out])
  _make_chain(str(src), 1000)
  r = cli('encrypt', src, tmp_path / 'p.tfxe', '--bundle', '--recipient',
          keys.pub('x'))
  assert r.returncode == 0, r.stderr[-2000:]
  r = cli('decrypt', tmp_path / 'p.tfxe', out, '--identity', keys.priv('x'),
          '--allow-unsigned')
  assert r.returncode == 0, r.stderr[-2000:]
  leaf = os.path.join(str(out), *['a'] * 1000, 'leaf')
  with open(leaf, 'rb') as f:
    assert f.read() == b'deep'
  info = te.inspect_package(tmp_path / 'p.tfxe')
  assert info.file_count == 2


def test_encrypt_too_long_chain_is_one_typed_error(tmp_path, deep):
  """A chain whose paths pass 4096 bytes: a one-line error, no traceback."""
  keys = _util.Keys(tmp_path)
  src = tmp_path / 'm'
  deep.append(src)
  _make_chain(str(src), 17, name='d' * 250)  # 17 x 251 bytes
  r = cli('encrypt', src, tmp_path / 'p', '--recipient', keys.pub('x'))
  assert r.returncode in (errors.UnsafePathError.exit_code, 9), r.stderr[-2000:]
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error: ')
  assert 'Traceback' not in r.stderr and 'RecursionError' not in r.stderr
  assert not os.path.exists(tmp_path / 'p')


def test_tree_walkers_do_not_recurse(tmp_path, deep):
  """os.walk recurses per level before Python 3.12; ours must not."""
  from tfx_encrypt import _fsutil  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.runtime import serving  # pylint: disable=g-import-not-at-top
  src = tmp_path / 'm'
  deep.append(src)
  _make_chain(str(src), 1100)
  assert _fsutil.tree_size(str(src)) == len(b'model') + len(b'deep')
  serving._make_group_readable(str(src))  # pylint: disable=protected-access
  leaf = os.path.join(str(src), *['a'] * 1100, 'leaf')
  assert os.stat(leaf).st_mode & 0o777 == 0o640


@pytest.mark.parametrize('unlinked_files', [True, False])
def test_failed_decrypt_of_a_1000_level_chain_leaves_nothing(
    tmp_path, deep, unlinked_files):
  """The cleanup path at depth (docs/SECURITY.md §2): a payload that fails
  its check ends the decrypt with one typed line and no plaintext anywhere,
  whether files were written unlinked (O_TMPFILE) or, with too few file
  descriptors for that, by name inside the temporary tree."""
  keys = _util.Keys(tmp_path)
  src, out = tmp_path / 'm', tmp_path / 'out' / 'o'
  os.mkdir(tmp_path / 'out')
  deep.append(src)
  _make_chain(str(src), 1000)
  bundle = tmp_path / 'p.tfxe'
  r = cli('encrypt', src, bundle, '--bundle', '--recipient', keys.pub('x'))
  assert r.returncode == 0, r.stderr[-2000:]
  with open(bundle, 'r+b') as f:  # the last payload's last tag byte
    f.seek(-1, os.SEEK_END)
    last = f.read(1)
    f.seek(-1, os.SEEK_END)
    f.write(bytes([last[0] ^ 1]))
  env = dict(os.environ, PYTHONPATH=ROOT)
  limit = '' if unlinked_files else (
      'import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); ')
  code = (limit + 'import sys; from tfx_encrypt import _entry; '
          'sys.argv = ["tfx-encrypt"] + sys.argv[1:]; _entry.main()')
  r = subprocess.run(
      [sys.executable, '-c', code, 'decrypt', str(bundle), str(out),
       '--identity', keys.priv('x'), '--allow-unsigned'],
      capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 4, r.stderr[-2000:]
  assert len(r.stderr.splitlines()) == 1, r.stderr[-2000:]
  assert os.listdir(tmp_path / 'out') == []
