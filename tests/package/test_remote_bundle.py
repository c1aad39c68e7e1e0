"""encrypt_model to a bundle on s3:// / gs://: streamed, nothing staged.

A bundle's header comes first but is known only after the last payload is
sealed. `storage._bundle` streams the payloads anyway (S3: one multipart
upload whose part 1, header + the first 5 MiB held in memory, goes last;
GCS: a temporary payload object, a temporary header object, one compose),
create-only, with nothing on the local disk. Against moto (s3://, which
enforces S3's 5 MiB minimum part size) and the patched GCS emulator
(gs://), both on loopback (tests/fakes/stores.py).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt import storage
from tfx_encrypt.format import streaming
from tfx_encrypt.package import layout as layout_lib
from tfx_encrypt.package import operations as operations_lib
from tfx_encrypt.storage import _assemble
from tfx_encrypt.storage import _bundle
from tests import _util

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# Payload streams of 1 + 13 MiB + 3 + 2 MiB + ...: file boundaries fall
# inside S3 parts, one file spans several, the total is not a multiple of
# anything.
FILES = {'saved_model.pb': b'\x08\x01',
         'variables/variables.data-00000-of-00002': 13 * MiB + 17,
         'variables/variables.data-00001-of-00002': 2 * MiB + 5,
         'variables/variables.index': 300, 'assets/vocab.txt': b'',
         'caf\u00e9.txt': b'nfc'}


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(params=['s3', 'gs'])
def store(request):
  return request.getfixturevalue(f'{request.param}_store')


def bucket_of(uri):
  s, bucket, _ = storage.split(uri)
  return f'{s}://{bucket}'


def everything(uri):
  """Every object in the bucket of `uri`, and (S3) every multipart upload
  still open: what a failed run must not leave."""
  names = storage.list_names(bucket_of(uri))
  s, bucket, _ = storage.split(uri)
  uploads = []
  if s == 's3':
    uploads = storage._s3().list_multipart_uploads(Bucket=bucket).get(  # pylint: disable=protected-access
        'Uploads', [])
  return names, uploads


def upload_tree(local, uri):
  for rel, data in sorted(_util.read_tree(local).items()):
    if data is not None:
      storage.put(storage.join(uri, rel), data)


def read_object(uri):
  with storage.open_reader(uri) as r:
    return r.read_range(0, r.size)


def _fixed_stream_new(cls, suite, ikm, aad):
  """Deterministic stream headers (the same in both writers): TEST-ONLY."""
  h = hashlib.sha256(b'test salt' + aad).digest()
  return cls(suite, ikm, aad, h, hashlib.sha256(h).digest()[:7])


@pytest.fixture
def fixed(monkeypatch, keys):
  """The same envelope (DEK, package id, stanzas), stream headers and time
  for every encrypt_model of the test, as the Beam byte-identity test."""
  env = operations_lib.prepare_envelope([keys.pub('x')],
                                        context={'team': 'ml'})
  monkeypatch.setattr(operations_lib, 'prepare_envelope',
                      lambda *a, **k: env)
  monkeypatch.setattr(streaming.StreamCipher, 'new',
                      classmethod(_fixed_stream_new))
  monkeypatch.setattr(layout_lib, '_now', lambda: '2026-12-02T09:00:00Z')
  return env


@pytest.mark.parametrize('source', ['local', 'remote'])
def test_streamed_bundle_is_byte_identical_to_the_local_one(
    tmp_path, keys, store, fixed, source, monkeypatch):
  """Same inputs: the object is the local bundle byte for byte; it
  verifies and decrypts from the store; S3 used several parts (>= 5 MiB
  but the last: moto enforces it); nothing else is left in the bucket."""
  del fixed
  src = _util.make_tree(tmp_path / 'm', FILES)
  base = store.new_base()
  model = src
  if source == 'remote':
    model = storage.join(base, 'model')
    upload_tree(src, model)
  kw = dict(recipients=[keys.pub('x')], signer=keys.priv('ed'),
            context={'team': 'ml'}, bundle=True)
  local = te.encrypt_model(src, tmp_path / 'ref.tfxe', **kw)
  pkg = storage.join(base, 'pkg.tfxe')
  parts = []
  if store.scheme == 's3':
    client = storage._s3()  # pylint: disable=protected-access
    real = client.upload_part

    def spy(**a):
      parts.append((a['PartNumber'], a['ContentLength']))
      return real(**a)
    monkeypatch.setattr(client, 'upload_part', spy)
  info = te.encrypt_model(model, pkg, **kw)
  monkeypatch.undo()
  with open(tmp_path / 'ref.tfxe', 'rb') as f:
    assert read_object(pkg) == f.read()
  assert info.package_id == local.package_id
  assert info.header_bytes == local.header_bytes
  assert info.ciphertext_bytes == local.ciphertext_bytes
  assert te.verify_package(pkg, trusted=[keys.pub('ed')]).signature_verified
  out = tmp_path / 'out'
  te.decrypt_model(pkg, out, identities=[keys.priv('x')],
                   trusted=[keys.pub('ed')])
  assert _util.read_tree(out) == _util.read_tree(src)
  names, uploads = everything(pkg)
  want = ['pkgs/pkg.tfxe']
  if source == 'remote':
    want += ['pkgs/model/' + n for n in sorted(
        k for k, v in _util.read_tree(src).items() if v is not None)]
  assert sorted(names) == sorted(want) and uploads == []
  if store.scheme == 's3':
    # Part 1 (header + 5 MiB) last; parts 2.. of 5 MiB, the last smaller.
    assert [n for n, _ in parts] == list(range(2, len(parts) + 1)) + [1]
    assert len(parts) >= 4
    assert parts[-1][1] == local.header_bytes + _bundle.S3_HELD_BACK
    assert all(size >= 5 * MiB for _, size in parts[:-2])


@pytest.mark.parametrize('payload', [
    100, _bundle.S3_HELD_BACK - 1, _bundle.S3_HELD_BACK,
    _bundle.S3_HELD_BACK + 1, _bundle.S3_HELD_BACK + 5 * MiB,
    _bundle.S3_HELD_BACK + 5 * MiB + 1, _bundle.S3_HELD_BACK + 11 * MiB + 7])
def test_bundle_writer_at_part_boundaries(store, payload):
  """Writes of odd sizes (and one whole write) that end exactly at, just
  before and just after the held-back bytes and part boundaries: the
  object is header + payload, and a second writer is refused."""
  base = store.new_base()
  data = _util.pattern(payload, seed=3)
  for n, step in enumerate((MiB + 7, payload)):
    uri = storage.join(base, f'b{n}.tfxe')
    w = _bundle.open_bundle_writer(uri, payload)
    for off in range(0, payload, step):
      w.write(memoryview(data)[off:off + step])
    w.commit(b'HEADER' * 100)
    assert read_object(uri) == b'HEADER' * 100 + data
    w = _bundle.open_bundle_writer(uri, payload)
    w.write(data)
    with pytest.raises(storage.ObjectExistsError, match='already exists'):
      w.commit(b'other')
    assert read_object(uri) == b'HEADER' * 100 + data
  names, uploads = everything(base)
  assert names == ['pkgs/b0.tfxe', 'pkgs/b1.tfxe'] and uploads == []
  w = _bundle.open_bundle_writer(storage.join(base, 'c.tfxe'), 10)
  with pytest.raises(errors.UsageError, match='more bytes than announced'):
    w.write(b'x' * 11)
  w.abort()
  assert everything(base) == (names, [])


def test_s3_part_size_keeps_within_10000_parts():
  for size in (1, 5 * MiB, 10 << 30, 100 << 30, 5 << 40):
    part = _bundle.s3_part_size(size)
    assert part >= 5 * MiB and part % MiB == 0
    n = 1 + -(-max(0, size - _bundle.S3_HELD_BACK) // part)
    assert n <= _assemble.S3_MAX_PARTS, size
  assert _bundle.s3_part_size(10 << 30) == 5 * MiB


def _fail_after(store, monkeypatch, n, exc):
  """Make the store streaming fail with `exc` after some parts: S3, the
  n-th UploadPart; GCS, the first write after n x 4 MiB went into the
  temporary object's upload (so chunks were sent: GCS_WRITE_CHUNK_SIZE)."""
  calls = []
  if store.scheme == 's3':
    client = storage._s3()  # pylint: disable=protected-access
    real = client.upload_part

    def failing(**a):
      calls.append(a['PartNumber'])
      if len(calls) == n:
        raise exc
      return real(**a)
    monkeypatch.setattr(client, 'upload_part', failing)
  else:
    from tfx_encrypt.storage import _verbs  # pylint: disable=g-import-not-at-top
    real_open = _verbs.open_writer

    def open_failing(uri, size):
      w = real_open(uri, size)
      real_write = w.write

      def write(data):
        calls.append(memoryview(data).nbytes)
        if sum(calls) > n * 4 * MiB:
          raise exc
        real_write(data)
      w.write = write
      return w
    monkeypatch.setattr(_verbs, 'open_writer', open_failing)
  return calls


