"""The GCS writer's resumable protocol against a scripted session: GCS may
persist less than a chunk it was sent (308 with a shorter Range), and the
writer must resend exactly the rest; the last chunk goes only on commit.

The emulator always keeps whole chunks, so this path is driven here by a
scripted HTTP session (the answers real GCS documents for resumable
uploads: 308 + Range, 200/201 on the last byte, 412 on a failed
precondition).
"""

import pytest

from tfx_encrypt import storage
from tfx_encrypt.storage import _google


class _Resp:

  def __init__(self, status, rng=None):
    self.status_code, self.text = status, ''
    self.headers = {'Range': rng} if rng else {}


class _Session:
  """Keeps all but `short` bytes of the first chunk, then everything."""

  def __init__(self, size, short=0, final=200, fail=()):
    self.size, self.short, self.final = size, short, final
    self.fail = list(fail)  # (status or 'reset', bytes kept) per failure
    self.got = bytearray()
    self.ranges = []
    self.deleted = False

  def put(self, url, data, timeout, headers):
    del url, timeout
    body = data if isinstance(data, bytes) else data.read()
    rng = headers['Content-Range']
    self.ranges.append(rng)
    if rng.startswith('bytes */'):  # a status query
      assert body == b''
      if rng.endswith(f'/{self.size}') and len(self.got) == self.size:
        return _Resp(self.final)
      return _Resp(308, f'bytes=0-{len(self.got) - 1}' if self.got else None)
    if self.fail:
      kind, keep = self.fail.pop(0)
      self.got += body[:keep]
      if kind == 'reset':
        import requests  # pylint: disable=g-import-not-at-top
        raise requests.ConnectionError('reset by peer')
      return _Resp(kind)
    start = int(rng.split()[1].split('-')[0])
    assert start == len(self.got), (rng, len(self.got))
    keep = body[:len(body) - self.short] if self.short else body
    self.short = 0
    self.got += keep
    if rng.endswith(f'/{self.size}') and len(self.got) == self.size:
      return _Resp(self.final)
    return _Resp(308, f'bytes=0-{len(self.got) - 1}')

  def delete(self, url, timeout):
    del url, timeout
    self.deleted = True

  def close(self):
    pass


def _writer(monkeypatch, size, session):
  monkeypatch.setattr(_google, 'GCS_WRITE_CHUNK_SIZE', 256 << 10)
  w = _google._GcsWriter('gs://b/k', 'b', 'k', size)  # pylint: disable=protected-access
  monkeypatch.setattr(w, '_http', lambda: ('https://upload/x', session))
  w._session = ('https://upload/x', session)  # pylint: disable=protected-access
  return w


def test_a_partly_persisted_chunk_is_resent_from_where_gcs_stopped(
    monkeypatch):
  data = bytes(range(256)) * 4096  # 1 MiB: four 256 KiB chunks
  s = _Session(len(data), short=1000)
  w = _writer(monkeypatch, len(data), s)
  for i in range(0, len(data), 100_000):
    w.write(data[i:i + 100_000])
  assert len(s.got) < len(data)  # the last chunk waits for commit
  assert not any(r.endswith(f'/{len(data)}') for r in s.ranges)
  w.commit()
  assert bytes(s.got) == data
  # The resend starts exactly where GCS stopped.
  assert s.ranges[1] == f'bytes {(256 << 10) - 1000}-{(256 << 10) - 1}/*'
  assert s.ranges[-1].endswith(f'/{len(data)}')
  assert not s.deleted


@pytest.mark.parametrize('fail', [
    [('reset', 100_000)], [(503, 0)], [(429, 0), ('reset', 5)],
    [('reset', 0), (500, 0)]])
