"""Atomic filesystem publication: temp siblings and no-replace renames."""

import ctypes
import ctypes.util
import errno
import os
import shutil
from typing import Optional

from tfx_encrypt import errors

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


def temp_sibling(path: str, kind: str = 'tmp') -> str:
  """A fresh hidden name next to `path` (same filesystem, so rename works)."""
  parent = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(os.path.abspath(path))
  return os.path.join(parent, f'.{name}.{kind}-{os.urandom(6).hex()}')


def publish(tmp: str, dst: str, force: bool = False) -> None:
  """Atomically move `tmp` to `dst`.

  Without `force`, fails with OutputExistsError if `dst` exists, even when
  another process creates it concurrently (RENAME_NOREPLACE). With `force`,
  an existing `dst` is swapped out atomically (RENAME_EXCHANGE) and removed.
  """
  if not force:
    try:
      if _call_renameat2(tmp, dst, _RENAME_NOREPLACE):
        return
    except FileExistsError:
      raise _exists(dst) from None
    # Fallback without renameat2: link() refuses existing names for files;
    # for directories a check-then-rename leaves a small race window.
    if os.path.isdir(tmp):
      if os.path.lexists(dst):
        raise _exists(dst)
      os.rename(tmp, dst)
    else:
      try:
        os.link(tmp, dst)
      except FileExistsError:
        raise _exists(dst) from None
      os.unlink(tmp)
    return
  if not os.path.lexists(dst):
    publish(tmp, dst, force=False)
    return
  try:
    swapped = _call_renameat2(tmp, dst, _RENAME_EXCHANGE)
  except OSError:
    swapped = False
  if swapped:
    remove_tree(tmp)  # now holds the old content
    return
  old = temp_sibling(dst, 'old')
  os.rename(dst, old)
  os.rename(tmp, dst)
  remove_tree(old)


def _exists(dst: str) -> errors.OutputExistsError:
  return errors.OutputExistsError(
      f'{dst} already exists; choose another path or pass --force to replace '
      'it atomically')


def remove_tree(path: Optional[str]) -> None:
  """Remove a file or directory tree if present, never following links."""
  if not path or not os.path.lexists(path):
    return
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):  # e.g. a read-only subdirectory
      for root, dirs, _ in os.walk(path):
        for d in dirs:
          os.chmod(os.path.join(root, d), 0o700)
      shutil.rmtree(path, ignore_errors=True)
  else:
    os.unlink(path)


def fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_all(fd: int, data) -> None:
  mv = memoryview(data)
  while mv:
    n = os.write(fd, mv)
    mv = mv[n:]


def read_into_exact(fd: int, buf, offset: Optional[int] = None) -> int:
  """Fill memoryview `buf` from fd (at `offset` with preadv if given)."""
  mv = memoryview(buf)
  got = 0
  total = len(mv)
  while got < total:
    if offset is None:
      n = os.readv(fd, [mv[got:]])
    else:
      n = os.preadv(fd, [mv[got:]], offset + got)
    if n == 0:
      break
    got += n
  return got
