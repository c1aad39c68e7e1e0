"""TEST-ONLY fake of HashiCorp Vault's transit HTTP API (encrypt/decrypt).

Served over HTTPS on a loopback port with a throwaway self-signed
certificate, so the backend is exercised through the real hvac client with
TLS verification on. It is not Vault: it knows tokens, transit keys with
versions, ``associated_data``, ``min_decryption_version``, and Vault's error
bodies (``{"errors": [...]}``) and status codes, and nothing else.
"""

import base64
import binascii
import collections
import json
import os
import re
import ssl
import threading
from typing import Dict, List, Optional, Set

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.fakes.httpserver import LoopbackServer

_PATH_RE = re.compile(r'^/v1/(?P<mount>.+)/(?P<op>encrypt|decrypt)/'
                      r'(?P<name>[^/]+)$')


class TransitKey:

  def __init__(self):
    self.versions: List[bytes] = [os.urandom(32)]
    self.min_decryption_version = 1

  def rotate(self) -> None:
    self.versions.append(os.urandom(32))


class FakeVault:
  """Vault transit on https://127.0.0.1:<free port>."""

  def __init__(self, ssl_context: Optional[ssl.SSLContext],
               mounts=('transit',)):
    self.mounts: Dict[str, Dict[str, TransitKey]] = {m: {} for m in mounts}
    # token -> set of allowed (op, mount, name); '*' allows everything.
    self.tokens: Dict[str, Set] = {}
    self.calls = collections.Counter()
    self.faults: List[List] = []    # [count, status, [errors]]
    self.seen_tokens: List[str] = []
    self.seen_namespaces: List[Optional[str]] = []
    self._lock = threading.Lock()

    def handle(method, path, headers, raw):
      del method  # transit encrypt/decrypt accept POST and PUT alike
      status, body = self._handle(path, headers, raw)
      return status, {'Content-Type': 'application/json'}, json.dumps(
          body).encode()

    self._http = LoopbackServer(handle, ssl_context, 'fake-vault')
    self.port = self._http.port

  # -- test API ---------------------------------------------------------------
  def add_key(self, name: str, mount: str = 'transit') -> TransitKey:
    key = TransitKey()
    self.mounts.setdefault(mount, {})[name] = key
    return key

  def add_token(self, token: str, allowed='*') -> None:
    self.tokens[token] = allowed

  def uri(self, name: str, mount: str = 'transit') -> str:
    return f'hcvault://127.0.0.1:{self.port}/{mount}/keys/{name}'

  def inject(self, count: int, status: int, errs) -> None:
    with self._lock:
      self.faults.append([count, status, list(errs)])

  def stop(self) -> None:
    self._http.stop()

  # -- service ----------------------------------------------------------------
  def _handle(self, path: str, headers, raw: bytes):
    m = _PATH_RE.match(path)
    token = headers.get('X-Vault-Token', '')
    with self._lock:
      self.seen_tokens.append(token)
      self.seen_namespaces.append(headers.get('X-Vault-Namespace'))
      if m:
        self.calls[m.group('op')] += 1
      for f in self.faults:
        if f[0] > 0:
          f[0] -= 1
          return f[1], {'errors': f[2]}
    if not m or m.group('mount') not in self.mounts:
      return 404, {'errors': [f"no handler for route '{path[4:]}'. route "
                              'entry not found.']}
    op, mount, name = m.group('op'), m.group('mount'), m.group('name')
    allowed = self.tokens.get(token)
    if allowed is None or (allowed != '*' and (op, mount, name) not in allowed):
      return 403, {'errors': ['1 error occurred:\n\t* permission denied\n\n']}
    try:
      req = json.loads(raw or b'{}')
      aad = base64.b64decode(req.get('associated_data') or '', validate=True)
    except (ValueError, binascii.Error):
      return 400, {'errors': ['failed to parse request']}
    key = self.mounts[mount].get(name)
    if op == 'encrypt':
      if key is None:   # no upsert: the token may only "update"
        return 403, {'errors': ['1 error occurred:\n\t* permission denied'
                                '\n\n']}
      try:
        pt = base64.b64decode(req.get('plaintext', ''), validate=True)
      except (ValueError, binascii.Error):
        return 400, {'errors': ['failed to base64-decode plaintext']}
      ver = len(key.versions)
      nonce = os.urandom(12)
      ct = AESGCM(key.versions[-1]).encrypt(nonce, pt, aad)
      text = f'vault:v{ver}:' + base64.b64encode(nonce + ct).decode()
      return 200, _envelope({'ciphertext': text, 'key_version': ver})
    if key is None:
      return 400, {'errors': ['encryption key not found']}
    m2 = re.match(r'^vault:v(\d+):(.*)$', req.get('ciphertext', ''))
    if not m2:
      return 400, {'errors': ['invalid ciphertext: no prefix']}
    ver = int(m2.group(1))
    if ver < key.min_decryption_version:
      return 400, {'errors': ['ciphertext or signature version is '
                              'disallowed by policy (too old)']}
    if ver > len(key.versions) or ver < 1:
      return 400, {'errors': ['invalid ciphertext: invalid key version']}
    try:
      blob = base64.b64decode(m2.group(2), validate=True)
      pt = AESGCM(key.versions[ver - 1]).decrypt(blob[:12], blob[12:], aad)
    except (ValueError, binascii.Error, InvalidTag):
      return 400, {'errors': ['cipher: message authentication failed']}
    return 200, _envelope({'plaintext': base64.b64encode(pt).decode()})


def _envelope(data):
  return {'request_id': os.urandom(8).hex(), 'lease_id': '',
          'renewable': False, 'lease_duration': 0, 'data': data,
          'wrap_info': None, 'warnings': None, 'auth': None}
