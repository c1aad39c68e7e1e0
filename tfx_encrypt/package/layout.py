"""Package files on disk: the directory and bundle forms, the source model.

FORMAT.md §2 (layout: `tfxe.header` + `payload/`, or one `.tfxe` bundle;
only regular files are read) and the writer's side of §9 (scanning a model
directory, refusing links and non-models). Outputs are published through
:mod:`tfx_encrypt._fsutil` (owned temporary siblings, atomic renames;
docs/SECURITY.md).
"""

import dataclasses
import datetime
import errno
import os
import re
import stat
import time
import unicodedata
from typing import List, Optional, Sequence, Tuple

from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt import storage
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import paths as paths_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.format.header import FileEntry, Header
from tfx_encrypt.keys.base import KeyBackend
from tfx_encrypt.package.envelope import Envelope, seal_header


HEADER_NAME = 'tfxe.header'


PAYLOAD_DIR = 'payload'


BUNDLE_SUFFIX = '.tfxe'


_O_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)


_O_CLOEXEC = getattr(os, 'O_CLOEXEC', 0)


def payload_name(i: int) -> str:
  return f'{i:08d}'


@dataclasses.dataclass
class _SourceFile:
  path: str  # relative POSIX path
  abspath: str  # a local path, or the object's s3:// / gs:// URI
  size: int
  #: For an object: the version it was listed at (S3 ETag, GCS generation);
  #: every read is pinned to it.
  version: Optional[str] = None


#: File names that make a directory look like a model (anywhere in the tree).
MODEL_MARKER_NAMES = frozenset(
    {'saved_model.pb', 'saved_model.pbtxt', 'fingerprint.pb'})


#: File name endings that do the same (Keras, TF Lite, HDF5).
MODEL_MARKER_SUFFIXES = ('.keras', '.tflite', '.h5')


_O_NONBLOCK = getattr(os, 'O_NONBLOCK', 0)


def _starts_with_magic(path: str) -> bool:
  """True if the file at `path` starts like a tfx-encrypt header (a bundle,
  or a directory package's header), of any format version."""
  fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
  try:
    return os.pread(fd, 6, 0) == header_lib.MAGIC[:6]
  finally:
    os.close(fd)


def _refuse_in_model(src_dir: str, relpath: str, what: str) -> errors.UsageError:
  if not relpath:
    return errors.UsageError(
        f'{_text.printable(src_dir)} is {what}, not a model; refusing to '
        'encrypt it, even with --any-dir (decrypt it, or rotate it to change '
        'its keys)')
  return errors.UsageError(
      f'{_text.printable(src_dir)} contains {what} at '
      f'{_text.quoted(relpath)}; refusing to encrypt it, even with '
      '--any-dir: move it out of the model directory')


