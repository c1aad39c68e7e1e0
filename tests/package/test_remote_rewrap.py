"""rewrap in place on s3:// and gs:// (docs/OBJECT_STORES.md, "rewrap in place").

Against moto's standalone server (s3://, real boto3; moto enforces If-Match
on PutObject) and gcp-storage-emulator with the TEST-ONLY precondition
patch (gs://, real google-cloud-storage; tests/fakes/gcs_emulator.py). The
header object is the commit point: it is replaced only if it is still the
version that was read and verified; the payload objects are never touched;
the trust rules are rewrap's own (tests/package/test_rewrap_trust.py).
"""

import multiprocessing
import os

import click.testing
import pytest

import tfx_encrypt as te
from tfx_encrypt import cli
from tfx_encrypt import errors
from tfx_encrypt import storage
from tests import _util

MODEL = {'saved_model.pb': 700, 'variables/variables.index': 50,
         'variables/variables.data-00000-of-00001': (1 << 20) + 70_000}


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  return _util.make_tree(tmp_path_factory.mktemp('model') / 'm', MODEL)


@pytest.fixture(params=['s3', 'gs'])
def store(request):
  return request.getfixturevalue(f'{request.param}_store')


def _remote(tmp_path, keys, model, store, signer='ed', bundle=False,
            name='p', **kw):
  local = tmp_path / (name + ('.tfxe' if bundle else ''))
  if not local.exists():
    te.encrypt_model(model, local, signer=keys.priv(signer) if signer else None,
                     bundle=bundle, **(kw or {'recipients': [keys.pub('x')]}))
  uri = storage.join(store.new_base(), name + ('.tfxe' if bundle else ''))
  _util.upload_package(str(local), uri)
  return uri


def _header(uri):
  with storage.open_reader(storage.join(uri, 'tfxe.header')) as r:
    return r.read_range(0, r.size), r.version


class Snapshot:
  """Every object under (and at) a package URI: name, size, version."""

  def __init__(self, uri):
    self.uri = uri
    self.objects = self.now()

  def now(self):
    return {n: (i.size, i.version)
            for n, i in storage.list_objects(self.uri).items()}

  def unchanged(self):
    assert self.now() == self.objects

  def payloads_unchanged(self):
    now = self.now()
    assert set(now) == set(self.objects)
    assert {n: v for n, v in now.items() if n != 'tfxe.header'} == {
        n: v for n, v in self.objects.items() if n != 'tfxe.header'}


def _decrypts(uri, tmp_path, model, ident, trusted):
  out = tmp_path / f'out-{len(os.listdir(tmp_path))}'
  te.decrypt_model(uri, out, identities=[ident], trusted=trusted,
                   allow_unsigned=not trusted)
  assert _util.read_tree(out) == _util.read_tree(model)


# --- it works, and touches the header only --------------------------------------

