"""BeamEncryptPusher without a shared filesystem, against real emulators.

The model and the package are on `s3://` (moto's server, real boto3) or
`gs://` (gcp-storage-emulator, real google-cloud-storage); Beam workers are
separate processes that read their byte ranges from the model's objects and
write part objects; the driver assembles them server-side (S3
UploadPartCopy, GCS compose) and commits the header create-only.

"No shared filesystem" is simulated for real: each worker process runs in
its own mount namespace (`unshare -m`) where pytest's whole temporary root,
which holds everything the driver wrote (model copy, keys, a canary file),
is covered by an empty tmpfs; it starts in another working directory with
another TMPDIR and HOME. A probe written by every worker proves it could
not see the canary.
"""

import base64
import hashlib
import os
import shlex
import shutil
import sys
import tempfile

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.transforms import environments
import pytest

import tfx_encrypt
from tfx_encrypt import errors
from tfx_encrypt import package as package_lib
from tfx_encrypt import storage
from tfx_encrypt.components.encrypt_pusher import beam_executor
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.package import layout as layout_lib
from tfx_encrypt.package import operations as operations_lib
from tfx_encrypt.storage import _assemble

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(tfx_encrypt.__file__)))
MIB = 1 << 20


@pytest.fixture
def worker_env(monkeypatch):
  """Beam worker subprocesses must import tfx_encrypt."""
  path = os.environ.get('PYTHONPATH')
  monkeypatch.setenv('PYTHONPATH',
                     _REPO + (os.pathsep + path if path else ''))
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '3')


def _write_model(root: str, big: int) -> str:
  """A model-shaped tree: markers, a big shard, an empty directory."""
  os.makedirs(os.path.join(root, 'variables'))
  os.makedirs(os.path.join(root, 'assets'))
  for name, n in (('saved_model.pb', 40_000), ('fingerprint.pb', 60),
                  ('empty.bin', 0),
                  ('variables/variables.index', 900),
                  ('variables/variables.data-00000-of-00001', big)):
    with open(os.path.join(root, name), 'wb') as f:
      f.write(os.urandom(n))
  return root


def _upload(local: str, base: str) -> None:
  """Upload a tree as tf.io.gfile / gsutil leave it: one object per file,
  an empty `dir/` placeholder per directory."""
  for d, subdirs, files in os.walk(local):
    rel = os.path.relpath(d, local).replace(os.sep, '/')
    if rel != '.':
      storage.put(f'{base}/{rel}/', b'')
    for name in files:
      relf = name if rel == '.' else f'{rel}/{name}'
      with open(os.path.join(d, name), 'rb') as fh:
        storage.put(storage.join(base, relf), fh)


def _tree(root):
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      p = os.path.join(d, name)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def _read(uri: str) -> bytes:
  with storage.open_reader(uri) as r:
    return r.read_range(0, r.size)


class _IsolatedWorkers:
  """DirectRunner's engine (FnApiRunner) with N worker processes, each in a
  mount namespace that hides `hidden` (an empty tmpfs over it), started in
  its own directory with its own TMPDIR and HOME."""

  def __init__(self, hidden: str, canary: str, workers: int = 2):
    self.home = tempfile.mkdtemp(prefix='tfxe-beam-worker-')
    os.makedirs(os.path.join(self.home, 'tmp'))
    os.makedirs(os.path.join(self.home, 'keys'), mode=0o700)
    assert not self.home.startswith(hidden.rstrip('/') + '/')
    self.hidden, self.canary, self.workers = hidden, canary, workers
    q = shlex.quote
    inner = (
        f'mount -t tmpfs -o size=1m,mode=0700 tfxe-hidden {q(hidden)} && '
        f'cd {q(self.home)} && '
        f'if [ -e {q(canary)} ]; then s=visible; else s=hidden; fi && '
        f'echo "$s $(pwd)" > {q(self.home)}/probe-$$ && '
        f'exec env TMPDIR={q(self.home)}/tmp HOME={q(self.home)} '
        f'{q(sys.executable)} -m apache_beam.runners.worker.sdk_worker_main')
    self.command = f'unshare -m --propagation private sh -c {q(inner)}'

  def key(self, src: str) -> str:
    """A copy of a private key file, where only the workers keep theirs."""
    dst = os.path.join(self.home, 'keys', os.path.basename(src))
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)
    return dst

  def pipeline(self):
    env = environments.SubprocessSDKEnvironment.from_command_string(
        self.command)
    return beam.Pipeline(
        runner=FnApiRunner(default_environment=env),
        options=PipelineOptions([f'--direct_num_workers={self.workers}']))

  def probes(self):
    out = []
    for name in os.listdir(self.home):
      if name.startswith('probe-'):
        with open(os.path.join(self.home, name)) as f:
          out.append(f.read().split())
    return out

  def close(self):
    shutil.rmtree(self.home, ignore_errors=True)


