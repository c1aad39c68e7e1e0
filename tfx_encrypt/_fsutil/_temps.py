"""Owned temporary siblings, removed at any depth (docs/SECURITY.md §2).

Every output is written into a hidden temporary sibling and renamed into
place. A sibling is recognisable by its name and owned through an flock on
its lock file, held for the life of the process:

  .NAME.tfxe-KIND-TOKEN        the temporary file or directory
  .NAME.tfxe-KIND-TOKEN.lock   "PID HOST", flock'ed by the owner

The lock file is created and locked before the sibling, and removed after
it, so a sibling whose lock file is missing, or free, belongs to nobody:
its process died (SIGKILL, power loss). `sweep` removes those; every
command that creates a sibling sweeps its parent first.
"""

import fcntl
import os
import re
import socket
import stat
import threading
import time
from typing import Dict, List, Optional, Tuple

from tfx_encrypt import _signals
from tfx_encrypt._fsutil._io import (
    _DIR_FLAGS, _O_CLOEXEC, _O_NOFOLLOW, _O_NONBLOCK, write_all)


TEMP_NAME_RE = re.compile(
    r'^\.(?P<name>.*)\.tfxe-(?P<kind>[a-z]+)-(?P<token>[0-9a-f]{16})'
    r'(?P<lock>\.lock)?$', re.DOTALL)
_LOCK_SUFFIX = '.lock'


#: A lock file that is still empty this long after its creation is stale.
_EMPTY_LOCK_GRACE_S = 60.0


# Keep the whole sibling name below NAME_MAX (255) for any destination name.
_MAX_NAME_IN_TEMP = 120


class _Live:
  """This process's temporary siblings: path -> (lock fd, destination)."""

  def __init__(self):
    self.lock = threading.Lock()
    self.temps: Dict[str, Tuple[int, str]] = {}


_LIVE = _Live()