def scan_model(src_dir: str, any_dir: bool = False
               ) -> Tuple[List[_SourceFile], List[str]]:
  """List regular files and directories under src_dir, refusing anything else.

  Symlinks (anywhere below the root), devices, FIFOs and sockets raise
  UnsafePathError; they are never followed.

  It must look like a model: some file in the tree is named as in
  MODEL_MARKER_NAMES or ends as in MODEL_MARKER_SUFFIXES, unless `any_dir`.
  A tree holding a tfx-encrypt package (a `tfxe.header`, or a file starting
  with the format's magic) or a tfx-encrypt temporary sibling is refused
  even with `any_dir`: encrypting it is a mistake (a package inside a
  package, or a half-written output). Only files of at least a header
  prefix's size are opened to read their magic (a few microseconds each).
  """
  root = os.path.abspath(src_dir)
  try:
    st = os.stat(root)
  except FileNotFoundError:
    raise errors.UsageError(f'model directory {src_dir} does not exist') from None
  if not stat.S_ISDIR(st.st_mode):
    raise errors.UsageError(
        f'{src_dir} is not a directory; pass a SavedModel directory')
  files: List[_SourceFile] = []
  dirs: List[str] = []
  looks_like_model = False
  stack = ['']
  while stack:
    rel = stack.pop()
    base = os.path.join(root, rel) if rel else root
    try:
      entries = list(os.scandir(base))
    except PermissionError:
      raise errors.UsageError(f'cannot read directory {base}') from None
    for e in entries:
      name = e.name
      if unicodedata.normalize('NFC', name) != name:
        raise errors.UnsafePathError(
            f'file name {os.path.join(rel, name)!r} is not NFC-normalised '
            'Unicode; rename it')
      relpath = f'{rel}/{name}' if rel else name
      if _fsutil.is_temp_name(name):
        raise errors.UsageError(
            f'{_text.printable(src_dir)} contains a tfx-encrypt temporary '
            f'file {_text.quoted(relpath)} (a command is writing it, or was '
            'interrupted); refusing to encrypt it, even with --any-dir: wait '
            'for that command, or delete it')
      st = e.stat(follow_symlinks=False)
      if stat.S_ISLNK(st.st_mode):
        raise errors.UnsafePathError(
            f'{relpath!r} is a symbolic link; links are never followed. '
            'Replace it with the file it points to.')
      if stat.S_ISDIR(st.st_mode):
        dirs.append(relpath)
        stack.append(relpath)
      elif stat.S_ISREG(st.st_mode):
        if name == HEADER_NAME:
          raise _refuse_in_model(src_dir, rel, 'a tfx-encrypt package')
        if (st.st_size >= header_lib.PREFIX_SIZE and
            _starts_with_magic(e.path)):
          raise _refuse_in_model(src_dir, relpath, 'a tfx-encrypt bundle')
        if not looks_like_model and (
            name in MODEL_MARKER_NAMES or
            name.lower().endswith(MODEL_MARKER_SUFFIXES)):
          looks_like_model = True
        files.append(_SourceFile(relpath, e.path, st.st_size))
      else:
        raise errors.UnsafePathError(
            f'{relpath!r} is not a regular file or directory (device, FIFO or '
            'socket); remove it from the model directory')
  if not files:
    raise errors.EmptyModelError(
        f'{src_dir} contains no files; point at a SavedModel directory (it '
        'should contain saved_model.pb)')
  if len(files) > header_lib.MAX_FILES or len(dirs) > header_lib.MAX_DIRS:
    raise errors.UsageError(
        f'model has more than {header_lib.MAX_FILES} files or directories')
  files.sort(key=lambda f: f.path)
  for f in files:
    if f.size > header_lib.MAX_FILE_SIZE:
      raise errors.UsageError(f'{f.path} is larger than 1 PiB')
  dirs = paths_lib.check_tree([f.path for f in files], dirs)
  if not looks_like_model and not any_dir:
    raise errors.UsageError(
        f'{_text.printable(src_dir)} does not look like a model directory: no '
        f'{", ".join(sorted(MODEL_MARKER_NAMES))} or '
        f'{", ".join("*" + x for x in MODEL_MARKER_SUFFIXES)} file in it; '
        'pass --any-dir (any_dir=True) to encrypt it anyway')
  return files, dirs


def scan_remote_model(uri: str, any_dir: bool = False
                      ) -> Tuple[List[_SourceFile], List[str]]:
  """:func:`scan_model` for a model directory at a `s3://` / `gs://` URI.

  One listing names every object with its size and version; every read of
  the encryption is pinned to that version (a model changed meanwhile
  fails, never mixes). Each object name below `uri/` must be a package path
  (FORMAT.md §9, format/paths.py: no `.`/`..` or empty component, no
  backslash, control or bidi character, NFC, length limits) and no
  tfx-encrypt temporary name; zero-byte objects named like a folder
  (`dir/`, what tf.io.gfile.makedirs writes) are directories, a non-empty
  one is refused. The same model and package rules as locally: a
  `tfxe.header` is refused here, a file starting with the format's magic
  when its first segment is read (before anything is published), or, for
  Beam, by `package._parts.scan_remote_model` (which calls this) up front.
  """
  uri = uri.rstrip('/')
  listing = storage.list_objects(uri)
  if not listing:
    if storage.exists(uri):
      raise errors.UsageError(
          f'{_text.printable(uri)} is an object, not a model directory; '
          'pass the prefix that holds saved_model.pb')
    raise errors.UsageError(
        f'model directory {_text.printable(uri)} does not exist (no object '
        'under it)')
  files: List[_SourceFile] = []
  dirs = set()
  looks_like_model = False
  for name in sorted(listing):
    info = listing[name]
    if name == '' or name.endswith('/'):
      if info.size != 0:
        raise errors.UnsafePathError(
            f'object {_text.quoted(name)} under {_text.printable(uri)} is '
            'named like a folder but holds data; refusing to read it')
      if not name:
        continue
      paths_lib.check_relpath(name[:-1])
      target = name[:-1]
    else:
      paths_lib.check_relpath(name)
      target = None
    for comp in name.rstrip('/').split('/'):
      if _fsutil.is_temp_name(comp):
        raise errors.UsageError(
            f'{_text.printable(uri)} contains a tfx-encrypt temporary file '
            f'{_text.quoted(name)}; refusing to encrypt it, even with '
            '--any-dir')
    parent = (target or name).rpartition('/')[0]
    while parent and parent not in dirs:
      dirs.add(parent)
      parent = parent.rpartition('/')[0]
    if target is not None:
      dirs.add(target)
      continue
    base = name.rpartition('/')[2]
    if base == HEADER_NAME:
      raise _refuse_in_model(uri, name.rpartition('/')[0],
                             'a tfx-encrypt package')
    if base in MODEL_MARKER_NAMES or base.lower().endswith(
        MODEL_MARKER_SUFFIXES):
      looks_like_model = True
    if info.size > header_lib.MAX_FILE_SIZE:
      raise errors.UsageError(f'{_text.quoted(name)} is larger than 1 PiB')
    files.append(_SourceFile(name, storage.join(uri, name), info.size,
                             info.version))
  if not files:
    raise errors.EmptyModelError(
        f'{_text.printable(uri)} contains no files; point at a SavedModel '
        'directory (it should contain saved_model.pb)')
  if len(files) > header_lib.MAX_FILES or len(dirs) > header_lib.MAX_DIRS:
    raise errors.UsageError(
        f'model has more than {header_lib.MAX_FILES} files or directories')
  dirs = paths_lib.check_tree([f.path for f in files], dirs)
  if not looks_like_model and not any_dir:
    raise errors.UsageError(
        f'{_text.printable(uri)} does not look like a model directory: no '
        f'{", ".join(sorted(MODEL_MARKER_NAMES))} or '
        f'{", ".join("*" + x for x in MODEL_MARKER_SUFFIXES)} object in it; '
        'pass --any-dir (any_dir=True) to encrypt it anyway')
  return files, dirs


