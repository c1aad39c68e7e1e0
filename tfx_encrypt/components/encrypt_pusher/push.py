"""Where an EncryptPusher package goes: the artifact, then `<base>/<version>/`.

`encrypt_to_artifact` writes the package into the `EncryptedModel`
artifact (staged next to a local one and renamed; streamed straight into
one on `gs://` / `s3://`; a model on `gs://` / `s3://` is read from the
store, never staged as plaintext); `push_package` pushes it with the
TFX Pusher's versioning (a Unix timestamp, `str(int(time.time()))`) and
tfx-encrypt's publication rules (docs/SECURITY.md):

* On a POSIX filesystem (a path or `file://`), the package is copied into an
  owned temporary sibling inside the base directory and renamed to
  `<base>/<version>` with an atomic create-if-absent rename
  (`renameat2(RENAME_NOREPLACE)` on Linux, through `tfx_encrypt._fsutil`). On
  a collision, e.g. two runs pushing in the same second, the version is
  bumped (`<ts>+1`, ...), so version names stay integers that sort in push
  order, as TF Serving style consumers expect.
* On `gs://` and `s3://` (`tfx_encrypt.storage`, docs/OBJECT_STORES.md)
  every object of the push is written create-only (GCS `ifGenerationMatch=0`,
  S3 `If-None-Match: *`): the payload objects first (payload 0 claims the
  version: a concurrent push of the same version fails on it and moves on),
  then the header, or the one bundle object, as the commit point. A version
  someone else holds is left alone and the next one is tried; a failed push
  deletes the objects it wrote. See `_push_object_store`.
* On other object stores reached through `tf.io.gfile` there is no
  create-if-absent: the first free version is chosen by an existence check
  and the package is copied into it, payload first and header last (best
  effort; see `_push_remote`).
* On failure, temporary paths are removed; nothing is left at the
  destination.
"""

import contextlib
import errno
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Optional, Tuple

from absl import logging
from tfx.dsl.io import fileio
from tfx.utils import io_utils

from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt import storage
from tfx_encrypt.components.encrypt_pusher import spec

# How many consecutive versions to try after a collision.
_MAX_VERSION_ATTEMPTS = 1000

_URL_SCHEME_RE = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')


def is_local_path(path: str) -> bool:
  """True for a plain path or a file:// URI (a POSIX filesystem)."""
  m = _URL_SCHEME_RE.match(path)
  return not m or m.group(1).lower() == 'file'


def local_path(path: str) -> str:
  return path[len('file://'):] if path.startswith('file://') else path


def rename_noreplace(src: str, dst: str) -> None:
  """Renames src to dst, failing with FileExistsError if dst exists.

  Atomic on Linux (renameat2 with RENAME_NOREPLACE, via
  `tfx_encrypt._fsutil.publish`). Elsewhere it falls back to an existence
  check and rename(2), which still never replaces a non-empty directory.

  Raises:
    FileExistsError: dst exists.
  """
  try:
    _fsutil.publish(src, dst, force=False)
  except errors.OutputExistsError as e:
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from e
  except OSError as e:
    if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
      raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST),
                            dst) from e
    raise


def _copy_tree(src: str, dst: str) -> None:
  """Copies a local file or directory tree `src` to the new path `dst`."""
  if os.path.isdir(src):
    shutil.copytree(src, dst, symlinks=False, copy_function=shutil.copyfile)
  else:
    os.makedirs(os.path.dirname(dst) or '.', exist_ok=True)
    shutil.copyfile(src, dst)


def _remove_tree(path: str) -> None:
  try:
    if is_local_path(path):
      _fsutil.remove_tree(local_path(path))
    elif fileio.exists(path):
      if fileio.isdir(path):
        fileio.rmtree(path)
      else:
        fileio.remove(path)
  except Exception:  # pylint: disable=broad-except
    logging.warning('Could not remove temporary path %s',
                    _text.printable(path), exc_info=True)


def is_empty_or_package(uri: str) -> bool:
  """A remote directory tfx-encrypt may replace (docs/SECURITY.md §1)."""
  from tfx_encrypt.format import header  # pylint: disable=g-import-not-at-top
  if not fileio.isdir(uri):
    return False
  names = sorted(n.rstrip('/') for n in fileio.listdir(uri))
  if not names:
    return True
  if names == ['payload', 'tfxe.header']:
    first = os.path.join(uri, 'tfxe.header')
  elif names == [spec.BUNDLE_FILE_NAME]:
    first = os.path.join(uri, spec.BUNDLE_FILE_NAME)
  else:
    return False
  with fileio.open(first, 'rb') as f:
    return f.read(len(header.MAGIC)) == header.MAGIC


