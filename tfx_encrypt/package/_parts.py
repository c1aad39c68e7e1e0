"""A package written in parts on an object store, by processes that share
no filesystem (BeamEncryptPusher; docs/OBJECT_STORES.md, "Beam without a
shared filesystem").

The same bytes as :func:`tfx_encrypt.package.encrypt_model` writes
(FORMAT.md §2, §6, §9), cut differently:

* the model is a prefix of objects (:func:`scan_remote_model`: the checks
  of `layout.scan_remote_model`, plus the magic of each file up front),
  each pinned to the version listed;
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
import json
import logging
import os
import re
import threading
import time
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt import storage
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.format.header import FileEntry
from tfx_encrypt.keys.base import KeyBackend
from tfx_encrypt.package import layout as layout_lib
from tfx_encrypt.package.envelope import Envelope
from tfx_encrypt.storage import _assemble


# --------------------------------------------------------------------------
# The staging prefix: `PARENT/.NAME.tfxe-beam-TOKEN/`, one per run.
# --------------------------------------------------------------------------

#: The kind in a staging prefix's name (`.NAME.tfxe-beam-TOKEN`).
STAGING_KIND = 'beam'

#: The object a run writes first under its staging prefix: what tells
#: `tfx-encrypt clean` that the prefix is one of ours (with its name and
#: the names of everything else under it).
STAGING_MARKER = 'tfxe-beam-staging.json'

_STAGING_TAG = 'tfx-encrypt beam staging prefix'
_MARKER_MAX_BYTES = 4096
# What a run writes under its prefix: part objects, digest results, the
# GCS bundle's header object and composition intermediates.
_STAGED_NAME_RE = re.compile(
    r'parts/[0-9]{8}/[0-9]{10}|results/[0-9]{8}\.json|'
    r'compose/(?:[0-9]{8}|bundle)/(?:head|compose-[0-9]{2}-[0-9]{6})')


def staging_prefix(package: str) -> str:
  """A fresh prefix next to `package`, named as tfx-encrypt's temporary
  siblings are (`.NAME.tfxe-beam-TOKEN`): everything under it is one
  run's, deleted when the run ends (a SIGKILLed run's: `clean`)."""
  parent, _, name = package.rstrip('/').rpartition('/')
  return f'{parent}/.{name[:120]}.tfxe-{STAGING_KIND}-{os.urandom(8).hex()}'


#: How often a running driver rewrites its marker (seconds): `clean`'s age
#: rule (`--older-than`, default 3600) then never takes a running Beam
#: job's prefix for a dead one, even while no worker writes there.
STAGING_HEARTBEAT_S = 600.0


def _marker_bytes(stage: str, package: str) -> bytes:
  return json.dumps({'tag': _STAGING_TAG, 'staging': stage.rpartition('/')[2],
                     'package': package, 'written': int(time.time()),
                     'pid': os.getpid()}, sort_keys=True).encode()


def write_staging_marker(stage: str, package: str) -> None:
  """Claim `stage` (create-only), before anything else is written there."""
  storage.put_create_only(storage.join(stage, STAGING_MARKER),
                          _marker_bytes(stage, package))


class StagingHeartbeat:
  """Rewrites the marker of `stage` every :data:`STAGING_HEARTBEAT_S`
  seconds from a thread, between `start()` and `stop()` (which waits for
  the thread: nothing is written after it returns). A failed rewrite is
  logged, not raised: the run does not depend on it."""

  def __init__(self, stage: str, package: str):
    self._stage, self._package = stage, package
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def start(self) -> None:
    self._thread = threading.Thread(target=self._loop, daemon=True,
                                    name='tfxe-beam-staging-heartbeat')
    self._thread.start()

  def _loop(self) -> None:
    while not self._stop.wait(STAGING_HEARTBEAT_S):
      try:
        storage.put(storage.join(self._stage, STAGING_MARKER),
                    _marker_bytes(self._stage, self._package))
      except Exception:  # pylint: disable=broad-except
        logging.warning('Could not refresh %s', _text.printable(self._stage),
                        exc_info=True)

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None


def is_staging_name(name: str) -> bool:
  """`.NAME.tfxe-beam-TOKEN` (not its `.lock`: stores have no locks)."""
  m = _fsutil.TEMP_NAME_RE.match(name)
  return bool(m) and m.group('kind') == STAGING_KIND and not m.group('lock')


def is_our_staging(stage: str, objects: Mapping[str, Any]) -> bool:
  """True only if the objects under `stage` (name -> storage.ObjectInfo,
  folder objects left out) are unmistakably what a Beam run writes: the
  prefix is named `.NAME.tfxe-beam-TOKEN`; it holds our marker, naming this
  very prefix; every other object is named as a run names them (parts,
  results, bundle header, compose intermediates); every part starting a
  payload stream starts like one (its first byte is the stream header's
  length, FORMAT.md §6); every result is a digest record of its file."""
  name = stage.rstrip('/').rpartition('/')[2]
  info = objects.get(STAGING_MARKER)
  if not is_staging_name(name) or info is None or not (
      0 < info.size <= _MARKER_MAX_BYTES):
    return False
  if not all(_STAGED_NAME_RE.fullmatch(n) for n in objects
             if n != STAGING_MARKER):
    return False
  try:
    marker = json.loads(_read_small(storage.join(stage, STAGING_MARKER),
                                    info))
    if not (isinstance(marker, dict) and marker.get('tag') == _STAGING_TAG
            and marker.get('staging') == name):
      return False
    for n, i in objects.items():
      if n.startswith('parts/') and n.endswith('/0000000000'):
        if not layout_lib._starts_like_a_stream(storage.join(stage, n), i):  # pylint: disable=protected-access
          return False
      elif n.startswith('results/'):
        if not 0 < i.size <= _MARKER_MAX_BYTES:
          return False
        rec = json.loads(_read_small(storage.join(stage, n), i))
        if not (isinstance(rec, dict) and
                rec.get('index') == int(n[len('results/'):-len('.json')]) and
                {'plain_digest', 'cipher_digest', 'ct_size'} <= set(rec)):
          return False
  except (ValueError, FileNotFoundError, storage.ObjectChangedError):
    return False  # not JSON, not UTF-8, or changed meanwhile: not ours
  return True


def _read_small(uri: str, info) -> bytes:
  with storage.open_reader(uri, version=info.version) as r:
    return r.read_range(0, r.size)


# --------------------------------------------------------------------------
# The model, its ranges, their part objects.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class RemoteFile:
  """One file of a model on an object store."""
  path: str  # relative POSIX path, as in the file table
  uri: str
  size: int
  version: str  # S3 ETag / GCS generation, as scanned


def scan_remote_model(model_uri: str, any_dir: bool = False
                      ) -> Tuple[List[RemoteFile], List[str]]:
  """`layout.scan_remote_model`, then every file opened once, up front.

  All the checks of `layout.scan_remote_model` (one listing; each object
  name a package path, no temporary name, no `tfxe.header`, folder objects
  empty, a model marker unless `any_dir`, the size limits), and the version
  each object was listed at, to which every later read is pinned. Then,
  because Beam workers seal ranges far from the start of a file and never
  see its first bytes together with the decision to publish, each file is
  opened here, pinned to its listed version (a file replaced since the
  listing is refused), and one starting with the format's magic (a bundle
  inside the model) is refused before any work is handed out. `encrypt_model`
  does that last check when it reads a file's first segment instead.
  """
  _assemble.check_remote(model_uri, 'model')
  model_uri = model_uri.rstrip('/')
  listed, dirs = layout_lib.scan_remote_model(model_uri, any_dir=any_dir)
  files = [RemoteFile(f.path, f.abspath, f.size, f.version or '')
           for f in listed]
  for f in files:
    if not f.version:
      raise errors.UsageError(
          f'{_text.printable(f.uri)}: the store named no version for it; '
          'its reads cannot be pinned')
    if f.size < header_lib.PREFIX_SIZE:
      continue
    with open_model_file(f) as r:
      if r.read_range(0, 6) == header_lib.MAGIC[:6]:
        raise layout_lib._refuse_in_model(  # pylint: disable=protected-access
            model_uri, f.path, 'a tfx-encrypt bundle')
  return files, dirs


def _changed(f: RemoteFile) -> errors.UsageError:
  return errors.UsageError(
      f'{_text.printable(f.path)} changed while the model was being '
      'encrypted; do not modify the model during encryption')


def open_model_file(f: RemoteFile) -> storage.Reader:
  """A reader of `f` pinned to the version scanned (else UsageError)."""
  try:
    r = storage.open_reader(f.uri, version=f.version)
  except (FileNotFoundError, storage.ObjectChangedError):
    raise _changed(f) from None
  if r.size != f.size:
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
