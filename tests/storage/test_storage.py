"""tfx_encrypt.storage against local paths and real emulators on loopback.

s3://: moto's standalone server through real boto3 (moto enforces
`If-None-Match: *` on PutObject). gs://: gcp-storage-emulator through the
real google-cloud-storage client; the emulator ignores `ifGenerationMatch`,
so the create-only tests run it with the TEST-ONLY precondition patch of
tests/fakes/gcs_emulator.py, and one test measures the unpatched behaviour.
"""

import multiprocessing
import os

import pytest

from tfx_encrypt import errors
from tfx_encrypt import storage
from tests.fakes import stores

STORES = ['local', 's3', 'gs']


@pytest.fixture(params=STORES)
def base(request, tmp_path):
  """A fresh base URI on each store."""
  if request.param == 'local':
    yield str(tmp_path / 'store')
    return
  env = request.getfixturevalue(f'{request.param}_store')
  yield env.new_base()


def test_put_read_list_delete(base):
  data = os.urandom(storage.CHUNK_SIZE * 2 + 12345)
  storage.put(storage.join(base, 'payload', '00000000'), data)
  storage.put(storage.join(base, 'payload', '00000001'), b'')
  storage.put_create_only(storage.join(base, 'tfxe.header'), b'header')
  assert storage.list_names(base) == [
      'payload/00000000', 'payload/00000001', 'tfxe.header']
  assert storage.exists(storage.join(base, 'tfxe.header'))
  assert not storage.exists(storage.join(base, 'nothing'))
  with storage.open_reader(storage.join(base, 'payload', '00000000')) as r:
    assert r.size == len(data)
    # Ranges across chunk boundaries, out of order, and past the end.
    for off, ln in [(storage.CHUNK_SIZE - 5, 10), (0, 7), (len(data) - 3, 10),
                    (1, len(data))]:
      assert r.read_range(off, ln) == data[off:off + ln]
  with storage.open_reader(storage.join(base, 'payload', '00000001')) as r:
    assert r.size == 0 and r.read_range(0, 5) == b''
  storage.delete(storage.join(base, 'payload', '00000000'))
  storage.delete(storage.join(base, 'payload', '00000000'))  # missing: fine
  assert storage.list_names(base) == ['payload/00000001', 'tfxe.header']
  with pytest.raises(FileNotFoundError):
    storage.open_reader(storage.join(base, 'payload', '00000000'))


def test_put_create_only_never_overwrites(base, tmp_path):
  uri = storage.join(base, 'tfxe.header')
  storage.put_create_only(uri, b'first')
  with pytest.raises(storage.ObjectExistsError):
    storage.put_create_only(uri, b'second')
  # A file object, and above the SDKs' single-request sizes (resumable /
  # multipart upload paths).
  big = tmp_path / 'big'
  big.write_bytes(os.urandom(9 << 20))
  with open(big, 'rb') as f, pytest.raises(storage.ObjectExistsError):
    storage.put_create_only(uri, f)
  with storage.open_reader(uri) as r:
    assert r.read_range(0, 100) == b'first'
  assert isinstance(storage.ObjectExistsError('x'), errors.OutputExistsError)
  with open(big, 'rb') as f:
    storage.put_create_only(storage.join(base, 'big'), f)
  with storage.open_reader(storage.join(base, 'big')) as r:
    assert r.read_range(0, 20 << 20) == big.read_bytes()


def _race(args):
  uri, env, me = args
  os.environ.update(env)
  storage.reset_clients()
  try:
    storage.put_create_only(uri, me.encode())
    return me
  except storage.ObjectExistsError:
    return None


def test_two_processes_racing_one_wins(base):
  """Processes race create-only writes of the same keys: one wins each."""
  env = {k: v for k, v in os.environ.items()
         if k.startswith(('AWS_', 'STORAGE_EMULATOR_HOST'))}
  ctx = multiprocessing.get_context('spawn')
  with ctx.Pool(4) as pool:
    for round_ in range(8):
      uri = storage.join(base, f'r{round_}', 'tfxe.header')
      won = [w for w in pool.map(_race, [(uri, env, f'writer{i}')
                                         for i in range(4)]) if w]
      assert len(won) == 1, won
      with storage.open_reader(uri) as r:
        assert r.read_range(0, 100) == won[0].encode()


