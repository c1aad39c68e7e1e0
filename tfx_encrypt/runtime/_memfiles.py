"""A decrypted model as anonymous memory files that TensorFlow opens by path.

TensorFlow reads a SavedModel by path (`saved_model.pb`, `fingerprint.pb`,
`variables/variables.index`, `variables/variables.data-*` named from the
index's prefix, `assets/*`). `MemoryTree` gives it those paths without a
byte of plaintext in any filesystem:

* each file is decrypted straight into its own `memfd_create(2)` file
  (anonymous shared memory, like a private tmpfs file that has no name),
  verified (every segment tag, its ciphertext and plaintext digests), then
  sealed read-only (`F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW`);
* a private 0700 directory on a tmpfs (`/dev/shm` where it exists) holds
  only symbolic links `NAME -> /proc/self/fd/N` and the model's
  subdirectories, created after every file has been verified. Opening a
  link from this process reaches the memfd; from any other process it
  reaches that process's own descriptor N, never this model.

Cleanup cannot leave plaintext behind: the memfds are freed by the kernel
when their descriptors close, which happens in `close()`, on any exception
(KeyboardInterrupt included) and, at the latest, when the process dies, even
by SIGKILL. The link directory is an owned temporary sibling
(`_fsutil.temp_sibling`): a process killed before removing it leaves only
dangling links (file names, no content), which the next `load_model` sweeps.

Compared with TensorFlow's `ram://` filesystem (the previous design) this
drops two full copies of every file (Python `bytes`, then the GFile write
into a `std::string`): decrypted bytes go to the memfd once, and TensorFlow
reads them from there as it would from the page cache.
"""

import fcntl
import os
import stat
import tempfile
import threading
from typing import Dict, Iterable, Optional

from tfx_encrypt import _fsutil

_SEALS = (getattr(fcntl, 'F_SEAL_WRITE', 0) | getattr(fcntl, 'F_SEAL_SHRINK', 0)
          | getattr(fcntl, 'F_SEAL_GROW', 0) | getattr(fcntl, 'F_SEAL_SEAL', 0))
#: Where the link directory goes: a tmpfs, so not even file names reach a disk.
_LINK_PARENTS = ('/dev/shm',)


def supported(count: int) -> bool:
  """True if this process can hold `count` memfds reachable by path."""
  if not hasattr(os, 'memfd_create') or not os.path.isdir('/proc/self/fd'):
    return False
  return _fsutil._reserve_fds(count)  # pylint: disable=protected-access


def _link_parent() -> str:
  for d in _LINK_PARENTS:
    try:
      st = os.stat(d)
    except OSError:
      continue
    if stat.S_ISDIR(st.st_mode) and os.access(d, os.W_OK | os.X_OK):
      return d
  return tempfile.gettempdir()


class MemoryTree:
  """Verified plaintext files in memfds, published as a directory of links.

  Usage: `create(relpath)` an fd and write the file into it; `done(relpath)`
  once its digests are checked (the memfd is sealed); `publish(relpaths)`
  links files that are done (all of them by default) and returns the
  directory to hand to TensorFlow; it may be called again for more files.
  `close()` (or leaving the `with` block) frees everything.
  """

  def __init__(self, dirs: Iterable[str] = ()):
    self._dirs = sorted(dirs)
    self._lock = threading.Lock()
    self._fds: Dict[str, int] = {}
    self._done = set()
    self._linked = set()
    self.root: Optional[str] = None

  def __enter__(self) -> 'MemoryTree':
    return self

  def __exit__(self, exc_type, *exc) -> None:
    # On success TensorFlow has copied what it needs: the memory is
    # released on a thread, so the caller does not wait for the kernel to
    # free a model's worth of pages (about 0.04 s per 200 MiB here).
    self.close(in_background=exc_type is None)

  def create(self, relpath: str) -> int:
    """A fresh, empty memfd for `relpath` (a file of the package's table)."""
    fd = os.memfd_create('tfx-encrypt', os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    with self._lock:
      if relpath in self._fds:  # the file table has unique paths
        os.close(fd)
        raise ValueError(f'{relpath!r} created twice')
      self._fds[relpath] = fd
    return fd

  def discard(self, relpath: str) -> None:
    with self._lock:
      fd = self._fds.pop(relpath, None)
      self._done.discard(relpath)
    if fd is not None:
      os.close(fd)

  def done(self, relpath: str) -> None:
    """`relpath` holds verified plaintext: make it read-only for good."""
    with self._lock:
      fd = self._fds[relpath]
    if _SEALS:
      try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
      except OSError:
        pass  # a kernel without sealing: the fd is still private
    with self._lock:
      self._done.add(relpath)

  def publish(self, relpaths: Optional[Iterable[str]] = None) -> str:
    """Link `relpaths` (default: every file), all verified; return the root.

    The first call creates the link directory and the model's
    subdirectories. Only files that are `done` are ever linked: asking for
    another one is a bug, and raises before anything is linked.
    """
    with self._lock:
      want = set(self._fds if relpaths is None else relpaths) - self._linked
      missing = want - self._done
      fds = {p: self._fds[p] for p in want if p in self._fds}
    if missing:
      raise RuntimeError(f'{len(missing)} files are not verified yet')
    if self.root is None:
      parent = _link_parent()
      root = _fsutil.temp_sibling(os.path.join(parent, 'tfx-encrypt-model'),
                                  'load')
      self.root = root
      os.mkdir(root, 0o700)
      for d in self._dirs:  # sorted, so parents come first
        os.mkdir(os.path.join(root, *d.split('/')), 0o700)
    for relpath, fd in sorted(fds.items()):
      os.symlink(f'/proc/self/fd/{fd}',
                 os.path.join(self.root, *relpath.split('/')))
      with self._lock:
        self._linked.add(relpath)
    return self.root

  def read(self, relpath: str) -> bytes:
    """The content of a file that is done (e.g. to inspect saved_model.pb)."""
    with self._lock:
      if relpath not in self._done:
        raise RuntimeError(f'{relpath!r} is not verified yet')
      fd = self._fds[relpath]
    size = os.fstat(fd).st_size
    buf = bytearray(size)
    if _fsutil.read_into_exact(fd, buf, 0) != size:
      raise OSError(f'short read of {relpath!r} from memory')
    return bytes(buf)

  def close(self, in_background: bool = False) -> None:
    """Remove the link directory and free every memfd (idempotent).

    The link directory goes at once. With `in_background` the descriptors
    are closed by a daemon thread named `tfxe-free-memfds` (nothing can open
    them any more: the links are gone); if the process ends first, the
    kernel frees them all the same.
    """
    root, self.root = self.root, None
    try:
      if root is not None:
        _fsutil.remove_tree(root)
    finally:
      with self._lock:
        fds, self._fds = self._fds, {}
        self._done = set()
        self._linked = set()
      closer = None
      if in_background and fds:
        closer = threading.Thread(target=_close_all, args=(list(fds.values()),),
                                  name='tfxe-free-memfds', daemon=True)
        try:
          closer.start()
        except RuntimeError:  # no thread to be had: close them here
          closer = None
      if closer is None:
        _close_all(fds.values())


def _close_all(fds: Iterable[int]) -> None:
  for fd in fds:
    os.close(fd)
