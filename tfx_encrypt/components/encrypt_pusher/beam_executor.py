"""EncryptPusher Beam executor: fan model encryption out to Beam workers.

For large models, the per-file streams of a tfx-encrypt package (docs/FORMAT.md
§6: 1 MiB segments, each sealed independently) are encrypted by Beam workers,
file by file and, for big files, segment range by segment range. The output
is a standard package, byte-compatible with `tfx_encrypt.package`, that the
plain `decrypt_model` / `tfx-encrypt decrypt` reads: it is written with the
same building blocks as `package.encrypt_model` (`prepare_envelope`,
`start_package`, `start_payload` / `seal_segment_range`, `finish_package`).

Key handling:

* The driver (this executor) prepares the envelope: it generates the data key
  (DEK), wraps it for every recipient, and keeps the derived keys in its own
  memory only, to compute the header MAC and the encrypted file table at the
  end.
* The Beam job graph carries only public values: key URIs, paths, sizes, the
  package id, the encryption context, the wrapped-key stanzas (which are in
  the package header anyway), the key commitment, and each file's public
  stream header (salt and nonce prefix).
* Every worker rebuilds the envelope itself, once per worker process: it
  unwraps the DEK from `beam_worker_identity` (a KMS key that is also a
  recipient, or a private key file every worker can read) and checks it
  against the key commitment. No plaintext key is ever part of the job
  graph, a pickled DoFn or a Beam element (an Envelope refuses to be
  pickled).

Runner requirements: workers read the model and write the payload files in
place (positioned writes), so the model directory and the package staging
directory (next to the EncryptedModel artifact) must be on a filesystem that
every worker mounts: always true for DirectRunner (multi-processing or
multi-threading); for Dataflow/Flink/Spark, use a shared POSIX filesystem
(NFS, Filestore, ...).

Work is done in two Beam stages:
  1. `EncryptRanges`: one element per (file, segment range);
     `package.seal_segment_range` seals it into the pre-sized payload file.
  2. `DigestFiles`: after all ranges of a file are done (GroupByKey), hashes
     its plaintext and ciphertext (the digests the header records) and writes
     a small result record that the driver collects.
"""

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from absl import logging
import apache_beam as beam

# Only light imports at module level: Beam workers import this module to
# unpickle the DoFns, and should not pay for importing TFX and TensorFlow.
# The TFX executor class is built on first access (see __getattr__ below).
from tfx_encrypt import _fsutil
from tfx_encrypt import errors
from tfx_encrypt import keys as keys_lib
from tfx_encrypt import package as package_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.format.header import FileEntry
from tfx_encrypt.format.stanza import Stanza
from tfx_encrypt.keys.base import KeyBackend

DEFAULT_SEGMENT_BYTES = 64 << 20
_METRICS_NAMESPACE = 'tfx_encrypt'


# --------------------------------------------------------------------------
# The envelope, as public values and back.
# --------------------------------------------------------------------------


def _public_values(env: package_lib.Envelope) -> Dict[str, Any]:
  """What a worker needs, with its identity, to rebuild `env`: no key."""
  return {
      'suite': env.suite,
      'hash_alg': env.hash_alg,
      'package_id': env.package_id.hex(),
      'context': dict(env.context),
      'stanzas': [st.to_json() for st in env.stanzas],
      'commitment': env.keys.commitment.hex(),
  }


def _open_envelope(identity: KeyBackend,
                   public: Mapping[str, Any]) -> package_lib.Envelope:
  """The envelope of `public`, its DEK unwrapped with `identity`.

  Raises:
    NoMatchingKeyError: `identity` cannot unwrap any of the stanzas.
    TamperedPackageError: the unwrapped key does not match the commitment.
  """
  package_id = bytes.fromhex(public['package_id'])
  stanzas = [Stanza.from_json(o) for o in public['stanzas']]
  _, keys = package_lib.unwrap_data_key(
      [identity], stanzas, package_id, public['context'], public['suite'],
      bytes.fromhex(public['commitment']))
  return package_lib.Envelope(public['suite'], public['hash_alg'], package_id,
                              dict(public['context']), stanzas, keys)


# --------------------------------------------------------------------------
# Worker side. Nothing here ever receives a plaintext key as an argument.
# --------------------------------------------------------------------------


def _worker_envelope(job: Mapping[str, Any]) -> package_lib.Envelope:
  """The envelope, rebuilt with the worker identity named in `job`."""
  identity = keys_lib.resolve(job['identity'])
  try:
    return _open_envelope(identity, job)
  except errors.NoMatchingKeyError:
    raise errors.NoMatchingKeyError(
        f'the Beam worker identity {identity.describe()} cannot unwrap the '
        'data key: it must be a recipient (a KMS key) or the private key of '
        'one') from None


