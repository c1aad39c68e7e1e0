"""OCI push from, and pull into, `s3://` and `gs://` packages.

The real CNCF distribution registry (`docker-registry`, as in test_oci.py)
and the object-store emulators on loopback: moto's standalone server for
`s3://` (real boto3), gcp-storage-emulator with the TEST-ONLY precondition
patch for `gs://` (real google-cloud-storage); tests/fakes/stores.py.
"""

import os
import subprocess
import sys
import tempfile

import pytest

from tests._util import read_tree
from tests.distribution.test_oci import (  # noqa: F401  pylint: disable=unused-import
    _encrypt, keys, model, registry)
from tfx_encrypt import errors
from tfx_encrypt import package as pkg
from tfx_encrypt import storage
from tfx_encrypt.distribution import oci

pytestmark = pytest.mark.integration


@pytest.fixture(params=['s3', 'gs'])
def store(request):
  return request.getfixturevalue(f'{request.param}_store')


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
  """tempfile's directory for this test, to see what a pull stages there."""
  d = tmp_path / 'tmpdir'
  d.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(d))
  return d


def _upload(local, uri, header=True):
  """A push to the store: payload objects, then the header (or the bundle
  object) create-only; without `header`, an incomplete push."""
  if os.path.isfile(local):
    with open(local, 'rb') as f:
      storage.put_create_only(uri, f)
    return
  pdir = os.path.join(local, pkg.PAYLOAD_DIR)
  for name in sorted(os.listdir(pdir)):
    with open(os.path.join(pdir, name), 'rb') as f:
      storage.put(storage.join(uri, pkg.PAYLOAD_DIR, name), f)
  if header:
    with open(os.path.join(local, pkg.HEADER_NAME), 'rb') as f:
      storage.put_create_only(storage.join(uri, pkg.HEADER_NAME), f)


def _layer_digest(registry, repo, tag):  # noqa: F811
  return registry.manifest(repo, tag)['layers'][0]['digest']


@pytest.mark.parametrize('bundle', [False, True], ids=['directory', 'bundle'])
def test_push_from_store_and_pull_into_store(registry, keys, model, tmp_path,  # noqa: F811
                                             store, bundle, private_tmp):
  local = _encrypt(model, keys, tmp_path / ('m.tfxe' if bundle else 'm.pkg'),
                   bundle=bundle)
  base = store.new_base()
  src = storage.join(base, '7' + ('.tfxe' if bundle else ''))
  _upload(local, src)
  repo = f'models/{store.scheme}-{"b" if bundle else "d"}'
  digest = oci.push_package(src, registry.ref(f'{repo}:remote'),
                            insecure=True)
  # The layer is byte for byte what a push of the local package uploads.
  oci.push_package(local, registry.ref(f'{repo}:local'), insecure=True)
  assert _layer_digest(registry, repo, 'remote') == _layer_digest(
      registry, repo, 'local')
  assert registry.manifest(repo, 'remote')['layers'][0]['annotations'][
      oci.TITLE_ANNOTATION] == '7.tfxe'

  # Pull into the store: the directory form (as EncryptPusher pushes) ...
  out = storage.join(base, 'pulled', '8')
  res = oci.pull_package(registry.ref(f'{repo}:remote'), out,
                         trusted=[keys.pub('ed')], insecure=True)
  assert res.manifest_digest == digest
  assert (res.info.path, res.info.bundle) == (out, False)
  n = pkg.inspect_package(local).file_count
  assert storage.list_names(out) == sorted([pkg.HEADER_NAME] + [
      f'{pkg.PAYLOAD_DIR}/{pkg.payload_name(i)}' for i in range(n)])
  pkg.decrypt_model(out, tmp_path / 'plain', identities=[keys.priv('x')],
                    trusted=[keys.pub('ed')])
  assert read_tree(tmp_path / 'plain') == read_tree(model)
  # ... or one bundle object.
  out_b = storage.join(base, 'pulled', '9.tfxe')
  res = oci.pull_package(registry.ref(f'{repo}:remote'), out_b,
                         trusted=[keys.pub('ed')], insecure=True)
  assert res.info.bundle is True
  assert storage.list_names(storage.join(base, 'pulled')) == sorted(
      ['9.tfxe'] + [f'8/{n}' for n in storage.list_names(out)])
  with storage.open_reader(out_b) as r:
    blob = r.read_range(0, r.size)
  assert blob == registry.blob(repo, _layer_digest(registry, repo, 'remote'))
  # Nothing replaced on a store; --force does not apply there.
  before = {u: storage.list_sizes(u) for u in (out,)}
  with pytest.raises(errors.OutputExistsError):
    oci.pull_package(registry.ref(f'{repo}:remote'), out,
                     trusted=[keys.pub('ed')], insecure=True)
  with pytest.raises(errors.OutputExistsError):
    oci.pull_package(registry.ref(f'{repo}:remote'), out_b,
                     trusted=[keys.pub('ed')], insecure=True)
  with pytest.raises(errors.UsageError, match='--force'):
    oci.pull_package(registry.ref(f'{repo}:remote'), out,
                     trusted=[keys.pub('ed')], insecure=True, force=True)
  with pytest.raises(errors.UsageError, match='inside the bucket'):
    oci.pull_package(registry.ref(f'{repo}:remote'),
                     f'{store.scheme}://{base.split("/")[2]}',
                     trusted=[keys.pub('ed')], insecure=True)
  assert {u: storage.list_sizes(u) for u in (out,)} == before
  assert os.listdir(private_tmp) == []  # the staging is gone