@pytest.mark.parametrize('exc', [ConnectionError('store went away'),
                                 KeyboardInterrupt()],
                         ids=['error', 'interrupt'])
def test_a_failure_midway_leaves_nothing(tmp_path, keys, store, exc,
                                         monkeypatch):
  """An upload failing after some parts (or an interrupt there): the
  multipart upload is aborted / the temporary objects deleted; nothing is
  in the bucket, no upload is open."""
  src = _util.make_tree(tmp_path / 'm', FILES)
  base = store.new_base()
  pkg = storage.join(base, 'pkg.tfxe')
  calls = _fail_after(store, monkeypatch, 2, exc)
  with pytest.raises(type(exc)):
    te.encrypt_model(src, pkg, recipients=[keys.pub('x')], bundle=True)
  assert calls
  monkeypatch.undo()
  assert everything(pkg) == ([], [])
  # And the destination is free: a new run succeeds.
  te.encrypt_model(src, pkg, recipients=[keys.pub('x')], bundle=True)
  assert everything(pkg) == (['pkgs/pkg.tfxe'], [])


_SIGTERM_MIDWAY = r"""
import os, signal, sys
from tfx_encrypt import storage
calls, sent = [], []
if sys.argv[1].startswith('s3://'):
  client = storage._s3()
  real = client.upload_part
  def hooked(**a):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(**a)
  client.upload_part = hooked
else:  # the temporary object's upload, once 12 MiB went into it
  from tfx_encrypt.storage import _verbs
  real_open = _verbs.open_writer
  def open_hooked(uri, size):
    w = real_open(uri, size)
    real_write = w.write
    def write(data):
      calls.append(memoryview(data).nbytes)
      if sum(calls) > 12 << 20 and not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
      real_write(data)
    w.write = write
    return w
  _verbs.open_writer = open_hooked
sys.argv = ['tfx-encrypt', 'encrypt', sys.argv[2], sys.argv[1], '--bundle',
            '-r', sys.argv[3]]
from tfx_encrypt import _entry
_entry.main()
"""