class EncryptRangesFn(beam.DoFn):
  """Seals a range of segments of one file into its payload file."""

  def __init__(self, job: Mapping[str, Any]):
    super().__init__()
    self._job = dict(job)  # public values only; see the module docstring
    self._env = None
    self._unwraps = beam.metrics.Metrics.counter(_METRICS_NAMESPACE,
                                                 'dek_unwraps')
    self._segments = beam.metrics.Metrics.counter(_METRICS_NAMESPACE,
                                                  'segments_sealed')
    self._bytes = beam.metrics.Metrics.counter(_METRICS_NAMESPACE,
                                               'plaintext_bytes')

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_env'] = None  # never pickle keys, even by accident
    return state

  def setup(self):
    self._env = None

  def teardown(self):
    self._env = None

  def process(self, item: Mapping[str, Any]):
    if self._env is None:
      self._env = _worker_envelope(self._job)
      self._unwraps.inc()
    sealed = package_lib.seal_segment_range(
        self._env, item['index'], bytes.fromhex(item['stream_header']),
        source=item['src'], relpath=item['relpath'], size=item['size'],
        payload=item['out'], first=item['seg_start'], end=item['seg_end'])
    segments = item['seg_end'] - item['seg_start']
    self._bytes.inc(sealed)
    self._segments.inc(segments)
    yield item['index'], {'pid': os.getpid(), 'segments': segments}


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
    plain_digest, plain_size = _fsutil.hash_file(f['src'], self._hash_alg)
    if plain_size != f['size']:
      raise errors.UsageError(
          f'{f["relpath"]} changed size during encryption; do not modify the '
          'model during encryption')
    cipher_digest, ct_size = _fsutil.hash_file(f['out'], self._hash_alg)
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
                   public: Mapping[str, Any]) -> str:
  """First candidate URI that can unwrap the DEK (checked once, up front)."""
  tried = []
  for uri in candidates:
    try:
      _open_envelope(keys_lib.resolve(uri), public)
      return uri
    except (errors.NoMatchingKeyError, errors.UsageError):
      tried.append(uri)
  raise errors.UsageError(
      'Beam workers must unwrap the data key themselves, but none of '
      f'{", ".join(tried) or "the given keys"} can: pass '
      'beam_worker_identity=<a KMS recipient key URI, or the URI of the '
      'private key of a recipient that every worker can read>')


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

  Raises:
    UsageError: no candidate identity can unwrap the data key, or the model
      changed while it was being encrypted.
    OutputExistsError: `package` exists.
    TfxEncryptError: as `package.encrypt_model`, or the Beam job did not
      seal every file.
  """
  started = time.monotonic()
  stats = stats if stats is not None else BeamStats()
  package = os.path.abspath(os.fspath(package))
  recipient_uris = [recipients] if isinstance(recipients, str) else list(
      recipients)
  sign_with = package_lib.resolve_signer(signer)
  # The same output rules as the in-process path (docs/SECURITY.md §1).
  package = _fsutil.check_output(package, force=False, sources=[src_dir])
  files, dirs = package_lib.scan_model(os.fspath(src_dir))
  env = package_lib.prepare_envelope(recipient_uris, context=context,
                                     cipher=cipher, hash_alg=hash_alg)
  job = _public_values(env)  # public values only: URIs, ids, wrapped keys
  job['identity'] = _pick_identity(
      [worker_identity] if worker_identity else recipient_uris, job)
  stats.worker_identity = job['identity']

  tmp = package_lib.start_package(package)
  results_dir = _fsutil.temp_sibling(package, 'beam')
  try:
    os.mkdir(results_dir, 0o700)
    segs_per_item = max(1, int(segment_bytes) //
                        streaming.PLAINTEXT_SEGMENT_SIZE)
    items, file_specs = [], {}
    for i, f in enumerate(files):
      out, stream_header = package_lib.start_payload(env, tmp, i, f.size)
      file_specs[i] = {'relpath': f.path, 'src': f.abspath, 'out': out,
                       'size': f.size}
      n = streaming.num_segments(f.size)
      for start in range(0, n, segs_per_item):
        items.append(dict(file_specs[i], index=i,
                          stream_header=stream_header.hex(), seg_start=start,
                          seg_end=min(n, start + segs_per_item)))
    items.sort(key=lambda x: -x['size'])  # big files first
    logging.info('Encrypting %d files as %d Beam work items; workers unwrap '
                 'the data key with %s.', len(files), len(items),
                 job['identity'])
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
    package_lib.finish_package(
        env, tmp, package,
        entries=[FileEntry(f.path, f.size, records[i]['plain_digest'])
                 for i, f in enumerate(files)],
        dirs=dirs,
        payloads=[(records[i]['ct_size'], records[i]['cipher_digest'])
                  for i in range(len(files))],
        signer=sign_with, bundle=bundle)
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
      size = _fsutil.tree_size(model_dir)
      if size < params.beam_min_bytes:
        logging.info('Model is %d bytes (< beam_min_bytes=%d): encrypting '
                     'in-process.', size, params.beam_min_bytes)
        return super().EncryptModel(model_dir, package, params, context)
      stats = BeamStats()
      info = encrypt_model_with_beam(
          model_dir, package, context=dict(context),
          make_pipeline=self._make_beam_pipeline,
          worker_identity=params.beam_worker_identity,
          segment_bytes=params.beam_segment_bytes or DEFAULT_SEGMENT_BYTES,
          stats=stats, **params.package_options())
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