def test_push_refuses_incomplete_and_tampered_store_packages(
    registry, keys, model, tmp_path, store, monkeypatch):  # noqa: F811
  local = _encrypt(model, keys, tmp_path / 'm.pkg', bundle=False)
  base = store.new_base()
  incomplete = storage.join(base, '1')
  _upload(local, incomplete, header=False)
  with pytest.raises(errors.UnsupportedFormatError, match='incomplete'):
    oci.push_package(incomplete, registry.ref('models/incomplete:1'),
                     insecure=True)
  # Tampered ciphertext: the upload streams, but the manifest is never
  # pushed, so the tag never names it.
  tampered = storage.join(base, '2')
  _upload(local, tampered)
  sizes = storage.list_sizes(storage.join(tampered, pkg.PAYLOAD_DIR))
  victim = storage.join(tampered, pkg.PAYLOAD_DIR, max(sizes, key=sizes.get))
  with storage.open_reader(victim) as r:
    data = bytearray(r.read_range(0, r.size))
  data[len(data) // 2] ^= 1
  storage.put(victim, bytes(data))
  with pytest.raises(errors.TamperedPackageError, match='Nothing was tagged'):
    oci.push_package(tampered, registry.ref('models/tampered:1'),
                     insecure=True)
  # Replaced between the check and the stream (here: right after the
  # inspection): the streamed header must be the one inspected.
  swapped = storage.join(base, '3')
  _upload(local, swapped)
  other = _encrypt(model, keys, tmp_path / 'other.pkg', bundle=False)
  real_inspect = pkg.inspect_package

  def inspect_then_swap(uri):
    info = real_inspect(uri)
    with open(os.path.join(other, pkg.HEADER_NAME), 'rb') as f:
      storage.put(storage.join(swapped, pkg.HEADER_NAME), f.read())
    return info

  monkeypatch.setattr(pkg, 'inspect_package', inspect_then_swap)
  with pytest.raises(errors.TamperedPackageError, match='changed while'):
    oci.push_package(swapped, registry.ref('models/swapped:1'), insecure=True)
  monkeypatch.setattr(pkg, 'inspect_package', real_inspect)
  for name in ('incomplete', 'tampered', 'swapped'):
    with pytest.raises(oci.ArtifactNotFoundError):
      oci.pull_package(registry.ref(f'models/{name}:1'), tmp_path / 'x.tfxe',
                       trusted=[keys.pub('ed')], insecure=True)


def test_pull_into_store_refused_or_raced_leaves_nothing(
    registry, keys, model, tmp_path, store, private_tmp, monkeypatch):  # noqa: F811
  local = _encrypt(model, keys, tmp_path / 'm.pkg', bundle=False)
  ref = registry.ref(f'models/{store.scheme}-race:1')
  oci.push_package(local, ref, insecure=True)
  base = store.new_base()
  out = storage.join(base, '5')
  # Verified before anything is written: an untrusted publisher, a policy.
  with pytest.raises(errors.UntrustedSignerError):
    oci.pull_package(ref, out, trusted=[keys.pub('evil')], insecure=True)
  from tfx_encrypt import policy as policy_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.PolicyError):
    oci.pull_package(ref, out, trusted=[keys.pub('ed')], insecure=True,
                     policy=policy_lib.Policy({'model': 'other'}))
  assert storage.list_names(base) == []
  assert os.listdir(private_tmp) == []
  # Another writer commits the same OUT while the pull publishes: its
  # header wins (create-only), the pull deletes every payload it wrote.
  real = storage.put_create_only
  rival = b'another writer\n'

  def racing(uri, data):
    if uri.endswith('/' + pkg.HEADER_NAME):
      real(uri, rival)
    return real(uri, data)

  monkeypatch.setattr(storage, 'put_create_only', racing)
  with pytest.raises(errors.OutputExistsError):
    oci.pull_package(ref, out, trusted=[keys.pub('ed')], insecure=True)
  monkeypatch.setattr(storage, 'put_create_only', real)
  assert storage.list_names(out) == [pkg.HEADER_NAME]
  with storage.open_reader(storage.join(out, pkg.HEADER_NAME)) as r:
    assert r.read_range(0, r.size) == rival
  assert os.listdir(private_tmp) == []
  # ... or one of the payload objects: the pull stops there, deletes the
  # payloads it wrote and never writes its header; the rival's stays.
  out2 = storage.join(base, '6')
  second = f'{pkg.PAYLOAD_DIR}/{pkg.payload_name(1)}'

  def racing_payload(uri, data):
    if uri.endswith('/' + second):
      real(uri, rival)
    return real(uri, data)

  monkeypatch.setattr(storage, 'put_create_only', racing_payload)
  with pytest.raises(errors.OutputExistsError):
    oci.pull_package(ref, out2, trusted=[keys.pub('ed')], insecure=True)
  monkeypatch.setattr(storage, 'put_create_only', real)
  assert storage.list_names(out2) == [second]
  assert os.listdir(private_tmp) == []