def test_rewrap_in_place_replaces_only_the_header(tmp_path, keys, model,
                                                  store):
  uri = _remote(tmp_path, keys, model, store)
  snap = Snapshot(uri)
  old_header, old_version = _header(uri)
  ident = _util.CountingKey(keys.priv('x'))
  info = te.rewrap_package(uri, identities=[ident],
                           add_recipients=[keys.pub('x2')],
                           remove_recipients=[keys.pub('x')],
                           signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert ident.calls == 1
  assert info.path == uri and not info.bundle and info.signature_verified
  assert [r['key_id'] for r in info.recipients] == [
      te.inspect_package(uri).recipients[0]['key_id']]
  snap.payloads_unchanged()  # same names, sizes and versions
  new_header, new_version = _header(uri)
  assert new_header != old_header and new_version != old_version
  assert te.verify_package(uri, trusted=[keys.pub('ed')]).signature_verified
  _decrypts(uri, tmp_path, model, keys.priv('x2'), [keys.pub('ed')])
  with pytest.raises(errors.NoMatchingKeyError):
    te.decrypt_model(uri, tmp_path / 'no', identities=[keys.priv('x')],
                     trusted=[keys.pub('ed')])
  # Nothing next to the package either (no temporary object).
  assert storage.list_names(uri.rsplit('/', 1)[0]) == sorted(
      'p/' + n for n in snap.objects)


def test_rewrap_in_place_with_key_groups(tmp_path, keys, model, store):
  uri = _remote(tmp_path, keys, model, store, name='g',
                key_groups=[[keys.pub('x')], [keys.pub('x2')]], threshold=2)
  snap = Snapshot(uri)
  info = te.rewrap_package(uri, identities=[keys.priv('x'), keys.priv('x2')],
                           add_recipients=[keys.pub('rsa')], add_to_group=1,
                           remove_recipients=[keys.pub('x2')],
                           signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert info.threshold['k'] == 2
  snap.payloads_unchanged()
  te.decrypt_model(uri, tmp_path / 'o', identities=[keys.priv('x'),
                                                    keys.priv('rsa')],
                   trusted=[keys.pub('ed')])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)
  with pytest.raises(errors.NoMatchingKeyError):
    te.decrypt_model(uri, tmp_path / 'o2', identities=[keys.priv('x'),
                                                       keys.priv('x2')],
                     trusted=[keys.pub('ed')])


# --- the trust rules are rewrap's own -----------------------------------------

def test_untrusted_signer_refused_before_any_key_call(tmp_path, keys, model,
                                                      store):
  uri = _remote(tmp_path, keys, model, store, signer='evil')
  snap = Snapshot(uri)
  for kw in ({'trusted': [keys.pub('ed')]}, {'allow_unsigned': True},
             {'trusted': [keys.pub('ed')], 'allow_unsigned': True,
              'resign_unsigned': True}):
    ident = _util.CountingKey(keys.priv('x'))
    with pytest.raises(errors.UntrustedSignerError):
      te.rewrap_package(uri, identities=[ident],
                        add_recipients=[keys.pub('x2')],
                        signer=keys.priv('ed'), **kw)
    assert ident.calls == 0
  snap.unchanged()


def test_signed_package_needs_sign_with(tmp_path, keys, model, store):
  uri = _remote(tmp_path, keys, model, store)
  snap = Snapshot(uri)
  ident = _util.CountingKey(keys.priv('x'))
  with pytest.raises(errors.UsageError, match='--sign-with'):
    te.rewrap_package(uri, identities=[ident], add_recipients=[keys.pub('x2')],
                      trusted=[keys.pub('ed')])
  with pytest.raises(errors.UsageError, match='say whom you trust'):
    te.rewrap_package(uri, identities=[ident], add_recipients=[keys.pub('x2')],
                      signer=keys.priv('ed'))
  assert ident.calls == 0
  snap.unchanged()


def test_unsigned_resigned_only_with_resign_unsigned(tmp_path, keys, model,
                                                     store):
  uri = _remote(tmp_path, keys, model, store, signer=None)
  snap = Snapshot(uri)
  ident = _util.CountingKey(keys.priv('x'))
  with pytest.raises(errors.UsageError, match='resign-unsigned'):
    te.rewrap_package(uri, identities=[ident], add_recipients=[keys.pub('x2')],
                      signer=keys.priv('ed'), allow_unsigned=True)
  with pytest.raises(errors.UntrustedSignerError, match='not signed'):
    te.rewrap_package(uri, identities=[ident], add_recipients=[keys.pub('x2')],
                      signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert ident.calls == 0
  snap.unchanged()
  # Unsigned stays unsigned without a signer.
  info = te.rewrap_package(uri, identities=[keys.priv('x')],
                           add_recipients=[keys.pub('x2')],
                           allow_unsigned=True)
  assert info.signer is None and te.inspect_package(uri).signer is None
  # Re-signed with resign_unsigned (a warning is logged, as locally).
  info = te.rewrap_package(uri, identities=[keys.priv('x2')],
                           add_recipients=[keys.pub('rsa')],
                           signer=keys.priv('ed'), allow_unsigned=True,
                           resign_unsigned=True)
  assert info.signature_verified
  snap.payloads_unchanged()
  _decrypts(uri, tmp_path, model, keys.priv('rsa'), [keys.pub('ed')])


# --- a bundle: the one object written anew, only if unchanged -------------------

MiB = 1 << 20

# Payload under 5 MiB (one conditional request, in memory) and over it
# (S3: part 1 = header + payload bytes to 5 MiB, then UploadPartCopy of the
# rest; GCS: the payload streamed into a temporary, then compose).
BIG_MODEL = {'saved_model.pb': 700, 'variables/variables.index': 50,
             'variables/variables.data-00000-of-00001': 11 * MiB + 70_001}


@pytest.fixture(scope='module')
def big_model(tmp_path_factory):
  return _util.make_tree(tmp_path_factory.mktemp('bigmodel') / 'm', BIG_MODEL)


def _read(uri):
  with storage.open_reader(uri) as r:
    return r.read_range(0, r.size), r.version


def _bundle_parts(uri):
  """(header length, header bytes, payload bytes) of the bundle at `uri`."""
  data, _ = _read(uri)
  hlen = te.inspect_package(uri).header_bytes
  return hlen, data[:hlen], data[hlen:]


def everything(uri):
  """Every object in the bucket of `uri`, and (S3) every multipart upload
  still open: a rewrap must leave no temporary behind."""
  s, bucket, _ = storage.split(uri)
  names = storage.list_names(f'{s}://{bucket}')
  uploads = []
  if s == 's3':
    uploads = storage._s3().list_multipart_uploads(Bucket=bucket).get(  # pylint: disable=protected-access
        'Uploads', [])
  return names, uploads


def _spy_copies(store, monkeypatch):
  calls = []
  if store.scheme == 's3':
    client = storage._s3()  # pylint: disable=protected-access
    real = client.upload_part_copy

    def spy(**a):
      calls.append(a['CopySourceRange'])
      return real(**a)
    monkeypatch.setattr(client, 'upload_part_copy', spy)
  return calls


@pytest.mark.parametrize('size', ['small', 'big'])
def test_rewrap_of_a_bundle_in_place(tmp_path, keys, model, big_model, store,
                                     size, monkeypatch):
  """A recipient added and one removed: the bundle's header changes (and
  its length), its payload bytes are byte-identical, it decrypts to the
  model; nothing else is left in the bucket, no upload open."""
  m = model if size == 'small' else big_model
  uri = _remote(tmp_path, keys, m, store, bundle=True, name=size)
  old_len, old_header, old_payload = _bundle_parts(uri)
  assert (len(old_payload) < 5 * MiB) == (size == 'small')
  _, old_version = _read(uri)
  copies = _spy_copies(store, monkeypatch)
  ident = _util.CountingKey(keys.priv('x'))
  info = te.rewrap_package(uri, identities=[ident],
                           add_recipients=[keys.pub('x2'), keys.pub('rsa')],
                           remove_recipients=[keys.pub('x')],
                           signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  monkeypatch.undo()
  assert ident.calls == 1
  assert info.bundle and info.path == uri and info.signature_verified
  assert len(info.recipients) == 2
  if store.scheme == 's3' and size == 'big':
    assert copies  # the payload beyond part 1 was copied server-side
  else:
    assert not copies
  new_len, new_header, new_payload = _bundle_parts(uri)
  assert new_len != old_len and new_header != old_header
  assert new_payload == old_payload  # the ciphertext, byte for byte
  assert _read(uri)[1] != old_version
  assert everything(uri) == ([uri.split('/', 3)[3]], [])
  assert te.verify_package(uri, trusted=[keys.pub('ed')]).signature_verified
  _decrypts(uri, tmp_path, m, keys.priv('x2'), [keys.pub('ed')])
  _decrypts(uri, tmp_path, m, keys.priv('rsa'), [keys.pub('ed')])
  with pytest.raises(errors.NoMatchingKeyError):
    te.decrypt_model(uri, tmp_path / 'no', identities=[keys.priv('x')],
                     trusted=[keys.pub('ed')])
  # And back: removing the added ones, re-adding x (shorter header again).
  te.rewrap_package(uri, identities=[keys.priv('x2')],
                    add_recipients=[keys.pub('x')],
                    remove_recipients=[keys.pub('x2'), keys.pub('rsa')],
                    signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert _bundle_parts(uri)[2] == old_payload
  _decrypts(uri, tmp_path, m, keys.priv('x'), [keys.pub('ed')])
  assert everything(uri) == ([uri.split('/', 3)[3]], [])


def test_a_bundle_with_key_groups(tmp_path, keys, model, store):
  uri = _remote(tmp_path, keys, model, store, bundle=True, name='kg',
                key_groups=[[keys.pub('x')], [keys.pub('x2')]], threshold=2)
  payload = _bundle_parts(uri)[2]
  te.rewrap_package(uri, identities=[keys.priv('x'), keys.priv('x2')],
                    add_recipients=[keys.pub('rsa')], add_to_group=1,
                    remove_recipients=[keys.pub('x2')],
                    signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert _bundle_parts(uri)[2] == payload
  te.decrypt_model(uri, tmp_path / 'o', identities=[keys.priv('x'),
                                                    keys.priv('rsa')],
                   trusted=[keys.pub('ed')])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(model)


def test_a_bundle_untrusted_refused_before_any_key_call(tmp_path, keys, model,
                                                        store):
  uri = _remote(tmp_path, keys, model, store, bundle=True, signer='evil')
  before = storage.list_objects(uri.rsplit('/', 1)[0])
  ident = _util.CountingKey(keys.priv('x'))
  with pytest.raises(errors.UntrustedSignerError):
    te.rewrap_package(uri, identities=[ident], add_recipients=[keys.pub('x2')],
                      signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert ident.calls == 0
  assert storage.list_objects(uri.rsplit('/', 1)[0]) == before


def _rival_bundle(tmp_path, keys, m, name):
  """The bytes of the same bundle as a rival rewrap (adding 'rsa') left
  it: valid, and different from what ours writes."""
  local = tmp_path / (name + '.tfxe')
  rival = tmp_path / (name + '-rival.tfxe')
  with open(local, 'rb') as f, open(rival, 'wb') as g:
    g.write(f.read())
  te.rewrap_package(rival, identities=[keys.priv('x')],
                    add_recipients=[keys.pub('rsa')],
                    signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  with open(rival, 'rb') as f:
    return f.read()


def _hook_midway(store, monkeypatch, action):
  """Run `action()` in the middle of the bundle's rewrite, after bytes of
  the old object were read or copied: S3, at the first UploadPartCopy
  (the big bundle: part 1 was uploaded, pinned reads done); GCS, right
  before the compose (the payload temporary is complete)."""
  if store.scheme == 's3':
    client = storage._s3()  # pylint: disable=protected-access
    real = client.upload_part_copy
    done = []

    def hooked(**a):
      if not done:
        done.append(1)
        action()
      return real(**a)
    monkeypatch.setattr(client, 'upload_part_copy', hooked)
  else:
    from google.cloud.storage import blob as blob_mod  # pylint: disable=g-import-not-at-top
    real = blob_mod.Blob.compose

    def hooked(self, *a, **k):
      action()
      return real(self, *a, **k)
    monkeypatch.setattr(blob_mod.Blob, 'compose', hooked)


@pytest.mark.parametrize('size,when', [('small', 'before'),
                                       ('big', 'before'), ('big', 'midway')])
def test_a_bundle_replaced_between_read_and_write(tmp_path, keys, model,
                                                  big_model, store, size,
                                                  when, monkeypatch):
  """Another writer replaces the bundle after rewrap read and verified it
  (before the rewrite starts, or in its middle): nothing of ours is
  written, the rival's bundle stays, no temporary or upload is left."""
  m = model if size == 'small' else big_model
  name = f'{size}-{when}'
  uri = _remote(tmp_path, keys, m, store, bundle=True, name=name)
  rival = _rival_bundle(tmp_path, keys, m, name)
  from tfx_encrypt.storage import _bundle  # pylint: disable=g-import-not-at-top
  if when == 'before':
    real = _bundle.rewrite_bundle_header
    seen = []

    def hooked(u, *a):
      seen.append(u)
      storage.put(u, rival)
      return real(u, *a)
    monkeypatch.setattr(_bundle, 'rewrite_bundle_header', hooked)
  else:
    _hook_midway(store, monkeypatch, lambda: storage.put(uri, rival))
  with pytest.raises(storage.ObjectChangedError,
                     match='nothing was replaced') as e:
    te.rewrap_package(uri, identities=[keys.priv('x')],
                      add_recipients=[keys.pub('x2')],
                      signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert isinstance(e.value, errors.TamperedPackageError)  # exit 4
  assert '\n' not in str(e.value)
  monkeypatch.undo()
  if when == 'before':
    assert seen == [uri]
  assert _read(uri)[0] == rival
  assert everything(uri) == ([uri.split('/', 3)[3]], [])
  _decrypts(uri, tmp_path, m, keys.priv('rsa'), [keys.pub('ed')])
  with pytest.raises(errors.NoMatchingKeyError):  # our change was not made
    te.decrypt_model(uri, tmp_path / 'no', identities=[keys.priv('x2')],
                     trusted=[keys.pub('ed')])


def test_a_bundle_removed_before_the_write(tmp_path, keys, model, store,
                                           monkeypatch):
  uri = _remote(tmp_path, keys, model, store, bundle=True)
  from tfx_encrypt.storage import _bundle  # pylint: disable=g-import-not-at-top
  real = _bundle.rewrite_bundle_header

  def hooked(u, *a):
    storage.delete(u)
    return real(u, *a)
  monkeypatch.setattr(_bundle, 'rewrite_bundle_header', hooked)
  with pytest.raises(storage.ObjectChangedError, match='nothing was replaced'):
    te.rewrap_package(uri, identities=[keys.priv('x')],
                      add_recipients=[keys.pub('x2')],
                      signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  monkeypatch.undo()
  assert everything(uri) == ([], [])  # not created again


@pytest.mark.parametrize('exc', [ConnectionError('store went away'),
                                 KeyboardInterrupt()],
                         ids=['error', 'interrupt'])
def test_a_bundle_rewrite_failing_midway_leaves_it_unchanged(
    tmp_path, keys, big_model, store, exc, monkeypatch):
  """A failure (or an interrupt) in the middle of the rewrite: the bundle
  is the old one (same version), the multipart upload is aborted / the
  temporaries deleted; a second rewrap then succeeds."""
  uri = _remote(tmp_path, keys, big_model, store, bundle=True, name='fail')
  before, version = _read(uri)

  def boom():
    raise exc
  _hook_midway(store, monkeypatch, boom)
  with pytest.raises(type(exc)):
    te.rewrap_package(uri, identities=[keys.priv('x')],
                      add_recipients=[keys.pub('x2')],
                      signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  monkeypatch.undo()
  assert _read(uri) == (before, version)
  assert everything(uri) == ([uri.split('/', 3)[3]], [])
  te.rewrap_package(uri, identities=[keys.priv('x')],
                    add_recipients=[keys.pub('x2')],
                    signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  _decrypts(uri, tmp_path, big_model, keys.priv('x2'), [keys.pub('ed')])
  assert everything(uri) == ([uri.split('/', 3)[3]], [])


# --- a concurrent change between read and write: nothing replaced ------------

def _rival_header(tmp_path, keys, model, store, recipient):
  """The header a rival rewrap of the same package (adding `recipient`)
  committed: valid, and different from ours."""
  uri = _remote(tmp_path, keys, model, store)
  te.rewrap_package(uri, identities=[keys.priv('x')],
                    add_recipients=[keys.pub(recipient)],
                    signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  return _header(uri)[0]


def _replace_before_write(monkeypatch, action):
  """Run `action(uri)` right before rewrap's conditional write: after the
  header was read, verified and the key calls made."""
  real = storage.put_if_unchanged
  seen = []

  def hooked(uri, data, version):
    seen.append(uri)
    action(uri)
    return real(uri, data, version)
  monkeypatch.setattr(storage, 'put_if_unchanged', hooked)
  return seen


def test_header_replaced_between_read_and_write(tmp_path, keys, model, store,
                                                monkeypatch):
  rival = _rival_header(tmp_path, keys, model, store, 'rsa')
  uri = _remote(tmp_path, keys, model, store)
  snap = Snapshot(uri)
  seen = _replace_before_write(monkeypatch, lambda u: storage.put(u, rival))
  with pytest.raises(storage.ObjectChangedError,
                     match='nothing was replaced') as e:
    te.rewrap_package(uri, identities=[keys.priv('x')],
                      add_recipients=[keys.pub('x2')],
                      signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  assert isinstance(e.value, errors.TamperedPackageError)  # exit 4
  assert seen == [storage.join(uri, 'tfxe.header')]
  monkeypatch.undo()
  assert _header(uri)[0] == rival  # the rival's header stays
  snap.payloads_unchanged()
  _decrypts(uri, tmp_path, model, keys.priv('rsa'), [keys.pub('ed')])
  with pytest.raises(errors.NoMatchingKeyError):  # our change was not made
    te.decrypt_model(uri, tmp_path / 'no', identities=[keys.priv('x2')],
                     trusted=[keys.pub('ed')])


def test_header_removed_between_read_and_write(tmp_path, keys, model, store,
                                               monkeypatch):
  uri = _remote(tmp_path, keys, model, store)
  snap = Snapshot(uri)
  _replace_before_write(monkeypatch, storage.delete)
  with pytest.raises(storage.ObjectChangedError, match='nothing was replaced'):
    te.rewrap_package(uri, identities=[keys.priv('x')],
                      add_recipients=[keys.pub('x2')],
                      signer=keys.priv('ed'), trusted=[keys.pub('ed')])
  monkeypatch.undo()
  # Not created again: the payloads are an incomplete package now.
  assert not storage.exists(storage.join(uri, 'tfxe.header'))
  assert {n: v for n, v in snap.now().items()} == {
      n: v for n, v in snap.objects.items() if n != 'tfxe.header'}
  with pytest.raises(errors.UnsupportedFormatError, match='incomplete'):
    te.inspect_package(uri)


def _race_child(uri, env, barrier, recipient, keydir, results):
  os.environ.update(env)
  storage.reset_clients()
  keys = _util.Keys.__new__(_util.Keys)
  keys.dir = keydir
  real = storage.put_if_unchanged

  def after_everyone_read(u, data, version):
    barrier.wait(60)  # both have read and verified the same header version
    return real(u, data, version)
  storage.put_if_unchanged = after_everyone_read
  try:
    te.rewrap_package(uri, identities=[keys.priv('x')],
                      add_recipients=[keys.pub(recipient)],
                      signer=keys.priv('ed'), trusted=[keys.pub('ed')])
    results.put((recipient, 'won'))
  except storage.ObjectChangedError as e:
    results.put((recipient, f'refused: {e}'))
  except BaseException as e:  # pylint: disable=broad-except
    results.put((recipient, f'error: {type(e).__name__}: {e}'))


def test_two_processes_racing_rewraps_one_wins(tmp_path, keys, model, store):
  """Two processes rewrap the same package at once (each adds its own
  recipient): exactly one header is committed, the other process fails
  cleanly, and the package is exactly the winner's."""
  env = {k: v for k, v in os.environ.items()
         if k.startswith(('AWS_', 'STORAGE_EMULATOR_HOST', 'GOOGLE_'))}
  ctx = multiprocessing.get_context('spawn')
  for round_ in range(3):
    uri = _remote(tmp_path, keys, model, store, name=f'r{round_}')
    snap = Snapshot(uri)
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_child,
                         args=(uri, env, barrier, r, keys.dir, results))
             for r in ('x2', 'rsa')]
    for p in procs:
      p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
      p.join(60)
      assert p.exitcode == 0
    won = [r for r, what in got.items() if what == 'won']
    assert len(won) == 1, got
    lost = ({'x2', 'rsa'} - set(won)).pop()
    assert got[lost].startswith('refused: ') and (
        'nothing was replaced' in got[lost]), got
    snap.payloads_unchanged()
    _decrypts(uri, tmp_path, model, keys.priv(won[0]), [keys.pub('ed')])
    with pytest.raises(errors.NoMatchingKeyError):
      te.decrypt_model(uri, tmp_path / f'no{round_}',
                       identities=[keys.priv(lost)], trusted=[keys.pub('ed')])


# --- CLI --------------------------------------------------------------------------

def test_cli_rewrap_in_place(tmp_path, keys, model, store, monkeypatch):
  uri = _remote(tmp_path, keys, model, store)
  snap = Snapshot(uri)
  runner = click.testing.CliRunner()
  r = runner.invoke(cli.main, ['rewrap', uri, '-i', keys.priv('x'),
                               '--add-recipient', keys.pub('x2'),
                               '--sign-with', keys.priv('ed'),
                               '--trust', keys.pub('ed')])
  assert r.exit_code == 0, r.output
  assert r.output.startswith('rewrapped ')
  snap.payloads_unchanged()
  _decrypts(uri, tmp_path, model, keys.priv('x2'), [keys.pub('ed')])
  # Trust: an untrusted publisher is refused (exit 6), nothing changed.
  snap = Snapshot(uri)
  r = runner.invoke(cli.main, ['rewrap', uri, '-i', keys.priv('x'),
                               '--add-recipient', keys.pub('rsa'),
                               '--sign-with', keys.priv('ed'),
                               '--trust', keys.pub('evil')])
  assert r.exit_code == 6, r.output
  snap.unchanged()
  # A concurrent change: exit 4, one line, nothing replaced.
  rival = _rival_header(tmp_path, keys, model, store, 'rsa')
  _replace_before_write(monkeypatch, lambda u: storage.put(u, rival))
  r = runner.invoke(cli.main, ['rewrap', uri, '-i', keys.priv('x'),
                               '--add-recipient', keys.pub('x2'),
                               '--sign-with', keys.priv('ed'),
                               '--trust', keys.pub('ed')])
  monkeypatch.undo()
  assert r.exit_code == 4, r.output
  lines = r.output.strip().splitlines()
  assert len(lines) == 1 and 'nothing was replaced' in lines[0], lines
  assert _header(uri)[0] == rival
  # A bundle on the store: rewrapped in place too.
  buri = _remote(tmp_path, keys, model, store, bundle=True)
  r = runner.invoke(cli.main, ['rewrap', buri, '-i', keys.priv('x'),
                               '--add-recipient', keys.pub('x2'),
                               '--sign-with', keys.priv('ed'),
                               '--trust', keys.pub('ed')])
  assert r.exit_code == 0, r.output
  assert r.output.startswith('rewrapped ')
  _decrypts(buri, tmp_path, model, keys.priv('x2'), [keys.pub('ed')])


def test_moto_ignores_if_match_on_complete_multipart_upload(s3_store):
  """Measured, so that a moto that starts enforcing it shows up: moto 5.2.5
  checks only `If-None-Match: *` on CompleteMultipartUpload (and nothing
  on UploadPartCopy's `x-amz-copy-source-if-match`), so a bundle rewrite
  checks the ETag with HeadObject right before completing
  (docs/OBJECT_STORES.md, "Rewrap in place"); real S3 refuses with 412."""
  base = s3_store.new_base()
  _, bucket, key = storage.split(storage.join(base, 'o'))
  c = storage._s3()  # pylint: disable=protected-access
  c.put_object(Bucket=bucket, Key=key, Body=b'old')
  upload_id = c.create_multipart_upload(Bucket=bucket, Key=key)['UploadId']
  etag = c.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                       PartNumber=1, Body=b'new')['ETag']
  c.complete_multipart_upload(
      Bucket=bucket, Key=key, UploadId=upload_id, IfMatch='"not-the-etag"',
      MultipartUpload={'Parts': [{'PartNumber': 1, 'ETag': etag}]})
  assert c.get_object(Bucket=bucket, Key=key)['Body'].read() == b'new'
