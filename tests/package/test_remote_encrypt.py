"""encrypt_model / `tfx-encrypt encrypt` from and to s3:// and gs://.

Against moto's standalone server (s3://, real boto3) and gcp-storage-emulator
(gs://, real google-cloud-storage; ifGenerationMatch=0 enforced by the
TEST-ONLY patch of tests/fakes/gcs_emulator.py), both on loopback
(tests/fakes/stores.py). The source is listed once and read segment by
segment with ranged reads pinned to the listed versions; a remote package
is streamed create-only, payloads first, header last.
"""

import json
import os
import subprocess
import sys

import click.testing
import pytest

import tfx_encrypt as te
from tfx_encrypt import cli
from tfx_encrypt import errors
from tfx_encrypt import storage
from tests import _util

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

FILES = {'saved_model.pb': b'\x08\x01',
         'variables/variables.data-00000-of-00001': 9 * MiB + 17,
         'variables/variables.index': 300, 'assets/vocab.txt': b'',
         'caf\u00e9.txt': b'nfc'}


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(params=['s3', 'gs'])
def store(request):
  return request.getfixturevalue(f'{request.param}_store')


def upload_tree(local, uri, markers=True):
  """Copy a local model to `uri/`, with the zero-byte folder objects
  tf.io.gfile.makedirs writes (`uri/`, `uri/variables/`, ...)."""
  if markers:
    _, bucket, key = storage.split(uri)
    put_raw(uri.split('://')[0], bucket, key.rstrip('/') + '/', b'')
  for rel, data in sorted(_util.read_tree(local).items()):
    if data is None:
      if markers:
        _, bucket, key = storage.split(storage.join(uri, rel))
        put_raw(uri.split('://')[0], bucket, key + '/', b'')
      continue
    storage.put(storage.join(uri, rel), data)


def put_raw(scheme, bucket, key, data):
  """An object under exactly this key (storage.join would strip a `/`)."""
  if scheme == 's3':
    storage._s3().put_object(Bucket=bucket, Key=key, Body=data)  # pylint: disable=protected-access
  else:
    storage._gcs().bucket(bucket).blob(key).upload_from_string(data)  # pylint: disable=protected-access


def model(tmp_path, files=None):
  return _util.make_tree(tmp_path / 'm', files or FILES)


def decrypted(tmp_path, pkg, keys, name='out'):
  out = tmp_path / name
  te.decrypt_model(pkg, out, identities=[keys.priv('x')],
                   trusted=[keys.pub('ed')])
  return _util.read_tree(out)


@pytest.mark.parametrize('bundle', [False, True], ids=['dir', 'bundle'])
def test_remote_model_to_local_and_remote_packages(tmp_path, keys, store,
                                                   bundle):
  src = model(tmp_path)
  base = store.new_base()
  upload_tree(src, storage.join(base, 'model'))
  local = te.encrypt_model(src, tmp_path / 'ref', recipients=[keys.pub('x')])
  suffix = '.tfxe' if bundle else ''
  outs = {'local': str(tmp_path / ('p' + suffix)),
          'remote': storage.join(base, 'pkg' + suffix)}
  for where, pkg in outs.items():
    info = te.encrypt_model(storage.join(base, 'model'), pkg,
                            recipients=[keys.pub('x')], signer=keys.priv('ed'),
                            bundle=bundle, context={'model': 'm'})
    # The same model: the same fingerprint (model_signing's root digest).
    assert info.fingerprint == local.fingerprint, where
    assert info.plaintext_bytes == sum(
        len(v) for v in _util.read_tree(src).values() if v is not None)
    assert te.inspect_package(pkg).package_id == info.package_id
    assert te.verify_package(pkg, trusted=[keys.pub('ed')]).signature_verified
    assert decrypted(tmp_path, pkg, keys, 'o-' + where) == _util.read_tree(src)
  names = storage.list_names(outs['remote'])
  if bundle:
    assert names == [] and storage.exists(outs['remote'])
  else:
    assert names == ['payload/0000000%d' % i for i in range(5)] + [
        'tfxe.header']