def check_remote_output(uri: str, *, force: bool,
                        sources: Sequence[str] = ()) -> str:
  """check_output for a `s3://` / `gs://` package: nothing may be there.

  Objects are never replaced (there is no atomic replace on a store), so
  `force` is refused; an output inside a remote source is refused too.
  Zero-byte folder objects (`uri/`) do not count. Returns `uri` without a
  trailing `/`.
  """
  uri = uri.rstrip('/')
  _, bucket, key = storage.split(uri)
  if not key:
    raise errors.UsageError(f'{_text.printable(uri)} names a bucket, not a '
                            'package: add a name (s3://BUCKET/NAME)')
  for src in sources:
    src = os.fspath(src)
    if storage.is_remote(src):
      ss, sb, sk = storage.split(src.rstrip('/'))
      if (ss, sb) == storage.split(uri)[:2] and (
          not sk or key == sk or key.startswith(sk.rstrip('/') + '/')):
        raise errors.UnsafeOverwriteError(
            f'the output {_text.printable(uri)} is inside the input '
            f'{_text.printable(src)}; write it somewhere else')
  taken = storage.exists(uri) or any(
      not storage.is_dir_marker(n, sz)
      for n, sz in storage.list_sizes(uri).items())
  if taken:
    if force:
      raise errors.UnsafeOverwriteError(
          f'--force will not replace {_text.printable(uri)}: objects on a '
          's3:// or gs:// store are never replaced. Remove it yourself if '
          'you mean to replace it, or choose another output')
    raise errors.OutputExistsError(
        f'{_text.printable(uri)} already exists; choose another output (on '
        'object stores, tfx-encrypt never replaces anything)')
  return uri


def delete_objects(uris: Sequence[str]) -> List[str]:
  """Remove objects this process wrote, last first (the commit object
  before the payloads); returns those that could not be removed."""
  left = []
  for uri in reversed(list(uris)):
    try:
      storage.delete(uri)
    except Exception:  # pylint: disable=broad-except
      left.append(uri)
  return left


_VERSION_NAME_RE = re.compile(r'[0-9]{1,20}')
_PAYLOAD_NAME_RE = re.compile(PAYLOAD_DIR + r'/[0-9]{8}')
#: The hidden header of a bundle being uploaded to gs:// (storage/_bundle.py).
_BUNDLE_HEADER_TEMP_RE = re.compile(r'\..{1,120}\.tfxe-bundle-[0-9a-f]{16}')


@dataclasses.dataclass
class IncompletePackage:
  """What a killed run left: a version with payload objects but no header
  (a push or an encrypt; kind 'version'), a BeamEncryptPusher run's
  temporary prefix (kind 'beam-staging'), or the hidden header of a bundle
  upload to gs:// killed before its compose (kind 'bundle-header')."""
  uri: str
  objects: int
  age_s: float
  removed: bool
  kind: str = 'version'


