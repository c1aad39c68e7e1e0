"""EncryptPusher Beam executor: fan model encryption out to Beam workers.

For large models, the per-file streams of a tfx-encrypt package (docs/FORMAT.md
§6: 1 MiB segments, each sealed independently) are encrypted by Beam workers,
file by file and, for big files, segment range by segment range. The output
is a standard package, byte-compatible with `tfx_encrypt.package`, that the
plain `decrypt_model` / `tfx-encrypt decrypt` reads.

Key handling:

* The driver (this executor) generates the data key (DEK), wraps it for every
  recipient, and keeps it in its own memory only, to compute the header MAC
  and the encrypted file table at the end.
* The Beam job graph carries only public values: key URIs, paths, sizes, the
  package id, the encryption context, the wrapped-key stanzas (which are in
  the package header anyway), the key commitment, and each file's public
  stream header (salt and nonce prefix).
* Every worker unwraps the DEK itself, once per worker process, from
  `beam_worker_identity` (a KMS key that is also a recipient, or a private
  key file every worker can read), checks it against the key commitment,
  derives the payload key and forgets the DEK. No plaintext key is ever part
  of the job graph, a pickled DoFn or a Beam element.

Runner requirements: workers read the model and write the payload files in
place (positioned writes), so the model directory and the package staging
directory (next to the EncryptedModel artifact) must be on a filesystem that
every worker mounts: always true for DirectRunner (multi-processing or
multi-threading); for Dataflow/Flink/Spark, use a shared POSIX filesystem
(NFS, Filestore, ...).

Work is done in two Beam stages:
  1. `EncryptRanges`: one element per (file, segment range); seals segments
     into the pre-sized payload file with `pwrite`.
  2. `DigestFiles`: after all ranges of a file are done (GroupByKey), hashes
     its plaintext and ciphertext (the digests the header records) and writes
     a small result record that the driver collects.
"""

import dataclasses
import json
import os
import stat
import time
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import apache_beam as beam

# Only light imports at module level: Beam workers import this module to
# unpickle the DoFns, and should not pay for importing TFX and TensorFlow.
# The TFX executor class is built on first access (see __getattr__ below).
from tfx_encrypt import _fsutil
from tfx_encrypt import errors
from tfx_encrypt import keys as keys_lib
from tfx_encrypt import package as package_lib
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.keys.base import Stanza

DEFAULT_SEGMENT_BYTES = 64 << 20
_READ_CHUNK = 4 << 20
_METRICS_NAMESPACE = 'tfx_encrypt'


# --------------------------------------------------------------------------
# Worker side. Nothing here ever receives a plaintext key as an argument.
# --------------------------------------------------------------------------


def _worker_stream_key(job: Mapping[str, Any]) -> bytes:
  """Unwraps the DEK with the worker identity and derives the payload key."""
  identity = keys_lib.resolve(job['identity'])
  try:
    _, keys = package_lib.unwrap_data_key(
        [identity], [Stanza.from_json(o) for o in job['stanzas']],
        bytes.fromhex(job['package_id']), job['context'], job['suite'],
        bytes.fromhex(job['commitment']))
  except errors.NoMatchingKeyError:
    raise errors.NoMatchingKeyError(
        f'the Beam worker identity {identity.describe()} cannot unwrap the data '
        'key: it must be a recipient (a KMS key) or the private key of one'
    ) from None
  return keys.stream_key


class EncryptRangesFn(beam.DoFn):
  """Seals a range of segments of one file into its payload file."""

  def __init__(self, job: Mapping[str, Any]):
    super().__init__()
    self._job = dict(job)  # public values only; see the module docstring
    self._stream_key = None
    self._unwraps = beam.metrics.Metrics.counter(_METRICS_NAMESPACE,
                                                 'dek_unwraps')
    self._segments = beam.metrics.Metrics.counter(_METRICS_NAMESPACE,
                                                  'segments_sealed')
    self._bytes = beam.metrics.Metrics.counter(_METRICS_NAMESPACE,
                                               'plaintext_bytes')

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_stream_key'] = None  # never pickle a key, even by accident
    return state

  def setup(self):
    self._stream_key = None

  def teardown(self):
    self._stream_key = None

  def process(self, item: Mapping[str, Any]):
    job = self._job
    if self._stream_key is None:
      self._stream_key = _worker_stream_key(job)
      self._unwraps.inc()
    i, size = item['index'], item['size']
    n = streaming.num_segments(size)
    sc = streaming.StreamCipher(
        job['suite'], self._stream_key,
        header_lib.payload_aad(bytes.fromhex(job['package_id']), i,
                               bytes.fromhex(job['ctx_digest'])),
        bytes.fromhex(item['salt']), bytes.fromhex(item['nonce_prefix']))
    plain = bytearray(streaming.PLAINTEXT_SEGMENT_SIZE)
    cipher = bytearray(streaming.SEGMENT_SIZE)
    src = os.open(item['src'], os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0))
    try:
      if os.fstat(src).st_size != size:
        raise errors.UsageError(
            f'{item["relpath"]} changed size during encryption; do not modify '
            'the model during encryption')
      out = os.open(item['out'], os.O_WRONLY)
      try:
        for s in range(item['seg_start'], item['seg_end']):
          off, ln = streaming.plaintext_segment(s, size)
          mv = memoryview(plain)[:ln]
          if _fsutil.read_into_exact(src, mv, off) != ln:
            raise errors.UsageError(
                f'{item["relpath"]} shrank during encryption; do not modify '
                'the model during encryption')
          k = sc.encrypt_into(s, s == n - 1, mv, cipher)
          _pwrite_all(out, memoryview(cipher)[:k],
                      streaming.ciphertext_segment_offset(s))
          self._bytes.inc(ln)
        self._segments.inc(item['seg_end'] - item['seg_start'])
      finally:
        os.close(out)
    finally:
      os.close(src)
    yield i, {'pid': os.getpid(),
              'segments': item['seg_end'] - item['seg_start']}


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
  while data:
    k = os.pwrite(fd, data, offset)
    data, offset = data[k:], offset + k


