"""serve-sync: keep a TF Serving base path in sync with a push destination.

The source-facing tests run three times: on a local directory, on `s3://`
(moto's standalone server, real boto3) and on `gs://` (gcp-storage-emulator
with the TEST-ONLY precondition patch, real google-cloud-storage), both on
loopback (tests/fakes/stores.py). A remote version is pushed as
EncryptPusher pushes it: payload objects first, then the header (or the one
bundle object) create-only.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from tests import _util
from tfx_encrypt import errors
from tfx_encrypt import package as package_lib
from tfx_encrypt import storage
from tfx_encrypt.runtime import serving

V1, V2, V3, V4 = '1700000001', '1700000002', '1700000003', '1700000004'


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


def _files(version):
  return {'saved_model.pb': f'graph {version}'.encode(),
          'variables/variables.index': 100 + int(version[-1]),
          'variables/variables.data-00000-of-00001': 70000,
          'assets/vocab.txt': b'a\nb\n'}


def _upload(local, uri, header=True):
  """Copy a local package to `uri` as a push does: payload objects, then the
  header (or the bundle) create-only; without `header`, stop before it."""
  if os.path.isfile(local):
    with open(local, 'rb') as f:
      storage.put_create_only(uri, f)
    return
  pdir = os.path.join(local, package_lib.PAYLOAD_DIR)
  for name in sorted(os.listdir(pdir)):
    with open(os.path.join(pdir, name), 'rb') as f:
      storage.put(storage.join(uri, package_lib.PAYLOAD_DIR, name), f)
  if header:
    with open(os.path.join(local, package_lib.HEADER_NAME), 'rb') as f:
      storage.put_create_only(storage.join(uri, package_lib.HEADER_NAME), f)


def _push(keys, tmp_path, source, version, *, bundle=False,
          bundle_in_dir=False, signer='ed', header=True):
  """Encrypt a small tree as EncryptPusher would push it; return the tree.

  `source` is a local directory or a s3:// / gs:// base. Without `header`,
  the push stops before its commit point (directory form only): an
  incomplete version; `_commit` finishes it.
  """
  tree = _util.make_tree(tmp_path / 'models' / version, _files(version))
  if bundle:
    rel = version + '.tfxe'
  elif bundle_in_dir:
    rel = version + '/model.tfxe'
  else:
    rel = version
  remote = storage.is_remote(source)
  out = (str(tmp_path / 'staged' / rel) if remote or not header
         else os.path.join(source, rel))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  package_lib.encrypt_model(tree, out, recipients=[keys.pub('x')],
                            signer=keys.priv(signer) if signer else None,
                            bundle=bundle or bundle_in_dir)
  if remote:
    _upload(out, storage.join(source, rel), header=header)
  elif not header:  # local: the payload directory without its header
    shutil.copytree(os.path.join(out, package_lib.PAYLOAD_DIR),
                    os.path.join(source, rel, package_lib.PAYLOAD_DIR))
  return tree


def _commit(tmp_path, source, version):
  """Write the header of a push `_push(..., header=False)` started."""
  staged = tmp_path / 'staged' / version / package_lib.HEADER_NAME
  with open(staged, 'rb') as f:
    storage.put_create_only(
        storage.join(source, version, package_lib.HEADER_NAME), f)


def _largest_payload(source, version):
  pdir = storage.join(source, version, package_lib.PAYLOAD_DIR)
  sizes = storage.list_sizes(pdir)
  return storage.join(pdir, max(sizes, key=sizes.get))


def _tamper(source, version):
  """Flip one bit in the middle of the version's largest payload."""
  uri = _largest_payload(source, version)
  with storage.open_reader(uri) as r:
    data = bytearray(r.read_range(0, r.size))
  data[len(data) // 2] ^= 1
  if storage.is_remote(uri):
    storage.put(uri, bytes(data))
  else:
    with open(uri, 'r+b') as f:
      f.write(data)


def _delete(source, version):
  """Withdraw a version from the source (every object / the directory)."""
  if not storage.is_remote(source):
    shutil.rmtree(os.path.join(source, version))
    return
  base = storage.join(source, version)
  for name in storage.list_names(base):
    storage.delete(storage.join(base, name))


def _sync(keys, source, serving_base, **kwargs):
  kwargs.setdefault('identities', [keys.priv('x')])
  kwargs.setdefault('trusted', [keys.pub('ed')])
  return serving.sync_serving(source, serving_base, **kwargs)


def _versions(base):
  return sorted((n for n in os.listdir(base) if n.isdigit()), key=int)


def _summary(result):
  return [(a.action, a.version) for a in result.actions]


@pytest.fixture
def local_source(tmp_path):
  d = tmp_path / 'push'
  d.mkdir()
  return str(d)


@pytest.fixture(params=['local', 's3', 'gs'])
def source(request, tmp_path):
  """The push base: a local directory, or a fresh s3:// / gs:// base (the
  emulator's environment applied for the test, and its subprocesses)."""
  if request.param == 'local':
    return request.getfixturevalue('local_source')
  return request.getfixturevalue(f'{request.param}_store').new_base()


def test_sync_installs_newest_then_rotates(keys, tmp_path, source,
                                           monkeypatch):
  trees = {V1: _push(keys, tmp_path, source, V1),
           V2: _push(keys, tmp_path, source, V2, bundle=True),
           V3: _push(keys, tmp_path, source, V3, bundle_in_dir=True)}
  # Names of every entry serve-sync creates while it works.
  seen = set()
  real_decrypt = package_lib.decrypt_model
  tmpdir = tmp_path / 'tmpdir'  # nothing staged there either
  tmpdir.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(tmpdir))

  def spy(package, out, **kw):
    # Decrypted straight from the source (a store: streamed, no copy).
    assert package.startswith(source + '/')
    info = real_decrypt(package, out, **kw)
    seen.update(os.listdir(os.path.dirname(os.path.dirname(out))))
    return info

  monkeypatch.setattr(package_lib, 'decrypt_model', spy)
  serving_base = str(tmp_path / 'serving')
  result = _sync(keys, source, serving_base, keep=2)
  assert result.ok
  assert _summary(result) == [('installed', V3), ('installed', V2)]
  assert _versions(serving_base) == [V2, V3]
  for v in (V2, V3):
    assert _util.read_tree(os.path.join(serving_base, v)) == _util.read_tree(
        trees[v])
    st = os.stat(os.path.join(serving_base, v))
    assert stat.S_IMODE(st.st_mode) == 0o700
  # Temp names were hidden and never numeric; none is left.
  temps = {n for n in seen if not n.isdigit()}
  assert temps and all(n.startswith('.') for n in temps), seen
  assert any(n.startswith(serving.TMP_PREFIX) for n in temps)
  assert sorted(os.listdir(serving_base)) == sorted(
      [V2, V3, serving.MARKER_NAME, serving.LOCK_NAME])
  assert os.listdir(tmpdir) == []
  marker = json.load(open(os.path.join(serving_base, serving.MARKER_NAME)))
  assert set(marker['versions']) == {V2, V3}
  infos = {a.version: a for a in result.installed}
  for v in (V2, V3):
    assert marker['versions'][v]['package_id'] == infos[v].package_id
    assert marker['versions'][v]['fingerprint'] == infos[v].fingerprint
    assert marker['versions'][v]['signer'] == infos[v].signer is not None
    assert marker['versions'][v]['source'] == infos[v].source
    assert infos[v].source.startswith(source)
  assert stat.S_IMODE(os.stat(
      os.path.join(serving_base, serving.MARKER_NAME)).st_mode) == 0o600

  # Idempotent: nothing new, nothing changes (not even the marker).
  before = os.stat(os.path.join(serving_base, serving.MARKER_NAME)).st_mtime_ns
  again = _sync(keys, source, serving_base, keep=2)
  assert _summary(again) == [('kept', V3), ('kept', V2)]
  assert not again.changed and again.ok
  assert os.stat(os.path.join(serving_base,
                              serving.MARKER_NAME)).st_mtime_ns == before

  # A foreign version directory is never touched, even when old.
  foreign = _util.make_tree(os.path.join(serving_base, '7'),
                            {'saved_model.pb': b'not ours'})
  trees[V4] = _push(keys, tmp_path, source, V4)
  result = _sync(keys, source, serving_base, keep=2)
  assert _summary(result) == [('installed', V4), ('kept', V3),
                              ('removed', V2)]
  assert _versions(serving_base) == ['7', V3, V4]
  assert _util.read_tree(foreign) == {'saved_model.pb': b'not ours'}
  assert _util.read_tree(os.path.join(serving_base, V4)) == _util.read_tree(
      trees[V4])
  marker = json.load(open(os.path.join(serving_base, serving.MARKER_NAME)))
  assert set(marker['versions']) == {V3, V4}
  assert result.to_dict()['actions'][2] == {
      'action': 'removed', 'version': V2,
      'path': os.path.join(serving_base, V2),
      'package_id': infos[V2].package_id,
      'fingerprint': infos[V2].fingerprint}