def _check_namespaces(where: str) -> None:
  """Fail (never skip) with the reason when mount namespaces are missing:
  the isolation below needs root and CAP_SYS_ADMIN (`unshare -m`)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  p = subprocess.run(
      ['unshare', '-m', '--propagation', 'private', 'sh', '-c',
       f'mount -t tmpfs -o size=1m tfxe-check {shlex.quote(where)}'],
      capture_output=True, text=True, check=False)
  if p.returncode:
    pytest.fail('these tests isolate Beam workers in mount namespaces '
                f'(unshare -m, mount -t tmpfs; root): {p.stderr.strip()}',
                pytrace=False)


@pytest.fixture
def isolated(tmp_path_factory, tmp_path):
  _check_namespaces(str(tmp_path))
  canary = tmp_path / 'driver-only-canary'
  canary.write_text('the driver\'s temporary directory')
  w = _IsolatedWorkers(str(tmp_path_factory.getbasetemp()), str(canary))
  yield w
  w.close()


class _DriverIO:
  """Records what the driver process itself reads from and writes to the
  store (the workers are other processes: not recorded)."""

  def __init__(self, monkeypatch):
    self.opened, self.put = [], []
    real_open, real_put = storage.open_reader, storage.put
    real_create = storage.put_create_only

    def open_reader(uri, *a, **kw):
      self.opened.append(uri)
      return real_open(uri, *a, **kw)

    def put(uri, data, *a, **kw):
      self.put.append((uri, len(data) if isinstance(data, bytes) else -1))
      return real_put(uri, data, *a, **kw)

    def put_create_only(uri, data, *a, **kw):
      self.put.append((uri, len(data) if isinstance(data, bytes) else -1))
      return real_create(uri, data, *a, **kw)

    monkeypatch.setattr(storage, 'open_reader', open_reader)
    monkeypatch.setattr(storage, 'put', put)
    monkeypatch.setattr(storage, 'put_create_only', put_create_only)


def _recording(monkeypatch, owner, name):
  """Wrap `owner.name` (a function): the list of what it returned."""
  out = []
  real = getattr(owner, name)

  def wrapper(*a, **kw):
    out.append(real(*a, **kw))
    return out[-1]

  monkeypatch.setattr(owner, name, wrapper)
  return out


def _secrets(env, pkg, identity):
  """The DEK (unwrapped again from the package) and the derived keys; the
  key commitment is public (it is in the header)."""
  from tfx_encrypt import keys as keys_lib  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.format.header import Header  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.keys.base import WrapContext  # pylint: disable=g-import-not-at-top
  h, _ = Header.read(storage.ReaderFile(
      storage.open_reader(f'{pkg}/tfxe.header')))
  backend = keys_lib.resolve(identity)
  [stanza] = [x for x in h.recipients if backend.matches(x)]
  dek = backend.unwrap(stanza, WrapContext(h.package_id, h.context))
  assert env.keys.stream_key == header_lib.DerivedKeys(
      dek, h.package_id, h.suite).stream_key
  return [dek, env.keys.stream_key, env.keys.mac_key]


@pytest.mark.slow
def test_s3_workers_share_no_directory_with_the_driver(
    s3_store, tmp_path, keys, worker_env, isolated, monkeypatch):
  del worker_env
  base = s3_store.new_base()
  local = _write_model(str(tmp_path / 'model'), 12 * MIB + 12345)
  _upload(local, f'{base}/model')
  pkg = f'{base}/encrypted/1'
  worker_key = isolated.key(keys.recipient_key)
  import dill  # pylint: disable=g-import-not-at-top
  pickles = []
  real_dumps = dill.dumps

  def recording_dumps(*args, **kwargs):
    out = real_dumps(*args, **kwargs)
    pickles.append(out)
    return out

  monkeypatch.setattr(dill, 'dumps', recording_dumps)
  envs = _recording(monkeypatch, package_lib, 'prepare_envelope')
  io = _DriverIO(monkeypatch)
  driver_tmp = tmp_path / 'driver-tmp'
  driver_tmp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(driver_tmp))
  stats = beam_executor.BeamStats()
  info = beam_executor.encrypt_model_with_beam(
      f'{base}/model', pkg, recipients=[keys.recipient, keys.other],
      worker_identity=worker_key, signer=keys.signer,
      context={'team': 'ml'}, segment_bytes=MIB, stats=stats,
      make_pipeline=isolated.pipeline)
  monkeypatch.undo()
  # Two worker processes, neither the driver; each ran in its own
  # directory and could not see the driver's temporary directory.
  probes = isolated.probes()
  assert len(probes) >= 2
  assert all(p == ['hidden', isolated.home] for p in probes), probes
  assert len(stats.worker_pids) == 2 and os.getpid() not in stats.worker_pids
  # The workers staged nothing on their own disks either (streamed).
  assert [f for _, _, fs in os.walk(os.path.join(isolated.home, 'tmp'))
          for f in fs] == []
  # S3 parts: >= 5 MiB but the last, so the 13-segment shard is 3 parts
  # (and 4 one-part files, one of them empty).
  assert stats.parts == 4 + 3 and stats.work_items == 7
  # The driver read no payload or part byte and wrote only the header;
  # it left nothing on its disk, and nothing under the staging prefix.
  assert not [u for u in io.opened if '/parts/' in u or '/payload/' in u]
  assert [u for u, _ in io.put] == [
      f'{stats.staging}/tfxe-beam-staging.json', f'{pkg}/tfxe.header']
  assert io.put[0][1] < 1000 and io.put[1][1] == info.header_bytes
  written = [os.path.join(d, f) for d, _, fs in os.walk(driver_tmp)
             for f in fs]
  assert written == []  # (Beam's own empty temp directories aside)
  assert storage.list_names(stats.staging) == []
  assert sorted(storage.list_names(f'{base}/encrypted')) == sorted(
      ['1/tfxe.header'] + [f'1/payload/{i:08d}' for i in range(5)])
  # No key in any pickled DoFn or in the job graph: the identity is a URI.
  blob = b'\0'.join(pickles)
  assert worker_key.encode() in blob
  [env] = envs
  for secret in _secrets(env, pkg, keys.recipient_key):
    for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
      assert form not in blob
  # A standard package: the plain reader decrypts it (other recipient).
  out = str(tmp_path / 'out')
  dec = package_lib.decrypt_model(pkg, out, identities=[keys.other_key],
                                  trusted=[keys.signer_pub])
  assert dec.fingerprint == info.fingerprint
  assert _tree(out) == _tree(local)
  assert sorted(os.listdir(os.path.join(out))) == sorted(os.listdir(local))


def _fixed_stream_new(cls, suite, ikm, aad):
  """Deterministic stream headers (the same in both writers): TEST-ONLY."""
  h = hashlib.sha256(b'test salt' + aad).digest()
  return cls(suite, ikm, aad, h, hashlib.sha256(h).digest()[:7])


@pytest.mark.parametrize('store,bundle', [('s3', False), ('gs', False),
                                          ('s3', True), ('gs', True)])
def test_byte_identical_to_encrypt_model_with_key_groups(
    store, bundle, request, tmp_path, keys, monkeypatch):
  """Same envelope (DEK, package id, stanzas), same stream headers and
  time: the Beam package's objects (or bundle object) equal encrypt_model's
  files (bundle file) byte for byte, with key groups (2 of 2), a signature
  and a BLAKE3 hash. The S3 bundle is a multipart upload of copied ranges
  and driver-joined pieces (here: a 23 MiB shard in 5 MiB parts)."""
  st = request.getfixturevalue(f'{store}_store')
  base = st.new_base()
  local = _write_model(str(tmp_path / 'model'),
                       (23 if bundle else 7) * MIB + 99)
  _upload(local, f'{base}/model')
  env = package_lib.prepare_envelope(
      None, key_groups=[[keys.recipient], [keys.other]], threshold=2,
      context={'team': 'ml'})
  assert env.threshold is not None
  monkeypatch.setattr(package_lib, 'prepare_envelope', lambda *a, **k: env)
  monkeypatch.setattr(operations_lib, 'prepare_envelope',
                      lambda *a, **k: env)
  monkeypatch.setattr(streaming.StreamCipher, 'new',
                      classmethod(_fixed_stream_new))
  monkeypatch.setattr(layout_lib, '_now', lambda: '2026-12-02T09:00:00Z')
  plans = _recording(monkeypatch, _assemble, 'plan_multipart')
  groups = [[keys.recipient], [keys.other]]
  single_path = str(tmp_path / ('single.tfxe' if bundle else 'single'))
  single = package_lib.encrypt_model(
      local, single_path, key_groups=groups, threshold=2,
      signer=keys.signer, context={'team': 'ml'}, bundle=bundle)
  pkg = f'{base}/beam' + ('.tfxe' if bundle else '')
  stats = beam_executor.BeamStats()
  info = beam_executor.encrypt_model_with_beam(
      f'{base}/model', pkg, key_groups=groups, threshold=2,
      worker_identity=[keys.recipient_key, keys.other_key],
      signer=keys.signer, context={'team': 'ml'}, segment_bytes=MIB,
      stats=stats, make_pipeline=beam.Pipeline, bundle=bundle)
  monkeypatch.undo()
  assert stats.parts >= 6 and stats.files == 5
  assert info.threshold == single.threshold and info.threshold['k'] == 2
  assert info.bundle == bundle
  assert storage.list_names(stats.staging) == []
  if bundle:
    assert [n for n in storage.list_names(base)
            if not n.startswith('model/')] == ['beam.tfxe']
    with open(single_path, 'rb') as f:
      assert _read(pkg) == f.read()
    if store == 's3':  # the last plan is the bundle's
      copied = [p for p in plans[-1] if p.copy]
      fetched = sum(x.size for p in plans[-1] for x in p.join
                    if x.source != 0)
      assert len(copied) >= 3 and fetched < 10 * MIB
      assert all(p.size < 10 * MIB for p in plans[-1] if p.join)
  else:
    names = storage.list_names(pkg)
    assert names == [f'payload/{i:08d}' for i in range(5)] + ['tfxe.header']
    for name in names:
      with open(os.path.join(single_path, *name.split('/')), 'rb') as f:
        assert _read(storage.join(pkg, name)) == f.read(), name
  # And it decrypts with keys of both groups only.
  out = str(tmp_path / 'out')
  package_lib.decrypt_model(pkg, out,
                            identities=[keys.recipient_key, keys.other_key],
                            trusted=[keys.signer_pub])
  assert _tree(out) == _tree(local)
  with pytest.raises(errors.NoMatchingKeyError, match='2 of 2 key groups'):
    package_lib.decrypt_model(pkg, str(tmp_path / 'out2'),
                              identities=[keys.recipient_key],
                              trusted=[keys.signer_pub])


@pytest.fixture(scope='module')
def gs_limited():
  """A GCS emulator that also enforces compose's 32-source limit
  (TEST-ONLY patch, tests/fakes/gcs_compose_limit.py)."""
  from tests.fakes import gcs_compose_limit  # pylint: disable=g-import-not-at-top
  env = gcs_compose_limit.LimitedGcsStore()
  yield env
  env.close()


def test_gcs_emulator_composes_more_than_32_sources_unlike_gcs(gs_store):
  """Measured: the emulator accepts a compose of 33 sources, which real GCS
  refuses (400, at most 32): so the limit is checked against the patched
  emulator below."""
  from tfx_encrypt.storage import _gcs  # pylint: disable=g-import-not-at-top
  base = gs_store.new_base()
  _, bucket, key = storage.split(base)
  b = _gcs().bucket(bucket)
  for i in range(33):
    storage.put(f'{base}/s/{i:02d}', bytes([i]))
  b.blob(f'{key}/all').compose([b.blob(f'{key}/s/{i:02d}') for i in range(33)])
  assert _read(f'{base}/all') == bytes(range(33))


def test_gcs_compose_tree_bundle_no_leftovers(gs_limited, tmp_path, keys):
  with gs_limited.applied():
    base = gs_limited.new_base()
    _, bucket, key = storage.split(base)
    from tfx_encrypt.storage import _gcs  # pylint: disable=g-import-not-at-top
    b = _gcs().bucket(bucket)
    for i in range(33):
      storage.put(f'{base}/s/{i:02d}', b'x')
    with pytest.raises(Exception, match='32'):  # the patch holds
      b.blob(f'{key}/all').compose(
          [b.blob(f'{key}/s/{i:02d}') for i in range(33)])
    local = _write_model(str(tmp_path / 'model'), 40 * MIB)  # 41 parts
    _upload(local, f'{base}/model')
    pkg = f'{base}/serving/1/model.tfxe'
    stats = beam_executor.BeamStats()
    info = beam_executor.encrypt_model_with_beam(
        f'{base}/model', pkg, recipients=[keys.recipient],
        worker_identity=keys.recipient_key, bundle=True, segment_bytes=MIB,
        stats=stats, make_pipeline=beam.Pipeline)
    assert info.bundle and stats.parts == 41 + 4
    assert storage.list_names(f'{base}/serving') == ['1/model.tfxe']
    assert storage.list_names(stats.staging) == []
    out = str(tmp_path / 'out')
    package_lib.decrypt_model(pkg, out, identities=[keys.recipient_key],
                              allow_unsigned=True)
    assert _tree(out) == _tree(local)


@pytest.mark.parametrize('store', ['s3', 'gs'])
def test_existing_destination_is_never_replaced(store, request, tmp_path,
                                                keys):
  st = request.getfixturevalue(f'{store}_store')
  base = st.new_base()
  _upload(_write_model(str(tmp_path / 'model'), 1000), f'{base}/model')
  storage.put(f'{base}/pkg/payload/00000000', b'someone else')
  with pytest.raises(errors.OutputExistsError):
    beam_executor.encrypt_model_with_beam(
        f'{base}/model', f'{base}/pkg', recipients=[keys.recipient],
        worker_identity=keys.recipient_key, make_pipeline=beam.Pipeline)
  assert storage.list_names(f'{base}/pkg') == ['payload/00000000']
  assert _read(f'{base}/pkg/payload/00000000') == b'someone else'
  assert [n for n in storage.list_names(base)
          if '.tfxe-' in n] == []


def test_s3_header_taken_meanwhile_cleans_up(s3_store, tmp_path, keys,
                                             monkeypatch):
  """A writer that ignores the claim creates the header while the job
  runs: the commit fails, this run's payload objects and temporary objects
  are deleted, the other writer's header is left alone."""
  base = s3_store.new_base()
  _upload(_write_model(str(tmp_path / 'model'), 6 * MIB), f'{base}/model')
  pkg = f'{base}/pkg'
  real = beam_executor._run  # pylint: disable=protected-access

  def run_then_race(*a, **kw):
    real(*a, **kw)
    storage.put(f'{pkg}/tfxe.header', b'not ours')

  monkeypatch.setattr(beam_executor, '_run', run_then_race)
  stats = beam_executor.BeamStats()
  with pytest.raises(errors.OutputExistsError):
    beam_executor.encrypt_model_with_beam(
        f'{base}/model', pkg, recipients=[keys.recipient],
        worker_identity=keys.recipient_key, segment_bytes=MIB, stats=stats,
        make_pipeline=beam.Pipeline)
  assert storage.list_names(pkg) == ['tfxe.header']
  assert _read(f'{pkg}/tfxe.header') == b'not ours'
  assert stats.staging and storage.list_names(stats.staging) == []


