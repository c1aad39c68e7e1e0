"""storage.put_if_unchanged: replace an object only if it is the version read.

s3://: moto 5.2.5's standalone server through real boto3; moto implements
`If-Match` on PutObject itself (moto/s3/responses.py `put_object`: 404
NoSuchKey for a missing key, 412 PreconditionFailed for another ETag),
measured here with the raw client. gs://: gcp-storage-emulator through the
real google-cloud-storage client; the emulator as shipped IGNORES
`ifGenerationMatch=N` (measured below), so these tests run it with the
TEST-ONLY precondition patch of tests/fakes/gcs_emulator.py. Local paths:
RENAME_EXCHANGE, then the displaced file is checked.
"""

import multiprocessing
import os

import pytest

from tfx_encrypt import errors
from tfx_encrypt import storage
from tests.fakes import stores


@pytest.fixture(params=['local', 's3', 'gs'])
def base(request, tmp_path):
  """A fresh base URI on each store."""
  if request.param == 'local':
    os.makedirs(tmp_path / 'store')
    yield str(tmp_path / 'store')
    return
  env = request.getfixturevalue(f'{request.param}_store')
  yield env.new_base()


def _read(uri):
  with storage.open_reader(uri) as r:
    return r.read_range(0, r.size), r.version


def test_replaces_only_the_version_that_was_read(base, tmp_path):
  uri = storage.join(base, 'tfxe.header')
  storage.put(uri, b'one')
  data, v1 = _read(uri)
  assert data == b'one' and v1
  v2 = storage.put_if_unchanged(uri, b'two', v1)
  data, seen = _read(uri)
  assert data == b'two'
  assert v2 is None or v2 == seen
  # The version read before is stale now: refused, nothing written.
  with pytest.raises(storage.ObjectChangedError, match='not overwritten'):
    storage.put_if_unchanged(uri, b'three', v1)
  assert _read(uri)[0] == b'two'
  assert isinstance(storage.ObjectChangedError('x'),
                    errors.TamperedPackageError)  # exit 4, one line
  # Another writer replaced it meanwhile (same size, too).
  storage.put(uri, b'TWO')
  with pytest.raises(storage.ObjectChangedError):
    storage.put_if_unchanged(uri, b'four', seen)
  assert _read(uri)[0] == b'TWO'
  # Removed meanwhile: refused, and not created again.
  _, v = _read(uri)
  storage.delete(uri)
  with pytest.raises(storage.ObjectChangedError):
    storage.put_if_unchanged(uri, b'five', v)
  assert not storage.exists(uri)
  # Never unconditional.
  storage.put(uri, b'six')
  with pytest.raises(errors.UsageError, match='no version'):
    storage.put_if_unchanged(uri, b'seven', None)
  # A file object above the SDKs' single-request sizes (GCS: resumable).
  big = tmp_path / 'big'
  big.write_bytes(os.urandom(9 << 20))
  _, v = _read(uri)
  with open(big, 'rb') as f:
    storage.put_if_unchanged(uri, f, v)
  with open(big, 'rb') as f, pytest.raises(storage.ObjectChangedError):
    storage.put_if_unchanged(uri, f, v)
  assert _read(uri)[0] == big.read_bytes()
  # Nothing else was left next to it (local: no temporary file).
  assert storage.list_names(base) == ['tfxe.header']


def _race(args):
  uri, env, version, me = args
  os.environ.update(env)
  storage.reset_clients()
  try:
    storage.put_if_unchanged(uri, me.encode(), version)
    return me
  except storage.ObjectChangedError:
    return None


def test_processes_racing_one_version_one_wins(base):
  """4 processes replace the same version of one object: exactly one wins
  each round, and the object is the winner's."""
  env = {k: v for k, v in os.environ.items()
         if k.startswith(('AWS_', 'STORAGE_EMULATOR_HOST'))}
  ctx = multiprocessing.get_context('spawn')
  with ctx.Pool(4) as pool:
    for round_ in range(6):
      uri = storage.join(base, f'r{round_}', 'tfxe.header')
      storage.put(uri, b'original')
      _, v = _read(uri)
      won = [w for w in pool.map(_race, [(uri, env, v, f'writer{i}')
                                         for i in range(4)]) if w]
      assert len(won) == 1, won
      assert _read(uri)[0] == won[0].encode()


def test_moto_enforces_if_match_on_put_object(s3_store):
  """What the S3 side is verified against: moto's server itself refuses a
  PutObject whose If-Match names another ETag (412) or a missing key
  (404); boto3 sends the header as it would to S3 (no client-side check)."""
  import botocore.exceptions  # pylint: disable=g-import-not-at-top
  _, bucket, key = storage.split(storage.join(s3_store.new_base(), 'obj'))
  c = storage._s3()  # pylint: disable=protected-access
  etag = c.put_object(Bucket=bucket, Key=key, Body=b'one')['ETag']
  other = c.put_object(Bucket=bucket, Key=key, Body=b'two')['ETag']
  with pytest.raises(botocore.exceptions.ClientError) as e:
    c.put_object(Bucket=bucket, Key=key, Body=b'three', IfMatch=etag)
  assert e.value.response['ResponseMetadata']['HTTPStatusCode'] == 412
  assert c.get_object(Bucket=bucket, Key=key)['Body'].read() == b'two'
  c.put_object(Bucket=bucket, Key=key, Body=b'four', IfMatch=other)
  assert c.get_object(Bucket=bucket, Key=key)['Body'].read() == b'four'
  with pytest.raises(botocore.exceptions.ClientError) as e:
    c.put_object(Bucket=bucket, Key=key + '-missing', Body=b'x', IfMatch=etag)
  assert e.value.response['ResponseMetadata']['HTTPStatusCode'] == 404
  with pytest.raises(botocore.exceptions.ClientError):
    c.head_object(Bucket=bucket, Key=key + '-missing')


def test_unpatched_gcs_emulator_ignores_if_generation_match_n():
  """Why tests/fakes/gcs_emulator.py also enforces ifGenerationMatch=N: as
  shipped, the emulator replaces an object that is no longer generation N
  (and creates a missing one); real GCS answers 412."""
  env = stores.GcsStore(enforce_preconditions=False)
  try:
    with env.applied():
      uri = storage.join(env.new_base(), 'h')
      storage.put(uri, b'one')
      _, v = _read(uri)
      storage.put(uri, b'two')  # another writer
      storage.put_if_unchanged(uri, b'three', v)  # no 412 from the emulator
      assert _read(uri)[0] == b'three'
      storage.delete(uri)
      storage.put_if_unchanged(uri, b'four', v)
      assert _read(uri)[0] == b'four'
  finally:
    env.close()