def temp_sibling(path: str, kind: str = 'tmp') -> str:
  """Reserve a fresh hidden name next to `path` (same filesystem).

  Sweeps the parent's stale siblings first, then creates and locks the
  sibling's lock file; the caller creates the sibling itself (mkdir or an
  O_EXCL open) and must end with :func:`publish` or :func:`remove_tree`.
  """
  path = os.path.abspath(path)
  parent, name = os.path.split(path)
  if not re.fullmatch(r'[a-z]+', kind):
    raise ValueError(f'bad temporary kind {kind!r}')
  sweep(parent)
  tmp = os.path.join(
      parent, f'.{name[:_MAX_NAME_IN_TEMP]}.tfxe-{kind}-{os.urandom(8).hex()}')
  with _signals.deferred():
    fd = os.open(tmp + _LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_EXCL |
                 _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      write_all(fd, f'{os.getpid()} {socket.gethostname()}\n'.encode())
    except BaseException:
      os.close(fd)
      _unlink_quiet(tmp + _LOCK_SUFFIX)
      raise
    with _LIVE.lock:
      _LIVE.temps[tmp] = (fd, path)
  return tmp


def _release(tmp: str) -> None:
  """Forget a sibling that no longer exists: drop its lock file."""
  with _LIVE.lock:
    entry = _LIVE.temps.pop(tmp, None)
  if entry is None:
    return
  _unlink_quiet(tmp + _LOCK_SUFFIX)
  os.close(entry[0])


def remove_all_temps() -> List[str]:
  """Remove every sibling this process still owns (interrupted command)."""
  with _LIVE.lock:
    temps = list(_LIVE.temps)
  for tmp in temps:
    remove_tree(tmp)
  return temps


def public_path(path: Optional[str]) -> Optional[str]:
  """`path` with a temporary sibling in it replaced by its destination.

  Error messages name what the user asked for, never a hidden temporary
  name (which disappears with the failed command anyway).
  """
  if not path or not isinstance(path, str) or '.tfxe-' not in path:
    return path
  with _LIVE.lock:
    live = dict(_LIVE.temps)
  for tmp, (_, dst) in live.items():
    if path == tmp or path.startswith(tmp + os.sep):
      return dst + path[len(tmp):]
  parts = path.split(os.sep)
  for i, part in enumerate(parts):
    m = TEMP_NAME_RE.match(part)
    if m:
      parts[i] = m.group('name')
  return os.sep.join(parts)


def is_temp_name(name: str) -> bool:
  """True for a tfx-encrypt temporary sibling or its lock file."""
  return TEMP_NAME_RE.match(name) is not None


def sweep(parent: str) -> List[str]:
  """Remove the stale temporary siblings in `parent`; return their names.

  A sibling is stale when its lock file is missing or nobody holds its
  flock. Siblings of live commands (here or in another container sharing
  the directory) are left alone; so is anything not named like a sibling.
  """
  try:
    names = os.listdir(parent)
  except OSError:
    return []
  removed = []
  bases = {}
  for name in names:
    m = TEMP_NAME_RE.match(name)
    if m:
      bases.setdefault(name[:-len(_LOCK_SUFFIX)] if m.group('lock') else name,
                       set()).add(name)
  for base, present in sorted(bases.items()):
    path = os.path.join(parent, base)
    with _LIVE.lock:
      if path in _LIVE.temps:
        continue
    lock_name = base + _LOCK_SUFFIX
    if lock_name not in present:
      if _remove_quiet(path):
        removed.append(base)
      continue
    lock_path = os.path.join(parent, lock_name)
    try:
      fd = os.open(lock_path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC |
                   _O_NONBLOCK)
    except OSError:
      continue  # gone meanwhile, or not ours to open
    try:
      st = os.fstat(fd)
      if not stat.S_ISREG(st.st_mode):
        continue
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        continue  # a live owner holds it
      if st.st_size == 0 and time.time() - st.st_mtime < _EMPTY_LOCK_GRACE_S:
        continue  # its owner is between creating and locking it
      if base in present:
        _remove_quiet(path)
        removed.append(base)
      _unlink_quiet(lock_path)
      if base not in present:
        removed.append(lock_name)
    finally:
      os.close(fd)
  return removed


def _remove_quiet(path: str) -> bool:
  try:
    remove_tree(path)
    return True
  except OSError:
    return False


def _unlink_quiet(path: str) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


def remove_tree(path: Optional[str]) -> None:
  """Remove a file or directory tree if present, never following links.

  Iterative and relative to directory descriptors, so any depth works (a
  1,000-level chain is beyond both Python's recursion limit and PATH_MAX),
  and directories without write permission are made writable first.
  Signals are held while it runs; a sibling's lock file goes last.
  """
  if not path:
    return
  with _signals.deferred():
    try:
      st = os.lstat(path)
    except FileNotFoundError:
      _release(path)
      return
    if stat.S_ISDIR(st.st_mode):
      _rmtree_fd(path)
    else:
      _unlink_quiet(path)
    _release(path)


def _rmtree_fd(path: str) -> None:
  fd = os.open(path, _DIR_FLAGS)
  names: List[str] = []  # the chain below `path`, one name per level
  try:
    while True:
      sub = None
      with os.scandir(fd) as it:
        entries = list(it)
      for e in entries:
        if e.is_dir(follow_symlinks=False):
          sub = e.name
          break
        try:
          os.unlink(e.name, dir_fd=fd)
        except FileNotFoundError:
          pass
        except PermissionError:
          os.fchmod(fd, 0o700)
          os.unlink(e.name, dir_fd=fd)
      if sub is not None:
        try:
          child = os.open(sub, _DIR_FLAGS, dir_fd=fd)
        except PermissionError:
          os.chmod(sub, 0o700, dir_fd=fd)
          child = os.open(sub, _DIR_FLAGS, dir_fd=fd)
        os.fchmod(child, 0o700)  # so that its entries can be unlinked
        os.close(fd)
        fd = child
        names.append(sub)
        continue
      if not names:
        break
      parent = os.open('..', _DIR_FLAGS, dir_fd=fd)
      os.close(fd)
      fd = parent
      try:
        os.rmdir(names.pop(), dir_fd=fd)
      except FileNotFoundError:
        pass
  finally:
    os.close(fd)
  try:
    os.rmdir(path)
  except FileNotFoundError:
    pass
