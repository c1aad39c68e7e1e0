"""TEST-ONLY: gcp-storage-emulator as TensorFlow's GCS filesystem needs it.

The launcher of tests/fakes/gcs_emulator.py (with its ifGenerationMatch=0
patch), plus two more TEST-ONLY patches, both measured with TF 2.16's GCS
filesystem:

* the emulator crashes on a media upload with an empty body
  (`_media_upload` takes `len(request.data)` of None: "TypeError: object
  of type 'NoneType' has no len()", the client sees an empty reply), which
  is exactly how `tf.io.gfile.makedirs` creates a folder object (`dir/`,
  zero bytes). Real GCS stores a zero-byte object.
* TF's libcurl uploads with both `Content-Length` and `Transfer-Encoding:
  chunked`; the emulator reads Content-Length bytes and so stores the
  chunk framing ("1388\r\n...") as content. HTTP/1.1 (RFC 9112 §6.3)
  says Transfer-Encoding wins: the patched reader decodes the chunks.
Used through tests/fakes/gcs_tls_proxy.py; run as

  python -m tests.fakes.gcs_emulator_tf PORT
"""

import subprocess
import sys
from typing import Optional

from tests.fakes import gcs_emulator


def _patch_empty_media_upload():
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  media_upload = objects._media_upload  # pylint: disable=protected-access

  def media_upload_or_empty(request, response, storage):
    if request.data is None:
      request._data = b''  # pylint: disable=protected-access
    return media_upload(request, response, storage)
  objects._media_upload = media_upload_or_empty  # pylint: disable=protected-access


def _patch_chunked_uploads():
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  read_raw = server._read_raw_data  # pylint: disable=protected-access

  def read_raw_data(request_handler):
    te = request_handler.headers.get('Transfer-Encoding') or ''
    if te.lower() != 'chunked':
      return read_raw(request_handler)
    raw = b''
    while True:
      line = request_handler.rfile.readline().strip().split(b';')[0]
      size = int(line, 16) if line else 0
      if size == 0:
        while request_handler.rfile.readline().strip():
          pass  # trailers, up to the blank line
        return raw
      raw += request_handler.rfile.read(size)
      request_handler.rfile.readline()
  server._read_raw_data = read_raw_data  # pylint: disable=protected-access


class TfGcsEmulator(gcs_emulator.GcsEmulator):
  """GcsEmulator started through this launcher (preconditions enforced)."""

  def __init__(self):  # pylint: disable=super-init-not-called
    import pathlib  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    from tests.fakes.servers import free_port, wait_for_port  # pylint: disable=g-import-not-at-top
    self.port = free_port()
    self.host = f'127.0.0.1:{self.port}'
    self.url = f'http://{self.host}'
    self._log = tempfile.TemporaryFile()
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'tests.fakes.gcs_emulator_tf', str(self.port)],
        stdout=self._log, stderr=subprocess.STDOUT,
        cwd=str(pathlib.Path(__file__).resolve().parents[2]))
    try:
      wait_for_port(self.port, proc=self.proc)
    except Exception:
      self.close()
      raise


def main(argv: Optional[list] = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  gcs_emulator._patch_preconditions()  # pylint: disable=protected-access
  _patch_empty_media_upload()
  _patch_chunked_uploads()
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  create_server('127.0.0.1', int(argv[0]), in_memory=True).run()


if __name__ == '__main__':
  main()