@pytest.mark.slow
def test_worker_without_the_identity_fails_closed(
    gs_store, tmp_path, keys, worker_env, isolated):
  """The identity exists nowhere the driver can check (it defers to the
  workers): the workers cannot unwrap, the job fails, nothing is left."""
  del worker_env
  base = gs_store.new_base()
  _upload(_write_model(str(tmp_path / 'model'), 3 * MIB), f'{base}/model')
  missing = os.path.join(isolated.home, 'keys', 'absent.key.pem')
  stats = beam_executor.BeamStats()
  with pytest.raises(Exception, match='absent.key.pem'):
    beam_executor.encrypt_model_with_beam(
        f'{base}/model', f'{base}/pkg', recipients=[keys.recipient],
        worker_identity=missing, segment_bytes=MIB, stats=stats,
        make_pipeline=isolated.pipeline)
  assert storage.list_names(f'{base}/pkg') == []
  assert storage.list_names(stats.staging) == []


def test_model_changed_after_listing_is_refused(gs_store, tmp_path, keys,
                                                monkeypatch):
  base = gs_store.new_base()
  _upload(_write_model(str(tmp_path / 'model'), 2 * MIB), f'{base}/model')
  real = beam_executor._envelope_and_job  # pylint: disable=protected-access

  def replace_then_go(*a, **kw):
    out = real(*a, **kw)
    storage.put(f'{base}/model/variables/variables.index', b'changed')
    return out

  monkeypatch.setattr(beam_executor, '_envelope_and_job', replace_then_go)
  stats = beam_executor.BeamStats()
  with pytest.raises(errors.UsageError, match='changed while the model'):
    beam_executor.encrypt_model_with_beam(
        f'{base}/model', f'{base}/pkg', recipients=[keys.recipient],
        worker_identity=keys.recipient_key, stats=stats,
        make_pipeline=beam.Pipeline)
  assert storage.list_names(f'{base}/pkg') == []
  assert storage.list_names(stats.staging) == []