def test_local_model_to_remote_package_and_cli(tmp_path, keys, store):
  src = model(tmp_path)
  base = store.new_base()
  runner = click.testing.CliRunner()
  pkg = storage.join(base, 'cli-pkg')
  r = runner.invoke(cli.main, ['encrypt', str(src), pkg, '-r', keys.pub('x'),
                               '--sign-with', keys.priv('ed')])
  assert r.exit_code == 0, r.output
  assert decrypted(tmp_path, pkg, keys) == _util.read_tree(src)
  upload_tree(src, storage.join(base, 'model'))
  r = runner.invoke(cli.main, ['encrypt', storage.join(base, 'model'),
                               storage.join(base, 'b.tfxe'), '--bundle',
                               '-r', keys.pub('x'), '--sign-with',
                               keys.priv('ed')])
  assert r.exit_code == 0, r.output
  assert decrypted(tmp_path, storage.join(base, 'b.tfxe'), keys,
                   'o2') == _util.read_tree(src)
  # An existing output: exit 2, --force refused, nothing touched.
  before = storage.list_objects(pkg)
  for extra in ([], ['--force']):
    r = runner.invoke(cli.main, ['encrypt', str(src), pkg, '-r',
                                 keys.pub('x')] + extra)
    assert r.exit_code == 2, r.output
    assert ('never replaced' if extra else 'already exists') in r.output
  assert storage.list_objects(pkg) == before


def test_output_inside_a_remote_input_is_refused(tmp_path, keys, store):
  base = store.new_base()
  upload_tree(model(tmp_path), storage.join(base, 'model'))
  with pytest.raises(errors.UnsafeOverwriteError, match='inside the input'):
    te.encrypt_model(storage.join(base, 'model'),
                     storage.join(base, 'model', 'pkg'),
                     recipients=[keys.pub('x')])
  assert 'pkg' not in {n.split('/')[0] for n in storage.list_names(
      storage.join(base, 'model'))}


def test_folder_objects_are_directories(tmp_path, keys, store):
  """tf.io.gfile.makedirs (and consoles) write zero-byte `dir/` objects: an
  empty one is an (empty) directory of the model."""
  src = model(tmp_path)
  base = store.new_base()
  uri = storage.join(base, 'model')
  upload_tree(src, uri)
  scheme, bucket, key = storage.split(uri)
  put_raw(scheme, bucket, key + '/extra/empty/', b'')
  te.encrypt_model(uri, tmp_path / 'p', recipients=[keys.pub('x')],
                   signer=keys.priv('ed'))
  got = decrypted(tmp_path, tmp_path / 'p', keys)
  assert got == dict(_util.read_tree(src), **{'extra/empty/': None})


ODD_NAMES = [
    ('variables//x', 'empty component'),
    ('a\\b', 'backslash'),
    ('evil\x1b[2Jname', 'control'),
    ('e\u0301.txt', 'NFC'),
    ('x/\u202eexe.txt', 'bidirectional'),
    ('variables/', 'named like a folder but holds data'),
    ('.x.tfxe-tmp-0123456789abcdef', 'temporary file'),
    ('sub/tfxe.header', 'a tfx-encrypt package'),
    ('nested.tfxe', 'a tfx-encrypt bundle'),
    ('Saved_Model.pb', 'same name ignoring case'),
]
ODD_IDS = ['double-slash', 'backslash', 'escape', 'nfd', 'bidi',
           'folder-with-data', 'temp', 'header', 'bundle-magic',
           'case-collision']


@pytest.mark.parametrize('name,match', ODD_NAMES, ids=ODD_IDS)
def test_odd_object_names_are_refused(tmp_path, keys, store, name, match):
  _check_refused(tmp_path, keys, store, name, match)


