"""Owned temporary siblings, the sweep, the --force policy and tree removal.

Unit tests of tfx_encrypt._fsutil (docs/SECURITY.md): what may be replaced,
what is refused, how stale siblings of dead commands are recognised, and
that removal works for any tree a command can create.
"""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from tfx_encrypt import _fsutil
from tfx_encrypt import errors


def _package_dir(path):
  from tfx_encrypt.format import header  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(path, 'payload'))
  with open(os.path.join(path, 'tfxe.header'), 'wb') as f:
    f.write(header.MAGIC + b'\x00' * 8)
  return str(path)


def _bundle(path):
  from tfx_encrypt.format import header  # pylint: disable=g-import-not-at-top
  with open(path, 'wb') as f:
    f.write(header.MAGIC + b'\x00' * 8)
  return str(path)


# --- removal -------------------------------------------------------------------

def test_remove_tree_handles_a_chain_deeper_than_path_max(tmp_path):
  # 1,500 levels of 20-character names: 31,500 characters, far beyond
  # PATH_MAX (4096) and Python's recursion limit (1000).
  root = tmp_path / 'deep'
  os.mkdir(root)
  fd = os.open(root, os.O_RDONLY)
  name = 'd' * 20
  try:
    for i in range(1500):
      os.mkdir(name, dir_fd=fd)
      nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
      os.close(fd)
      fd = nfd
      if i % 100 == 0:
        with open(os.open('f', os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd),
                  'wb') as f:
          f.write(b'secret')
  finally:
    os.close(fd)
  _fsutil.remove_tree(str(root))
  assert not root.exists()


def test_remove_tree_handles_read_only_directories(tmp_path):
  root = tmp_path / 'ro'
  (root / 'a' / 'b').mkdir(parents=True)
  (root / 'a' / 'b' / 'f').write_bytes(b'x')
  os.chmod(root / 'a' / 'b', 0o500)
  os.chmod(root / 'a', 0o000)
  _fsutil.remove_tree(str(root))
  assert not root.exists()


def test_remove_tree_never_follows_links(tmp_path):
  outside = tmp_path / 'outside'
  outside.mkdir()
  (outside / 'keep').write_bytes(b'keep')
  root = tmp_path / 'root'
  root.mkdir()
  os.symlink(outside, root / 'link')
  _fsutil.remove_tree(str(root))
  assert not root.exists()
  assert (outside / 'keep').read_bytes() == b'keep'
  link = tmp_path / 'toplink'
  os.symlink(outside, link)
  _fsutil.remove_tree(str(link))
  assert not os.path.lexists(link) and (outside / 'keep').exists()


# --- temporary siblings and the sweep -------------------------------------------

def test_temp_sibling_is_recognisable_locked_and_released(tmp_path):
  dst = tmp_path / 'out'
  tmp = _fsutil.temp_sibling(str(dst))
  name = os.path.basename(tmp)
  assert _fsutil.is_temp_name(name)
  assert _fsutil.TEMP_NAME_RE.match(name).group('name') == 'out'
  assert os.path.exists(tmp + '.lock')
  os.mkdir(tmp)
  assert _fsutil.public_path(os.path.join(tmp, 'a', 'b')) == str(
      dst / 'a' / 'b')
  _fsutil.publish(tmp, str(dst))
  assert sorted(os.listdir(tmp_path)) == ['out']


def test_long_destination_names_fit_in_a_sibling_name(tmp_path):
  dst = tmp_path / ('n' * 250)
  tmp = _fsutil.temp_sibling(str(dst))
  os.mkdir(tmp)
  _fsutil.remove_tree(tmp)
  assert os.listdir(tmp_path) == []


_HOLD = textwrap.dedent('''
    import os, sys, time
    from tfx_encrypt import _fsutil
    tmp = _fsutil.temp_sibling(sys.argv[1])
    os.mkdir(tmp)
    print(tmp, flush=True)
    if sys.argv[2] == 'kill':
      os.kill(os.getpid(), 9)
    time.sleep(60)
''')


def _holder(dst, mode):
  p = subprocess.Popen([sys.executable, '-c', _HOLD, str(dst), mode],
                       stdout=subprocess.PIPE, text=True)
  tmp = p.stdout.readline().strip()
  return p, tmp