def test_sigterm_midway_leaves_nothing(tmp_path, keys, store):
  """The CLI gets SIGTERM while the second upload request runs: it exits
  143, the upload is aborted (S3) / its temporaries deleted (GCS)."""
  src = _util.make_tree(tmp_path / 'm', FILES)
  base = store.new_base()
  pkg = storage.join(base, 'pkg.tfxe')
  out = subprocess.run([sys.executable, '-c', _SIGTERM_MIDWAY, pkg, src,
                        keys.pub('x')], capture_output=True, text=True,
                       timeout=300, cwd=REPO, check=False)
  assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
  assert 'SIGTERM' in out.stderr
  assert everything(pkg) == ([], [])


def test_a_failure_at_the_commit_leaves_nothing(tmp_path, keys, store,
                                                monkeypatch):
  """The last step fails (S3 CompleteMultipartUpload, GCS compose): no
  bundle, no temporary payload or header object, no open upload."""
  src = _util.make_tree(tmp_path / 'm', FILES)
  base = store.new_base()
  pkg = storage.join(base, 'pkg.tfxe')
  if store.scheme == 's3':
    client = storage._s3()  # pylint: disable=protected-access

    def boom(**a):
      raise ConnectionError('complete failed')
    monkeypatch.setattr(client, 'complete_multipart_upload', boom)
  else:
    def boom(*a, **k):
      assert storage.list_names(pkg) == ['payload/00000000']  # the temp
      raise ConnectionError('compose failed')
    monkeypatch.setattr(_assemble, 'assemble', boom)
  with pytest.raises(ConnectionError, match='failed'):
    te.encrypt_model(src, pkg, recipients=[keys.pub('x')], bundle=True)
  monkeypatch.undo()
  assert everything(pkg) == ([], [])


