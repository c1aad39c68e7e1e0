"""Payload stream workers: seal and open files segment by segment.

FORMAT.md §6 (Tink-compatible segmented streaming AEAD) and §9 (plaintext
and ciphertext digests, the file table). Each worker streams its file
through two reused 1 MiB buffers (`readinto`, hash, seal/open in place,
hash, write); hashlib, file I/O and OpenSSL release the GIL, so files
overlap on a small thread pool. Memory is O(workers x 2 MiB), independent
of model size.
"""

import concurrent.futures
import hmac
import os
import queue
import stat
import threading
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import _signals
from tfx_encrypt import errors
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.format.header import FileEntry, Header
from tfx_encrypt.package.envelope import Envelope
from tfx_encrypt.package.layout import (
    PAYLOAD_DIR, _O_CLOEXEC, _O_NOFOLLOW, _Source, _SourceFile, _create,
    payload_name)


Progress = Optional[Callable[[int], None]]


def default_workers() -> int:
  return max(2, min(8, (os.cpu_count() or 1) * 2))


class _Buffers(threading.local):
  """Two reusable segment buffers per worker thread."""

  def __init__(self):
    super().__init__()
    self.plain = bytearray(streaming.PLAINTEXT_SEGMENT_SIZE)
    self.cipher = bytearray(streaming.SEGMENT_SIZE)


_BUFS = _Buffers()


# Files with at least this many segments are sealed by a two-stage pipeline:
# this thread reads, hashes the plaintext and encrypts; a second thread hashes
# the ciphertext and writes. The two SHA passes then run on two cores even
# when the model is a single large variables shard.
PIPELINE_MIN_SEGMENTS = 8