def test_mixed_local_and_remote_refused(s3_store, tmp_path, keys):
  base = s3_store.new_base()
  local = _write_model(str(tmp_path / 'model'), 1000)
  with pytest.raises(errors.UsageError, match='both on an object store'):
    beam_executor.encrypt_model_with_beam(
        local, f'{base}/pkg', recipients=[keys.recipient],
        worker_identity=keys.recipient_key, make_pipeline=beam.Pipeline)
  assert storage.list_names(base) == []


def test_s3_bundle_taken_meanwhile_cleans_up(s3_store, tmp_path, keys,
                                             monkeypatch):
  """An S3 bundle is created only if absent (CompleteMultipartUpload with
  If-None-Match: *): another writer's object at the bundle's key stops
  the commit; it is left alone and this run leaves nothing."""
  base = s3_store.new_base()
  local = _write_model(str(tmp_path / 'model'), 6 * MIB)
  _upload(local, f'{base}/model')
  pkg = f'{base}/serving/1/model.tfxe'
  real = beam_executor._run  # pylint: disable=protected-access

  def run_then_race(*a, **kw):
    real(*a, **kw)
    storage.put(pkg, b'not ours')

  monkeypatch.setattr(beam_executor, '_run', run_then_race)
  stats = beam_executor.BeamStats()
  with pytest.raises(errors.OutputExistsError):
    beam_executor.encrypt_model_with_beam(
        f'{base}/model', pkg, recipients=[keys.recipient], bundle=True,
        worker_identity=keys.recipient_key, segment_bytes=MIB, stats=stats,
        make_pipeline=beam.Pipeline)
  assert _read(pkg) == b'not ours'
  assert storage.list_names(f'{base}/serving') == ['1/model.tfxe']
  assert stats.staging and storage.list_names(stats.staging) == []
  _, bucket, _ = storage.split(base)
  assert not storage._s3().list_multipart_uploads(  # pylint: disable=protected-access
      Bucket=bucket).get('Uploads')