def test_a_rival_bundle_wins_and_nothing_of_ours_is_left(tmp_path, keys,
                                                         store):
  """Another writer creates the bundle while we stream: our create-only
  commit fails, theirs is untouched, our temporaries are gone."""
  src = _util.make_tree(tmp_path / 'm', FILES)
  base = store.new_base()
  pkg = storage.join(base, 'pkg.tfxe')
  state = {}

  def progress(_):
    if not state:
      state['x'] = 1
      storage.put(pkg, b'theirs')
  with pytest.raises(errors.OutputExistsError, match='already exists'):
    te.encrypt_model(src, pkg, recipients=[keys.pub('x')], bundle=True,
                     progress=progress)
  assert everything(pkg) == (['pkgs/pkg.tfxe'], [])
  assert read_object(pkg) == b'theirs'


_NO_LOCAL_WRITES = r'''
import json, os, sys
import tfx_encrypt as te
src, dst, pub = sys.argv[1:4]
writes = []

def hook(event, args):
  if event == 'open' and args[0] is not None and not isinstance(args[0], int):
    mode, flags = args[1], args[2]
    if str(args[0]) == os.devnull:
      return
    if (mode and any(c in mode for c in 'wax+')) or (
        flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
      writes.append(str(args[0]))
  elif event in ('os.mkdir', 'os.rename', 'shutil.copyfile',
                 'tempfile.mkstemp', 'tempfile.mkdtemp'):
    writes.append(str(args[0]))

sys.addaudithook(hook)
te.encrypt_model(src, dst, recipients=[pub], bundle=True)
print(json.dumps(writes))
'''


@pytest.mark.parametrize('source', ['local', 'remote'])
def test_nothing_is_written_locally(tmp_path, keys, store, source):
  """Every open for writing, mkdir, rename and temporary file of the
  process is recorded (PEP 578 audit hooks): encrypting to a remote
  bundle makes none, and TMPDIR stays empty."""
  src = _util.make_tree(tmp_path / 'm', FILES)
  base = store.new_base()
  model = src
  if source == 'remote':
    model = storage.join(base, 'model')
    upload_tree(src, model)
  empty = tmp_path / 'tmpdir'
  empty.mkdir()
  pkg = storage.join(base, 'pkg.tfxe')
  out = subprocess.run(
      [sys.executable, '-c', _NO_LOCAL_WRITES, model, pkg, keys.pub('x')],
      capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
      env=dict(os.environ, TMPDIR=str(empty)))
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == []
  assert not os.listdir(empty)
  te.decrypt_model(pkg, tmp_path / 'out', identities=[keys.priv('x')],
                   allow_unsigned=True)
  assert _util.read_tree(tmp_path / 'out') == _util.read_tree(src)


_KILLED_BEFORE_COMPOSE = r'''
import os, signal, sys
import tfx_encrypt as te
from tfx_encrypt.storage import _assemble
src, dst, pub = sys.argv[1:4]
_assemble.assemble = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
te.encrypt_model(src, dst, recipients=[pub], bundle=True)
'''