def clean_remote(uri: str, *, older_than_s: float = 3600.0,
                 now: Optional[float] = None) -> List[IncompletePackage]:
  """Remove what SIGKILLed pushes and Beam runs left under a `s3://` /
  `gs://` base.

  The candidates are `uri` itself and its children named like a push
  version (an integer), like a Beam run's staging prefix
  (`.NAME.tfxe-beam-TOKEN`) or like the hidden header of a bundle upload
  to gs:// (`.NAME.tfxe-bundle-TOKEN`: one object starting with the
  format's magic, no larger than a header). A version is removed only if it looks exactly
  like an incomplete tfx-encrypt package: nothing but `payload/NNNNNNNN`
  objects (no `tfxe.header`, no bundle, nothing else; zero-byte folder
  objects aside), each starting like a payload stream (its first byte is
  the stream header's length, FORMAT.md §6). A staging prefix only if its
  content is unmistakably a Beam run's (`_parts.is_our_staging`: the
  marker the run writes first, naming this prefix, and nothing but the
  objects a run writes). Either only when none of its objects was written
  in the last `older_than_s` seconds (a running push or Beam run writes one
  at least that often: there is no lock on a store). Just before removal
  it is listed again and must be unchanged. Anything else is never touched.

  Returns everything found, removed or left (too recent).
  """
  from tfx_encrypt.package import _parts  # pylint: disable=g-import-not-at-top
  uri = uri.rstrip('/')
  now = time.time() if now is None else now
  listing = {n: i for n, i in storage.list_objects(uri).items()
             if not storage.is_dir_marker(n, i.size)}
  groups = {}
  for name, info in listing.items():
    first, _, rest = name.partition('/')
    groups.setdefault(first, {})[rest] = info
  versions, stages, headers = [], [], []
  if _parts.is_staging_name(uri.rpartition('/')[2]):  # `uri` is one
    stages.append((uri, listing))
  elif set(groups) == {PAYLOAD_DIR}:  # `uri` is an incomplete package
    versions.append((uri, listing))
  else:
    for name, objs in sorted(groups.items()):
      if _VERSION_NAME_RE.fullmatch(name):
        versions.append((storage.join(uri, name), objs))
      elif _parts.is_staging_name(name):
        stages.append((storage.join(uri, name), objs))
      elif _BUNDLE_HEADER_TEMP_RE.fullmatch(name) and set(objs) == {''}:
        headers.append((storage.join(uri, name), objs['']))
  found = []
  for where, objs in versions:
    if not objs or not all(_PAYLOAD_NAME_RE.fullmatch(n) for n in objs):
      continue  # a package, a bundle, or not ours
    if not all(_starts_like_a_stream(storage.join(where, n), i)
               for n, i in sorted(objs.items())):
      continue
    found += _remove_if_old(where, objs, 'version', sorted(objs), now,
                            older_than_s)
  for where, objs in stages:
    if not _parts.is_our_staging(where, objs):
      continue  # named like ours, but not unmistakably ours
    found += _remove_if_old(
        where, objs, 'beam-staging', [_parts.STAGING_MARKER] + sorted(
            n for n in objs if n != _parts.STAGING_MARKER), now,
        older_than_s)
  for where, info in headers:
    found += _remove_bundle_header_if_old(where, info, now, older_than_s)
  return found


def _remove_bundle_header_if_old(where: str, info, now: float,
                                 older_than_s: float
                                 ) -> List[IncompletePackage]:
  """The hidden header a bundle upload to gs:// writes just before its
  compose (storage/_bundle.py), left by a SIGKILL: one object that starts
  with the format's magic and is no larger than a header can be. Removed
  if old enough and still the version listed."""
  if not 0 < info.size <= header_lib.MAX_HEADER:
    return []
  try:
    with storage.open_reader(where, version=info.version) as r:
      if r.read_range(0, len(header_lib.MAGIC)) != header_lib.MAGIC:
        return []
  except (FileNotFoundError, storage.ObjectChangedError):
    return []
  age = now - info.mtime
  if age < older_than_s:
    return [IncompletePackage(where, 1, age, False, 'bundle-header')]
  parent, _, name = where.rpartition('/')
  if storage.list_objects(parent).get(name) != info:
    return []  # changed meanwhile
  left = delete_objects([where])
  if left:
    raise OSError(errno.EIO, 'could not remove it', where)
  return [IncompletePackage(where, 1, age, True, 'bundle-header')]


def _remove_if_old(where: str, objs, kind: str, written: Sequence[str],
                   now: float, older_than_s: float
                   ) -> List[IncompletePackage]:
  """Delete the objects `written` (names under `where`, in the order they
  were written) last first, if none was written in the last
  `older_than_s` seconds and a second listing shows exactly `objs` again:
  the first one (payload 0, the Beam marker) goes last, so a clean that
  fails half-way leaves what is left recognisable. The report of what was
  found."""
  age = now - max(i.mtime for i in objs.values())
  if age < older_than_s:
    return [IncompletePackage(where, len(objs), age, False, kind)]
  again = {n: i for n, i in storage.list_objects(where).items()
           if not storage.is_dir_marker(n, i.size)}
  if again != objs:
    return []  # changed meanwhile: someone is writing there
  left = delete_objects([storage.join(where, n) for n in written])
  if left:
    raise OSError(errno.EIO, f'could not remove {len(left)} objects', where)
  return [IncompletePackage(where, len(objs), age, True, kind)]