def test_transient_failures_resume_from_what_gcs_kept(monkeypatch, fail):
  monkeypatch.setattr(_google, 'GCS_RETRY_PAUSES_S', (0, 0, 0))
  data = bytes(range(256)) * 4096  # 1 MiB: four 256 KiB chunks
  s = _Session(len(data), fail=fail)
  w = _writer(monkeypatch, len(data), s)
  w.write(data)
  w.commit()
  assert bytes(s.got) == data
  assert any(r.startswith('bytes */') for r in s.ranges)  # it asked


def test_persistent_failures_fail_without_the_session_url(monkeypatch):
  monkeypatch.setattr(_google, 'GCS_RETRY_PAUSES_S', (0, 0))
  data = b'z' * (600 << 10)
  s = _Session(len(data), fail=[('reset', 0)] * 3)
  w = _writer(monkeypatch, len(data), s)
  with pytest.raises(ConnectionError) as e:
    w.write(data)
  assert 'https://upload/x' not in str(e.value)  # the session URL


def test_a_failed_precondition_on_the_last_chunk_is_object_exists(
    monkeypatch):
  data = b'x' * (600 << 10)
  s = _Session(len(data), final=412)
  w = _writer(monkeypatch, len(data), s)
  w.write(data)
  with pytest.raises(storage.ObjectExistsError):
    w.commit()


def test_abort_cancels_the_session_and_never_sends_the_last_chunk(
    monkeypatch):
  data = b'y' * (600 << 10)
  s = _Session(len(data))
  w = _writer(monkeypatch, len(data), s)
  w.write(data)
  w.abort()
  assert s.deleted
  assert not any(r.endswith(f'/{len(data)}') for r in s.ranges)


@pytest.mark.parametrize('store_name', ['s3', 'gs'])
def test_writers_take_writes_that_cross_part_boundaries_up_to_the_end(
    request, store_name, monkeypatch):
  """One write that fills a part and still holds the object's last bytes
  (it once looped forever in the S3 writer), and writes of every odd size
  around the part boundaries: the object is the bytes written."""
  from tfx_encrypt.storage import _aws  # pylint: disable=g-import-not-at-top
  store = request.getfixturevalue(f'{store_name}_store')
  monkeypatch.setattr(_aws, 'S3_WRITE_PART_SIZE', 5 << 20)
  part = 5 << 20 if store_name == 's3' else _google.GCS_WRITE_CHUNK_SIZE
  data = bytes(range(251)) * ((2 * part + 12345) // 251 + 1)
  data = data[:2 * part + 12345]
  base = store.new_base()
  for name, cuts in (
      ('tail-crosses', [part - 7, len(data)]),  # last write spans a part
      ('odd', list(range(0, len(data), 1_000_003)) + [len(data)])):
    uri = storage.join(base, name)
    w = storage.open_writer(uri, len(data))
    prev = 0
    for c in cuts:
      if c > prev:
        w.write(memoryview(data)[prev:c])
      prev = c
    w.commit()
    with storage.open_reader(uri) as r:
      assert r.size == len(data)
      assert r.read_range(0, len(data)) == data


def test_the_benchmarks_linear_append_emulator_stores_the_same_bytes():
  """benchmarks/object_store.py's `gs-linear` store patches the emulator's
  resumable append (tests/fakes/gcs_emulator.py): uploads in many chunks
  and status queries still give the exact object."""
  from tests.fakes import stores  # pylint: disable=g-import-not-at-top
  st = stores.GcsStore(enforce_preconditions=False, linear_resumable=True)
  try:
    with st.applied():
      storage.reset_clients()
      base = st.new_base()
      data = bytes(range(251)) * ((3 * _google.GCS_WRITE_CHUNK_SIZE) // 251)
      for name, cut in (('a', 1 << 20), ('b', 3_333_333)):
        w = storage.open_writer(storage.join(base, name), len(data))
        for i in range(0, len(data), cut):
          w.write(memoryview(data)[i:i + cut])
        w.commit()
        with storage.open_reader(storage.join(base, name)) as r:
          assert r.read_range(0, len(data)) == data
  finally:
    storage.reset_clients()
    st.close()