def test_s3_assembly_with_a_head(s3_store, monkeypatch):
  """`assemble(head=...)`: the head and short parts joined by this
  process, long ranges copied; create-only; a part replaced after it was
  looked at fails the assembly (copies and fetches are pinned to its
  ETag) and leaves nothing."""
  base = s3_store.new_base()
  parts = {'a': os.urandom(100), 'b': os.urandom(6 * MIB + 7),
           'c': os.urandom(5 * MIB), 'd': os.urandom(3)}
  for name, data in parts.items():
    storage.put(f'{base}/p/{name}', data)
  head = os.urandom(3000)
  uris = [f'{base}/p/{n}' for n in parts]
  _assemble.assemble(f'{base}/out', uris, scratch=f'{base}/s', head=head)
  assert _read(f'{base}/out') == head + b''.join(parts.values())
  with pytest.raises(storage.ObjectExistsError):
    _assemble.assemble(f'{base}/out', uris, scratch=f'{base}/s', head=b'x')
  assert _read(f'{base}/out') == head + b''.join(parts.values())
  # Without a head, short parts are refused before anything is written
  # (the directory form: no byte through the driver).
  with pytest.raises(errors.UsageError, match='5 MiB'):
    _assemble.assemble(f'{base}/out2', uris, scratch=f'{base}/s')
  real = _assemble.plan_multipart
  for name in ('c', 'b'):  # one copied, one fetched and joined
    plan = real([3000] + [len(d) for d in parts.values()], local={0})
    [kind] = {('copy' if p.copy else 'join') for p in plan
              for x in ([p.copy] if p.copy else p.join)
              if x.source == 1 + list(parts).index(name)}
    assert kind == {'c': 'copy', 'b': 'join'}[name]

    def plan_then_replace(*a, name=name, **kw):
      out = real(*a, **kw)
      storage.put(f'{base}/p/{name}', os.urandom(len(parts[name])))
      return out

    monkeypatch.setattr(_assemble, 'plan_multipart', plan_then_replace)
    with pytest.raises(Exception, match='replaced|PreconditionFailed|412'):
      _assemble.assemble(f'{base}/out3', uris, scratch=f'{base}/s',
                         head=head)
    monkeypatch.undo()
    assert not storage.exists(f'{base}/out3')
    storage.put(f'{base}/p/{name}', parts[name])
  _, bucket, _ = storage.split(base)
  assert not storage._s3().list_multipart_uploads(  # pylint: disable=protected-access
      Bucket=bucket).get('Uploads')


