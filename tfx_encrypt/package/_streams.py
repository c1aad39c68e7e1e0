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
from typing import Callable, List, Optional, Sequence, Tuple

from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import _signals
from tfx_encrypt import errors
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.format.header import FileEntry, Header
from tfx_encrypt.package.layout import (
    _O_CLOEXEC, _O_NOFOLLOW, _Source, _SourceFile)


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


def _seal_stream(read_segment: Callable[[int, memoryview], None], size: int,
                 sc: streaming.StreamCipher, out_fd: int, hash_alg: str,
                 progress: Progress) -> Tuple[str, str, int]:
  """Encrypt one stream. Returns (plaintext digest, ciphertext digest, size)."""
  ph = digest_lib.new_hash(hash_alg)
  ch = digest_lib.new_hash(hash_alg)
  plain = memoryview(_BUFS.plain)
  n = streaming.num_segments(size)
  ch.update(sc.header)
  _fsutil.write_all(out_fd, sc.header)
  total = len(sc.header)
  if n < PIPELINE_MIN_SEGMENTS:
    cipher = memoryview(_BUFS.cipher)
    for i in range(n):
      _signals.check()
      _, ln = streaming.plaintext_segment(i, size)
      seg = plain[:ln]
      read_segment(i, seg)
      ph.update(seg)
      k = sc.encrypt_into(i, i == n - 1, seg, cipher)
      ch.update(cipher[:k])
      _fsutil.write_all(out_fd, cipher[:k])
      total += k
      if progress:
        progress(ln)
    return ph.hexdigest(), ch.hexdigest(), total

  free: 'queue.Queue' = queue.Queue()
  for _ in range(_PIPELINE_DEPTH):
    free.put(bytearray(streaming.SEGMENT_SIZE))
  work: 'queue.Queue' = queue.Queue()
  failed: List[BaseException] = []

  def sink():
    while True:
      item = work.get()
      if item is None:
        return
      buf, k = item
      if not failed:
        try:
          mv = memoryview(buf)[:k]
          ch.update(mv)
          _fsutil.write_all(out_fd, mv)
        except BaseException as e:  # pylint: disable=broad-except
          failed.append(e)
      free.put(buf)

  writer = threading.Thread(target=sink, name='tfxe-seal-writer', daemon=True)
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
  finally:
    work.put(None)
    writer.join()
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
    os.close(fd)
    raise
  ct_hash = digest_lib.new_hash(h.hash_alg)
  ct_hash.update(sh)
  return fd, offset, sc, ct_hash


def _decrypt_payload(src: _Source, h: Header, keys: header_lib.DerivedKeys,
                     index: int, entry: FileEntry,
                     sink: Callable[[memoryview], None],
                     progress: Progress = None) -> None:
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

    def consume(mv: memoryview) -> None:
      ph.update(mv)
      sink(mv)
      if progress:
        progress(len(mv))

    if n < PIPELINE_MIN_SEGMENTS:
      plain, cipher = memoryview(_BUFS.plain), memoryview(_BUFS.cipher)
      for i in range(n):
        _signals.check()
        k = open_segment(i, cipher, plain)
        consume(plain[:k])
    else:
      _open_pipelined(n, open_segment, consume)
    _check_ciphertext(h, index, ct_hash)
    if ph.hexdigest() != entry.digest:
      raise errors.TamperedPackageError(
          f'{_text.printable(entry.path)}: plaintext digest does not match '
          'the signed file '
          'table; the package was modified by a key holder')
  finally:
    os.close(fd)


def _open_pipelined(n: int,
                    open_segment: Callable[[int, memoryview, memoryview], int],
                    consume: Callable[[memoryview], None]) -> None:
  """Decrypt a large payload with two threads (the mirror of _seal_stream).

  A helper thread reads segment i + 1, hashes its ciphertext and decrypts
  it while this thread hashes segment i's plaintext and hands it to the
  sink, so the two digests run on two cores even for a model that is one
  large variables shard. Segments reach `consume` in order; the first
  error on either side stops both, and this thread raises it.
  """
  free: 'queue.Queue' = queue.Queue()
  for _ in range(_PIPELINE_DEPTH):
    free.put(bytearray(streaming.PLAINTEXT_SEGMENT_SIZE))
  ready: 'queue.Queue' = queue.Queue()
  stop = threading.Event()

  def produce():
    cipher = memoryview(bytearray(streaming.SEGMENT_SIZE))
    try:
      for i in range(n):
        buf = free.get()
        if stop.is_set():
          return
        _signals.check()
        ready.put((buf, open_segment(i, cipher, memoryview(buf))))
    except BaseException as e:  # pylint: disable=broad-except
      ready.put(e)

  opener = threading.Thread(target=produce, name='tfxe-open-reader',
                            daemon=True)
  opener.start()
  try:
    for _ in range(n):
      item = ready.get()
      if isinstance(item, BaseException):
        raise item
      buf, k = item
      _signals.check()
      consume(memoryview(buf)[:k])
      free.put(buf)
  finally:
    stop.set()
    free.put(bytearray(0))  # wakes the helper if it waits for a buffer
    opener.join()


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