def test_gcs_sigkill_before_compose_is_cleaned(tmp_path, keys, gs_store):
  """A SIGKILL between the uploads and the compose leaves the temporary
  payload object URI/payload/00000000: readers call URI incomplete,
  `clean URI` removes it (the small hidden header temporary stays)."""
  src = _util.make_tree(tmp_path / 'm', FILES)
  base = gs_store.new_base()
  pkg = storage.join(base, 'pkg.tfxe')
  out = subprocess.run(
      [sys.executable, '-c', _KILLED_BEFORE_COMPOSE, src, pkg,
       keys.pub('x')], capture_output=True, text=True, timeout=300,
      cwd=REPO, check=False)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert storage.list_names(pkg) == ['payload/00000000']
  assert not storage.exists(pkg)
  with pytest.raises(errors.UnsupportedFormatError, match='incomplete'):
    te.inspect_package(pkg)
  with pytest.raises(errors.OutputExistsError):
    te.encrypt_model(src, pkg, recipients=[keys.pub('x')], bundle=True)
  found = layout_lib.clean_remote(pkg, older_than_s=0)
  assert [(f.objects, f.removed) for f in found] == [(1, True)]
  names, _ = everything(pkg)
  assert len(names) == 1 and _util_is_header_temp(names[0])
  te.encrypt_model(src, pkg, recipients=[keys.pub('x')], bundle=True)
  assert te.inspect_package(pkg).bundle


def _util_is_header_temp(name):
  from tfx_encrypt import _fsutil  # pylint: disable=g-import-not-at-top
  base = name.rsplit('/', 1)[-1]
  return name.startswith('pkgs/.pkg.tfxe.tfxe-bundle-') and (
      _fsutil.is_temp_name(base))


_MEMORY_SCRIPT = r'''
import json, sys
import tfx_encrypt as te
small, big, pub, remote, remote2 = sys.argv[1:6]

def status(key):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(key + ':'):
        return int(line.split()[1])

# Warm up (imports, SDK clients, threads, buffers) on a small model.
te.encrypt_model(small, remote2, recipients=[pub], bundle=True)
base = status('VmRSS')
te.encrypt_model(big, remote, recipients=[pub], bundle=True)
print(json.dumps({'base_kib': base, 'peak_kib': status('VmHWM')}))
'''


@pytest.mark.slow
def test_bundle_memory_does_not_grow_with_the_model(tmp_path, keys, store):
  """Peak RSS of encrypting a 192 MiB model from the store into a bundle
  on the store stays far below the model's size (nothing staged)."""
  base = store.new_base()
  for i in range(2):  # 2 x 96 MiB, patterned: the test measures the streams
    storage.put(storage.join(base, 'big', 'variables', f'data-{i}'),
                _util.pattern(96 * MiB, seed=i))
  storage.put(storage.join(base, 'big', 'saved_model.pb'), b'\x08\x01')
  storage.put(storage.join(base, 'small', 'saved_model.pb'),
              _util.pattern(7 * MiB))
  empty = tmp_path / 'tmpdir'
  empty.mkdir()
  out = subprocess.run(
      [sys.executable, '-c', _MEMORY_SCRIPT, storage.join(base, 'small'),
       storage.join(base, 'big'), keys.pub('x'),
       storage.join(base, 'pkg.tfxe'), storage.join(base, 'small.tfxe')],
      capture_output=True, text=True, timeout=900, check=False, cwd=REPO,
      env=dict(os.environ, TMPDIR=str(empty)))
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  grown_mib = (r['peak_kib'] - r['base_kib']) / 1024
  print(f'{store.scheme} bundle encrypt: peak RSS {grown_mib:.1f} MiB over '
        'baseline')
  assert grown_mib < 64, r  # the model is 192 MiB
  assert not os.listdir(empty)
  info = te.inspect_package(storage.join(base, 'pkg.tfxe'))
  assert info.bundle and info.file_count == 3
  assert te.verify_package(storage.join(base, 'pkg.tfxe'),
                           allow_unsigned=True).file_count == 3
