"""Atomic publication (renameat2 NOREPLACE / EXCHANGE) and what --force
may replace (docs/SECURITY.md §1)."""

import ctypes
import ctypes.util
import errno
import json
import os
import stat
from typing import Optional, Sequence

from tfx_encrypt import _signals
from tfx_encrypt import errors
from tfx_encrypt._fsutil._io import (
    _O_CLOEXEC, _O_NOFOLLOW, _O_NONBLOCK, write_all)
from tfx_encrypt._fsutil._temps import _release, remove_tree, temp_sibling


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_libc = None
_renameat2 = None


try:
  _libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6',
                      use_errno=True)
  _renameat2 = _libc.renameat2
  _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                         ctypes.c_char_p, ctypes.c_uint]
  _renameat2.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc >= 2.28
  _renameat2 = None


def _call_renameat2(src: str, dst: str, flags: int) -> bool:
  """Return True on success, False if unsupported; raise OSError otherwise."""
  if _renameat2 is None:
    return False
  rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                  flags)
  if rc == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL):
    return False
  raise OSError(err, os.strerror(err), dst)


def publish(tmp: str, dst: str, force: bool = False,
            commit: bool = True) -> None:
  """Atomically move `tmp` to `dst`.

  Without `force`, fails with OutputExistsError if `dst` exists, even when
  another process creates it concurrently (RENAME_NOREPLACE). With `force`,
  an existing `dst` must still be something :func:`replaceable` allows; it
  is swapped out atomically (RENAME_EXCHANGE) and removed. Signals are held
  for the rename; with `commit`, the command counts as done afterwards.
  """
  with _signals.deferred():
    if force and os.path.lexists(dst):
      reason = unreplaceable_reason(dst)
      if reason:
        raise errors.UnsafeOverwriteError(_refusal(dst, reason))
      _exchange(tmp, dst)
    else:
      _rename_noreplace(tmp, dst)
    _release(tmp)
    if commit:
      _signals.mark_committed()


def replace_checked(tmp: str, dst: str) -> None:
  """rename(2) `tmp` over `dst`, for callers that applied their own
  replacement rule to `dst` (keygen --force: only PEM key files)."""
  with _signals.deferred():
    os.replace(tmp, dst)
    _release(tmp)
    _signals.mark_committed()


def _rename_noreplace(tmp: str, dst: str) -> None:
  try:
    if _call_renameat2(tmp, dst, _RENAME_NOREPLACE):
      return
  except FileExistsError:
    raise exists_error(dst) from None
  # Fallback without renameat2: link() refuses existing names for files;
  # for directories a check-then-rename leaves a small race window.
  if os.path.isdir(tmp):
    if os.path.lexists(dst):
      raise exists_error(dst)
    os.rename(tmp, dst)
  else:
    try:
      os.link(tmp, dst)
    except FileExistsError:
      raise exists_error(dst) from None
    os.unlink(tmp)


def _exchange(tmp: str, dst: str) -> None:
  """Swap `tmp` into `dst`; the old content ends up in `tmp`, then removed."""
  try:
    swapped = _call_renameat2(tmp, dst, _RENAME_EXCHANGE)
  except OSError:
    swapped = False
  if not swapped:
    old = temp_sibling(dst, 'old')
    os.rename(dst, old)
    os.rename(tmp, dst)
    remove_tree(old)
    return
  remove_tree(tmp)  # now holds the old content


def exists_error(dst: str) -> errors.OutputExistsError:
  return errors.OutputExistsError(
      f'{dst} already exists; choose another path, or pass --force to '
      'replace it (only a package or a tree tfx-encrypt wrote, or an empty '
      'directory)')


#: Extended attribute on a directory that decrypt wrote (docs/SECURITY.md).
DECRYPTED_XATTR = 'user.tfx-encrypt'


_DECRYPTED_VALUE = b'decrypted'


#: Fallback where the filesystem has no user xattrs: a sibling file naming
#: the directory's device and inode.
_DECRYPTED_SIDECAR = '.{name}.tfxe-decrypted'


_HEADER_NAME = 'tfxe.header'
_PAYLOAD_DIR = 'payload'


