"""TEST-ONLY: a counting, fault-injecting HTTP reverse proxy.

Put in front of a real server (moto) so a test can count the requests a
client sends per operation, and make the first N of them fail with a
throttling or 5xx answer, without touching the client.
"""

import collections
import http.client
import http.server
import threading
from typing import Callable, Dict, List, Optional, Tuple

_HOP_BY_HOP = frozenset({
    'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization',
    'te', 'trailers', 'transfer-encoding', 'upgrade', 'content-length'})


def aws_json_op(headers, path: str) -> str:
  """'Encrypt' for an X-Amz-Target of 'TrentService.Encrypt'."""
  target = headers.get('X-Amz-Target', '')
  return target.rsplit('.', 1)[-1] if target else path


class Fault:
  """A canned answer for the next `count` requests of operation `op`."""

  def __init__(self, count: int, status: int, body: bytes = b'',
               headers: Optional[Dict[str, str]] = None,
               op: Optional[str] = None):
    self.count = count
    self.status = status
    self.body = body
    self.headers = headers or {}
    self.op = op


class CountingProxy:
  """Reverse proxy on 127.0.0.1:<free port> forwarding to `upstream`."""

  def __init__(self, upstream_host: str, upstream_port: int,
               op_of: Callable = aws_json_op):
    self.upstream = (upstream_host, upstream_port)
    self.op_of = op_of
    self._lock = threading.Lock()
    self.requests: List[Tuple[str, int]] = []   # (op, status sent)
    self.faults: List[Fault] = []
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):  # keep test output quiet
        pass

      def _handle(self):
        length = int(self.headers.get('Content-Length') or 0)
        body = self.rfile.read(length) if length else b''
        op = proxy.op_of(self.headers, self.path)
        fault = proxy._take_fault(op)
        # Record before answering, so a client that got its answer always
        # sees the request counted.
        if fault is not None:
          proxy._record(op, fault.status)
          self._reply(fault.status, fault.headers, fault.body)
          return
        try:
          conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
          conn.putrequest(self.command, self.path, skip_host=True,
                          skip_accept_encoding=True)
          for k, v in self.headers.items():
            if k.lower() not in _HOP_BY_HOP:
              conn.putheader(k, v)
          conn.putheader('Content-Length', str(len(body)))
          conn.endheaders(body)
          resp = conn.getresponse()
          data = resp.read()
          headers = {k: v for k, v in resp.getheaders()
                     if k.lower() not in _HOP_BY_HOP}
          status = resp.status
          conn.close()
        except OSError:
          status, headers, data = 502, {'Content-Type': 'text/plain'}, (
              b'upstream unreachable')
        proxy._record(op, status)
        self._reply(status, headers, data)

      def _reply(self, status, headers, body):
        self.send_response(status)
        for k, v in headers.items():
          self.send_header(k, v)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self._server.daemon_threads = True
    self.port = self._server.server_address[1]
    self.url = f'http://127.0.0.1:{self.port}'
    self._thread = threading.Thread(target=self._server.serve_forever,
                                    kwargs={'poll_interval': 0.05},
                                    name='counting-proxy', daemon=True)
    self._thread.start()

  # -- test API ---------------------------------------------------------------
  def inject(self, fault: Fault) -> None:
    with self._lock:
      self.faults.append(fault)

  def counts(self) -> Dict[str, int]:
    with self._lock:
      return dict(collections.Counter(op for op, _ in self.requests))

  def reset(self) -> None:
    with self._lock:
      self.requests.clear()
      self.faults.clear()

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=10)

  # -- internals --------------------------------------------------------------
  def _take_fault(self, op: str) -> Optional[Fault]:
    with self._lock:
      for f in self.faults:
        if f.count > 0 and (f.op is None or f.op == op):
          f.count -= 1
          return f
    return None

  def _record(self, op: str, status: int) -> None:
    with self._lock:
      self.requests.append((op, status))