def test_failed_versions_are_reported_and_never_published(keys, tmp_path,
                                                          source):
  _push(keys, tmp_path, source, V1)
  _push(keys, tmp_path, source, V2)
  _push(keys, tmp_path, source, V3, signer='evil')  # untrusted publisher
  _push(keys, tmp_path, source, V4)
  _tamper(source, V4)  # the newest version
  serving_base = str(tmp_path / 'serving')
  result = _sync(keys, source, serving_base, keep=2)
  assert not result.ok
  assert _summary(result) == [('failed', V4), ('failed', V3),
                              ('installed', V2), ('installed', V1)]
  failed = {a.version: a for a in result.failed}
  assert failed[V4].error == 'TamperedPackageError'
  assert failed[V3].error == 'UntrustedSignerError'
  assert all(a.message for a in result.failed)
  assert _versions(serving_base) == [V1, V2]
  assert [n for n in os.listdir(serving_base)
          if n.startswith(serving.TMP_PREFIX)] == []
  # A version without a key is reported too, and retried, not remembered.
  result = _sync(keys, source, serving_base, keep=2,
                 identities=[keys.priv('x2')])
  assert _summary(result) == [('failed', V4), ('failed', V3), ('kept', V2),
                              ('kept', V1)]
  # A package that no identity opens: NoMatchingKeyError.
  _push(keys, tmp_path, source, '1700000005')
  result = _sync(keys, source, serving_base, keep=2,
                 identities=[keys.priv('x2')])
  assert ('failed', '1700000005') in _summary(result)
  assert result.failed[0].error == 'NoMatchingKeyError'
  assert _versions(serving_base) == [V1, V2]