def push_package(package_path: str,
                 base_directory: str,
                 version: Optional[str] = None) -> Tuple[str, str]:
  """Pushes a package to `<base_directory>/<version>/` without overwriting.

  Args:
    package_path: the local package directory (or a directory holding a
      bundle).
    base_directory: destination base dir, local or any tf.io.gfile scheme.
    version: integer version to try first; default the current Unix time.

  Returns:
    (destination path, version string).

  Raises:
    OSError / errors.TfxEncryptError: the push failed; nothing was left at the
      destination.
  """
  start = int(version) if version is not None else int(time.time())
  if storage.is_remote(package_path) and not storage.is_remote(
      base_directory):
    # The package is on a store (a remote EncryptedModel artifact): its
    # ciphertext is copied into the local or tf.io.gfile destination.
    staging = tempfile.mkdtemp(prefix='tfx-encrypt-ciphertext-')
    try:
      local = os.path.join(staging, 'package')
      _download_package(package_path, local)
      return push_package(local, base_directory, version=str(start))
    finally:
      _fsutil.remove_tree(staging)
  if is_local_path(base_directory):
    _, v = _push_local(package_path, local_path(base_directory), start)
    return os.path.join(base_directory, v), v  # as the user spelled it
  return _push_remote(package_path, base_directory, start)


def _push_local(package_path: str, base: str, start: int) -> Tuple[str, str]:
  """Temp sibling in `base`, then an atomic no-replace rename per version."""
  os.makedirs(base, exist_ok=True)
  # An owned temporary sibling (docs/SECURITY.md): a SIGKILLed push leaves
  # it for the next command writing into `base` (or tfx-encrypt clean).
  tmp = _fsutil.temp_sibling(os.path.join(base, str(start)), 'push')
  try:
    _copy_tree(package_path, tmp)
    for v in range(start, start + _MAX_VERSION_ATTEMPTS):
      target = os.path.join(base, str(v))
      try:
        rename_noreplace(tmp, target)
      except FileExistsError:
        logging.info('Version %s already exists under %s; trying %s.', v,
                     _text.printable(base), v + 1)
        continue
      return target, str(v)
    raise errors.OutputExistsError(
        f'could not find a free version under {base} after '
        f'{_MAX_VERSION_ATTEMPTS} attempts starting at {start}')
  except BaseException:
    _remove_tree(tmp)
    raise


def _push_remote(package_path: str, base: str, start: int
                 ) -> Tuple[str, str]:
  """Best effort on object stores: no atomic rename or create-if-absent.

  Picks the first version that does not exist and copies the package into
  it, the payload files first and the header (or the single bundle object)
  last: one object write is atomic on GCS and S3, so a reader that waits for
  the header never sees a partial package. Two writers checking the same
  version at the same instant are not excluded; use a local or mounted
  destination when concurrent pushes must be strictly serialised.

  `gs://` and `s3://` do not come here: `_push_object_store` publishes
  there with create-only writes.
  """
  if storage.is_remote(base):
    return _push_object_store(package_path, base, start)
  fileio.makedirs(base)
  for v in range(start, start + _MAX_VERSION_ATTEMPTS):
    target = os.path.join(base, str(v))
    if fileio.exists(target):
      logging.info('Version %s already exists under %s; trying %s.', v,
                   _text.printable(base), v + 1)
      continue
    try:
      last = []
      for root, _, names in os.walk(package_path):
        rel = os.path.relpath(root, package_path)
        for name in sorted(names):
          src = os.path.join(root, name)
          dst = os.path.join(target, name) if rel == '.' else os.path.join(
              target, rel, name)
          if rel == '.':
            last.append((src, dst))  # header / bundle: written last
          else:
            io_utils.copy_file(src, dst)
      for src, dst in last:
        io_utils.copy_file(src, dst)
    except BaseException:
      _remove_tree(target)
      raise
    return target, str(v)
  raise errors.OutputExistsError(
      f'could not find a free version under {base} after '
      f'{_MAX_VERSION_ATTEMPTS} attempts starting at {start}')