def _starts_like_a_stream(uri: str, info) -> bool:
  if info.size < streaming.HEADER_SIZE:
    return False
  try:
    with storage.open_reader(uri, version=info.version) as r:
      return r.read_range(0, 1) == bytes([streaming.HEADER_SIZE])
  except (FileNotFoundError, storage.ObjectChangedError):
    return False


def _create(path: str, mode: int = 0o600) -> int:
  return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW |
                 _O_CLOEXEC, mode)


# O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
# (then fstat refuses it); it means nothing for the regular files we read.
_READ_FLAGS = (os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC |
               getattr(os, 'O_NONBLOCK', 0))


def _open_regular(path: str, what: str) -> Tuple[int, os.stat_result]:
  """Open a file of a package for reading: a regular file, or refused.

  Links are not followed and a FIFO, device, socket or directory raises
  UnsafePathError before a single byte is read (the type comes from fstat of
  the opened descriptor, so a rename after a check cannot slip one in).
  Returns (fd, its stat); other OSErrors (missing, permission) propagate.
  """
  try:
    fd = os.open(path, _READ_FLAGS)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise errors.UnsafePathError(
          f'{what} {_text.printable(path)} is a symbolic link; links are '
          'never followed') from None
    raise
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      raise errors.UnsafePathError(
          f'{what} {_text.printable(path)} is not a regular file (a FIFO, '
          'device, socket or directory); only regular files are read')
    if _READ_FLAGS & getattr(os, 'O_NONBLOCK', 0):
      os.set_blocking(fd, True)
  except BaseException:
    os.close(fd)
    raise
  return fd, st


class _Source:
  """An opened package, directory or bundle form."""

  def __init__(self, path: str):
    if storage.is_remote(path):  # open_source reads those (_RemoteSource)
      raise errors.UsageError(
          f'{_text.printable(path)}: this command reads local packages only '
          '(inspect, verify, decrypt, rotate and rewrap also take s3:// and '
          'gs://); copy the package to a local path first')
    self.path = path
    try:
      st = os.stat(path)
    except FileNotFoundError:
      raise errors.UsageError(f'package {path} does not exist') from None
    self.bundle = stat.S_ISREG(st.st_mode)
    if not self.bundle and not stat.S_ISDIR(st.st_mode):
      raise errors.UnsafePathError(
          f'{_text.printable(path)} is neither a regular file (a bundle) nor '
          'a directory (a package); FIFOs, devices and sockets are never read')
    hpath = path if self.bundle else os.path.join(path, HEADER_NAME)
    try:
      fd, _ = _open_regular(hpath, 'bundle' if self.bundle else
                            'package header')
    except FileNotFoundError:
      raise errors.UnsupportedFormatError(
          f'{path} is not a tfx-encrypt package (no {HEADER_NAME})') from None
    except OSError as e:
      raise errors.UnsafePathError(f'cannot open {hpath}: {e.strerror}') from None
    with os.fdopen(fd, 'rb') as f:
      self.header, self.header_len = Header.read(f)
      f.seek(0, os.SEEK_END)
      self._hfile_size = f.tell()
    sizes = [s for s, _ in self.header.payloads]
    if self.bundle:
      if self._hfile_size != self.header_len + sum(sizes):
        raise errors.TamperedPackageError(
            f'bundle {path} has the wrong length for its header (truncated or '
            'extended); fetch a fresh copy')
      self.offsets = []
      off = self.header_len
      for s in sizes:
        self.offsets.append(off)
        off += s
    else:
      if self._hfile_size != self.header_len:
        raise errors.TamperedPackageError(
            f'{hpath} has trailing data after the header')
      self._check_dir(sizes)

  def _check_dir(self, sizes):
    names = set(os.listdir(self.path))
    if names != {HEADER_NAME, PAYLOAD_DIR}:
      extra = sorted(names - {HEADER_NAME, PAYLOAD_DIR})
      shown = ', '.join(_text.quoted(n, 64) for n in extra[:5])
      if len(extra) > 5:
        shown += f' and {len(extra) - 5} more'
      raise errors.TamperedPackageError(
          f'package directory {self.path} has unexpected entries '
          f'[{shown}] or is missing '
          f'{sorted({HEADER_NAME, PAYLOAD_DIR} - names)}')
    pdir = os.path.join(self.path, PAYLOAD_DIR)
    pmode = os.lstat(pdir).st_mode
    if stat.S_ISLNK(pmode):
      raise errors.UnsafePathError(f'{pdir} is a symbolic link')
    if not stat.S_ISDIR(pmode):
      raise errors.UnsafePathError(f'{pdir} is not a directory')
    want = {payload_name(i) for i in range(len(sizes))}
    have = set(os.listdir(pdir))
    if have != want:
      raise errors.TamperedPackageError(
          f'payload files of {self.path} do not match its header: '
          f'{len(have - want)} unexpected, {len(want - have)} missing')
    for i, s in enumerate(sizes):
      p = os.path.join(pdir, payload_name(i))
      st = os.lstat(p)
      if not stat.S_ISREG(st.st_mode):
        raise errors.UnsafePathError(f'{p} is not a regular file')
      if st.st_size != s:
        raise errors.TamperedPackageError(
            f'payload {i} of {self.path} has the wrong size (truncated or '
            'extended); fetch a fresh copy')

  def open_payload(self, i: int) -> Tuple[int, int]:
    """Return (fd, offset of the stream within fd).

    The file is opened anew, so it is checked anew: a regular file (never a
    FIFO that would block, a device or a link), of the expected size.
    """
    if self.bundle:
      fd, st = _open_regular(self.path, 'bundle')
      want, offset = self._hfile_size, self.offsets[i]
    else:
      p = os.path.join(self.path, PAYLOAD_DIR, payload_name(i))
      fd, st = _open_regular(p, 'payload file')
      want, offset = self.header.payloads[i][0], 0
    if st.st_size != want:
      os.close(fd)
      raise errors.TamperedPackageError(
          f'{self.path} changed while it was being read (payload {i} has the '
          'wrong size); fetch a fresh copy')
    return fd, offset

  def read_stream_header(self, fd: int, offset: int) -> bytes:
    buf = bytearray(streaming.HEADER_SIZE)
    if _fsutil.read_into_exact(fd, buf, offset) != len(buf):
      raise errors.TamperedPackageError('payload stream is truncated')
    return bytes(buf)