def check_output(dst: str, *, force: bool, sources: Sequence[str] = ()
                 ) -> str:
  """Check an output path before any work; return it absolute.

  Refuses an output inside (or equal to) a source in every case. An
  existing output needs `force`, and then must be replaceable: a
  tfx-encrypt package, a tree tfx-encrypt decrypted, or an empty directory,
  and never a source or its ancestor, `/`, $HOME, the current directory or
  its ancestors, or a path reached through a symbolic link.
  """
  dst = os.path.abspath(os.fspath(dst))
  real = os.path.realpath(dst)
  for src in sources:
    s = os.path.realpath(os.fspath(src))
    if _within(real, s):
      raise errors.UnsafeOverwriteError(
          f'the output {dst} is inside the input {os.fspath(src)}; write it '
          'somewhere else')
  if not os.path.lexists(dst):
    return dst
  if not force:
    raise exists_error(dst)
  for src in sources:
    if _within(os.path.realpath(os.fspath(src)), real):
      raise errors.UnsafeOverwriteError(_refusal(
          dst, f'it contains the input {os.fspath(src)}'))
  reason = unreplaceable_reason(dst)
  if reason:
    raise errors.UnsafeOverwriteError(_refusal(dst, reason))
  return dst


def _within(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _refusal(dst: str, reason: str) -> str:
  return (f'--force will not replace {dst}: {reason}. Remove it yourself if '
          'you mean to replace it, or choose another output')


def unreplaceable_reason(dst: str) -> Optional[str]:
  """Why --force must not replace the existing `dst`, or None if it may."""
  try:
    st = os.lstat(dst)
  except FileNotFoundError:
    return None
  if stat.S_ISLNK(st.st_mode):
    return 'it is a symbolic link'
  real = os.path.realpath(dst)
  if real != os.path.normpath(dst):
    return f'it is reached through a symbolic link (it is really {real})'
  protected = {os.sep: 'it is the root directory'}
  home = os.path.expanduser('~')
  if home and home != '~':
    protected[os.path.realpath(home)] = 'it is your home directory'
  try:
    cwd = os.path.realpath(os.getcwd())
  except OSError:
    cwd = None
  if cwd and _within(cwd, real):
    return 'it is the current directory or one of its parents'
  if real in protected:
    return protected[real]
  if stat.S_ISREG(st.st_mode):
    return None if _starts_with_magic(dst) else (
        'it is a file, not a tfx-encrypt package')
  if not stat.S_ISDIR(st.st_mode):
    return 'it is not a regular file or directory'
  try:
    names = os.listdir(dst)
  except OSError as e:
    return f'it cannot be listed ({e.strerror})'
  if not names:
    return None
  if set(names) == {_HEADER_NAME, _PAYLOAD_DIR} and _starts_with_magic(
      os.path.join(dst, _HEADER_NAME)):
    return None
  if is_decrypted_tree(dst):
    return None
  return ('it is not a tfx-encrypt package, a tree tfx-encrypt decrypted or '
          'an empty directory')


def _starts_with_magic(path: str) -> bool:
  from tfx_encrypt.format import header  # pylint: disable=g-import-not-at-top
  try:
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
  except OSError:
    return False
  try:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      return False
    return os.pread(fd, len(header.MAGIC), 0) == header.MAGIC
  finally:
    os.close(fd)


def mark_decrypted(tmp_dir: str, dst: str) -> None:
  """Mark a directory decrypt wrote, without touching the model's files.

  An xattr on the directory itself; where the filesystem refuses user
  xattrs (tmpfs before Linux 6.6, some FUSE mounts), a sidecar file next to
  `dst` names the directory's device and inode (rename keeps both).
  """
  try:
    os.setxattr(tmp_dir, DECRYPTED_XATTR, _DECRYPTED_VALUE,
                follow_symlinks=False)
    return
  except OSError:
    pass
  st = os.lstat(tmp_dir)
  sidecar = _sidecar_path(dst)
  doc = json.dumps({'tfx-encrypt': 'decrypted', 'dev': st.st_dev,
                    'ino': st.st_ino}).encode()
  tmp = sidecar + '.new-' + os.urandom(6).hex()
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW |
               _O_CLOEXEC, 0o600)
  try:
    write_all(fd, doc)
  finally:
    os.close(fd)
  os.replace(tmp, sidecar)


def _sidecar_path(dst: str) -> str:
  parent, name = os.path.split(os.path.abspath(dst))
  return os.path.join(parent, _DECRYPTED_SIDECAR.format(name=name))


def is_decrypted_tree(path: str) -> bool:
  """True for a directory that tfx-encrypt decrypted (see mark_decrypted)."""
  try:
    if os.getxattr(path, DECRYPTED_XATTR,
                   follow_symlinks=False) == _DECRYPTED_VALUE:
      return True
  except OSError:
    pass
  try:
    with open(_sidecar_path(path), 'rb') as f:
      doc = json.loads(f.read(4096))
    st = os.lstat(path)
    return (isinstance(doc, dict) and doc.get('tfx-encrypt') == 'decrypted'
            and doc.get('dev') == st.st_dev and doc.get('ino') == st.st_ino)
  except (OSError, ValueError):
    return False