def _hash_file(path: str, hash_alg: str) -> Tuple[str, int]:
  h = digest_lib.new_hash(hash_alg)
  buf = bytearray(_READ_CHUNK)
  total = 0
  fd = os.open(path, os.O_RDONLY)
  try:
    while True:
      k = os.readv(fd, [buf])
      if not k:
        break
      h.update(memoryview(buf)[:k])
      total += k
  finally:
    os.close(fd)
  return h.hexdigest(), total


class DigestFilesFn(beam.DoFn):
  """Hashes a finished file's plaintext and ciphertext; records the result."""

  def __init__(self, files: Mapping[int, Mapping[str, Any]], hash_alg: str,
               results_dir: str):
    super().__init__()
    self._files = {int(k): dict(v) for k, v in files.items()}
    self._hash_alg = hash_alg
    self._results_dir = results_dir

  def process(self, element):
    i, parts = element
    parts = list(parts)
    f = self._files[i]
    want = sum(p['segments'] for p in parts)
    if want != streaming.num_segments(f['size']):
      raise errors.TfxEncryptError(
          f'{f["relpath"]}: {want} of {streaming.num_segments(f["size"])} '
          'segments were sealed')
    plain_digest, plain_size = _hash_file(f['src'], self._hash_alg)
    if plain_size != f['size']:
      raise errors.UsageError(
          f'{f["relpath"]} changed size during encryption; do not modify the '
          'model during encryption')
    cipher_digest, ct_size = _hash_file(f['out'], self._hash_alg)
    if ct_size != streaming.ciphertext_size(f['size']):
      raise errors.TfxEncryptError(f'payload of {f["relpath"]} has the wrong '
                                   'size')
    record = {'index': i, 'plain_digest': plain_digest,
              'cipher_digest': cipher_digest, 'ct_size': ct_size,
              'pids': sorted({p['pid'] for p in parts}),
              'work_items': len(parts)}
    path = os.path.join(self._results_dir, f'{i:08d}.json')
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as fh:
      json.dump(record, fh)
    os.replace(tmp, path)  # retried bundles rewrite the same record
    yield i


def build_graph(pipeline, items: Sequence[Mapping[str, Any]],
                job: Mapping[str, Any], files: Mapping[int, Mapping[str, Any]],
                hash_alg: str, results_dir: str):
  """Adds the two encryption stages to `pipeline`. Public values only."""
  return (pipeline
          | 'WorkItems' >> beam.Create(list(items), reshuffle=False)
          | 'Distribute' >> beam.Reshuffle()
          | 'EncryptRanges' >> beam.ParDo(EncryptRangesFn(job))
          | 'ByFile' >> beam.GroupByKey()
          | 'DigestFiles' >> beam.ParDo(
              DigestFilesFn(files, hash_alg, results_dir)))


# --------------------------------------------------------------------------
# Driver side.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class BeamStats:
  """What the Beam fan-out did (for logs and tests)."""
  files: int = 0
  work_items: int = 0
  segments: int = 0
  worker_pids: List[int] = dataclasses.field(default_factory=list)
  dek_unwraps: Optional[int] = None
  seconds: float = 0.0
  worker_identity: str = ''


