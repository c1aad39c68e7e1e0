"""gcp-storage-emulator that also enforces GCS compose's 32-source limit.

TEST-ONLY. Real GCS refuses a compose request with more than 32 source
objects (400, "The number of source components provided (N) exceeds the
maximum (32)"); gcp-storage-emulator composes any number
(tests/components/test_encrypt_pusher_beam_remote.py measures it). This
launcher starts the emulator with tests/fakes/gcs_emulator.py's
`ifGenerationMatch` patch (which also covers compose's destination, since
compose creates its object through the same `create_file`) plus a patch
that answers 400 to a compose of more than 32 sources, so that the
composition tree of `tfx_encrypt.storage._assemble` is exercised against
the real limit. Nothing else changes. Used as

  python -m tests.fakes.gcs_compose_limit PORT
"""

import subprocess
import sys
import tempfile
from typing import Optional

from tests.fakes import gcs_emulator
from tests.fakes.stores import GcsStore
from tests.fakes.servers import free_port, wait_for_port

MAX_COMPOSE_SOURCES = 32


def _patch_compose_limit():
  from http import HTTPStatus  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  real = objects.compose

  def compose(request, response, storage, *args, **kwargs):
    n = len(request.data.get('sourceObjects') or ())
    if n > MAX_COMPOSE_SOURCES:
      msg = (f'The number of source components provided ({n}) exceeds the '
             f'maximum ({MAX_COMPOSE_SOURCES})')
      response.status = HTTPStatus.BAD_REQUEST
      response.json({'error': {'code': 400, 'message': msg, 'errors': [
          {'reason': 'invalid', 'message': msg}]}})
      return None
    return real(request, response, storage, *args, **kwargs)

  # Before gcp_storage_emulator.server is imported: its routing table keeps
  # the handler functions it sees at import time.
  objects.compose = compose


class _Server:
  """The patched emulator as a child process on a free loopback port."""

  def __init__(self):
    import pathlib  # pylint: disable=g-import-not-at-top
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._log = tempfile.TemporaryFile()
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'tests.fakes.gcs_compose_limit',
         str(self.port)], stdout=self._log, stderr=subprocess.STDOUT,
        cwd=str(pathlib.Path(__file__).resolve().parents[2]))
    try:
      wait_for_port(self.port, proc=self.proc)
    except Exception:
      self.close()
      raise

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(timeout=10)
    self._log.close()


class LimitedGcsStore(GcsStore):
  """A GcsStore (env, buckets) on the compose-limited emulator."""

  def __init__(self):  # pylint: disable=super-init-not-called
    self.server = _Server()


def main(argv: Optional[list] = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  _patch_compose_limit()
  gcs_emulator._patch_preconditions()  # pylint: disable=protected-access
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  create_server('127.0.0.1', int(argv[0]), in_memory=True).run()


if __name__ == '__main__':
  main()
