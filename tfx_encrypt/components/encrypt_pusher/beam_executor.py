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

Two ways to run, chosen by where the model and the package are:

* **No shared filesystem** (both on `gs://` / `s3://`; Dataflow, Flink, Spark,
  Dask): workers read their byte ranges of the model straight from its
  objects (ranged reads pinned to the version the driver listed) and write
  the ciphertext of each range as a *part object* under a temporary prefix
  next to the package; the driver then has the store concatenate the parts
  into the payload objects server-side (S3 UploadPartCopy, GCS compose:
  `tfx_encrypt.storage._assemble`) and writes the header create-only as the
  commit point. No payload byte passes through the driver (but for a
  bundle on S3: the header and the short pieces it must join to reach S3's
  5 MiB part minimum, less than 10 MiB at a time); the temporary objects
  are deleted on success and on failure; a SIGKILLed run's are recognised
  by `tfx-encrypt clean` through the marker it writes first (`package._parts`,
  docs/OBJECT_STORES.md "Beam without a shared filesystem").
* **Shared filesystem** (both local paths): workers read the model and
  write the payload files in place (positioned writes), so the model
  directory and the package staging directory must be on a filesystem every
  worker mounts: always true for DirectRunner; elsewhere NFS, Filestore...

Work is done in two Beam stages:
  1. `EncryptRanges`: one element per (file, segment range);
     `package.seal_segment_range` seals it into the pre-sized payload file
     (or `_parts.seal_range_to` into its part object).
  2. `DigestFiles`: after all ranges of a file are done (GroupByKey), hashes
     its plaintext and ciphertext (the digests the header records) and writes
     a small result record that the driver collects (a file, or an object
     under the temporary prefix).