def test_plan_ranges_respects_store_limits():
  from tfx_encrypt.package import _parts  # pylint: disable=g-import-not-at-top
  s3 = _assemble.part_limits('s3://b/k')
  gs = _assemble.part_limits('gs://b/k')
  size = 100 * streaming.PLAINTEXT_SEGMENT_SIZE
  n = streaming.num_segments(size)
  for limits, per, want in ((s3, 1, 5), (gs, 1, 1), (s3, 64, 64),
                            (gs, 7, 7)):
    ranges = _parts.plan_ranges(size, per, limits)
    assert ranges[0] == (0, want) and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [_parts.range_bytes(size, a, b)[1] for a, b in ranges]
    assert sum(sizes) == streaming.ciphertext_size(size)
    assert all(s >= limits.min_part for s in sizes[:-1])
  # 10,000 parts at most on S3: the ranges grow instead.
  huge = 30000 * streaming.PLAINTEXT_SEGMENT_SIZE
  assert len(_parts.plan_ranges(huge, 1, s3)) <= 10000


def test_s3_assembly_keeps_s3_part_limits_and_create_only(s3_store):
  """moto enforces S3's 5 MiB minimum for parts but the last, as S3 does:
  the assembly reports it; and a create-only assembly never replaces."""
  base = s3_store.new_base()
  storage.put(f'{base}/p/0', b'a' * 10)
  storage.put(f'{base}/p/1', b'b' * 10)
  with pytest.raises(errors.UsageError, match='5 MiB'):
    _assemble.assemble(f'{base}/out', [f'{base}/p/0', f'{base}/p/1'],
                       scratch=f'{base}/scratch')
  assert not storage.exists(f'{base}/out')
  storage.put(f'{base}/p/big', b'c' * (5 * MIB))
  _assemble.assemble(f'{base}/out', [f'{base}/p/big', f'{base}/p/1'],
                     scratch=f'{base}/scratch')
  assert _read(f'{base}/out') == b'c' * (5 * MIB) + b'b' * 10
  with pytest.raises(storage.ObjectExistsError):
    _assemble.assemble(f'{base}/out', [f'{base}/p/0'],
                       scratch=f'{base}/scratch')
  assert _read(f'{base}/out') == b'c' * (5 * MIB) + b'b' * 10
  with pytest.raises(errors.UsageError, match='one store'):
    _assemble.assemble(f'{base}/out2', ['gs://other/p'],
                       scratch=f'{base}/scratch')


