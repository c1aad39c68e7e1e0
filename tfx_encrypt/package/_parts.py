"""A package written in parts on an object store, by processes that share
no filesystem (BeamEncryptPusher; docs/OBJECT_STORES.md, "Beam without a
shared filesystem").

The same bytes as :func:`tfx_encrypt.package.encrypt_model` writes
(FORMAT.md §2, §6, §9), cut differently:

* the model is a prefix of objects (:func:`scan_remote_model`: the checks
  of `scan_model`, on object names), each pinned to the version scanned;
* payload stream `i` is sealed in segment ranges `[first, end)`, each by
  any process, into a *part object* (:class:`SealedRange`: the ciphertext
  of those segments at their stream offsets, with the stream header in
  the range starting at segment 0). Ciphertext segment `j` starts at
  `j MiB` of the stream (§6: 40-byte header + segment 0 = 1 MiB), so
  the parts of a stream, concatenated in order, are the stream;
* the store concatenates the parts server-side into the payload objects
  (`storage._assemble`), then the header (:func:`build_header`, the same
  as `layout.finish_package` builds) is written create-only: the commit
  point.

Nothing here holds plaintext beyond one segment, or a key beyond the
Envelope the caller passes in.
"""

import dataclasses
import io
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
from tfx_encrypt.format.header import FileEntry
from tfx_encrypt.keys.base import KeyBackend
from tfx_encrypt.package import layout as layout_lib
from tfx_encrypt.package.envelope import Envelope
from tfx_encrypt.storage import _assemble


@dataclasses.dataclass
class RemoteFile:
  """One file of a model on an object store."""
  path: str  # relative POSIX path, as in the file table
  uri: str
  size: int
  version: str  # S3 ETag / GCS generation, as scanned


def scan_remote_model(model_uri: str, any_dir: bool = False
                      ) -> Tuple[List[RemoteFile], List[str]]:
  """`layout.scan_model` for a model under a `gs://` / `s3://` prefix.

  Objects are files; names ending in `/` (the empty-directory placeholders
  gsutil and tf.io.gfile write) are directories. The same refusals: unsafe
  or non-NFC names, a tfx-encrypt package or temporary name inside, no
  model marker (unless `any_dir`), too many files. Each file's version is
  recorded here; every later read of it is pinned to that version.
  """
  _assemble.check_remote(model_uri, 'model')
  sizes = storage.list_sizes(model_uri)
  files: List[RemoteFile] = []
  dirs = set()
  looks_like_model = False
  for name, size in sorted(sizes.items()):
    rel = name.rstrip('/')
    if not rel:
      continue
    for comp in rel.split('/'):
      if unicodedata.normalize('NFC', comp) != comp:
        raise errors.UnsafePathError(
            f'object name {name!r} is not NFC-normalised Unicode; rename it')
      if _fsutil.is_temp_name(comp):
        raise errors.UsageError(
            f'{_text.printable(model_uri)} holds a tfx-encrypt temporary '
            f'object {_text.quoted(name)}; refusing to encrypt it')
    comps = rel.split('/')
    for k in range(1, len(comps)):
      dirs.add('/'.join(comps[:k]))
    if name.endswith('/'):  # a directory placeholder
      if size:
        raise errors.UnsafePathError(
            f'object {name!r} ends with "/" but is not empty')
      dirs.add(rel)
      continue
    base = comps[-1]
    if base == layout_lib.HEADER_NAME:
      raise errors.UsageError(
          f'{_text.printable(model_uri)} contains a tfx-encrypt package at '
          f'{_text.quoted(name)}; refusing to encrypt it')
    if base in layout_lib.MODEL_MARKER_NAMES or base.lower().endswith(
        layout_lib.MODEL_MARKER_SUFFIXES):
      looks_like_model = True
    files.append(RemoteFile(rel, storage.join(model_uri, rel), size, ''))
  if not files:
    raise errors.EmptyModelError(
        f'{_text.printable(model_uri)} holds no objects; point at a '
        'SavedModel prefix (it should hold saved_model.pb)')
  if (len(files) > header_lib.MAX_FILES or
      len(dirs) > header_lib.MAX_DIRS):
    raise errors.UsageError(
        f'model has more than {header_lib.MAX_FILES} files or directories')
  for f in files:
    if f.size > header_lib.MAX_FILE_SIZE:
      raise errors.UsageError(f'{f.path} is larger than 1 PiB')
  files.sort(key=lambda f: f.path)
  out_dirs = paths_lib.check_tree([f.path for f in files], sorted(dirs))
  if not looks_like_model and not any_dir:
    raise errors.UsageError(
        f'{_text.printable(model_uri)} does not look like a model: no '
        f'{", ".join(sorted(layout_lib.MODEL_MARKER_NAMES))} or '
        f'{", ".join("*" + x for x in layout_lib.MODEL_MARKER_SUFFIXES)} '
        'object under it; pass any_dir=True to encrypt it anyway')
  for f in files:  # pin each version; refuse a bundle inside
    with storage.open_reader(f.uri) as r:
      f.version = _assemble.object_version(r)
      if r.size != f.size:
        raise _changed(f)
      if f.size >= header_lib.PREFIX_SIZE and r.read_range(0, 6) == (
          header_lib.MAGIC[:6]):
        raise errors.UsageError(
            f'{_text.printable(model_uri)} contains a tfx-encrypt bundle at '
            f'{_text.quoted(f.path)}; refusing to encrypt it')
  return files, out_dirs