Recipients may be key groups (k of n, FORMAT.md §7.1): the workers then
unwrap shares of k groups with their identities (`worker_identity` names
one key URI per group they open) and rebuild the data key themselves.
"""

import dataclasses
import json
import os
import time
from typing import (Any, Callable, Dict, List, Mapping, Optional, Sequence,
                    Union)

from absl import logging
import apache_beam as beam

# Only light imports at module level: Beam workers import this module to
# unpickle the DoFns, and should not pay for importing TFX and TensorFlow.
# The TFX executor class is built on first access (see __getattr__ below).
from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt import keys as keys_lib
from tfx_encrypt import package as package_lib
from tfx_encrypt import storage
from tfx_encrypt.format import streaming
from tfx_encrypt.format.header import FileEntry, KeyGroups
from tfx_encrypt.format.stanza import Stanza
from tfx_encrypt.keys.base import KeyBackend
from tfx_encrypt.package import _parts
from tfx_encrypt.storage import _assemble

DEFAULT_SEGMENT_BYTES = 64 << 20
_METRICS_NAMESPACE = 'tfx_encrypt'

KeyUris = Union[str, Sequence[str]]


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
      'threshold': (None if env.threshold is None else
                    {'k': env.threshold.k,
                     'groups': [list(g) for g in env.threshold.groups]}),
      'commitment': env.keys.commitment.hex(),
  }


def _open_envelope(identities: Sequence[KeyBackend],
                   public: Mapping[str, Any]) -> package_lib.Envelope:
  """The envelope of `public`, its DEK unwrapped with `identities` (k of
  them, one per key group, when the recipients are key groups).

  Raises:
    NoMatchingKeyError: the identities cannot unwrap the data key.
    TamperedPackageError: the unwrapped key does not match the commitment.
  """
  package_id = bytes.fromhex(public['package_id'])
  stanzas = [Stanza.from_json(o) for o in public['stanzas']]
  kg = public.get('threshold')
  threshold = None if kg is None else KeyGroups(kg['k'], kg['groups'])
  _, keys = package_lib.unwrap_data_key(
      list(identities), stanzas, package_id, public['context'],
      public['suite'], bytes.fromhex(public['commitment']), threshold)
  return package_lib.Envelope(public['suite'], public['hash_alg'], package_id,
                              dict(public['context']), stanzas, keys,
                              threshold)


# --------------------------------------------------------------------------
# Worker side. Nothing here ever receives a plaintext key as an argument.
# --------------------------------------------------------------------------


def _worker_envelope(job: Mapping[str, Any]) -> package_lib.Envelope:
  """The envelope, rebuilt with the worker identities named in `job`."""
  identities = [keys_lib.resolve(u) for u in job['identities']]
  try:
    return _open_envelope(identities, job)
  except errors.NoMatchingKeyError:
    raise errors.NoMatchingKeyError(
        'the Beam worker identity '
        f'{", ".join(i.describe() for i in identities)} cannot unwrap the '
        'data key: it must be a recipient (a KMS key) or the private key of '
        'one (with key groups: one such key in each of k groups)') from None


class _EnvelopeFn(beam.DoFn):
  """A DoFn that unwraps the data key itself, once per instance."""

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

  def _envelope(self) -> package_lib.Envelope:
    # Lazily, not in setup(): runners that call process() only (Beam's
    # DaskRunner) get the same behaviour.
    if self._env is None:
      self._env = _worker_envelope(self._job)
      self._unwraps.inc()
    return self._env


class EncryptRangesFn(_EnvelopeFn):
  """Seals a range of segments of one file into its payload file."""

  def process(self, item: Mapping[str, Any]):
    env = self._envelope()
    sealed = package_lib.seal_segment_range(
        env, item['index'], bytes.fromhex(item['stream_header']),
        source=item['src'], relpath=item['relpath'], size=item['size'],
        payload=item['out'], first=item['seg_start'], end=item['seg_end'])
    segments = item['seg_end'] - item['seg_start']
    self._bytes.inc(sealed)
    self._segments.inc(segments)
    yield item['index'], {'pid': os.getpid(), 'segments': segments}


class SealPartsFn(_EnvelopeFn):
  """Seals a range of segments of one model object into its part object
  (no shared filesystem: object store to object store)."""

  def process(self, item: Mapping[str, Any]):
    env = self._envelope()
    f = _parts.RemoteFile(**item['file'])
    size = _parts.seal_range_to(
        item['part'], env, item['index'],
        bytes.fromhex(item['stream_header']), f, item['seg_start'],
        item['seg_end'])
    segments = item['seg_end'] - item['seg_start']
    self._bytes.inc(_parts.range_bytes(f.size, item['seg_start'],
                                       item['seg_end'])[1])
    self._segments.inc(segments)
    yield item['index'], {'pid': os.getpid(), 'segments': segments,
                          'part': item['part'], 'part_size': size,
                          'seg_start': item['seg_start']}


def _check_all_sealed(f: Mapping[str, Any], parts) -> None:
  """Every segment of the file was sealed, once (a retried bundle may
  report a range twice: count each range once)."""
  ranges = {p.get('seg_start', id(p)): p['segments'] for p in parts}
  want = streaming.num_segments(f['size'])
  if sum(ranges.values()) != want:
    raise errors.TfxEncryptError(
        f'{_text.printable(f["relpath"])}: {sum(ranges.values())} of {want} '
        'segments were sealed')


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
    if sum(p['segments'] for p in parts) != streaming.num_segments(f['size']):
      _check_all_sealed(f, parts)
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


class DigestPartsFn(beam.DoFn):
  """Hashes a file's plaintext (its model object) and ciphertext (its part
  objects, in order); writes the result as an object the driver reads."""

  def __init__(self, files: Mapping[int, Mapping[str, Any]], hash_alg: str,
               results: str):
    super().__init__()
    self._files = {int(k): dict(v) for k, v in files.items()}
    self._hash_alg = hash_alg
    self._results = results

  def process(self, element):
    i, reports = element
    reports = list(reports)
    spec = self._files[i]
    f = _parts.RemoteFile(**spec['file'])
    _check_all_sealed({'relpath': f.path, 'size': f.size}, reports)
    sizes = {r['part']: r['part_size'] for r in reports}
    if sorted(sizes) != sorted(spec['parts']) or any(
        sizes[p] != s for p, s in zip(spec['parts'], spec['part_sizes'])):
      raise errors.TfxEncryptError(
          f'{_text.printable(f.path)}: the sealed parts are not the planned '
          'ones')
    plain_digest, cipher_digest, ct_size = _parts.digest_parts(
        f, spec['parts'], spec['part_sizes'], self._hash_alg)
    record = {'index': i, 'plain_digest': plain_digest,
              'cipher_digest': cipher_digest, 'ct_size': ct_size,
              'pids': sorted({r['pid'] for r in reports}),
              'work_items': len(reports)}
    # Retried bundles rewrite the same record.
    storage.put(storage.join(self._results, f'{i:08d}.json'),
                json.dumps(record, sort_keys=True).encode())
    yield i


def build_graph(pipeline, items: Sequence[Mapping[str, Any]],
                job: Mapping[str, Any], files: Mapping[int, Mapping[str, Any]],
                hash_alg: str, results_dir: str):
  """Adds the two encryption stages to `pipeline`. Public values only."""
  remote = bool(items) and 'part' in items[0]
  seal = SealPartsFn(job) if remote else EncryptRangesFn(job)
  digest = (DigestPartsFn if remote else DigestFilesFn)(files, hash_alg,
                                                        results_dir)
  return (pipeline
          | 'WorkItems' >> beam.Create(list(items), reshuffle=False)
          | 'Distribute' >> beam.Reshuffle()
          | 'EncryptRanges' >> beam.ParDo(seal)
          | 'ByFile' >> beam.GroupByKey()
          | 'DigestFiles' >> beam.ParDo(digest))


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
  #: No shared filesystem: the parts assembled server-side, and the
  #: temporary prefix they lived under (deleted).
  parts: int = 0
  staging: str = ''


def _local_file_absent(uri: str) -> bool:
  """True if `uri` names a local key file this (driver) host lacks."""
  if keys_lib.uri_scheme(uri) != 'file':
    return False
  path = uri[len('file://'):] if uri.startswith('file://') else uri
  return not os.path.exists(path)


def _pick_identities(candidates: Sequence[str], public: Mapping[str, Any],
                     explicit: bool) -> List[str]:
  """The worker identities, checked once up front where the driver can.

  Plain recipients: the first candidate that unwraps. Key groups: every
  candidate that resolves, together (workers open k groups with them). An
  explicit identity that is a key file absent on this host (it may exist
  on the workers only) is left to the workers, who fail closed.
  """
  if explicit and all(_local_file_absent(u) for u in candidates):
    logging.info('The Beam worker identity %s is not on this host: the '
                 'workers check it.', _text.printable(', '.join(candidates)))
    return list(candidates)
  tried = []
  if public.get('threshold') is None:
    for uri in candidates:
      try:
        _open_envelope([keys_lib.resolve(uri)], public)
        return [uri]
      except (errors.NoMatchingKeyError, errors.UsageError):
        tried.append(uri)
  else:
    usable = []
    for uri in candidates:
      try:
        usable.append((uri, keys_lib.resolve(uri)))
      except errors.UsageError:
        tried.append(uri)
    try:
      _open_envelope([b for _, b in usable], public)
      return [u for u, _ in usable]
    except (errors.NoMatchingKeyError, errors.UsageError):
      tried.extend(u for u, _ in usable)
  raise errors.UsageError(
      'Beam workers must unwrap the data key themselves, but '
      f'{", ".join(tried) or "none of the given keys"} cannot: pass '
      'beam_worker_identity=<a KMS recipient key URI, or the URI of the '
      'private key of a recipient that every worker can read> (with key '
      'groups: one per group, k groups)')


def encrypt_model_with_beam(
    src_dir: str,
    package: str,
    *,
    recipients: Optional[Sequence[str]] = None,
    make_pipeline: Callable[[], beam.Pipeline],
    key_groups: Optional[Sequence[Sequence[str]]] = None,
    threshold: Optional[int] = None,
    worker_identity: Optional[KeyUris] = None,
    signer: Optional[str] = None,
    context: Optional[Mapping[str, str]] = None,
    cipher: str = 'aes-256-gcm',
    hash_alg: str = 'blake3',
    bundle: bool = False,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    any_dir: bool = False,
    stats: Optional[BeamStats] = None) -> package_lib.PackageInfo:
  """Like `package.encrypt_model`, with the payload sealed by Beam workers.

  Args:
    src_dir: the model: a local directory (shared with the workers), or a
      `gs://` / `s3://` prefix (then `package` must be on a store too).
    package: the package to create (must not exist): a local path, or a
      `gs://` / `s3://` URI (no shared filesystem needed).
    recipients: key URIs the DEK is wrapped for (any one decrypts).
    make_pipeline: returns a fresh `beam.Pipeline` (honouring
      beam_pipeline_args).
    key_groups: instead of recipients, n lists of key URIs; with
      `threshold` k, keys of k distinct groups are needed (FORMAT.md §7.1).
    threshold: k, with key_groups.
    worker_identity: key URI (or URIs: one per key group, k groups) the
      workers unwrap the DEK with; default: the first recipient that can
      unwrap (a KMS recipient), or with key groups all that can.
    signer: optional signing key URI.
    context: encryption context.
    cipher: 'aes-256-gcm' or 'chacha20-poly1305'.
    hash_alg: 'blake3' (default) or 'sha256'.
    bundle: write a single-file bundle.
    segment_bytes: plaintext bytes per work item for large files.
    any_dir: encrypt a tree that does not look like a model.
    stats: optional BeamStats filled in with what the job did.

  Returns:
    The PackageInfo of the new package.

  Raises:
    UsageError: no candidate identity can unwrap the data key, the model
      changed while it was being encrypted, or the model and the package
      are not both local or both on object stores.
    OutputExistsError: `package` exists.
    TfxEncryptError: as `package.encrypt_model`, or the Beam job did not
      seal every file.
  """
  started = time.monotonic()
  stats = stats if stats is not None else BeamStats()
  src_dir, package = os.fspath(src_dir), os.fspath(package)
  if isinstance(recipients, str):
    recipients = [recipients]
  explicit = worker_identity is not None
  if isinstance(worker_identity, str):
    worker_identity = [worker_identity]
  if storage.is_remote(src_dir) or storage.is_remote(package):
    encrypt = _encrypt_remote
  else:
    encrypt = _encrypt_shared_fs
  try:
    return encrypt(
        src_dir, package, recipients=recipients, key_groups=key_groups,
        threshold=threshold, make_pipeline=make_pipeline,
        worker_identity=worker_identity, explicit=explicit, signer=signer,
        context=context, cipher=cipher, hash_alg=hash_alg, bundle=bundle,
        segment_bytes=segment_bytes, any_dir=any_dir, stats=stats)
  finally:
    stats.seconds = time.monotonic() - started


def _envelope_and_job(recipients, key_groups, threshold, worker_identity,
                      explicit, context, cipher, hash_alg, stats):
  env = package_lib.prepare_envelope(recipients, context=context,
                                     cipher=cipher, hash_alg=hash_alg,
                                     key_groups=key_groups,
                                     threshold=threshold)
  job = _public_values(env)  # public values only: URIs, ids, wrapped keys
  def uri(k):
    return k.uri if isinstance(k, KeyBackend) else str(k)

  if explicit:
    candidates = [uri(k) for k in worker_identity]
  elif key_groups is not None:
    candidates = [uri(k) for g in key_groups for k in g]
  else:
    candidates = [uri(k) for k in recipients or ()]
  job['identities'] = _pick_identities(candidates, job, explicit)
  stats.worker_identity = ', '.join(job['identities'])
  return env, job


def _segments_per_item(segment_bytes: int) -> int:
  return max(1, int(segment_bytes) // streaming.PLAINTEXT_SEGMENT_SIZE)


def _run(make_pipeline, items, job, file_specs, hash_alg, results, stats):
  pipeline = make_pipeline()
  build_graph(pipeline, items, job, file_specs, hash_alg, results)
  result = pipeline.run()
  try:
    result.wait_until_finish()
    stats.dek_unwraps = _counter(result, 'dek_unwraps')
  finally:
    # Beam's DaskRunner opens a dask.distributed Client per run and leaves
    # it open: close it (no other runner's result has one).
    client = getattr(result, 'client', None)
    if client is not None and callable(getattr(client, 'close', None)):
      try:
        client.close()
      except Exception:  # pylint: disable=broad-except
        logging.warning('Could not close the Dask client', exc_info=True)


def _check_records(records: Mapping[int, Any], count: int) -> None:
  if sorted(records) != list(range(count)):
    raise errors.TfxEncryptError(
        f'the Beam job finished {len(records)} of {count} files')


def _encrypt_shared_fs(src_dir, package, *, recipients, key_groups, threshold,
                       make_pipeline, worker_identity, explicit, signer,
                       context, cipher, hash_alg, bundle, segment_bytes,
                       any_dir, stats):
  """Model and package on a filesystem every worker mounts."""
  package = os.path.abspath(package)
  sign_with = package_lib.resolve_signer(signer)
  # The same output rules as the in-process path (docs/SECURITY.md §1).
  package = _fsutil.check_output(package, force=False, sources=[src_dir])
  files, dirs = package_lib.scan_model(src_dir, any_dir=any_dir)
  env, job = _envelope_and_job(recipients, key_groups, threshold,
                               worker_identity, explicit, context, cipher,
                               hash_alg, stats)
  tmp = package_lib.start_package(package)
  results_dir = _fsutil.temp_sibling(package, 'beam')
  try:
    os.mkdir(results_dir, 0o700)
    segs_per_item = _segments_per_item(segment_bytes)
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
                 stats.worker_identity)
    _run(make_pipeline, items, job, file_specs, hash_alg, results_dir, stats)

    records = {}
    for name in os.listdir(results_dir):
      if name.endswith('.json'):
        with open(os.path.join(results_dir, name)) as fh:
          rec = json.load(fh)
        records[rec['index']] = rec
    _check_records(records, len(files))
    package_lib.finish_package(
        env, tmp, package,
        entries=[FileEntry(f.path, f.size, records[i]['plain_digest'])
                 for i, f in enumerate(files)],
        dirs=dirs,
        payloads=[(records[i]['ct_size'], records[i]['cipher_digest'])
                  for i in range(len(files))],
        signer=sign_with, bundle=bundle)
    _fill_stats(stats, files, items, records)
  except BaseException:
    _fsutil.remove_tree(tmp)
    raise
  finally:
    _fsutil.remove_tree(results_dir)
  info = package_lib.inspect_package(package)
  return dataclasses.replace(info, plaintext_bytes=sum(f.size for f in files),
                             signature_verified=sign_with is not None)


def _fill_stats(stats, files, items, records):
  stats.files = len(files)
  stats.work_items = len(items)
  stats.segments = sum(streaming.num_segments(f.size) for f in files)
  stats.worker_pids = sorted({p for r in records.values() for p in r['pids']})


def _encrypt_remote(src_dir, package, *, recipients, key_groups, threshold,
                    make_pipeline, worker_identity, explicit, signer, context,
                    cipher, hash_alg, bundle, segment_bytes, any_dir, stats):
  """No shared filesystem: model and package on object stores."""
  for uri, what in ((src_dir, 'model'), (package, 'package')):
    if not storage.is_remote(uri):
      raise errors.UsageError(
          'Beam without a shared filesystem needs the model and the package '
          f'both on an object store (gs://, s3://); the {what} '
          f'{_text.printable(uri)} is not. Use local paths for both on a '
          'filesystem every worker mounts')
  src_dir, package = src_dir.rstrip('/'), package.rstrip('/')
  scheme, _, key = storage.split(package)
  if not key:
    raise errors.UsageError(f'{_text.printable(package)}: name a package '
                            'under the bucket, not the bucket itself')
  if src_dir == package or package.startswith(src_dir + '/') or (
      src_dir.startswith(package + '/')):
    raise errors.UsageError('the package must not be inside the model, nor '
                            'the model inside the package')
  sign_with = package_lib.resolve_signer(signer)
  # Never replace anything: the destination must be free. (The create-only
  # writes below enforce it again against a concurrent writer.)
  if _objects(package) or storage.exists(package):
    raise errors.OutputExistsError(
        f'{_text.printable(package)} already exists; tfx-encrypt never '
        'replaces what it did not write')
  files, dirs = _parts.scan_remote_model(src_dir, any_dir=any_dir)
  env, job = _envelope_and_job(recipients, key_groups, threshold,
                               worker_identity, explicit, context, cipher,
                               hash_alg, stats)
  limits = _assemble.part_limits(package)
  stage = _parts.staging_prefix(package)
  stats.staging = stage
  segs_per_item = _segments_per_item(segment_bytes)
  items, file_specs = [], {}
  for i, f in enumerate(files):
    stream_header = env.new_stream(i).header  # public: salt, nonce prefix
    spec = {'file': dataclasses.asdict(f), 'parts': [], 'part_sizes': []}
    for first, end in _parts.plan_ranges(f.size, segs_per_item, limits):
      part = storage.join(stage, 'parts', f'{i:08d}', f'{first:010d}')
      spec['parts'].append(part)
      spec['part_sizes'].append(_parts.range_bytes(f.size, first, end)[1])
      items.append({'file': spec['file'], 'index': i, 'size': f.size,
                    'stream_header': stream_header.hex(), 'seg_start': first,
                    'seg_end': end, 'part': part})
    file_specs[i] = spec
  items.sort(key=lambda x: -x['size'])  # big files first
  logging.info('Encrypting %d objects as %d Beam work items (no shared '
               'filesystem: parts under %s); workers unwrap the data key '
               'with %s.', len(files), len(items), _text.printable(stage),
               stats.worker_identity)
  if bundle and scheme == 's3':  # fail before the job, not after it
    _assemble.plan_multipart(
        [1] + [n for i in range(len(files))
               for n in file_specs[i]['part_sizes']], local={0})
  written: List[str] = []
  committed = False
  heartbeat = _parts.StagingHeartbeat(stage, package)
  try:
    # First: the marker that makes a SIGKILLed run's prefix recognisably
    # ours to `tfx-encrypt clean` (nothing else is there yet); refreshed
    # while the run lasts, so that clean's age rule never takes it for a
    # dead run's.
    _parts.write_staging_marker(stage, package)
    heartbeat.start()
    results = storage.join(stage, 'results')
    _run(make_pipeline, items, job, file_specs, hash_alg, results, stats)
    records = {}
    for name in storage.list_names(results):
      with storage.open_reader(storage.join(results, name)) as r:
        rec = json.loads(r.read_range(0, r.size))
      records[rec['index']] = rec
    _check_records(records, len(files))
    payloads = [(records[i]['ct_size'], records[i]['cipher_digest'])
                for i in range(len(files))]
    hbytes = _parts.build_header(
        env, entries=[FileEntry(f.path, f.size, records[i]['plain_digest'])
                      for i, f in enumerate(files)],
        dirs=dirs, payloads=payloads, signer=sign_with)
    stats.parts = len(items)
    if bundle:  # the header, then every part: one create-only object
      _assemble.assemble(
          package, [p for i in range(len(files))
                    for p in file_specs[i]['parts']],
          scratch=storage.join(stage, 'compose', 'bundle'), create_only=True,
          head=hbytes)
      written.append(package)
      with storage.open_reader(package) as r:
        if r.size != len(hbytes) + sum(s for s, _ in payloads):
          raise errors.TfxEncryptError(
              f'{_text.printable(package)} was assembled with the wrong size')
      committed = True
    else:
      for i in range(len(files)):  # payload 0 first: it claims the package
        uri = storage.join(package, package_lib.PAYLOAD_DIR,
                           package_lib.payload_name(i))
        _assemble.assemble(uri, file_specs[i]['parts'],
                           scratch=storage.join(stage, 'compose', f'{i:08d}'),
                           create_only=True)
        written.append(uri)
      have = _objects(package)
      want = {f'{package_lib.PAYLOAD_DIR}/{package_lib.payload_name(i)}': s
              for i, (s, _) in enumerate(payloads)}
      if set(have) - set(want):
        raise errors.OutputExistsError(
            f'another writer wrote {len(set(have) - set(want))} objects under '
            f'{_text.printable(package)} while it was being encrypted; '
            'tfx-encrypt never replaces what it did not write')
      if have != want:
        raise errors.TfxEncryptError(
            f'the payload objects of {_text.printable(package)} are not the '
            'ones assembled (wrong sizes, or foreign objects)')
      hobj = storage.join(package, package_lib.HEADER_NAME)
      storage.put_create_only(hobj, hbytes)  # the commit point
      committed = True
    _fill_stats(stats, files, items, records)
  except BaseException:
    if not committed:
      left = _assemble.delete_objects(list(reversed(written)))
      if left:
        logging.warning('Could not remove %d payload objects of the failed '
                        'package %s', len(left), _text.printable(package))
    raise
  finally:
    heartbeat.stop()
    _remove_staging(stage)
  info = package_lib.inspect_package(package)
  return dataclasses.replace(info, plaintext_bytes=sum(f.size for f in files),
                             signature_verified=sign_with is not None)


def _objects(prefix: str) -> Dict[str, int]:
  """{name: size} under `prefix/`, without the empty folder objects
  (`prefix/`, `dir/`) that tf.io.gfile.makedirs and consoles write: they
  hold nothing, and TFX pre-creates output directories that way."""
  return {n: s for n, s in storage.list_sizes(prefix).items()
          if not (s == 0 and (n == '' or n.endswith('/')))}


def _remove_staging(stage: str) -> None:
  """Delete every object under this run's own temporary prefix."""
  try:
    names = storage.list_names(stage)
  except Exception:  # pylint: disable=broad-except
    logging.warning('Could not list the temporary objects under %s',
                    _text.printable(stage), exc_info=True)
    return
  left = _assemble.delete_objects([storage.join(stage, n) for n in names])
  if left:
    logging.warning('Could not remove %d temporary objects under %s; remove '
                    'them by hand', len(left), _text.printable(stage))


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
      remote = storage.is_remote(model_dir), storage.is_remote(package)
      if any(remote):
        size = (sum(_objects(model_dir).values()) if remote[0] else
                _fsutil.tree_size(model_dir))
      else:
        size = _fsutil.tree_size(model_dir)
      if size < params.beam_min_bytes:
        logging.info('Model is %d bytes (< beam_min_bytes=%d): encrypting '
                     'in-process.', size, params.beam_min_bytes)
        return super().EncryptModel(model_dir, package, params, context)
      if remote[0] != remote[1]:
        # Workers that share no filesystem need both on a store.
        logging.warning(
            'Encrypting in-process, not with Beam: the model (%s) and the '
            'package (%s) must both be on gs:// or s3://, or both local.',
            _text.printable(model_dir), _text.printable(package))
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