@pytest.mark.parametrize('name', ['variables/../x', './x', 'variables/./x'])
def test_dot_components_are_refused(tmp_path, keys, s3_store, name):
  """S3 stores `a/../b` as a plain key. (gcp-storage-emulator drops the
  connection on such names, so this runs on moto only; the check is the
  same code for every store: format/paths.py.)"""
  _check_refused(tmp_path, keys, s3_store, name, r'"\." or "\.\." component')


def _check_refused(tmp_path, keys, store, name, match):
  base = store.new_base()
  uri = storage.join(base, 'model')
  upload_tree(model(tmp_path, {'saved_model.pb': b'\x08\x01',
                               'variables/v': 2 * MiB}), uri, markers=False)
  data = b'data'
  if name == 'nested.tfxe':
    data = b'TFXENC\x00\x02' + b'\x00' * 64
  scheme, bucket, key = storage.split(uri)
  put_raw(scheme, bucket, key + '/' + name, data)
  dst = storage.join(base, 'pkg')
  with pytest.raises((errors.UnsafePathError, errors.UsageError),
                     match=match) as exc:
    te.encrypt_model(uri, dst, recipients=[keys.pub('x')])
  assert '\x1b' not in str(exc.value) and '\u202e' not in str(exc.value)
  assert storage.list_names(dst) == [] and not storage.exists(dst)


def _replace_after_first_segment(uri, data):
  state = {'done': False}

  def progress(_):
    if not state['done']:
      state['done'] = True
      storage.put(uri, data)
  return progress


@pytest.mark.parametrize('which', ['being-read', 'not-yet-read'])
def test_a_model_changed_while_encrypting_fails_and_leaves_nothing(
    tmp_path, keys, store, which):
  base = store.new_base()
  uri = storage.join(base, 'model')
  big, small = 'variables/big', 'variables/small'
  upload_tree(model(tmp_path, {'saved_model.pb': b'\x08\x01',
                               big: 12 * MiB, small: 2 * MiB}), uri)
  # Largest first, one worker: `big` is being read at the first progress
  # call, `small` not opened yet. Same size, other bytes: only the version
  # pin can tell.
  target = big if which == 'being-read' else small
  size = 12 * MiB if target == big else 2 * MiB
  for dst in (str(tmp_path / 'p'), storage.join(base, 'pkg')):
    storage.put(storage.join(uri, target), _util.pattern(size))
    changed = _replace_after_first_segment(storage.join(uri, target),
                                           _util.pattern(size, seed=9))
    with pytest.raises(errors.UsageError,
                       match='replaced or removed while it was being '
                       'encrypted'):
      te.encrypt_model(uri, dst, recipients=[keys.pub('x')], workers=1,
                       progress=changed)
    assert not os.path.exists(tmp_path / 'p')
    assert not os.listdir(tmp_path) or os.listdir(tmp_path) == ['m']
  assert storage.list_names(storage.join(base, 'pkg')) == []


def test_a_concurrent_writer_of_the_header_wins_and_our_payloads_go(
    tmp_path, keys, store):
  """Someone creates the package's header while we encrypt: our header
  commit fails (create-only), the payload objects we wrote are deleted,
  theirs is untouched."""
  base = store.new_base()
  dst = storage.join(base, 'pkg')
  state = {}

  def progress(_):
    if not state:
      state['x'] = 1
      storage.put(storage.join(dst, 'tfxe.header'), b'theirs')
  with pytest.raises(errors.OutputExistsError, match='already exists'):
    te.encrypt_model(model(tmp_path), dst, recipients=[keys.pub('x')],
                     progress=progress)
  assert storage.list_names(dst) == ['tfxe.header']
  with storage.open_reader(storage.join(dst, 'tfxe.header')) as r:
    assert r.read_range(0, 100) == b'theirs'