def _changed(f: RemoteFile) -> errors.UsageError:
  return errors.UsageError(
      f'{_text.printable(f.path)} changed while the model was being '
      'encrypted; do not modify the model during encryption')


def open_model_file(f: RemoteFile) -> storage.Reader:
  """A reader of `f` pinned to the version scanned (else UsageError)."""
  try:
    r = storage.open_reader(f.uri)
  except FileNotFoundError:
    raise _changed(f) from None
  if r.size != f.size or _assemble.object_version(r) != f.version:
    r.close()
    raise _changed(f)
  return r


def plan_ranges(size: int, segments_per_part: int,
                limits: _assemble.PartLimits) -> List[Tuple[int, int]]:
  """Segment ranges `[first, end)` of a payload of `size` plaintext bytes,
  about `segments_per_part` segments each, within the store's part limits
  (every part but the last at least `min_part` bytes, at most `max_part`,
  at most `max_parts` of them)."""
  n = streaming.num_segments(size)
  seg = streaming.SEGMENT_SIZE
  per = max(1, int(segments_per_part), -(-limits.min_part // seg))
  if limits.max_part:
    per = min(per, limits.max_part // seg)
  if limits.max_parts and -(-n // per) > limits.max_parts:
    per = -(-n // limits.max_parts)
    if limits.max_part and per * seg > limits.max_part:
      raise errors.UsageError(
          f'a file of {size} bytes is too large for this store\'s multipart '
          f'limits ({limits.max_parts} parts of at most {limits.max_part} '
          'bytes)')
  return [(s, min(n, s + per)) for s in range(0, n, per)]


def range_bytes(size: int, first: int, end: int) -> Tuple[int, int]:
  """(offset, length) in the payload stream of the part `[first, end)`."""
  n = streaming.num_segments(size)
  start = 0 if first == 0 else streaming.ciphertext_segment_offset(first)
  stop = (streaming.ciphertext_size(size) if end >= n else
          streaming.ciphertext_segment_offset(end))
  return start, stop - start


class SealedRange(io.RawIOBase):
  """The part object of segments `[first, end)` of payload `index`.

  A seekable, read-only file whose bytes are computed on demand: each
  ciphertext segment is sealed from its plaintext (read from `reader` at
  its offset) when first read, one segment held at a time. Sealing is
  deterministic given the stream header, so a store client that seeks
  back to retry or checksum gets the same bytes again.
  """

  def __init__(self, env: Envelope, index: int, stream_header: bytes,
               reader: storage.Reader, relpath: str, size: int, first: int,
               end: int):
    super().__init__()
    self._sc = streaming.StreamCipher.from_header(
        env.suite, env.keys.stream_key, env.payload_aad(index),
        stream_header)
    self._header = bytes(stream_header)
    self._reader, self._relpath, self._size = reader, relpath, size
    self._n = streaming.num_segments(size)
    if not 0 <= first < end <= self._n:
      raise errors.UsageError(f'bad segment range [{first}, {end})')
    self._start, self.length = range_bytes(size, first, end)
    self._pos = 0
    self._plain = bytearray(streaming.PLAINTEXT_SEGMENT_SIZE)
    self._cipher = bytearray(streaming.SEGMENT_SIZE)
    self._seg = -1  # the segment in self._cipher
    self._seg_len = 0
    self.sealed_bytes = 0  # plaintext bytes sealed (counting re-reads)

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def tell(self) -> int:
    return self._pos

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos,
            io.SEEK_END: self.length}[whence]
    if base + offset < 0:
      raise ValueError('negative seek position')
    self._pos = base + offset
    return self._pos

  def _load(self, i: int) -> None:
    off, ln = streaming.plaintext_segment(i, self._size)
    mv = memoryview(self._plain)[:ln]
    if self._reader.read_into(mv, off) != ln:
      raise errors.UsageError(
          f'{_text.printable(self._relpath)} shrank while it was being '
          'encrypted; do not modify the model during encryption')
    self._seg_len = self._sc.encrypt_into(i, i == self._n - 1, mv,
                                          self._cipher)
    self._seg = i
    self.sealed_bytes += ln

  def readinto(self, b) -> int:
    out = memoryview(b).cast('B')
    got = 0
    while got < len(out) and self._pos < self.length:
      at = self._start + self._pos  # offset in the payload stream
      if at < streaming.HEADER_SIZE:
        src = memoryview(self._header)[at:]
      else:
        i = at // streaming.SEGMENT_SIZE
        if i != self._seg:
          self._load(i)
        seg_off = streaming.ciphertext_segment_offset(i)
        src = memoryview(self._cipher)[at - seg_off:self._seg_len]
      k = min(len(out) - got, len(src), self.length - self._pos)
      out[got:got + k] = src[:k]
      got += k
      self._pos += k
    return got

  def close(self) -> None:
    self._plain = self._cipher = bytearray(0)
    super().close()


def seal_range_to(uri: str, env: Envelope, index: int, stream_header: bytes,
                  f: RemoteFile, first: int, end: int) -> int:
  """Seal segments `[first, end)` of `f` into the part object `uri`.

  Returns the part's size. The plaintext is read from the version of `f`
  that was scanned (UsageError if it changed); the part is written with a
  plain (replacing) write, so a retried work item writes the same bytes.
  """
  with open_model_file(f) as reader:
    part = SealedRange(env, index, stream_header, reader, f.path, f.size,
                       first, end)
    try:
      storage.put(uri, part)
      return part.length
    finally:
      part.close()


def digest_parts(f: RemoteFile, part_uris: Sequence[str],
                 part_sizes: Sequence[int], hash_alg: str
                 ) -> Tuple[str, str, int]:
  """(plaintext digest, ciphertext digest, ciphertext size) of payload `f`
  from its model object and its part objects, read in order (§9)."""
  ph = digest_lib.new_hash(hash_alg)
  ch = digest_lib.new_hash(hash_alg)
  buf = memoryview(bytearray(storage.CHUNK_SIZE))
  with open_model_file(f) as r:
    _hash_reader(r, f.size, ph, buf, f.path)
  total = 0
  for uri, size in zip(part_uris, part_sizes):
    with storage.open_reader(uri) as r:
      if r.size != size:
        raise errors.TfxEncryptError(
            f'part {_text.printable(uri)} has {r.size} bytes, not {size}')
      _hash_reader(r, size, ch, buf, uri)
      total += size
  if total != streaming.ciphertext_size(f.size):
    raise errors.TfxEncryptError(
        f'the parts of {_text.printable(f.path)} hold {total} bytes, not '
        f'{streaming.ciphertext_size(f.size)}')
  return ph.hexdigest(), ch.hexdigest(), total


def _hash_reader(r: storage.Reader, size: int, h, buf: memoryview,
                 what: str) -> None:
  off = 0
  while off < size:
    want = min(len(buf), size - off)
    if r.read_into(buf[:want], off) != want:
      raise errors.UsageError(f'{_text.printable(what)} shrank while it was '
                              'being read')
    h.update(buf[:want])
    off += want


def build_header(env: Envelope, *, entries: Sequence[FileEntry],
                 dirs: Sequence[str], payloads: Sequence[Tuple[int, str]],
                 signer: Optional[KeyBackend]) -> bytes:
  """The sealed header bytes, as `layout.finish_package` builds them."""
  return layout_lib.build_header(env, entries=entries, dirs=dirs,
                                 payloads=payloads, signer=signer)[1]