def test_sweep_removes_siblings_of_dead_processes_only(tmp_path):
  live, live_tmp = _holder(tmp_path / 'b', 'hold')
  dead, dead_tmp = _holder(tmp_path / 'a', 'kill')  # sweeps; b is live
  dead.wait(30)
  try:
    # A sibling whose lock file is gone, an orphan lock file, and names
    # that only look similar.
    orphan = tmp_path / ('.c.tfxe-tmp-' + '1' * 16)
    orphan.mkdir()
    (orphan / 'plaintext').write_bytes(b'x')
    (tmp_path / ('.d.tfxe-tmp-' + '2' * 16 + '.lock')).write_bytes(b'1 h\n')
    for other in ('.e.tfxe-tmp-short', '.f.tmp-' + '3' * 16, 'g.tfxe-tmp-' +
                  '4' * 16, 'model'):
      (tmp_path / other).mkdir()
    assert os.path.isdir(dead_tmp) and os.path.isdir(live_tmp)
    removed = _fsutil.sweep(str(tmp_path))
    assert sorted(removed) == sorted([
        os.path.basename(dead_tmp), orphan.name,
        '.d.tfxe-tmp-' + '2' * 16 + '.lock'])
    assert not os.path.exists(dead_tmp) and not os.path.exists(
        dead_tmp + '.lock')
    assert os.path.isdir(live_tmp) and os.path.exists(live_tmp + '.lock')
    assert sorted(os.listdir(tmp_path)) == sorted([
        os.path.basename(live_tmp), os.path.basename(live_tmp) + '.lock',
        '.e.tfxe-tmp-short', '.f.tmp-' + '3' * 16, 'g.tfxe-tmp-' + '4' * 16,
        'model'])
  finally:
    live.kill()
    live.wait()
  assert _fsutil.sweep(str(tmp_path)) == [os.path.basename(live_tmp)]


def test_a_fresh_empty_lock_file_is_left_to_its_owner(tmp_path):
  # The owner creates the lock file, then locks and fills it: a sweeper that
  # comes in between must not take the sibling.
  lock = tmp_path / ('.a.tfxe-tmp-' + '5' * 16 + '.lock')
  lock.write_bytes(b'')
  (tmp_path / ('.a.tfxe-tmp-' + '5' * 16)).mkdir()
  assert _fsutil.sweep(str(tmp_path)) == []
  old = os.stat(lock).st_mtime - 3600
  os.utime(lock, (old, old))
  assert len(_fsutil.sweep(str(tmp_path))) == 1
  assert os.listdir(tmp_path) == []


def test_new_siblings_sweep_their_parent_first(tmp_path):
  dead, dead_tmp = _holder(tmp_path / 'a', 'kill')
  dead.wait(30)
  tmp = _fsutil.temp_sibling(str(tmp_path / 'b'))
  assert not os.path.exists(dead_tmp)
  _fsutil.remove_tree(tmp)
  assert os.listdir(tmp_path) == []


# --- the --force policy -----------------------------------------------------------

@pytest.fixture
def place(tmp_path, monkeypatch):
  home = tmp_path / 'home'
  home.mkdir()
  work = tmp_path / 'work'
  work.mkdir()
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.chdir(work)
  return tmp_path


def test_force_replaces_packages_decrypted_trees_and_empty_dirs(place):
  pkgdir = _package_dir(place / 'pkg')
  bundle = _bundle(place / 'model.tfxe')
  empty = place / 'empty'
  empty.mkdir()
  dec = place / 'dec'
  dec.mkdir()
  (dec / 'saved_model.pb').write_bytes(b'x')
  _fsutil.mark_decrypted(str(dec), str(dec))
  for dst in (pkgdir, bundle, str(empty), str(dec)):
    assert _fsutil.unreplaceable_reason(dst) is None, dst
    assert _fsutil.check_output(dst, force=True) == dst
    with pytest.raises(errors.OutputExistsError):
      _fsutil.check_output(dst, force=False)


def test_decrypted_marker_falls_back_to_a_sidecar_without_xattrs(
    place, monkeypatch):
  def no_xattrs(*args, **kwargs):
    raise OSError(errno.ENOTSUP, 'Operation not supported')
  monkeypatch.setattr(os, 'setxattr', no_xattrs)
  monkeypatch.setattr(os, 'getxattr', no_xattrs)
  dec = place / 'dec'
  dec.mkdir()
  (dec / 'f').write_bytes(b'x')
  _fsutil.mark_decrypted(str(dec), str(dec))
  assert (place / '.dec.tfxe-decrypted').exists()
  assert _fsutil.is_decrypted_tree(str(dec))
  # Another directory at the same path (a new inode) is not ours.
  os.rename(dec, place / 'moved')
  other = place / 'dec'
  other.mkdir()
  (other / 'f').write_bytes(b'x')
  assert not _fsutil.is_decrypted_tree(str(other))


