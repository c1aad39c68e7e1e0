"""TEST-ONLY: a tiny threaded HTTP(S) server on a loopback port.

The protocol fakes (Vault, Azure Key Vault) give it one function,
``handle(method, path, headers, body) -> (status, headers, body)``.
:meth:`LoopbackServer.stop` also drops open keep-alive connections, so a
stopped server looks like a crashed one to clients.
"""

import http.server
import socket
import ssl
import threading
from typing import Callable, Dict, Optional, Tuple

Handler = Callable[[str, str, object, bytes], Tuple[int, Dict[str, str], bytes]]


class LoopbackServer:
  """Serves `handle` on https://127.0.0.1:<free port> (or http without TLS)."""

  def __init__(self, handle: Handler,
               ssl_context: Optional[ssl.SSLContext] = None,
               name: str = 'fake-server'):
    self._conns = set()
    self._lock = threading.Lock()
    server = self

    class RequestHandler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):
        pass

      def setup(self):
        super().setup()
        with server._lock:
          server._conns.add(self.connection)

      def finish(self):
        with server._lock:
          server._conns.discard(self.connection)
        try:
          super().finish()
        except OSError:
          pass

      def _any(self):
        length = int(self.headers.get('Content-Length') or 0)
        body = self.rfile.read(length) if length else b''
        status, headers, data = handle(self.command, self.path, self.headers,
                                       body)
        self.send_response(status)
        for k, v in headers.items():
          self.send_header(k, v)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0),
                                                   RequestHandler)
    self._server.daemon_threads = True
    if ssl_context is not None:
      self._server.socket = ssl_context.wrap_socket(self._server.socket,
                                                    server_side=True)
    self.port = self._server.server_address[1]
    self.url = (f'{"https" if ssl_context else "http"}://127.0.0.1:'
                f'{self.port}')
    self._thread = threading.Thread(
        target=self._server.serve_forever, kwargs={'poll_interval': 0.05},
        name=name, daemon=True)
    self._thread.start()

  def stop(self) -> None:
    """Stops serving and drops open keep-alive connections, like a crash."""
    self._server.shutdown()
    self._server.server_close()
    with self._lock:
      conns, self._conns = list(self._conns), set()
    for c in conns:
      try:
        c.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
      c.close()
    self._thread.join(timeout=10)