def _package_objects(package_path: str
                     ) -> Tuple[list, Tuple[Any, str]]:
  """The objects of a package, in push order: ([(source, object name), ...]
  of the payloads, (source, name) of the commit object). A source is a
  local file path, or (URI, listed version) for a package on a store."""
  if storage.is_remote(package_path):
    return _remote_package_objects(package_path.rstrip('/'))
  header = os.path.join(package_path, 'tfxe.header')
  if os.path.isfile(header):
    pdir = os.path.join(package_path, 'payload')
    names = sorted(os.listdir(pdir))
    if sorted(os.listdir(package_path)) != ['payload', 'tfxe.header'] or (
        not names):
      raise errors.UsageError(
          f'{_text.printable(package_path)} is not a package directory')
    return ([(os.path.join(pdir, n), f'payload/{n}') for n in names],
            (header, 'tfxe.header'))
  if os.listdir(package_path) == [spec.BUNDLE_FILE_NAME]:
    return [], (os.path.join(package_path, spec.BUNDLE_FILE_NAME),
                spec.BUNDLE_FILE_NAME)
  raise errors.UsageError(
      f'{_text.printable(package_path)} holds neither a package nor a '
      f'{spec.BUNDLE_FILE_NAME}')


def _remote_package_objects(uri: str) -> Tuple[list, Tuple[Any, str]]:
  listing = {n: i for n, i in storage.list_objects(uri).items()
             if not storage.is_dir_marker(n, i.size)}
  names = sorted(listing)
  src = lambda n: (storage.join(uri, n), listing[n].version)  # pylint: disable=unnecessary-lambda-assignment
  if names == [spec.BUNDLE_FILE_NAME]:
    return [], (src(spec.BUNDLE_FILE_NAME), spec.BUNDLE_FILE_NAME)
  payloads = [n for n in names if _PAYLOAD_OBJECT_RE.fullmatch(n)]
  if 'tfxe.header' not in names or not payloads or len(payloads) + 1 != len(
      names):
    raise errors.UsageError(
        f'{_text.printable(uri)} holds neither a package nor a '
        f'{spec.BUNDLE_FILE_NAME}')
  return [(src(n), n) for n in payloads], (src('tfxe.header'), 'tfxe.header')


def _put_create_only_from(source, uri: str) -> None:
  """Write the object `uri` create-only from a local file, or by a
  streamed copy of an object pinned to its listed version (no staging;
  memory: one read chunk and one upload part)."""
  if isinstance(source, str):
    with open(source, 'rb') as f:
      storage.put_create_only(uri, f)
    return
  src_uri, version = source
  with storage.open_reader(src_uri, version=version) as r:
    w = storage.open_writer(uri, r.size)
    try:
      _copy_reader(r, src_uri, w.write)
      w.commit()
    except BaseException:
      w.abort()
      raise


def _download_package(uri: str, dst: str) -> None:
  """Copy a package on a store (its ciphertext) into the new local `dst`."""
  payloads, commit = _package_objects(uri)
  os.mkdir(dst, 0o700)
  for (src_uri, version), name in payloads + [commit]:
    path = os.path.join(dst, *name.split('/'))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with storage.open_reader(src_uri, version=version) as r, open(
        path, 'xb') as f:
      _copy_reader(r, src_uri, f.write)


def _copy_reader(r, src_uri: str, write) -> None:
  """Copy the whole object `r` (pinned to its version) into `write`, one
  chunk at a time; then check the object did not change meanwhile."""
  buf = memoryview(bytearray(storage.CHUNK_SIZE))
  off = 0
  while off < r.size:
    n = r.read_into(buf[:min(len(buf), r.size - off)], off)
    if n <= 0:
      raise errors.TamperedPackageError(
          f'{_text.printable(src_uri)} was truncated while it was copied')
    write(buf[:n])
    off += n
  r.check_unchanged()


def _push_object_store(package_path: str, base: str, start: int
                       ) -> Tuple[str, str]:
  """Atomic, never-overwriting push to `gs://` / `s3://` (docs/OBJECT_STORES.md).

  Every object is written create-only. The payload objects go first, in
  index order, so payload 0 claims the version: a concurrent push of the
  same version fails on it before writing anything and tries the next
  version. The header (or the bundle object) goes last: the commit point;
  until it exists readers treat the version as incomplete. A version that
  already holds any object (a package, someone's incomplete push, anything
  else) is skipped. On a collision, or any failure, the objects this push
  wrote are deleted.
  """
  payloads, commit = _package_objects(package_path)
  for v in range(start, start + _MAX_VERSION_ATTEMPTS):
    target = storage.join(base, str(v))
    if storage.list_names(target):
      logging.info('Version %s already exists under %s; trying %s.', v,
                   _text.printable(base), v + 1)
      continue
    written = []
    try:
      for source, name in payloads + [commit]:
        uri = storage.join(target, name)
        _put_create_only_from(source, uri)
        written.append(uri)
    except storage.ObjectExistsError:
      _delete_objects(written)
      logging.info('Version %s was taken by another push under %s; trying '
                   '%s.', v, _text.printable(base), v + 1)
      continue
    except BaseException:
      _delete_objects(written)
      raise
    return target, str(v)
  raise errors.OutputExistsError(
      f'could not find a free version under {base} after '
      f'{_MAX_VERSION_ATTEMPTS} attempts starting at {start}')


