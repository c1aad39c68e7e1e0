"""Atomic publication: owned temporary siblings, no-replace renames, the
overwrite policy and tree removal that cannot fail half-way (docs/SECURITY.md).
"""

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import socket
import stat
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

from tfx_encrypt import _signals
from tfx_encrypt import errors
from tfx_encrypt.format import digest as digest_lib

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


# --- temporary siblings ---------------------------------------------------------
#
# Every output is written into a hidden temporary sibling and renamed into
# place. A sibling is recognisable by its name and owned through an flock on
# its lock file, held for the life of the process (FORMAT-independent; see
# docs/SECURITY.md):
#
#   .NAME.tfxe-KIND-TOKEN        the temporary file or directory
#   .NAME.tfxe-KIND-TOKEN.lock   "PID HOST", flock'ed by the owner
#
# The lock file is created and locked before the sibling, and removed after
# it, so a sibling whose lock file is missing, or free, belongs to nobody:
# its process died (SIGKILL, power loss). `sweep` removes those; every
# command that creates a sibling sweeps its parent first.

TEMP_NAME_RE = re.compile(
    r'^\.(?P<name>.*)\.tfxe-(?P<kind>[a-z]+)-(?P<token>[0-9a-f]{16})'
    r'(?P<lock>\.lock)?$', re.DOTALL)
_LOCK_SUFFIX = '.lock'
#: A lock file that is still empty this long after its creation is stale.
_EMPTY_LOCK_GRACE_S = 60.0
# Keep the whole sibling name below NAME_MAX (255) for any destination name.
_MAX_NAME_IN_TEMP = 120
_O_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)
_O_CLOEXEC = getattr(os, 'O_CLOEXEC', 0)
_O_NONBLOCK = getattr(os, 'O_NONBLOCK', 0)


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


# --- publishing ------------------------------------------------------------------

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


# --- what --force may replace (docs/SECURITY.md) ----------------------------------

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


# --- plaintext that cannot be orphaned ---------------------------------------------

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


# --- removing trees --------------------------------------------------------------

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


_DIR_FLAGS = os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0) | _O_NOFOLLOW | _O_CLOEXEC


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


# --- reading trees and files --------------------------------------------------

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
