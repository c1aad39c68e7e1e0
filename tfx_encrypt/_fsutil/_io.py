"""Exact reads and writes, hashing and sizing files and trees, and
plaintext files that cannot be orphaned (O_TMPFILE)."""

import errno
import os
import threading
from typing import Dict, Optional, Tuple, Union

from tfx_encrypt.format import digest as digest_lib


_O_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)
_O_CLOEXEC = getattr(os, 'O_CLOEXEC', 0)
_O_NONBLOCK = getattr(os, 'O_NONBLOCK', 0)


class UnlinkedFiles:
  """Files written without a name (O_TMPFILE), named only when all are done.

  Decrypt writes each file into an anonymous inode of its directory and
  links them all into the temporary tree after every digest checked. If the
  process dies before that (even by SIGKILL), the kernel frees the
  plaintext: the stale sibling that the next command sweeps holds only
  empty directories. Where O_TMPFILE or /proc/self/fd is missing, or the
  process may not hold one descriptor per file, files are created by name
  as before (the sweep still removes them).
  """

  def __init__(self, count: int):
    self._lock = threading.Lock()
    self._pending: Dict[str, int] = {}
    self._named = set()
    self.enabled = (hasattr(os, 'O_TMPFILE') and
                    os.path.isdir('/proc/self/fd') and _reserve_fds(count))

  def create(self, path: str, mode: int = 0o600) -> int:
    """An fd to write `path`'s content into; then `done` or `discard` it."""
    if self.enabled:
      try:
        return os.open(os.path.dirname(path),
                       os.O_TMPFILE | os.O_WRONLY | _O_CLOEXEC, mode)
      except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
          raise
        self.enabled = False  # this filesystem has no O_TMPFILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW |
                 _O_CLOEXEC, mode)
    with self._lock:
      self._named.add(fd)
    return fd

  def done(self, path: str, fd: int) -> None:
    """`fd` holds `path`'s verified content."""
    with self._lock:
      named = fd in self._named
      self._named.discard(fd)
      if not named:
        self._pending[path] = fd
    if named:
      os.close(fd)

  def discard(self, fd: int) -> None:
    with self._lock:
      self._named.discard(fd)
    os.close(fd)

  def link_all(self) -> None:
    """Give every finished anonymous file its name (no plaintext is new)."""
    with self._lock:
      pending, self._pending = self._pending, {}
    # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names an O_TMPFILE
    # inode. Python calls plain link(2), which does not follow, unless a
    # dir fd is given: hence the (unused, the path is absolute) src_dir_fd.
    root = os.open('/', _DIR_FLAGS)
    try:
      for path, fd in sorted(pending.items()):
        os.link(f'/proc/self/fd/{fd}', path, src_dir_fd=root,
                follow_symlinks=True)
    finally:
      os.close(root)
      for fd in pending.values():
        os.close(fd)

  def close_all(self) -> None:
    """Drop every unlinked file: the kernel frees the plaintext."""
    with self._lock:
      pending, self._pending = self._pending, {}
    for fd in pending.values():
      os.close(fd)


def _reserve_fds(count: int) -> bool:
  """Raise the soft RLIMIT_NOFILE so `count` more descriptors fit."""
  import resource  # pylint: disable=g-import-not-at-top
  need = count + 256
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if soft == resource.RLIM_INFINITY or soft >= need:
    return True
  if hard != resource.RLIM_INFINITY and hard < need:
    return False
  try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
  except (ValueError, OSError):
    return False
  return True


_DIR_FLAGS = os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0) | _O_NOFOLLOW | _O_CLOEXEC


def fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_all(fd: int, data, offset: Optional[int] = None) -> None:
  """Write all of `data` to fd (at `offset` with pwrite if given)."""
  mv = memoryview(data)
  while mv:
    if offset is None:
      n = os.write(fd, mv)
    else:
      n = os.pwrite(fd, mv, offset)
      offset += n
    mv = mv[n:]


def read_into_exact(fd: int, buf, offset: Optional[int] = None) -> int:
  """Fill memoryview `buf` from fd (at `offset` with preadv if given).

  `fd` may also be a `tfx_encrypt.storage.Reader` (a remote object, read
  with ranged requests at `offset`).
  """
  if not isinstance(fd, int):
    return fd.read_into(buf, offset or 0)
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


#: Bytes read per call while hashing a file.
_HASH_CHUNK = 4 << 20


def hash_file(path: Union[str, int], alg: str, *, offset: int = 0,
              size: Optional[int] = None) -> Tuple[str, int]:
  """The hex digest of a file's bytes, and how many were hashed.

  The one hashing loop for the package's digests (FORMAT.md §9: verify,
  the Beam executor) and the OCI layer digest, so they agree byte for byte.

  Args:
    path: a path (opened without following a final link) or an open file
      descriptor, which is read with pread and left open.
    alg: a hash name of `tfx_encrypt.format.digest` ('blake3', 'sha256').
    offset: where to start.
    size: how many bytes to hash; default: up to the end of the file.

  Returns:
    (hex digest, bytes hashed): fewer than `size` bytes when the file ends
    first, which the caller treats as truncation.

  Raises:
    OSError: the file cannot be opened or read.
    UsageError / UnsupportedFormatError: `alg` is unavailable or unknown.
  """
  h = digest_lib.new_hash(alg)
  opened = not (isinstance(path, int) or hasattr(path, 'read_into'))
  fd = os.open(os.fspath(path), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC
               ) if opened else path
  try:
    left = os.fstat(fd).st_size - offset if size is None else size
    buf = memoryview(bytearray(max(1, min(left, _HASH_CHUNK))))
    done = 0
    while size is None or done < size:
      want = len(buf) if size is None else min(len(buf), size - done)
      got = read_into_exact(fd, buf[:want], offset + done)
      h.update(buf[:got])
      done += got
      if got < want:
        break
  finally:
    if opened:
      os.close(fd)
  return h.hexdigest(), done


def close_fd(fd) -> None:
  """Close a file descriptor, or a `tfx_encrypt.storage.Reader`."""
  if isinstance(fd, int):
    os.close(fd)
  else:
    fd.close()


def tree_size(path: str) -> int:
  """Bytes of the regular files below `path`, never following links.

  An estimate (progress bars, the Beam executor's in-process threshold): a
  directory that cannot be read counts as empty, and whoever reads the tree
  next reports it properly. Iterative: os.walk recurses once per level
  before Python 3.12, and a 1,000-level directory chain must give the
  commands' typed errors, not a RecursionError.
  """
  total = 0
  stack = [path]
  while stack:
    try:
      with os.scandir(stack.pop()) as it:
        for e in it:
          if e.is_dir(follow_symlinks=False):
            stack.append(e.path)
          elif e.is_file(follow_symlinks=False):
            total += e.stat(follow_symlinks=False).st_size
    except OSError:
      pass
  return total