def test_cli_push_from_and_pull_into_store(registry, keys, model, tmp_path,  # noqa: F811
                                           store):
  local = _encrypt(model, keys, tmp_path / 'm.pkg', bundle=False)
  base = store.new_base()
  src = storage.join(base, '3')
  _upload(local, src)
  ref = registry.ref(f'models/{store.scheme}-cli:3')

  def cli(*args):
    return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *args],
                          capture_output=True, text=True, timeout=120)

  p = cli('push', src, ref, '--insecure')
  assert p.returncode == 0, p.stderr
  assert p.stdout.startswith(f'pushed {src} to {ref}; manifest digest sha256:')
  out = storage.join(base, 'pulled', '3')
  p = cli('pull', ref, out, '--trust', keys.pub('ed'), '--insecure')
  assert p.returncode == 0, p.stderr
  assert f'into {out}: ' in p.stdout and 'signed by trusted' in p.stdout
  p = cli('pull', ref, out, '--trust', keys.pub('ed'), '--insecure')
  assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
  assert 'already exists' in p.stderr
  p = cli('push', storage.join(base, 'nothing'), ref, '--insecure')
  assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
  p = cli('decrypt', out, str(tmp_path / 'plain'), '--identity',
          keys.priv('x'), '--trust', keys.pub('ed'))
  assert p.returncode == 0, p.stderr
  assert read_tree(tmp_path / 'plain') == read_tree(model)