_PAYLOAD_OBJECT_RE = re.compile(r'payload/[0-9]{8}')
_BUNDLE_HEADER_TEMP_RE = re.compile(
    r'\.' + re.escape(spec.BUNDLE_FILE_NAME) + r'\.tfxe-bundle-[0-9a-f]{16}')


def _store_holds_package_or_debris(uri: str, names) -> bool:
  """True if the objects `names` under `uri` are a tfx-encrypt package (its
  header or bundle starting with the magic) or the payload objects of an
  incomplete one: what an earlier attempt of this execution left."""
  from tfx_encrypt.format import header  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.format import streaming  # pylint: disable=g-import-not-at-top
  bundle_parts = {
      # What a SIGKILLed bundle upload to gs:// leaves (storage/_bundle.py):
      # its payload streams, staged as one object under the bundle's name,
      # and its header in a hidden sibling; each starts as ours does.
      spec.BUNDLE_FILE_NAME + '/payload/00000000':
          bytes([streaming.HEADER_SIZE]),
  }
  if names and all(n == spec.BUNDLE_FILE_NAME or n in bundle_parts or
                   _BUNDLE_HEADER_TEMP_RE.fullmatch(n) for n in names) and (
                       names != [spec.BUNDLE_FILE_NAME]):
    for n in names:
      want = bundle_parts.get(n, header.MAGIC)
      with storage.open_reader(storage.join(uri, n)) as r:
        if r.read_range(0, len(want)) != want:
          return False
    return True
  if names == [spec.BUNDLE_FILE_NAME]:
    first = spec.BUNDLE_FILE_NAME
  elif all(n == 'tfxe.header' or _PAYLOAD_OBJECT_RE.fullmatch(n)
           for n in names):
    if 'tfxe.header' not in names:
      return True  # payloads without a header: an incomplete package
    first = 'tfxe.header'
  else:
    return False
  with storage.open_reader(storage.join(uri, first)) as r:
    return r.read_range(0, len(header.MAGIC)) == header.MAGIC


def _clear_artifact_on_store(uri: str) -> None:
  """Make the EncryptedModel artifact URI on `gs://` / `s3://` ready.

  TFX gives each execution its own artifact URI; an earlier attempt of this
  execution may have left a package (or its payloads) there, which is
  removed: header first, so it stops being a package before its payloads
  go. Zero-byte folder objects (`uri/`, what tf.io.gfile.makedirs writes
  when TFX creates the output directory) hold nothing and stay. Anything
  else there is refused before a byte is written.
  """
  names = [n for n, size in storage.list_sizes(uri).items()
           if not storage.is_dir_marker(n, size)]
  if names:
    if not _store_holds_package_or_debris(uri, sorted(names)):
      raise errors.OutputExistsError(
          f'the EncryptedModel artifact {_text.printable(uri)} already has '
          'content; tfx-encrypt never replaces what it did not write')
    _delete_objects([storage.join(uri, n) for n in sorted(
        names, key=lambda n: n in ('tfxe.header', spec.BUNDLE_FILE_NAME) or
        bool(_BUNDLE_HEADER_TEMP_RE.fullmatch(n)))])


def _publish_artifact_to_store(pkg_root: str, uri: str) -> None:
  """Write a locally staged package (ciphertext) into the EncryptedModel
  artifact on `gs://` / `s3://`, create-only, as a push does; on failure
  the objects written are deleted."""
  _clear_artifact_on_store(uri)
  payloads, commit = _package_objects(pkg_root)
  written = []
  try:
    for source, name in payloads + [commit]:
      _put_create_only_from(source, storage.join(uri, name))
      written.append(storage.join(uri, name))
  except BaseException:
    _delete_objects(written)
    raise


def _delete_objects(uris) -> None:
  """Remove what a push wrote, last first (header before payloads)."""
  for uri in reversed(uris):
    try:
      storage.delete(uri)
    except Exception:  # pylint: disable=broad-except
      logging.warning('Could not remove %s', _text.printable(uri),
                      exc_info=True)