class _RemoteSource(_Source):
  """An opened package at a `s3://` or `gs://` URI (docs/OBJECT_STORES.md).

  The same forms and checks as on disk (FORMAT.md §2): the directory form
  is exactly the objects `URI/tfxe.header` and `URI/payload/NNNNNNNN` of the
  header's sizes, the bundle is the one object `URI` of exactly the
  header's length. The header is a push's commit point: payload objects
  with no header are an incomplete package, reported as such and never
  read. Payloads are read with ranged requests, one chunk in memory per
  open payload, each pinned to the object version it opened (a version
  replaced mid-read is an error, never a mix).
  """

  def __init__(self, uri: str):  # pylint: disable=super-init-not-called
    self.path = uri.rstrip('/')
    hpath = storage.join(self.path, HEADER_NAME)
    try:
      reader = storage.open_reader(hpath)
      self.bundle = False
    except FileNotFoundError:
      try:
        reader = storage.open_reader(self.path)
        self.bundle = True
      except FileNotFoundError:
        left = [n for n, sz in storage.list_sizes(self.path).items()
                if not storage.is_dir_marker(n, sz)]
        if left:
          raise errors.UnsupportedFormatError(
              f'{_text.printable(self.path)} is an incomplete package: '
              f'{len(left)} objects under it but no {HEADER_NAME} (a push '
              'still running, or one that failed); it is not read') from None
        raise errors.UsageError(
            f'package {_text.printable(self.path)} does not exist') from None
    with reader:
      self.header, self.header_len = Header.read(storage.ReaderFile(reader))
      self._hfile_size = reader.size
      # The version these header bytes were read from (S3 ETag, GCS
      # generation): rewrap replaces the header only if it still is.
      self.header_version = reader.version
    sizes = [s for s, _ in self.header.payloads]
    if self.bundle:
      if self._hfile_size != self.header_len + sum(sizes):
        raise errors.TamperedPackageError(
            f'bundle {_text.printable(self.path)} has the wrong length for '
            'its header (truncated or extended); fetch a fresh copy')
      self.offsets = []
      off = self.header_len
      for s in sizes:
        self.offsets.append(off)
        off += s
      return
    if self._hfile_size != self.header_len:
      raise errors.TamperedPackageError(
          f'{_text.printable(hpath)} has trailing data after the header')
    want = {HEADER_NAME: self.header_len}
    want.update({f'{PAYLOAD_DIR}/{payload_name(i)}': s
                 for i, s in enumerate(sizes)})
    # Zero-byte "folder" objects (tf.io.gfile.makedirs, consoles) hold
    # nothing: skipped, as a reader of the directory form skips nothing else.
    have = {n: sz for n, sz in storage.list_sizes(self.path).items()
            if not (storage.is_dir_marker(n, sz) and n in ('', PAYLOAD_DIR +
                                                           '/'))}
    if set(have) != set(want):
      raise errors.TamperedPackageError(
          f'package {_text.printable(self.path)} does not match its header: '
          f'{len(set(have) - set(want))} unexpected objects, '
          f'{len(set(want) - set(have))} missing')
    for name, s in want.items():
      if have[name] != s:
        raise errors.TamperedPackageError(
            f'{_text.printable(name)} of {_text.printable(self.path)} has '
            'the wrong size (truncated or extended); fetch a fresh copy')

  def open_payload(self, i: int):
    """Return (a storage.Reader, offset of the stream within it)."""
    if self.bundle:
      uri, want, offset = self.path, self._hfile_size, self.offsets[i]
    else:
      uri = storage.join(self.path, PAYLOAD_DIR, payload_name(i))
      want, offset = self.header.payloads[i][0], 0
    try:
      reader = storage.open_reader(uri)
    except FileNotFoundError:
      raise errors.TamperedPackageError(
          f'{_text.printable(self.path)} changed while it was being read '
          f'(payload {i} is gone); fetch a fresh copy') from None
    if reader.size != want:
      reader.close()
      raise errors.TamperedPackageError(
          f'{_text.printable(self.path)} changed while it was being read '
          f'(payload {i} has the wrong size); fetch a fresh copy')
    return reader, offset