def _pick_identity(candidates: Sequence[str],
                   env: package_lib.Envelope) -> str:
  """First candidate URI that can unwrap the DEK (checked once, up front)."""
  tried = []
  for uri in candidates:
    try:
      backend = keys_lib.resolve(uri)
      package_lib.unwrap_data_key([backend], env.stanzas, env.package_id,
                                  env.context, env.suite,
                                  env.keys.commitment)
      return uri
    except (errors.NoMatchingKeyError, errors.UsageError):
      tried.append(uri)
  raise errors.UsageError(
      'Beam workers must unwrap the data key themselves, but none of '
      f'{", ".join(tried) or "the given keys"} can: pass '
      'beam_worker_identity=<a KMS recipient key URI, or the URI of the '
      'private key of a recipient that every worker can read>')


def _create(path: str, mode: int = 0o644) -> int:
  return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                 getattr(os, 'O_NOFOLLOW', 0), mode)


def encrypt_model_with_beam(
    src_dir: str,
    package: str,
    *,
    recipients: Sequence[str],
    make_pipeline: Callable[[], beam.Pipeline],
    worker_identity: Optional[str] = None,
    signer: Optional[str] = None,
    context: Optional[Mapping[str, str]] = None,
    cipher: str = 'aes-256-gcm',
    hash_alg: str = 'blake3',
    bundle: bool = False,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    stats: Optional[BeamStats] = None) -> package_lib.PackageInfo:
  """Like `package.encrypt_model`, with the payload sealed by Beam workers.

  Args:
    src_dir: local model directory (shared with the workers).
    package: path of the package to create (must not exist).
    recipients: key URIs the DEK is wrapped for.
    make_pipeline: returns a fresh `beam.Pipeline` (honouring
      beam_pipeline_args).
    worker_identity: key URI the workers unwrap the DEK with; default: the
      first recipient that can unwrap (a KMS recipient).
    signer: optional signing key URI.
    context: encryption context.
    cipher: 'aes-256-gcm' or 'chacha20-poly1305'.
    hash_alg: 'blake3' (default) or 'sha256'.
    bundle: write a single-file bundle.
    segment_bytes: plaintext bytes per work item for large files.
    stats: optional BeamStats filled in with what the job did.

  Returns:
    The PackageInfo of the new package.
  """
  started = time.monotonic()
  stats = stats if stats is not None else BeamStats()
  package = os.path.abspath(os.fspath(package))
  recipient_uris = [recipients] if isinstance(recipients, str) else list(
      recipients)
  sign_with = package_lib.resolve_signer(signer)
  if os.path.lexists(package):
    raise errors.OutputExistsError(f'{package} already exists')
  files, dirs = package_lib.scan_model(os.fspath(src_dir))
  env = package_lib.prepare_envelope(recipient_uris, context=context,
                                     cipher=cipher, hash_alg=hash_alg)
  identity = _pick_identity(
      [worker_identity] if worker_identity else recipient_uris, env)
  stats.worker_identity = identity

  tmp = package_lib.start_package(package)
  results_dir = _fsutil.temp_sibling(package, 'beam')
  try:
    os.mkdir(results_dir, 0o700)
    pdir = os.path.join(tmp, package_lib.PAYLOAD_DIR)
    segs_per_item = max(1, int(segment_bytes) //
                        streaming.PLAINTEXT_SEGMENT_SIZE)
    items, file_specs = [], {}
    for i, f in enumerate(files):
      out = os.path.join(pdir, package_lib.payload_name(i))
      salt = os.urandom(streaming.SALT_SIZE)
      prefix = os.urandom(streaming.NONCE_PREFIX_SIZE)
      fd = _create(out)
      try:  # public stream header, then the full (sparse) payload size
        _fsutil.write_all(fd, bytes([streaming.HEADER_SIZE]) + salt + prefix)
        os.ftruncate(fd, streaming.ciphertext_size(f.size))
      finally:
        os.close(fd)
      file_specs[i] = {'relpath': f.path, 'src': f.abspath, 'out': out,
                       'size': f.size}
      n = streaming.num_segments(f.size)
      for start in range(0, n, segs_per_item):
        items.append(dict(file_specs[i], index=i, salt=salt.hex(),
                          nonce_prefix=prefix.hex(), seg_start=start,
                          seg_end=min(n, start + segs_per_item)))
    items.sort(key=lambda x: -x['size'])  # big files first
    job = {  # public values only: URIs, ids, wrapped keys, commitment
        'identity': identity,
        'suite': env.suite,
        'package_id': env.package_id.hex(),
        'context': dict(env.context),
        'ctx_digest': env.ctx_digest.hex(),
        'stanzas': [st.to_json() for st in env.stanzas],
        'commitment': env.keys.commitment.hex(),
    }
    logging.info('Encrypting %d files as %d Beam work items; workers unwrap '
                 'the data key with %s.', len(files), len(items), identity)
    pipeline = make_pipeline()
    build_graph(pipeline, items, job, file_specs, hash_alg, results_dir)
    result = pipeline.run()
    result.wait_until_finish()
    stats.dek_unwraps = _counter(result, 'dek_unwraps')

    records = {}
    for name in os.listdir(results_dir):
      if name.endswith('.json'):
        with open(os.path.join(results_dir, name)) as fh:
          rec = json.load(fh)
        records[rec['index']] = rec
    if sorted(records) != list(range(len(files))):
      raise errors.TfxEncryptError(
          f'the Beam job finished {len(records)} of {len(files)} files')
    _, hlen = package_lib.finish_package(
        env, tmp, package,
        entries=[header_lib.FileEntry(f.path, f.size,
                                      records[i]['plain_digest'])
                 for i, f in enumerate(files)],
        dirs=dirs,
        payloads=[(records[i]['ct_size'], records[i]['cipher_digest'])
                  for i in range(len(files))],
        signer=sign_with, bundle=bundle)
    del hlen
    stats.files = len(files)
    stats.work_items = len(items)
    stats.segments = sum(streaming.num_segments(f.size) for f in files)
    stats.worker_pids = sorted({p for r in records.values()
                                for p in r['pids']})
  except BaseException:
    _fsutil.remove_tree(tmp)
    raise
  finally:
    _fsutil.remove_tree(results_dir)
    stats.seconds = time.monotonic() - started
  info = package_lib.inspect_package(package)
  return dataclasses.replace(info, plaintext_bytes=sum(f.size for f in files),
                             signature_verified=sign_with is not None)


