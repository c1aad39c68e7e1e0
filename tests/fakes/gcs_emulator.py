"""gcp-storage-emulator on loopback, optionally with generation preconditions.

TEST-ONLY. The real emulator (PyPI `gcp-storage-emulator`, the real
google-cloud-storage client talks to it through STORAGE_EMULATOR_HOST)
IGNORES `ifGenerationMatch`: a second create-only upload
(`ifGenerationMatch=0`) of an object succeeds and overwrites it, and so
does a conditional replacement (`ifGenerationMatch=N`) of an object that
is no longer generation N (tests/storage/test_storage.py measures both).
Real GCS answers 412 Precondition Failed. Run with
`--enforce-preconditions`, this launcher patches the emulator in its own
process so that an upload whose query says `ifGenerationMatch=G` (media,
multipart, or the final PUT of a resumable upload, whose URL keeps the
initiating query) gets 412 when the object's live generation is not G:
for G = 0, when the object exists; for G > 0, when it is missing or
another generation. Atomically (one lock around check-and-create).
Nothing else changes. Used as

  python -m tests.fakes.gcs_emulator PORT [--enforce-preconditions]
                                     [--linear-resumable]

`--linear-resumable` (benchmarks only) makes the emulator's resumable
append linear: see _patch_linear_resumable.
"""

import json
import subprocess
import sys
import tempfile
import threading
from typing import Optional

from tests.fakes.servers import free_port, wait_for_port


class _Exists(Exception):
  pass


def _patch_preconditions():
  from gcp_storage_emulator import server as srv  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import storage as st  # pylint: disable=g-import-not-at-top

  current = threading.local()
  lock = threading.Lock()
  create_file = st.Storage.create_file
  handle = srv.Router.handle

  def checked_create_file(self, bucket_name, file_name, *args, **kwargs):
    req = getattr(current, 'request', None)
    want = None
    if req is not None:
      q = req.query
      if 'ifGenerationMatch' in q:
        want = q['ifGenerationMatch'][0]
    with lock:
      live = self.objects.get(bucket_name, {}).get(file_name)
      if want == '0' and live is not None:
        raise _Exists(file_name)
      if want is not None and want != '0' and (
          live is None or str(live.get('generation')) != want):
        raise _Exists(file_name)  # another generation, or none: 412 too
      return create_file(self, bucket_name, file_name, *args, **kwargs)

  class TrackedRequest(srv.Request):
    """Remembers the request this thread is handling."""

    def __init__(self, *a, **kw):
      super().__init__(*a, **kw)
      current.request = self

  def checked_handle(self, method):
    rh = self._request_handler
    try:
      return handle(self, method)
    except _Exists:
      body = json.dumps({'error': {
          'code': 412, 'message': 'At least one of the pre-conditions you '
          'specified did not hold.', 'errors': [{
              'reason': 'conditionNotMet', 'message': 'Precondition Failed'}]}
                        }).encode()
      rh.send_response(412)
      rh.send_header('Content-Type', 'application/json')
      rh.send_header('Content-Length', str(len(body)))
      rh.end_headers()
      rh.wfile.write(body)
      return None
    finally:
      current.request = None

  srv.Request = TrackedRequest  # pylint: disable=invalid-name
  st.Storage.create_file = checked_create_file
  srv.Router.handle = checked_handle


def _patch_linear_resumable():
  """BENCHMARK-ONLY (benchmarks/object_store.py, store `gs-linear`).

  The emulator appends each chunk of a resumable upload by copying
  everything received so far (`file_content += content`): an object of n
  bytes sent in chunks of C costs about n**2 / (2 C) bytes of copying in
  the emulator, which real GCS does not. This keeps the received bytes of
  an upload in one bytearray and appends in place (in-memory mode only),
  so an upload in small chunks costs what it costs GCS: the bytes once.
  Nothing else changes (same checks, same answers)."""
  from gcp_storage_emulator import storage as st  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.exceptions import BadRequest  # pylint: disable=g-import-not-at-top

  def add_to_resumable_upload(self, file_id, content, total_size=None,
                              expected_start=None):
    path = self._object_path(st.RESUMABLE_DIR, self.safe_id(file_id))
    key = self._store._norm(path)  # pylint: disable=protected-access
    buf = self._store._files.get(key)  # pylint: disable=protected-access
    if buf is None:
      buf = bytearray()
      self._store.write_bytes(path, buf)  # registers the object
    elif not isinstance(buf, bytearray):
      buf = bytearray(buf)
      self._store._files[key] = buf  # pylint: disable=protected-access
    if expected_start is not None and expected_start != len(buf):
      raise BadRequest('Invalid Content-Range start: expected {}, got {}'
                       .format(len(buf), expected_start))
    buf += content or b''
    if total_size is None or len(buf) < total_size:
      return None
    return bytes(buf[:total_size])

  st.Storage.add_to_resumable_upload = add_to_resumable_upload


class GcsEmulator:
  """The emulator as a child process on a free loopback port."""

  def __init__(self, enforce_preconditions: bool = True,
               linear_resumable: bool = False):
    self.port = free_port()
    self.host = f'127.0.0.1:{self.port}'
    self.url = f'http://{self.host}'
    self._log = tempfile.TemporaryFile()
    args = [sys.executable, '-m', 'tests.fakes.gcs_emulator', str(self.port)]
    if enforce_preconditions:
      args.append('--enforce-preconditions')
    if linear_resumable:
      args.append('--linear-resumable')
    import pathlib  # pylint: disable=g-import-not-at-top
    self.proc = subprocess.Popen(
        args, stdout=self._log, stderr=subprocess.STDOUT,
        cwd=str(pathlib.Path(__file__).resolve().parents[2]))
    try:
      wait_for_port(self.port, proc=self.proc)
    except Exception:
      self.close()
      raise

  def log(self) -> str:
    self._log.seek(0)
    return self._log.read().decode('utf-8', 'replace')

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(timeout=10)
    self._log.close()


def main(argv: Optional[list] = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  port = int(argv[0])
  if '--enforce-preconditions' in argv:
    _patch_preconditions()
  if '--linear-resumable' in argv:
    _patch_linear_resumable()
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  create_server('127.0.0.1', port, in_memory=True).run()


if __name__ == '__main__':
  main()
