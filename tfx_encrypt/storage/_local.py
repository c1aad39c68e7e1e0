"""Local paths and file:// URIs: create-only through link(2)."""

import errno
import os
import stat
import threading
from typing import Dict, Tuple

from tfx_encrypt import _signals
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.storage._base import (
    CHUNK_SIZE, Data, ObjectExistsError, ObjectInfo, Reader, _as_stream,
    _changed_since_read)


_READ_FLAGS = (os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0) |
               getattr(os, 'O_CLOEXEC', 0) | getattr(os, 'O_NONBLOCK', 0))


class _LocalReader(Reader):

  def __init__(self, path: str):
    self.uri = path
    try:
      self._fd = os.open(path, _READ_FLAGS)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise errors.UnsafePathError(
            f'{_text.printable(path)} is a symbolic link; links are never '
            'followed') from None
      raise
    st = os.fstat(self._fd)
    if not stat.S_ISREG(st.st_mode):
      os.close(self._fd)
      raise errors.UnsafePathError(
          f'{_text.printable(path)} is not a regular file; only regular '
          'files are read')
    os.set_blocking(self._fd, True)
    self.size = st.st_size
    self.version = _local_version(st)

  def read_into(self, buf, offset: int) -> int:
    mv = memoryview(buf).cast('B')
    got = 0
    while got < len(mv):
      n = os.preadv(self._fd, [mv[got:]], offset + got)
      if n == 0:
        break
      got += n
    return got

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1


def _write_temp_sibling(path: str, data: Data, keep_mode: bool = False
                        ) -> Tuple[str, str]:
  """`data` into a new hidden sibling of `path`, synced (with the mode of
  `path` if `keep_mode` and it exists): (its path, its version)."""
  parent = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(parent, f'.{os.path.basename(path)}.tfxe-put-'
                     f'{os.getpid()}-{threading.get_ident()}')
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
               getattr(os, 'O_CLOEXEC', 0), 0o644)
  try:
    with os.fdopen(fd, 'wb') as f:
      src, _ = _as_stream(data)
      while True:
        b = src.read(CHUNK_SIZE)
        if not b:
          break
        f.write(b)
      if keep_mode:
        try:
          os.fchmod(f.fileno(), stat.S_IMODE(os.lstat(path).st_mode))
        except FileNotFoundError:
          pass
      f.flush()
      os.fsync(f.fileno())
      return tmp, _local_version(os.fstat(f.fileno()))
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise


def _local_put(path: str, data: Data, create_only: bool) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp, _ = _write_temp_sibling(path, data)
  try:
    if create_only:
      try:
        os.link(tmp, path)  # atomic create-if-absent, complete content
      except FileExistsError:
        raise ObjectExistsError(
            f'{_text.printable(path)} already exists') from None
    else:
      os.replace(tmp, path)
  finally:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass


def _local_list(prefix: str) -> Dict[str, int]:
  root = prefix.rstrip('/')
  if not os.path.isdir(root):
    return {}
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      p = os.path.join(dirpath, n)
      out[os.path.relpath(p, root).replace(os.sep, '/')] = os.lstat(
          p).st_size
  return out


def _local_list_info(prefix: str) -> Dict[str, ObjectInfo]:
  root = prefix.rstrip('/')
  if not os.path.isdir(root):
    return {}
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      st = os.lstat(os.path.join(dirpath, n))
      out[os.path.relpath(os.path.join(dirpath, n), root).replace(
          os.sep, '/')] = ObjectInfo(st.st_size, None, st.st_mtime)
  return out


def _local_version(st: os.stat_result) -> str:
  """A local file's version: which file (a replacement by rename is a new
  inode) and its size and change time (an in-place write)."""
  return f'{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}'


def _local_put_if_unchanged(path: str, data: Data, version: str) -> str:
  """Replace a file only if it is still `version` (from its reader).

  A filesystem has no compare-and-swap: the complete new file is swapped
  in atomically (renameat2 RENAME_EXCHANGE) and the file it displaced is
  checked; if that was not `version`, it is swapped back and
  ObjectChangedError raised (a reader may have seen the new file in
  between). Without renameat2: checked, then renamed (a small race).
  Returns the new file's version.
  """
  from tfx_encrypt._fsutil import _publish  # pylint: disable=g-import-not-at-top
  changed = _changed_since_read(path)
  tmp, new_version = _write_temp_sibling(path, data, keep_mode=True)
  try:
    try:
      if _local_version(os.lstat(path)) != version:
        raise changed
    except FileNotFoundError:
      raise changed from None
    # Exchange, check, swap back: never cut in half by a signal (tmp would
    # then hold the displaced file, perhaps another writer's).
    with _signals.deferred():
      try:
        swapped = _publish._call_renameat2(tmp, path,  # pylint: disable=protected-access
                                           _publish._RENAME_EXCHANGE)  # pylint: disable=protected-access
      except FileNotFoundError:  # removed since the check
        raise changed from None
      if not swapped:
        os.replace(tmp, path)
        tmp = None
        return new_version
      if _local_version(os.lstat(tmp)) != version:  # replaced meanwhile
        try:
          _publish._call_renameat2(tmp, path, _publish._RENAME_EXCHANGE)  # pylint: disable=protected-access
        except BaseException:
          tmp = None  # it holds the other writer's file: leave it
          raise
        raise changed
      return new_version
  finally:
    if tmp is not None:
      try:
        os.unlink(tmp)
      except FileNotFoundError:
        pass