def test_an_aborted_upload_publishes_nothing(store):
  """A writer that is aborted (or dropped) never creates its object."""
  import gc  # pylint: disable=g-import-not-at-top
  base = store.new_base()
  uri = storage.join(base, 'obj')
  w = storage.open_writer(uri, 12 * MiB)
  w.write(b'x' * (9 * MiB))  # past one part / chunk: an upload is running
  w.abort()
  w = storage.open_writer(uri, 3)
  w.write(b'abc')
  del w
  gc.collect()
  assert not storage.exists(uri) and storage.list_names(base) == []
  w = storage.open_writer(uri, 3)
  w.write(b'abc')
  w.commit()
  w = storage.open_writer(uri, 3)
  w.write(b'xyz')
  with pytest.raises(storage.ObjectExistsError):
    w.commit()
  with storage.open_reader(uri) as r:
    assert r.read_range(0, 3) == b'abc'


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
  elif event in ('os.mkdir', 'os.rename', 'shutil.copyfile'):
    writes.append(str(args[0]))

sys.addaudithook(hook)
te.encrypt_model(src, dst, recipients=[pub])
print(json.dumps(writes))
'''


def test_remote_to_remote_writes_nothing_locally(tmp_path, keys, store):
  """Every open for writing, mkdir and rename of the process is recorded
  (audit hooks, PEP 578): a remote-to-remote encryption makes none, so no
  plaintext (nor anything else) reaches the local disk."""
  base = store.new_base()
  upload_tree(model(tmp_path), storage.join(base, 'model'))
  empty = tmp_path / 'tmpdir'
  empty.mkdir()
  out = subprocess.run(
      [sys.executable, '-c', _NO_LOCAL_WRITES, storage.join(base, 'model'),
       storage.join(base, 'pkg'), keys.pub('x')],
      capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
      env=dict(os.environ, TMPDIR=str(empty)))
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == []
  assert not os.listdir(empty)
  te.decrypt_model(storage.join(base, 'pkg'), tmp_path / 'out',
                   identities=[keys.priv('x')], allow_unsigned=True)
  assert _util.read_tree(tmp_path / 'out') == _util.read_tree(tmp_path / 'm')


_MEMORY_SCRIPT = r'''
import json, sys
import tfx_encrypt as te
small, big, pub, local, remote, remote2 = sys.argv[1:7]

def status(key):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(key + ':'):
        return int(line.split()[1])

# Warm up (imports, SDK clients, thread pool, buffers) on a small model.
te.encrypt_model(small, remote2, recipients=[pub])
base = status('VmRSS')
te.encrypt_model(big, remote, recipients=[pub])
te.encrypt_model(big, local, recipients=[pub])
print(json.dumps({'base_kib': base, 'peak_kib': status('VmHWM')}))
'''


@pytest.mark.slow
def test_remote_encrypt_memory_does_not_grow_with_the_model(tmp_path, keys,
                                                            s3_store):
  """Peak RSS of encrypting a 192 MiB model from s3:// (to s3:// and to a
  local package) stays far below the model's size."""
  base = s3_store.new_base()
  for i in range(2):  # 2 x 96 MiB, patterned: the test measures the streams
    storage.put(storage.join(base, 'big', 'variables', f'data-{i}'),
                _util.pattern(96 * MiB, seed=i))
  storage.put(storage.join(base, 'big', 'saved_model.pb'), b'\x08\x01')
  storage.put(storage.join(base, 'small', 'saved_model.pb'),
              _util.pattern(3 * MiB))
  out = subprocess.run(
      [sys.executable, '-c', _MEMORY_SCRIPT, storage.join(base, 'small'),
       storage.join(base, 'big'), keys.pub('x'), str(tmp_path / 'local'),
       storage.join(base, 'pkg'), storage.join(base, 'pkg-small')],
      capture_output=True, text=True, timeout=900, check=False, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  grown_mib = (r['peak_kib'] - r['base_kib']) / 1024
  print(f'remote encrypt: peak RSS {grown_mib:.1f} MiB over baseline')
  assert grown_mib < 64, r  # the model is 192 MiB
  info = te.inspect_package(storage.join(base, 'pkg'))
  assert info.file_count == 3
  assert te.inspect_package(tmp_path / 'local').fingerprint == \
      info.fingerprint