@contextlib.contextmanager
def encrypt_to_artifact(model_path: str, artifact_uri: str, bundle: bool,
                        encrypt: Callable[[str, str], Any]
                        ) -> Iterator[Tuple[Any, str]]:
  """Runs `encrypt(model, package)`; `artifact_uri` then holds the package.

  No plaintext is staged for a model on `gs://` / `s3://`: `encrypt` gets
  its URI and `package.encrypt_model` streams it (ranged reads pinned to
  the listed versions; docs/OBJECT_STORES.md). Where the package goes:

  * a local artifact: into a temporary sibling of the artifact directory,
    renamed into place, so a failed run never leaves a partial package;
  * an artifact on `gs://` / `s3://`: straight into it, payload objects
    then the header (or the bundle object) create-only, deleted again on
    failure (what an earlier attempt of this execution left is removed
    first, anything else refused: `_clear_artifact_on_store`, which also
    knows what a killed bundle upload leaves). A bundle is streamed too
    (`storage/_bundle.py`): nothing is staged locally;
  * another tf.io.gfile scheme: staged locally (ciphertext), then copied.

  A model on another tf.io.gfile scheme (not `gs://`, `s3://`, a path)
  is still copied into a private (0700) staging directory first and
  deleted right after: the package API reads those schemes only locally.

  Args:
    model_path: the model directory: a path, `gs://`, `s3://`, or any
      tf.io.gfile scheme.
    artifact_uri: the EncryptedModel artifact directory.
    bundle: write `spec.BUNDLE_FILE_NAME` inside the artifact directory
      instead of a directory package.
    encrypt: called once with the model (a local directory or a `gs://` /
      `s3://` URI) and the package path or URI to create; its result is
      yielded.

  Yields:
    (what `encrypt` returned, the package to push from: a local path, or
    the artifact's `gs://` / `s3://` URI).

  Raises:
    OutputExistsError: a remote artifact directory holds something that is
      neither empty nor a package.
  """
  if storage.is_remote(artifact_uri):  # gs://, s3://: streamed, create-only
    uri = artifact_uri.rstrip('/')
    _clear_artifact_on_store(uri)
    package = storage.join(uri, spec.BUNDLE_FILE_NAME) if bundle else uri
    with _model_source(model_path) as src:
      info = encrypt(src, package)
    yield info, uri
    return
  local_artifact = is_local_path(artifact_uri)
  if local_artifact:
    uri = local_path(artifact_uri).rstrip('/')
    parent = os.path.dirname(uri)
    os.makedirs(parent, exist_ok=True)
    staging_root = _fsutil.temp_sibling(uri, 'stage')
    os.mkdir(staging_root, 0o700)
  else:
    staging_root = tempfile.mkdtemp(prefix='tfx-encrypt-staging-')
  try:
    pkg_root = os.path.join(staging_root, 'package')
    if bundle:
      os.makedirs(pkg_root)
      package = os.path.join(pkg_root, spec.BUNDLE_FILE_NAME)
    else:
      package = pkg_root
    with _model_source(model_path) as src:
      info = encrypt(src, package)
    if local_artifact:
      if os.path.isdir(uri) and not os.listdir(uri):
        os.rmdir(uri)  # TFX pre-creates output dirs; replace the empty one.
      rename_noreplace(pkg_root, uri)
      yield info, uri
    else:
      if fileio.exists(artifact_uri):
        # TFX creates the output directory: replace it only empty, or
        # holding a package (an earlier attempt of this execution).
        if is_empty_or_package(artifact_uri):
          fileio.rmtree(artifact_uri)
        else:
          raise errors.OutputExistsError(
              f'the EncryptedModel artifact {artifact_uri} already has '
              'content; tfx-encrypt never replaces what it did not write')
      io_utils.copy_dir(pkg_root, artifact_uri)
      yield info, pkg_root
  finally:
    _fsutil.remove_tree(staging_root)


@contextlib.contextmanager
def _model_source(model_path: str) -> Iterator[str]:
  """The model as `package.encrypt_model` reads it: a local path or a
  `gs://` / `s3://` URI as it is (streamed, never staged); another
  tf.io.gfile scheme copied into a private (0700) directory, removed on
  exit."""
  if is_local_path(model_path):
    yield local_path(model_path)
    return
  if storage.is_remote(model_path):
    yield model_path
    return
  staging = tempfile.mkdtemp(prefix='tfx-encrypt-model-')
  try:
    src = os.path.join(staging, 'plaintext-model')
    io_utils.copy_dir(model_path, src)
    yield src
  finally:
    _fsutil.remove_tree(staging)