@pytest.mark.parametrize('what', [
    'plain-dir', 'plain-file', 'cwd', 'cwd-parent', 'home', 'root',
    'symlink', 'through-symlink', 'copied-package-file-lookalike'])
def test_force_refuses_what_tfx_encrypt_did_not_make(place, what):
  target = {
      'plain-dir': place / 'mine',
      'plain-file': place / 'notes.txt',
      'cwd': place / 'work',
      'cwd-parent': place,
      'home': place / 'home',
      'root': '/',
      'symlink': place / 'link',
      'through-symlink': place / 'linkdir' / 'pkg',
      'copied-package-file-lookalike': place / 'fake.tfxe',
  }[what]
  (place / 'mine').mkdir()
  (place / 'mine' / 'keep').write_bytes(b'keep')
  (place / 'notes.txt').write_bytes(b'keep')
  (place / 'fake.tfxe').write_bytes(b'TFXENC\x00\x09 not a version we write')
  real = place / 'real'
  _package_dir(real / 'pkg')
  os.symlink(real / 'pkg', place / 'link')
  os.symlink(real, place / 'linkdir')
  before = sorted(os.listdir(place))
  with pytest.raises(errors.UnsafeOverwriteError) as e:
    _fsutil.check_output(str(target), force=True)
  msg = str(e.value)
  assert '\n' not in msg and 'Remove it yourself' in msg
  assert sorted(os.listdir(place)) == before


def test_outputs_inside_or_around_the_input_are_refused(place):
  src = place / 'model'
  (src / 'variables').mkdir(parents=True)
  pkgdir = _package_dir(place / 'model' / 'old-pkg')
  for dst, force in [(src, True), (src / 'out', False),
                     (src / 'variables', True), (pkgdir, True)]:
    with pytest.raises(errors.UnsafeOverwriteError, match='inside the input'):
      _fsutil.check_output(str(dst), force=force, sources=[str(src)])
  # An (empty, hence normally replaceable) ancestor... cannot be empty; a
  # package directory that contains the input is refused too.
  outer = _package_dir(place / 'outer')
  inner = os.path.join(outer, 'payload')
  with pytest.raises(errors.UnsafeOverwriteError, match='contains the input'):
    _fsutil.check_output(outer, force=True, sources=[inner])


def test_publish_rechecks_the_destination_under_force(place):
  dst = place / 'out'
  tmp = _fsutil.temp_sibling(str(dst))
  os.mkdir(tmp)
  dst.mkdir()
  (dst / 'appeared-meanwhile').write_bytes(b'keep')
  with pytest.raises(errors.UnsafeOverwriteError):
    _fsutil.publish(tmp, str(dst), force=True)
  assert (dst / 'appeared-meanwhile').read_bytes() == b'keep'
  _fsutil.remove_tree(tmp)


# --- the shared walkers -----------------------------------------------------------

def test_hash_file_matches_hashlib_for_whole_files_ranges_and_fds(tmp_path):
  import hashlib  # pylint: disable=g-import-not-at-top
  data = os.urandom(3 << 20) + b'tail'
  p = tmp_path / 'f'
  p.write_bytes(data)
  assert _fsutil.hash_file(str(p), 'sha256') == (
      hashlib.sha256(data).hexdigest(), len(data))
  assert _fsutil.hash_file(str(p), 'sha256', offset=5, size=1 << 20) == (
      hashlib.sha256(data[5:5 + (1 << 20)]).hexdigest(), 1 << 20)
  fd = os.open(p, os.O_RDONLY)
  try:
    assert _fsutil.hash_file(fd, 'sha256')[0] == hashlib.sha256(data).hexdigest()
  finally:
    os.close(fd)


def test_tree_size_counts_regular_files_only_and_never_follows_links(tmp_path):
  root = tmp_path / 'root'
  (root / 'a' / 'b').mkdir(parents=True)
  (root / 'x').write_bytes(b'1' * 10)
  (root / 'a' / 'b' / 'y').write_bytes(b'2' * 32)
  outside = tmp_path / 'big'
  outside.write_bytes(b'3' * 1000)
  os.symlink(outside, root / 'link')
  os.symlink(tmp_path, root / 'a' / 'loop')
  assert _fsutil.tree_size(str(root)) == 42