def open_source(path: str) -> _Source:
  """Open a package for reading: a local path, or a s3:// / gs:// URI."""
  if storage.is_remote(path):
    return _RemoteSource(path)
  return _Source(path)


def open_for_rewrap(path: str) -> _Source:
  """The package `rewrap` changes in place: a local one (directory or
  bundle), or a package on s3:// / gs:// (directory form: its header
  object; a bundle: the one object), which rewrap replaces only if it is
  still the version read here (`header_version`; docs/OBJECT_STORES.md,
  "rewrap in place")."""
  if not storage.is_remote(path):
    return _Source(path)
  src = _RemoteSource(path)
  if not src.header_version:
    what = 'the bundle' if src.bundle else HEADER_NAME
    raise errors.UsageError(
        f'{_text.printable(src.path)}: the store named no version for '
        f'{what}, so it cannot be replaced only if unchanged')
  return src


def start_package(package: str, force: bool = False) -> str:
  """Create the private temporary sibling `tmp/payload/` for a new package."""
  package = _fsutil.check_output(package, force=force)
  tmp = _fsutil.temp_sibling(package)
  os.mkdir(tmp, 0o700)
  try:
    os.mkdir(os.path.join(tmp, PAYLOAD_DIR), 0o700)
  except BaseException:
    _fsutil.remove_tree(tmp)
    raise
  return tmp


def build_header(env: Envelope, *, entries: Sequence[FileEntry],
                 dirs: Sequence[str], payloads: Sequence[Tuple[int, str]],
                 signer: Optional[KeyBackend]) -> Tuple[Header, bytes]:
  """The header over sealed payloads: file table, fingerprint, MAC,
  signature. Returns (header, its bytes)."""
  h = Header(
      suite=env.suite, hash_alg=env.hash_alg, package_id=env.package_id,
      created=_now(), context=env.context, recipients=env.stanzas,
      threshold=env.threshold, commitment=env.keys.commitment,
      fingerprint=digest_lib.root_digest(env.hash_alg,
                                         (e.digest for e in entries)),
      payloads=list(payloads),
      file_table=streaming.encrypt_bytes(
          env.suite, env.keys.stream_key,
          header_lib.file_table_aad(env.package_id, env.ctx_digest),
          header_lib.encode_file_table(entries, dirs)))
  seal_header(h, env.keys.mac_key, signer)
  return h, h.serialize()