def test_s3_reader_is_pinned_to_the_version_it_opened(s3_store):
  base = s3_store.new_base()
  uri = storage.join(base, 'obj')
  storage.put(uri, os.urandom(storage.CHUNK_SIZE + 10))
  with storage.open_reader(uri) as r:
    r.read_range(0, 10)
    storage.put(uri, os.urandom(storage.CHUNK_SIZE + 10))  # replaced
    with pytest.raises(errors.TamperedPackageError, match='replaced'):
      r.read_range(storage.CHUNK_SIZE, 10)


def test_unpatched_gcs_emulator_ignores_if_generation_match():
  """Why tests/fakes/gcs_emulator.py patches the emulator: as shipped, it
  lets a create-only upload overwrite an object (real GCS answers 412)."""
  env = stores.GcsStore(enforce_preconditions=False)
  try:
    with env.applied():
      uri = storage.join(env.new_base(), 'h')
      storage.put_create_only(uri, b'one')
      storage.put_create_only(uri, b'two')  # no 412 from the emulator
      with storage.open_reader(uri) as r:
        assert r.read_range(0, 10) == b'two'
  finally:
    env.close()


def test_missing_sdk_is_one_clear_line(monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_boto(name, *a, **kw):
    if name == 'boto3' or name.startswith('google.cloud'):
      raise ImportError(name)
    return real_import(name, *a, **kw)
  storage.reset_clients()
  monkeypatch.setattr(builtins, '__import__', no_boto)
  with pytest.raises(errors.UsageError, match=r"tfx-encrypt\[aws\]"):
    storage.exists('s3://bucket/key')
  with pytest.raises(errors.UsageError, match=r"tfx-encrypt\[gcp\]"):
    storage.exists('gs://bucket/key')
  storage.reset_clients()


def test_uris():
  assert storage.is_remote('s3://b/k') and storage.is_remote('gs://b/k')
  assert not storage.is_remote('/tmp/x') and not storage.is_remote('file:///x')
  assert storage.split('gs://b/a/b') == ('gs', 'b', 'a/b')
  assert storage.join('s3://b/a/', 'payload', '0') == 's3://b/a/payload/0'
  with pytest.raises(errors.UsageError):
    storage.split('s3:///key')


def test_s3_large_create_only_goes_multipart_and_keeps_the_precondition(
    s3_store, monkeypatch, tmp_path):
  from tfx_encrypt.storage import _aws as s3_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(s3_lib, 'S3_MULTIPART_THRESHOLD', 6 << 20)
  monkeypatch.setattr(s3_lib, 'S3_PART_SIZE', 5 << 20)
  big = tmp_path / 'big'
  big.write_bytes(os.urandom(12 << 20))
  uri = storage.join(s3_store.new_base(), 'bundle.tfxe')
  with open(big, 'rb') as f:
    storage.put_create_only(uri, f)
  with open(big, 'rb') as f, pytest.raises(storage.ObjectExistsError):
    storage.put_create_only(uri, f)
  with storage.open_reader(uri) as r:
    assert r.read_range(0, 13 << 20) == big.read_bytes()
  _, bucket, _ = storage.split(uri)
  assert storage._s3().list_multipart_uploads(  # pylint: disable=protected-access
      Bucket=bucket).get('Uploads', []) == []  # the refused one was aborted


def test_store_errors_are_one_line_os_errors(s3_store, monkeypatch):
  """An SDK error (no bucket, access denied, unreachable) reaches the CLI
  as an OSError naming the URI (one line, exit 9), not a traceback."""
  with pytest.raises(FileNotFoundError) as e:
    storage.list_names('s3://no-such-bucket-tfxe/x')
  assert e.value.filename == 's3://no-such-bucket-tfxe/x'
  monkeypatch.setenv('AWS_ENDPOINT_URL', 'http://127.0.0.1:9')
  monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')
  storage.reset_clients()
  with pytest.raises(ConnectionError, match='unreachable'):
    storage.exists('s3://bucket/key')
  storage.reset_clients()


def test_cli_reports_a_store_error_in_one_line(s3_store):
  import click.testing  # pylint: disable=g-import-not-at-top
  from tfx_encrypt import cli  # pylint: disable=g-import-not-at-top
  r = click.testing.CliRunner().invoke(
      cli.main, ['inspect', 's3://no-such-bucket-tfxe/pkg'])
  assert r.exit_code == 9, r.output
  assert 'Traceback' not in r.output
  assert 's3://no-such-bucket-tfxe/pkg' in r.output
