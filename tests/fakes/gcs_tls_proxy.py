"""TEST-ONLY: let TensorFlow's built-in GCS filesystem reach the emulator.

TF's GCS filesystem (tf.io.gfile, hence TFX's fileio) has its endpoints
compiled in: https://www.googleapis.com/storage/v1/ and
https://storage.googleapis.com/; no variable points it at an emulator. Its
libcurl does honour `https_proxy` and TF reads `CURL_CA_BUNDLE`. So this
loopback proxy answers CONNECT for those two hosts (and nothing else),
terminates TLS with a throwaway certificate for them (the CA bundle given
to TF is that certificate), and pipes the decrypted HTTP/1.1 bytes to
gcp-storage-emulator, which serves both URL forms. Authentication:
`GOOGLE_AUTH_TOKEN_FOR_TESTING` (read by TF). Nothing leaves the machine:
any other CONNECT target gets 403.
"""

import datetime
import os
import select
import socket
import ssl
import threading
from typing import Dict

from tests.fakes.servers import free_port

HOSTS = ('www.googleapis.com', 'storage.googleapis.com')


def _make_cert(directory: str):
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                       'tfx-encrypt TEST-ONLY GCS proxy')])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (
      x509.CertificateBuilder().subject_name(name).issuer_name(name)
      .public_key(key.public_key())
      .serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(minutes=5))
      .not_valid_after(now + datetime.timedelta(days=1))
      .add_extension(x509.SubjectAlternativeName(
          [x509.DNSName(h) for h in HOSTS]), critical=False)
      .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                     critical=True)
      .sign(key, hashes.SHA256()))
  cert_path = os.path.join(directory, 'gcs-proxy-cert.pem')
  key_path = os.path.join(directory, 'gcs-proxy-key.pem')
  with open(cert_path, 'wb') as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
  with open(key_path, 'wb') as f:
    f.write(key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  return cert_path, key_path


class GcsTlsProxy:
  """CONNECT proxy on 127.0.0.1 for TF's GCS client, to `emulator_port`."""

  def __init__(self, emulator_port: int, directory: str):
    self.emulator_port = emulator_port
    cert, key = _make_cert(directory)
    self.ca_bundle = cert
    self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._ctx.load_cert_chain(cert, key)
    self.port = free_port()
    self._sock = socket.create_server(('127.0.0.1', self.port))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._serve, daemon=True)
    self._thread.start()

  def env(self) -> Dict[str, str]:
    """What TF's GCS filesystem reads (set before it first runs)."""
    return {'https_proxy': f'http://127.0.0.1:{self.port}',
            'HTTPS_PROXY': f'http://127.0.0.1:{self.port}',
            'CURL_CA_BUNDLE': self.ca_bundle,
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
            'NO_GCE_CHECK': 'true',
            'no_proxy': '127.0.0.1,localhost',
            'NO_PROXY': '127.0.0.1,localhost'}

  def _serve(self):
    self._sock.settimeout(0.5)
    while not self._stop.is_set():
      try:
        conn, _ = self._sock.accept()
      except socket.timeout:
        continue
      except OSError:
        return
      threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

  def _handle(self, conn: socket.socket):
    try:
      head = b''
      while b'\r\n\r\n' not in head:
        b = conn.recv(4096)
        if not b:
          return
        head += b
      line = head.split(b'\r\n', 1)[0].decode('latin-1').split()
      host = line[1].rsplit(':', 1)[0] if len(line) > 1 else ''
      if len(line) < 2 or line[0] != 'CONNECT' or host not in HOSTS:
        conn.sendall(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n')
        return
      conn.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
      tls = self._ctx.wrap_socket(conn, server_side=True)
      up = socket.create_connection(('127.0.0.1', self.emulator_port))
      try:
        self._pipe(tls, up)
      finally:
        up.close()
    except (OSError, ssl.SSLError):
      pass
    finally:
      conn.close()

  @staticmethod
  def _pipe(a, b):
    """Bytes both ways. In answers, the emulator's `Location: http://HOST`
    (it builds URLs from the Host header, always as http) becomes https,
    so the resumable upload's next requests come back through the proxy.
    The last bytes of an answer are held until more come (a header split
    across reads) or the line goes quiet."""
    socks = [a, b]
    carry = b''
    keep = 64
    while True:
      if isinstance(a, ssl.SSLSocket) and a.pending():
        ready = [a]
      else:
        ready, _, _ = select.select(socks, [], [], 0.05 if carry else 60)
      if not ready:
        if carry:
          a.sendall(carry)
          carry = b''
          continue
        return
      for s in ready:
        data = s.recv(65536)
        if not data:
          if carry:
            a.sendall(carry)
          return
        if s is a:
          b.sendall(data)
          continue
        data = carry + data
        for h in HOSTS:
          data = data.replace(f'Location: http://{h}'.encode(),
                              f'Location: https://{h}'.encode())
        data, carry = data[:-keep], data[-keep:]
        if data:
          a.sendall(data)

  def close(self):
    self._stop.set()
    self._sock.close()
    self._thread.join(timeout=5)