@pytest.mark.parametrize('store,bundle', [('s3', 0), ('gs', 0), ('s3', 1)])
def test_beam_executor_with_model_artifact_and_push_on_the_store(
    store, bundle, request, tmp_path, model_uri, keys, monkeypatch):
  """The TFX Beam executor: model, EncryptedModel artifact and push
  destination on the store; Beam seals the parts, nothing is staged. An
  S3 bundle goes through Beam too (no in-process fallback any more)."""
  from tfx.dsl.components.base import base_beam_executor  # pylint: disable=g-import-not-at-top
  from tfx.utils import io_utils  # pylint: disable=g-import-not-at-top
  from tests.components import test_encrypt_pusher_executor as ext  # pylint: disable=g-import-not-at-top
  root = request.getfixturevalue(f'{store}_store').new_base()
  remote_model = storage.join(root, 'Trainer', 'model', '5')
  _upload(model_uri, remote_model)
  inputs, outputs, encrypted, pushed = ext._artifacts(  # pylint: disable=protected-access
      tmp_path, remote_model, blessed=True)
  encrypted.uri = storage.join(root, 'EncryptPusher', 'encrypted_model', '7')
  pushed.uri = storage.join(root, 'EncryptPusher', 'pushed_model', '7')
  props = ext._props(keys, storage.join(root, 'serving'),  # pylint: disable=protected-access
                     beam_worker_identity=keys.recipient_key,
                     beam_segment_bytes=MIB, bundle=bundle)

  def no_staging(*a, **k):
    raise AssertionError(f'the model was staged locally: copy_dir{a}')

  monkeypatch.setattr(io_utils, 'copy_dir', no_staging)
  ex = beam_executor.Executor(base_beam_executor.BaseBeamExecutor.Context(
      beam_pipeline_args=['--runner=DirectRunner'],
      tmp_dir=str(tmp_path / 'tmp'), unique_id='7'))
  ex.Do(inputs, outputs, props)
  stats = ex.last_beam_stats
  assert stats is not None and stats.files >= 3 and stats.parts >= 3
  assert storage.list_names(stats.staging) == []
  assert encrypted.get_int_custom_property('pushed') == 1
  dest = pushed.get_string_custom_property('pushed_destination')
  assert dest.startswith(storage.join(root, 'serving') + '/')
  if bundle:  # a bundle is `model.tfxe` in the artifact and the version
    artifact_pkg = storage.join(encrypted.uri, 'model.tfxe')
    assert storage.list_names(dest) == ['model.tfxe']
    dest = storage.join(dest, 'model.tfxe')
  else:
    artifact_pkg = encrypted.uri
  assert package_lib.inspect_package(dest).bundle == bool(bundle)
  assert package_lib.inspect_package(dest).payload_digest == (
      package_lib.inspect_package(artifact_pkg).payload_digest)
  out = str(tmp_path / 'decrypted')
  package_lib.decrypt_model(dest, out, identities=[keys.recipient_key],
                            trusted=[keys.signer_pub])
  assert _tree(out) == _tree(os.path.join(model_uri, 'Format-Serving'))