def test_foreign_directory_with_a_source_version_is_left_alone(
    keys, tmp_path, source):
  _push(keys, tmp_path, source, V1)
  _push(keys, tmp_path, source, V2)
  serving_base = tmp_path / 'serving'
  mine = _util.make_tree(serving_base / V2, {'x': b'hand-made'})
  result = _sync(keys, source, str(serving_base), keep=1)
  assert _summary(result) == [('failed', V2), ('installed', V1)]
  assert result.failed[0].error == 'OutputExistsError'
  assert _util.read_tree(mine) == {'x': b'hand-made'}


def test_allow_unsigned_group_readable_and_model_check(keys, tmp_path, source):
  _push(keys, tmp_path, source, V1, signer=None)  # unsigned
  _push(keys, tmp_path, source, V2)
  serving_base = str(tmp_path / 'serving')
  with pytest.raises(errors.UsageError, match='whom you trust'):
    _sync(keys, source, serving_base, trusted=[])
  checked = []

  def model_check(path):
    checked.append(os.path.basename(path))
    if os.path.basename(path) == V2:
      raise ValueError('bad graph')

  result = _sync(keys, source, serving_base, allow_unsigned=True,
                 group_readable=True, model_check=model_check)
  assert checked == [V2, V1]
  assert _summary(result) == [('failed', V2), ('installed', V1)]
  assert result.failed[0].error == 'ModelCheckError'
  assert 'bad graph' in result.failed[0].message
  assert result.installed[0].signer is None
  root = os.path.join(serving_base, V1)
  for dirpath, dirs, files in os.walk(root):
    assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o750
    for f in files:
      assert stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) == 0o640
  assert stat.S_IMODE(os.stat(serving_base).st_mode) == 0o750