def finish_package(env: Envelope, tmp: str, package: str, *,
                   entries: Sequence[FileEntry], dirs: Sequence[str],
                   payloads: Sequence[Tuple[int, str]],
                   signer: Optional[KeyBackend], bundle: bool,
                   force: bool = False, fsync: bool = False
                   ) -> Tuple[Header, int]:
  """Build, MAC and sign the header over the sealed payloads in `tmp`, then
  publish the package atomically (directory form, or a bundle).

  Returns (header, header length). On failure the caller removes `tmp`;
  anything this function created besides it is removed here.
  """
  h, hbytes = build_header(env, entries=entries, dirs=dirs,
                           payloads=payloads, signer=signer)
  pdir = os.path.join(tmp, PAYLOAD_DIR)
  if bundle:
    out_tmp = _fsutil.temp_sibling(package)
    try:
      _write_bundle(out_tmp, hbytes, pdir, len(payloads), fsync)
      _fsutil.publish(out_tmp, package, force=force)
    except BaseException:
      _fsutil.remove_tree(out_tmp)
      raise
    _fsutil.remove_tree(tmp)
  else:
    hfd = _create(os.path.join(tmp, HEADER_NAME), 0o644)
    try:
      _fsutil.write_all(hfd, hbytes)
      if fsync:
        os.fsync(hfd)
    finally:
      os.close(hfd)
    os.chmod(pdir, 0o755)
    os.chmod(tmp, 0o755)
    if fsync:
      _fsutil.fsync_dir(pdir)
      _fsutil.fsync_dir(tmp)
    _fsutil.publish(tmp, package, force=force)
  if fsync:
    _fsutil.fsync_dir(os.path.dirname(package))
  return h, len(hbytes)


def _write_bundle(path: str, hbytes: bytes, pdir: str, count: int,
                  fsync: bool) -> None:
  out = _create(path, 0o644)
  try:
    _fsutil.write_all(out, hbytes)
    for i in range(count):
      fd, st = _open_regular(os.path.join(pdir, payload_name(i)),
                             'payload file')
      try:
        _copy_fd(fd, out, st.st_size)
      finally:
        os.close(fd)
    if fsync:
      os.fsync(out)
  finally:
    os.close(out)


def bundle_directory_package(package, out) -> None:
  """Write the bundle form of a directory package to the new file `out`.

  The same bytes, one file (FORMAT.md §2): the header, then the payloads in
  index order, copied by the kernel. The directory is validated first
  (header parse, exact payload set and sizes, no links).
  """
  src = _Source(os.fspath(package))
  if src.bundle:
    raise errors.UsageError(f'{src.path} is already a bundle')
  fd, _ = _open_regular(os.path.join(src.path, HEADER_NAME), 'package header')
  try:
    hbytes = bytearray(src.header_len)
    if _fsutil.read_into_exact(fd, hbytes, 0) != src.header_len:
      raise errors.TamperedPackageError(f'{src.path}: header is truncated')
  finally:
    os.close(fd)
  _write_bundle(os.fspath(out), bytes(hbytes),
                os.path.join(src.path, PAYLOAD_DIR), len(src.header.payloads),
                fsync=False)


def _copy_fd(src: int, dst: int, size: int, src_offset: int = 0) -> None:
  """Kernel-side copy of `size` bytes (copy_file_range), with a fallback."""
  copied = 0
  if hasattr(os, 'copy_file_range'):
    try:
      while copied < size:
        n = os.copy_file_range(src, dst, size - copied, src_offset + copied)
        if n == 0:
          break
        copied += n
    except OSError:
      pass
  buf = memoryview(bytearray(1 << 20))
  while copied < size:
    ln = min(len(buf), size - copied)
    got = _fsutil.read_into_exact(src, buf[:ln], src_offset + copied)
    if got != ln:
      raise errors.TamperedPackageError('payload is truncated')
    _fsutil.write_all(dst, buf[:ln])
    copied += ln


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%dT%H:%M:%SZ')


def _write_header_only(src: _Source, h: Header) -> None:
  """Atomically replace a package's header, keeping its payloads."""
  hbytes = h.serialize()
  if not src.bundle:
    hpath = os.path.join(src.path, HEADER_NAME)
    tmp = _fsutil.temp_sibling(hpath)
    try:
      fd = _create(tmp, 0o644)
      try:
        _fsutil.write_all(fd, hbytes)
        os.fsync(fd)
      finally:
        os.close(fd)
      _fsutil.publish(tmp, hpath, force=True)  # a header: replaceable
    except BaseException:
      _fsutil.remove_tree(tmp)
      raise
    return
  tmp = _fsutil.temp_sibling(src.path)
  out = _create(tmp, 0o644)
  try:
    _fsutil.write_all(out, hbytes)
    fd, _ = _open_regular(src.path, 'bundle')
    try:
      _copy_fd(fd, out, h.ciphertext_bytes, src.header_len)
    finally:
      os.close(fd)
    os.fsync(out)
    os.close(out)
    out = None
    _fsutil.publish(tmp, src.path, force=True)  # a bundle: replaceable
  except BaseException:
    if out is not None:
      os.close(out)
    _fsutil.remove_tree(tmp)
    raise