def _counter(result, name: str) -> Optional[int]:
  try:
    from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top
    counters = result.metrics().query(
        MetricsFilter().with_namespace(_METRICS_NAMESPACE).with_name(name))[
            'counters']
    return sum(c.committed or c.attempted or 0 for c in counters)
  except Exception:  # pylint: disable=broad-except
    return None


def _model_bytes(model_dir: str) -> int:
  total = 0
  stack = [model_dir]  # not os.walk: it recurses per level before 3.12
  while stack:
    with os.scandir(stack.pop()) as it:
      for e in it:
        st = e.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
          stack.append(e.path)
        elif stat.S_ISREG(st.st_mode):
          total += st.st_size
  return total


def _make_executor_class():
  """Builds the TFX Beam executor class (imports TFX on first use)."""
  # pylint: disable=g-import-not-at-top
  from tfx.dsl.components.base import base_beam_executor
  from tfx_encrypt.components.encrypt_pusher import executor
  # pylint: enable=g-import-not-at-top

  class Executor(executor.Executor, base_beam_executor.BaseBeamExecutor):
    """EncryptPusher executor that fans encryption out to Beam workers.

    Honours `beam_pipeline_args` (pipeline-level and
    `BeamEncryptPusher(...).with_beam_pipeline_args([...])`), e.g.
    `--direct_num_workers=2 --direct_running_mode=multi_processing`.
    Models smaller than `beam_min_bytes` are encrypted in-process.
    """

    #: Filled in after each Beam encryption (for logs and tests).
    last_beam_stats: Optional[BeamStats] = None

    def EncryptModel(self, model_dir: str, package: str, params: Any,
                     context: Mapping[str, str]) -> Any:
      size = _model_bytes(model_dir)
      if size < params.beam_min_bytes:
        logging.info('Model is %d bytes (< beam_min_bytes=%d): encrypting '
                     'in-process.', size, params.beam_min_bytes)
        return super().EncryptModel(model_dir, package, params, context)
      stats = BeamStats()
      kwargs = {}
      if params.cipher:
        kwargs['cipher'] = params.cipher
      if params.hash_alg:
        kwargs['hash_alg'] = params.hash_alg
      info = encrypt_model_with_beam(
          model_dir, package,
          recipients=list(params.recipients),
          make_pipeline=self._make_beam_pipeline,
          worker_identity=params.beam_worker_identity,
          signer=params.signer,
          context=dict(context),
          bundle=params.bundle,
          segment_bytes=params.beam_segment_bytes or DEFAULT_SEGMENT_BYTES,
          stats=stats,
          **kwargs)
      self.last_beam_stats = stats
      logging.info(
          'Beam encryption: %d files, %d work items, %d segments, worker '
          'processes %s, DEK unwraps %s, %.1f s.', stats.files,
          stats.work_items, stats.segments, stats.worker_pids,
          stats.dek_unwraps, stats.seconds)
      return info

  Executor.__module__ = __name__
  Executor.__qualname__ = 'Executor'
  return Executor


def __getattr__(name):
  # `Executor` (the TFX executor class) is created on first access, so that
  # Beam workers, which import this module only for the DoFns, stay light.
  if name == 'Executor':
    cls = _make_executor_class()
    globals()['Executor'] = cls
    return cls
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