def test_recovers_from_interrupted_sync_and_hand_deleted_version(
    keys, tmp_path, source):
  _push(keys, tmp_path, source, V1)
  serving_base = tmp_path / 'serving'
  _sync(keys, source, str(serving_base), keep=1)
  # A crash left a staging directory; someone deleted the version by hand.
  _util.make_tree(serving_base / (serving.TMP_PREFIX + 'dead'), {'a': b'p'})
  shutil.rmtree(serving_base / V1)
  result = _sync(keys, source, str(serving_base), keep=1)
  assert _summary(result) == [('installed', V1)]
  assert sorted(os.listdir(serving_base)) == sorted(
      [V1, serving.MARKER_NAME, serving.LOCK_NAME])


def test_usage_errors(keys, tmp_path, local_source):
  source = local_source
  with pytest.raises(errors.UsageError, match='keep'):
    _sync(keys, source, str(tmp_path / 's'), keep=0)
  with pytest.raises(errors.UsageError, match='must be a local path'):
    _sync(keys, source, 'gs://bucket/serving')
  with pytest.raises(errors.UsageError, match='must be a local path'):
    _sync(keys, 's3://bucket/models', 's3://bucket/serving')
  with pytest.raises(errors.UsageError, match='gs:// and s3:// push bases'):
    _sync(keys, 'hdfs://nn/models', str(tmp_path / 's'))
  with pytest.raises(errors.UsageError, match='names no bucket'):
    _sync(keys, 'gs:///models', str(tmp_path / 's'))
  with pytest.raises(errors.UsageError, match='not a directory'):
    _sync(keys, str(tmp_path / 'missing'), str(tmp_path / 's'))
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / serving.MARKER_NAME).write_text('{')
  with pytest.raises(errors.UsageError, match='not valid JSON'):
    _sync(keys, source, str(tmp_path / 'bad'))


def _cli(*args, **kwargs):
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
                        capture_output=True, text=True, timeout=120, **kwargs)


def test_cli_once_text_and_json(keys, tmp_path, source):
  for v in (V1, V2, V3):
    _push(keys, tmp_path, source, v)
  serving_base = tmp_path / 'serving'
  common = ['serve-sync', source, serving_base, '--identity', keys.priv('x'),
            '--trust', keys.pub('ed'), '--keep', '2', '--once']
  p = _cli(*common)
  assert p.returncode == 0, p.stderr
  assert p.stderr == ''
  lines = p.stdout.splitlines()
  assert len(lines) == 2
  assert lines[0].startswith(f'installed {V3} into ')
  assert lines[1].startswith(f'installed {V2} into ')
  assert 'signed by trusted' in lines[0]
  assert _versions(serving_base) == [V2, V3]
  p = _cli(*common, '--json')
  assert p.returncode == 0, p.stderr
  assert len(p.stdout.splitlines()) == 1
  doc = json.loads(p.stdout)
  assert doc['ok'] is True
  assert [(a['action'], a['version']) for a in doc['actions']] == [
      ('kept', V3), ('kept', V2)]
  # A failed version: reported, exit 1, the others still synced.
  _push(keys, tmp_path, source, V4, signer='evil')
  p = _cli(*common, '--json')
  assert p.returncode == 1, p.stderr
  doc = json.loads(p.stdout)
  assert doc['ok'] is False
  assert doc['actions'][0]['action'] == 'failed'
  assert doc['actions'][0]['error'] == 'UntrustedSignerError'
  assert p.stderr == ''  # reported once, in the output


@pytest.mark.parametrize('extra, message', [
    ([], '--once, or --interval'),
    (['--once', '--interval', '5'], '--once, or --interval'),
    (['--once', '--keep', '0'], '--keep'),
    (['--once', '--no-such-option'], 'no-such-option'),
])
def test_cli_usage_errors_are_one_line(keys, tmp_path, local_source, extra,
                                       message):
  p = _cli('serve-sync', local_source, tmp_path / 'serving', '--identity',
           keys.priv('x'), '--trust', keys.pub('ed'), *extra)
  assert p.returncode == 2, (p.stdout, p.stderr)
  assert p.stdout == ''
  assert len(p.stderr.splitlines()) == 1
  assert message in p.stderr and p.stderr.startswith('tfx-encrypt: error:')