@pytest.mark.slow
def test_gs_key_groups_bundle_with_isolated_workers(
    gs_store, tmp_path, keys, worker_env, isolated):
  """Key groups (2 of 2) through worker processes that share nothing with
  the driver: each worker opens both groups with its own key copies."""
  del worker_env
  base = gs_store.new_base()
  local = _write_model(str(tmp_path / 'model'), 3 * MIB + 5)
  _upload(local, f'{base}/model')
  pkg = f'{base}/serving/1/model.tfxe'
  stats = beam_executor.BeamStats()
  info = beam_executor.encrypt_model_with_beam(
      f'{base}/model', pkg, key_groups=[[keys.recipient], [keys.other]],
      threshold=2, bundle=True, signer=keys.signer, segment_bytes=MIB,
      worker_identity=[isolated.key(keys.recipient_key),
                       isolated.key(keys.other_key)],
      stats=stats, make_pipeline=isolated.pipeline)
  assert info.bundle and info.threshold['k'] == 2
  assert len(stats.worker_pids) >= 1 and os.getpid() not in stats.worker_pids
  probes = isolated.probes()
  assert len(probes) >= 2 and all(p[0] == 'hidden' for p in probes)
  assert storage.list_names(f'{base}/serving') == ['1/model.tfxe']
  out = str(tmp_path / 'out')
  package_lib.decrypt_model(pkg, out,
                            identities=[keys.recipient_key, keys.other_key],
                            trusted=[keys.signer_pub])
  assert _tree(out) == _tree(local)


def test_staging_marker_is_refreshed_while_the_run_lasts(
    s3_store, tmp_path, keys, monkeypatch):
  """The driver writes its staging marker first and rewrites it while the
  run lasts (so `clean`'s age rule never takes a running job for a dead
  one); after the run nothing is left, and nothing is rewritten."""
  import time  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.package import _parts  # pylint: disable=g-import-not-at-top
  base = s3_store.new_base()
  _upload(_write_model(str(tmp_path / 'model'), 2 * MIB), f'{base}/model')
  monkeypatch.setattr(_parts, 'STAGING_HEARTBEAT_S', 0.2)
  stats = beam_executor.BeamStats()
  versions = []
  real = beam_executor._run  # pylint: disable=protected-access

  def marker_version():
    listed = storage.list_objects(stats.staging)
    assert _parts.is_our_staging(stats.staging, listed)
    return listed[_parts.STAGING_MARKER].version

  def slow_run(*a, **kw):
    versions.append(marker_version())
    real(*a, **kw)
    time.sleep(1.5)  # the marker holds the time in seconds
    versions.append(marker_version())

  monkeypatch.setattr(beam_executor, '_run', slow_run)
  beam_executor.encrypt_model_with_beam(
      f'{base}/model', f'{base}/pkg', recipients=[keys.recipient],
      worker_identity=keys.recipient_key, segment_bytes=MIB, stats=stats,
      make_pipeline=beam.Pipeline)
  assert len(versions) == 2 and versions[0] != versions[1]
  time.sleep(0.5)
  assert storage.list_names(stats.staging) == []


@pytest.mark.parametrize('store', ['s3', 'gs'])
def test_beam_scan_keeps_the_checks_of_both_scans(store, request, tmp_path,
                                                  keys):
  """`_parts.scan_remote_model` is `layout.scan_remote_model` (object
  names are package paths, as `encrypt` from a store checks them) plus the
  magic checked up front (workers never see a file's first bytes with the
  decision to publish): both refused before any Beam work, nothing
  written."""
  base = request.getfixturevalue(f'{store}_store').new_base()
  local = _write_model(str(tmp_path / 'model'), 1000)
  for extra, data, match in (
      ('assets/inner.tfxe', header_lib.MAGIC + os.urandom(200),
       'tfx-encrypt bundle'),
      ('assets//x', b'data', 'empty component'),
      ('assets/bad\\name', b'data', 'backslash')):
    model = f'{base}/m-{len(data)}-{match[:5]}'
    _upload(local, model)
    storage.put(f'{model}/{extra}', data)
    stats = beam_executor.BeamStats()
    with pytest.raises(errors.TfxEncryptError, match=match):
      beam_executor.encrypt_model_with_beam(
          model, f'{base}/pkg', recipients=[keys.recipient],
          worker_identity=keys.recipient_key, stats=stats,
          make_pipeline=beam.Pipeline)
    assert not stats.staging  # refused before a staging prefix was named
    assert not [n for n in storage.list_names(base)
                if not n.startswith('m-')]