_PIPELINE_DEPTH = 3
# At most this many payloads are opened by a pipeline at once: it adds
# cores only while fewer large files than cores are in flight (one large
# variables shard, load_model), and costs 4 MiB of buffers each.
_OPEN_PIPELINES = threading.BoundedSemaphore(max(1, (os.cpu_count() or 1) // 2))


def pipelines_help(sizes: Iterable[int], workers: int) -> bool:
  """Whether large files should each be spread over a pipeline of threads:
  only while fewer large files than cores run at once. With as many large
  files as cores in flight, the files alone keep every core busy and a
  pipeline's thread hand-offs only add cost (encrypting / decrypting
  4 x 256 MiB on 2 cores: 1.32 / 1.27 x `cp -r` with pipelines, 1.12 /
  1.15 x without, docs/BENCHMARKS.md). Files under a quarter of the largest
  one do not count: they finish early and leave it alone on the cores."""
  sizes = [s for s in sizes
           if streaming.num_segments(s) >= PIPELINE_MIN_SEGMENTS]
  if not sizes:
    return True
  large = sum(1 for s in sizes if 4 * s >= max(sizes))
  return min(large, max(1, workers)) < (os.cpu_count() or 1)


class _Worker(threading.Thread):
  """A daemon thread that says when its target has returned (`finished`):
  what :func:`_join` waits on. (Python 3.10's Thread.join, interrupted by
  KeyboardInterrupt, marks a thread that is still running as stopped, so a
  second join returns at once.)"""

  def __init__(self, target, args=(), name=None):
    super().__init__(target=target, args=args, name=name, daemon=True)
    self.finished = threading.Event()

  def run(self):
    try:
      super().run()
    finally:
      self.finished.set()


def _join(threads: Sequence[_Worker],
          stop: Optional[threading.Event] = None) -> None:
  """Wait for worker threads even when a signal (KeyboardInterrupt, a CLI
  signal's Interrupted) arrives meanwhile, then raise it: a worker must
  never outlive its caller, or it would write into an upload or a file
  the caller's cleanup is aborting or removing. `stop` is set on such an
  interruption (the workers stop at their next item)."""
  interrupted = None
  for t in threads:
    while True:
      try:
        t.finished.wait()
        break
      except BaseException as e:  # pylint: disable=broad-except
        if stop is not None:
          stop.set()
        interrupted = interrupted or e
  if interrupted is not None:
    raise interrupted


def _sink_of(out) -> Callable[[memoryview], None]:
  """A write(mv) for a file descriptor, or a storage.Writer (which copies)."""
  if isinstance(out, int):
    return lambda mv: _fsutil.write_all(out, mv)
  return out.write


def _seal_stream(read_segment: Callable[[int, memoryview], None], size: int,
                 sc: streaming.StreamCipher, out_fd, hash_alg: str,
                 progress: Progress, pipeline: bool = True
                 ) -> Tuple[str, str, int]:
  """Encrypt one stream into `out_fd` (a file descriptor, or a
  storage.Writer for a payload object). Returns (plaintext digest,
  ciphertext digest, size)."""
  write = _sink_of(out_fd)
  ph = digest_lib.new_hash(hash_alg)
  ch = digest_lib.new_hash(hash_alg)
  plain = memoryview(_BUFS.plain)
  n = streaming.num_segments(size)
  ch.update(sc.header)
  write(sc.header)
  total = len(sc.header)
  if n < PIPELINE_MIN_SEGMENTS or not pipeline:
    cipher = memoryview(_BUFS.cipher)
    for i in range(n):
      _signals.check()
      _, ln = streaming.plaintext_segment(i, size)
      seg = plain[:ln]
      read_segment(i, seg)
      ph.update(seg)
      k = sc.encrypt_into(i, i == n - 1, seg, cipher)
      ch.update(cipher[:k])
      write(cipher[:k])
      total += k
      if progress:
        progress(ln)
    return ph.hexdigest(), ch.hexdigest(), total

  free: 'queue.Queue' = queue.Queue()
  for _ in range(_PIPELINE_DEPTH):
    free.put(bytearray(streaming.SEGMENT_SIZE))
  work: 'queue.Queue' = queue.Queue()
  failed: List[BaseException] = []
  abandon = threading.Event()  # this thread failed: write nothing more

  def sink():
    while True:
      item = work.get()
      if item is None:
        return
      buf, k = item
      if not failed and not abandon.is_set():
        try:
          mv = memoryview(buf)[:k]
          ch.update(mv)
          write(mv)
        except BaseException as e:  # pylint: disable=broad-except
          failed.append(e)
      free.put(buf)

  writer = _Worker(target=sink, name='tfxe-seal-writer')
  writer.start()
  try:
    for i in range(n):
      if failed:
        break
      _signals.check()
      _, ln = streaming.plaintext_segment(i, size)
      seg = plain[:ln]
      read_segment(i, seg)
      ph.update(seg)
      buf = free.get()
      k = sc.encrypt_into(i, i == n - 1, seg, buf)
      work.put((buf, k))
      total += k
      if progress:
        progress(ln)
  except BaseException:
    abandon.set()
    raise
  finally:
    work.put(None)
    _join([writer], abandon)
  if failed:
    raise failed[0]
  return ph.hexdigest(), ch.hexdigest(), total


def _file_reader(fd: int, relpath: str, size: int):
  def read_segment(i, mv):
    if _fsutil.read_into_exact(fd, mv) != len(mv):
      raise errors.UsageError(
          f'{relpath} shrank while it was being encrypted; do not modify the '
          'model during encryption')
  def check_eof():
    if os.read(fd, 1):
      raise errors.UsageError(
          f'{relpath} grew while it was being encrypted; do not modify the '
          'model during encryption')
  return read_segment, check_eof


def _remote_file_reader(reader, f: _SourceFile, model: str):
  """read_segment / check_eof over a pinned storage.Reader (a model object).

  The first bytes are checked for the package magic (the local scan reads
  them up front), before any ciphertext of this file is kept.
  """
  pos = [0]

  def read_segment(i, mv):
    del i
    n = reader.read_into(mv, pos[0])
    if n != len(mv):
      raise errors.UsageError(
          f'{_text.quoted(f.path)} in {_text.printable(model)} shrank while '
          'it was being encrypted; do not modify the model during encryption')
    if pos[0] == 0 and f.size >= header_lib.PREFIX_SIZE and bytes(
        mv[:6]) == header_lib.MAGIC[:6]:
      raise errors.UsageError(
          f'{_text.printable(model)} contains a tfx-encrypt bundle at '
          f'{_text.quoted(f.path)}; refusing to encrypt it, even with '
          '--any-dir: move it out of the model directory')
    pos[0] += n

  def check_eof():
    reader.check_unchanged()
  return read_segment, check_eof


def _open_source(f: _SourceFile) -> int:
  fd = os.open(f.abspath, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
  st = os.fstat(fd)
  if not stat.S_ISREG(st.st_mode):
    os.close(fd)
    raise errors.UnsafePathError(f'{f.path!r} is no longer a regular file')
  if st.st_size != f.size:
    os.close(fd)
    raise errors.UsageError(
        f'{f.path} changed size during encryption; do not modify the model '
        'during encryption')
  return fd


def _run_parallel(fn, items: Sequence, workers: int) -> list:
  """Run fn over items on a thread pool; first error cancels the rest."""
  if workers <= 1 or len(items) <= 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(workers) as ex:
    futs = [ex.submit(fn, x) for x in items]
    try:
      return [f.result() for f in futs]
    except BaseException:
      for f in futs:
        f.cancel()
      raise


def _segment_opener(src: _Source, index: int, sc: streaming.StreamCipher,
                    fd: int, offset: int, ct_size: int,
                    ct_hash):
  """A read_segment(i, mv) that decrypts old segment i into mv (rotation),
  feeding the ciphertext into `ct_hash` (check it with _check_ciphertext)."""
  del src  # unused
  n = streaming.segments_of_ciphertext(ct_size)
  cbuf = bytearray(streaming.SEGMENT_SIZE)

  def read_segment(i, mv):
    off, ln = streaming.ciphertext_segment(i, ct_size)
    seg = memoryview(cbuf)[:ln]
    if _fsutil.read_into_exact(fd, seg, offset + off) != ln:
      raise errors.TamperedPackageError(f'payload {index} is truncated')
    ct_hash.update(seg)
    k = sc.decrypt_into(i, i == n - 1, seg, mv)
    if k != len(mv):
      raise errors.TamperedPackageError(f'payload {index} has a bad segment')
  return read_segment


def _check_ciphertext(h: Header, index: int, ct_hash) -> None:
  """The streamed ciphertext must be the one the header (and so the
  signature) names: a recipient cannot re-encrypt a payload (§10 step 6)."""
  if not hmac.compare_digest(ct_hash.hexdigest(), h.payloads[index][1]):
    raise errors.TamperedPackageError(
        f'payload {index} does not match its ciphertext digest in the '
        'header: it was re-encrypted or modified after signing')


def _open_stream(src: _Source, h: Header, keys: header_lib.DerivedKeys,
                 index: int):
  """Open payload `index`: (fd, offset, stream cipher, ciphertext hash
  already fed with the stream header)."""
  fd, offset = src.open_payload(index)
  try:
    sh = src.read_stream_header(fd, offset)
    sc = streaming.StreamCipher.from_header(
        h.suite, keys.stream_key,
        header_lib.payload_aad(h.package_id, index, h.ctx_digest), sh)
  except BaseException:
    _fsutil.close_fd(fd)  # an fd, or a remote storage.Reader
    raise
  ct_hash = digest_lib.new_hash(h.hash_alg)
  ct_hash.update(sh)
  return fd, offset, sc, ct_hash


def _decrypt_payload(src: _Source, h: Header, keys: header_lib.DerivedKeys,
                     index: int, entry: FileEntry,
                     sink: Callable[[memoryview], None],
                     progress: Progress = None, pipeline: bool = True) -> None:
  """Open payload `index` segment by segment into `sink`, then check its
  plaintext digest. `sink` gets a reused buffer: copy it if you keep it."""
  ct_size = h.payloads[index][0]
  if ct_size != streaming.ciphertext_size(entry.size):
    raise errors.TamperedPackageError(
        f'payload {index} size does not match the file table')
  fd, offset, sc, ct_hash = _open_stream(src, h, keys, index)
  try:
    n = streaming.num_segments(entry.size)
    ph = digest_lib.new_hash(h.hash_alg)

    def open_segment(i: int, cipher: memoryview, plain: memoryview) -> int:
      """Read, hash and decrypt ciphertext segment i into `plain`."""
      off, ln = streaming.ciphertext_segment(i, ct_size)
      seg = cipher[:ln]
      if _fsutil.read_into_exact(fd, seg, offset + off) != ln:
        raise errors.TamperedPackageError(f'payload {index} is truncated')
      ct_hash.update(seg)
      return sc.decrypt_into(i, i == n - 1, seg, plain)

    def deliver(mv: memoryview) -> None:
      sink(mv)
      if progress:
        progress(len(mv))

    if (pipeline and n >= PIPELINE_MIN_SEGMENTS and
        _OPEN_PIPELINES.acquire(blocking=False)):
      try:
        _open_pipelined(n, open_segment, [ph.update, deliver])
      finally:
        _OPEN_PIPELINES.release()
    else:
      plain, cipher = memoryview(_BUFS.plain), memoryview(_BUFS.cipher)
      for i in range(n):
        _signals.check()
        k = open_segment(i, cipher, plain)
        ph.update(plain[:k])
        deliver(plain[:k])
    _check_ciphertext(h, index, ct_hash)
    if ph.hexdigest() != entry.digest:
      raise errors.TamperedPackageError(
          f'{_text.printable(entry.path)}: plaintext digest does not match '
          'the signed file '
          'table; the package was modified by a key holder')
  finally:
    _fsutil.close_fd(fd)  # an fd, or a remote storage.Reader


_STOP = object()


def _open_pipelined(n: int,
                    open_segment: Callable[[int, memoryview, memoryview], int],
                    stages: Sequence[Callable[[memoryview], None]]) -> None:
  """Decrypt a large payload on a pipeline of threads (cf. _seal_stream).

  A helper thread reads segment i, hashes its ciphertext and decrypts it;
  each of `stages` but the last (the plaintext digest) runs in a thread of
  its own; the last (the sink) runs in this thread. So the two digests, the
  decryption and the sink's copy (a first write to fresh pages costs as
  much as a hash here) spread over the cores even for a model that is one
  large variables shard. Segments go through every stage in order; the
  first error anywhere stops every thread, and this thread raises it.
  """
  free: 'queue.Queue' = queue.Queue()
  for _ in range(_PIPELINE_DEPTH):
    free.put(bytearray(streaming.PLAINTEXT_SEGMENT_SIZE))
  queues = [queue.Queue() for _ in stages]
  stop = threading.Event()

  def produce():
    cipher = memoryview(bytearray(streaming.SEGMENT_SIZE))
    try:
      for i in range(n):
        buf = free.get()
        if stop.is_set():
          return
        _signals.check()
        queues[0].put((buf, open_segment(i, cipher, memoryview(buf))))
    except BaseException as e:  # pylint: disable=broad-except
      queues[0].put(e)

  def relay(fn, inq, outq):
    while True:
      item = inq.get()
      if item is _STOP:
        return
      if not isinstance(item, BaseException):
        try:
          fn(memoryview(item[0])[:item[1]])
        except BaseException as e:  # pylint: disable=broad-except
          item = e
      outq.put(item)
      if isinstance(item, BaseException):
        return

  threads = [_Worker(target=produce, name='tfxe-open-reader')]
  threads += [_Worker(target=relay, args=(fn, queues[j], queues[j + 1]),
                      name='tfxe-open-stage')
              for j, fn in enumerate(stages[:-1])]
  for t in threads:
    t.start()
  try:
    for _ in range(n):
      item = queues[-1].get()
      if isinstance(item, BaseException):
        raise item
      buf, k = item
      _signals.check()
      stages[-1](memoryview(buf)[:k])
      free.put(buf)
  finally:
    stop.set()
    free.put(bytearray(0))  # wakes the reader if it waits for a buffer
    for q in queues[:-1]:
      q.put(_STOP)
    _join(threads, stop)


def _decrypt_file_table(h: Header, keys: header_lib.DerivedKeys
                        ) -> Tuple[List[FileEntry], List[str]]:
  data = streaming.decrypt_bytes(
      h.suite, keys.stream_key,
      header_lib.file_table_aad(h.package_id, h.ctx_digest), h.file_table)
  entries, dirs = header_lib.decode_file_table(data, len(h.payloads))
  for i, e in enumerate(entries):
    if h.payloads[i][0] != streaming.ciphertext_size(e.size):
      raise errors.TamperedPackageError(
          f'payload {i} size does not match the file table')
  if digest_lib.root_digest(h.hash_alg, (e.digest for e in entries)) != \
      h.fingerprint:
    raise errors.TamperedPackageError(
        'the model fingerprint does not match the file table')
  return entries, dirs


# --------------------------------------------------------------------------
# One stream sealed in parts, in any order (BeamEncryptPusher's workers).
# --------------------------------------------------------------------------


def start_payload(env: Envelope, tmp: str, index: int,
                  size: int) -> Tuple[str, bytes]:
  """Create payload file `index` of the package being written in `tmp`.

  For a stream that workers seal in parts: the file holds a fresh stream's
  header (`Envelope.new_stream`) and is sized (sparse) for the ciphertext
  of `size` plaintext bytes, so that `seal_segment_range` can fill in any
  range of segments, in any order, from any process. `tmp` is what
  `start_package` returned.

  Returns:
    (the payload file's path, its stream header). The header is public (a
    salt and a nonce prefix): all a worker needs besides the envelope.
  """
  path = os.path.join(tmp, PAYLOAD_DIR, payload_name(index))
  sc = env.new_stream(index)
  fd = _create(path, 0o644)
  try:
    _fsutil.write_all(fd, sc.header)
    os.ftruncate(fd, streaming.ciphertext_size(size))
  finally:
    os.close(fd)
  return path, sc.header


def seal_segment_range(env: Envelope, index: int, stream_header: bytes, *,
                       source: str, relpath: str, size: int, payload: str,
                       first: int, end: int) -> int:
  """Seal plaintext segments [first, end) of `source` into their places.

  `payload` is payload file `index`, made by `start_payload` (which returned
  `stream_header`); each segment's ciphertext is written at its own offset.
  The digests of the file table are computed once every range of the file
  is sealed, by hashing the whole source and payload files. Returns the
  plaintext bytes sealed.

  Raises:
    UsageError: the source changed size while it was being encrypted.
    UnsafePathError: the source is no longer a regular file.
  """
  sc = streaming.StreamCipher.from_header(
      env.suite, env.keys.stream_key, env.payload_aad(index), stream_header)
  n = streaming.num_segments(size)
  plain, cipher = memoryview(_BUFS.plain), memoryview(_BUFS.cipher)
  sealed = 0
  src = _open_source(_SourceFile(relpath, source, size))
  try:
    out = os.open(payload, os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC)
    try:
      for i in range(first, end):
        _signals.check()
        off, ln = streaming.plaintext_segment(i, size)
        if _fsutil.read_into_exact(src, plain[:ln], off) != ln:
          raise errors.UsageError(
              f'{relpath} shrank while it was being encrypted; do not modify '
              'the model during encryption')
        k = sc.encrypt_into(i, i == n - 1, plain[:ln], cipher)
        _fsutil.write_all(out, cipher[:k],
                          streaming.ciphertext_segment_offset(i))
        sealed += ln
    finally:
      os.close(out)
  finally:
    os.close(src)
  return sealed