def test_cli_untrusted_without_trust_is_usage_error(keys, tmp_path,
                                                    local_source):
  p = _cli('serve-sync', local_source, tmp_path / 'serving', '--identity',
           keys.priv('x'), '--once')
  assert p.returncode == 2
  assert p.stderr.splitlines() == [
      'tfx-encrypt: error: say whom you trust: --trust PUBLISHER_PUBLIC_KEY, '
      'or --allow-unsigned']


def test_cli_interval_loop_stops_on_sigterm(keys, tmp_path, source):
  _push(keys, tmp_path, source, V1)
  serving_base = tmp_path / 'serving'
  p = subprocess.Popen(
      [sys.executable, '-m', 'tfx_encrypt', 'serve-sync', source,
       str(serving_base), '--identity', keys.priv('x'), '--trust',
       keys.pub('ed'), '--interval', '0.2'],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 60
    while not (serving_base / V1).exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    assert (serving_base / V1).exists()
    _push(keys, tmp_path, source, V2)  # picked up by a later iteration
    while not (serving_base / V2).exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    assert (serving_base / V2).exists()
  finally:
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
  assert p.returncode == 128 + signal.SIGTERM, err
  assert out.splitlines()[:2] == [l for l in out.splitlines()
                                  if l.startswith('installed')][:2]
  assert err.splitlines()[-1].startswith(
      'tfx-encrypt: error: interrupted by SIGTERM')
  assert sorted(n for n in os.listdir(serving_base) if n.startswith('.')) == [
      '.tfxe-managed.json', '.tfxe-sync.lock']  # no staging left behind


def test_import_does_not_load_tensorflow():
  script = textwrap.dedent('''
      import sys
      import tfx_encrypt.runtime.serving
      import tfx_encrypt.cli
      bad = sorted(m for m in sys.modules
                   if m.split('.')[0] in ('tensorflow', 'tfx', 'keras'))
      print(bad)
  ''')
  p = subprocess.run([sys.executable, '-c', script], capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip() == '[]'


@pytest.mark.tfx
def test_synced_savedmodel_loads_with_same_predictions(keys, tmp_path,
                                                       local_source):
  source = local_source
  tf = pytest.importorskip('tensorflow')

  class Tiny(tf.Module):

    def __init__(self):
      super().__init__()
      self.w = tf.Variable([[1.0, -2.0], [0.5, 3.0], [2.0, 0.25]])
      self.b = tf.Variable([0.1, -0.1])

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def __call__(self, x):
      return {'y': tf.matmul(x, self.w) + self.b}

  model_dir = str(tmp_path / 'saved_model')
  m = Tiny()
  tf.saved_model.save(m, model_dir, signatures={'serving_default': m.__call__})
  package_lib.encrypt_model(model_dir, os.path.join(source, V1),
                            recipients=[keys.pub('x')],
                            signer=keys.priv('ed'))
  serving_base = tmp_path / 'serving'
  result = _sync(keys, source, str(serving_base))
  assert _summary(result) == [('installed', V1)]
  x = tf.constant([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]])
  want = tf.saved_model.load(model_dir).signatures['serving_default'](x=x)
  got = tf.saved_model.load(str(serving_base / V1)).signatures[
      'serving_default'](x=x)
  assert got['y'].numpy().tolist() == want['y'].numpy().tolist()


# --- what a push base on a store adds (run on local, s3://, gs://) -----------

def test_incomplete_version_is_absent_until_its_header_arrives(
    keys, tmp_path, source):
  """Payloads without a header: reported `incomplete`, never installed,
  not a failure; the sync after the header is written installs it."""
  _push(keys, tmp_path, source, V1)
  _push(keys, tmp_path, source, V2, header=False)
  serving_base = tmp_path / 'serving'
  result = _sync(keys, source, str(serving_base), keep=2)
  assert _summary(result) == [('incomplete', V2), ('installed', V1)]
  assert result.ok and not result.failed
  inc = result.incomplete[0]
  assert inc.path == storage.join(source, V2)
  assert 'no tfxe.header' in inc.message and 'next sync' in inc.message
  assert inc.line().startswith(f'incomplete {V2} (')
  assert _versions(serving_base) == [V1]
  assert not [n for n in os.listdir(serving_base)
              if n.startswith((serving.TMP_PREFIX, serving.OLD_PREFIX))]
  # The CLI: reported, exit 0 (nothing failed).
  p = _cli('serve-sync', source, serving_base, '--identity', keys.priv('x'),
           '--trust', keys.pub('ed'), '--keep', '2', '--once', '--json')
  assert p.returncode == 0, p.stderr
  doc = json.loads(p.stdout)
  assert doc['ok'] is True
  assert [(a['action'], a['version']) for a in doc['actions']] == [
      ('incomplete', V2), ('kept', V1)]
  assert _versions(serving_base) == [V1]
  # The push completes: the next sync installs it.
  _commit(tmp_path, source, V2)
  result = _sync(keys, source, str(serving_base), keep=2)
  assert _summary(result) == [('installed', V2), ('kept', V1)]
  assert _util.read_tree(serving_base / V2) == _util.read_tree(
      tmp_path / 'models' / V2)


def test_tampered_version_never_replaces_the_good_one(keys, tmp_path, source):
  good = _push(keys, tmp_path, source, V1)
  serving_base = tmp_path / 'serving'
  assert _summary(_sync(keys, source, str(serving_base), keep=1)) == [
      ('installed', V1)]
  _push(keys, tmp_path, source, V2)
  _tamper(source, V2)
  for _ in range(2):  # retried, and refused, every sync
    result = _sync(keys, source, str(serving_base), keep=1)
    assert _summary(result) == [('failed', V2), ('kept', V1)]
    assert result.failed[0].error == 'TamperedPackageError'
    assert _versions(serving_base) == [V1]
    assert _util.read_tree(serving_base / V1) == _util.read_tree(good)
    assert not [n for n in os.listdir(serving_base)
                if n.startswith((serving.TMP_PREFIX, serving.OLD_PREFIX))]
  # An installed version is not read again: tampering with its source
  # afterwards changes nothing that is served.
  _tamper(source, V1)
  result = _sync(keys, source, str(serving_base), keep=1)
  assert _summary(result) == [('failed', V2), ('kept', V1)]
  assert _util.read_tree(serving_base / V1) == _util.read_tree(good)


def test_version_withdrawn_from_the_source(keys, tmp_path, source):
  """The same on every source: a withdrawn (or, on a store, header-less)
  version is absent; an installed copy newer than the kept ones stays
  (docs/RUNTIME.md), an older one is removed, as any installed version."""
  for v in (V1, V2, V3):
    _push(keys, tmp_path, source, v)
  serving_base = tmp_path / 'serving'
  assert _summary(_sync(keys, source, str(serving_base), keep=2)) == [
      ('installed', V3), ('installed', V2)]
  _delete(source, V3)
  result = _sync(keys, source, str(serving_base), keep=2)
  assert _summary(result) == [('kept', V2), ('installed', V1)]
  assert _versions(serving_base) == [V1, V2, V3]
  # Only the header withdrawn: absent the same way, and reported.
  header = storage.join(source, V2, package_lib.HEADER_NAME)
  storage.delete(header)
  _push(keys, tmp_path, source, V4)
  result = _sync(keys, source, str(serving_base), keep=2)
  assert _summary(result) == [('installed', V4), ('incomplete', V2),
                              ('kept', V1)]
  assert _versions(serving_base) == [V1, V2, V3, V4]
  # Older than the kept ones: removed, withdrawn or not (serve-sync
  # installed them).
  _delete(source, V1)
  _push(keys, tmp_path, source, '1700000005')
  result = _sync(keys, source, str(serving_base), keep=2)
  assert _summary(result) == [('installed', '1700000005'), ('kept', V4),
                              ('removed', V1), ('removed', V2),
                              ('removed', V3)]
  assert _versions(serving_base) == [V4, '1700000005']


@pytest.mark.parametrize('scheme', ['s3', 'gs'])
def test_hostile_object_names_are_escaped_and_never_used(
    keys, tmp_path, scheme, request, caplog):
  store = request.getfixturevalue(f'{scheme}_store')
  source = store.new_base()
  _push(keys, tmp_path, source, V1)
  # A bundle whose name carries a bidi override and a line separator.
  storage.put(storage.join(source, V2, 'evil\u202e\u2028x.tfxe'), b'x')
  # Objects that are neither a package nor a push in progress.
  storage.put(storage.join(source, V3, 'payload', '00000000'), b'x')
  storage.put(storage.join(source, V3, 'notes\u202e.txt'), b'x')
  # Not canonical version numbers: never a version (TF Serving would read
  # 01700000004 as 1700000004); nor a name that is not all digits.
  storage.put(storage.join(source, '0' + V4, 'tfxe.header'), b'x')
  storage.put(storage.join(source, '0' + V4, 'payload', '00000000'), b'x')
  storage.put(storage.join(source, '1' * 20, 'tfxe.header'), b'x')
  storage.put(storage.join(source, '17\u202e', 'tfxe.header'), b'x')
  storage.put(storage.join(source, '.tmp-1', 'tfxe.header'), b'x')
  # Empty "folder" objects (consoles, gsutil, tf.io.gfile.makedirs).
  storage.put(source + '/', b'')
  storage.put(storage.join(source, V4) + '/', b'')
  serving_base = tmp_path / 'serving'
  with caplog.at_level('WARNING', logger=serving.__name__):
    result = _sync(keys, source, str(serving_base), keep=3)
  assert _summary(result) == [('failed', V3), ('failed', V2),
                              ('installed', V1)]
  ignored = [r.getMessage().split()[2] for r in caplog.records
             if 'not a canonical version' in r.getMessage()]
  assert sorted(ignored) == sorted(['0' + V4, '1' * 20])  # once each
  failed = {a.version: a for a in result.failed}
  assert failed[V2].error == 'UnsafePathError'
  assert failed[V3].error == 'UnsupportedFormatError'
  for a in result.actions:
    line = a.line()
    assert '\u202e' not in line and '\u2028' not in line
  assert '\\u202e' in failed[V2].line()
  assert _versions(serving_base) == [V1]
  p = _cli('serve-sync', source, serving_base, '--identity', keys.priv('x'),
           '--trust', keys.pub('ed'), '--keep', '3', '--once')
  assert p.returncode == 1
  assert '\u202e' not in p.stdout + p.stderr
  assert '\u2028' not in p.stdout + p.stderr
  assert p.stdout.splitlines()[-1].startswith(f'kept {V1}')


@pytest.mark.parametrize('scheme', ['s3', 'gs'])
def test_cli_missing_bucket_is_one_line_exit_9(keys, tmp_path, scheme,
                                               request):
  request.getfixturevalue(f'{scheme}_store')
  p = _cli('serve-sync', f'{scheme}://no-such-bucket-tfxe/models',
           tmp_path / 'serving', '--identity', keys.priv('x'), '--trust',
           keys.pub('ed'), '--once')
  assert p.returncode == 9, (p.stdout, p.stderr)
  assert p.stdout == '' and len(p.stderr.splitlines()) == 1, p.stderr
  assert 'no-such-bucket-tfxe' in p.stderr
  assert not [n for n in os.listdir(tmp_path / 'serving')
              if n not in (serving.LOCK_NAME,)]


def test_cli_interval_reports_an_incomplete_version_once(keys, tmp_path,
                                                         source):
  _push(keys, tmp_path, source, V1)
  _push(keys, tmp_path, source, V2, header=False)
  serving_base = tmp_path / 'serving'
  p = subprocess.Popen(
      [sys.executable, '-m', 'tfx_encrypt', 'serve-sync', source,
       str(serving_base), '--identity', keys.priv('x'), '--trust',
       keys.pub('ed'), '--interval', '0.2'],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 60
    while not (serving_base / V1).exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    assert (serving_base / V1).exists()
    time.sleep(1.5)  # several iterations with V2 still incomplete
    assert not (serving_base / V2).exists()
    _commit(tmp_path, source, V2)
    while not (serving_base / V2).exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    assert (serving_base / V2).exists()
  finally:
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
  assert p.returncode == 128 + signal.SIGTERM, err
  lines = out.splitlines()
  assert [l.split(' ')[:2] for l in lines] == [
      ['incomplete', V2], ['installed', V1], ['installed', V2]], out
