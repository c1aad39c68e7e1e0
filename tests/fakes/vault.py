"""TEST-ONLY fake of HashiCorp Vault's transit HTTP API (encrypt, decrypt,
sign, read key).

Served over HTTPS on a loopback port with a throwaway self-signed
certificate, so the backend is exercised through the real hvac client with
TLS verification on. It is not Vault: it knows tokens, transit keys with
versions, ``associated_data``, ``min_decryption_version``, and Vault's error
bodies (``{"errors": [...]}``) and status codes, and nothing else. Signing
keys (``add_signing_key``: ``ecdsa-p256`` or ``ed25519``) hold real
`cryptography` private keys per version; ``GET /v1/MOUNT/keys/NAME``
answers as Vault does (PEM for ECDSA, base64 of the raw key for Ed25519),
and ``POST /v1/MOUNT/sign/NAME`` honours ``key_version``, ``prehashed``,
``hash_algorithm`` (sha2-256) and ``marshaling_algorithm`` (asn1).
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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.fakes.httpserver import LoopbackServer

_PATH_RE = re.compile(r'^/v1/(?P<mount>.+)/(?P<op>encrypt|decrypt|sign|keys)/'
                      r'(?P<name>[^/]+)$')


class TransitKey:

  def __init__(self):
    self.versions: List[bytes] = [os.urandom(32)]
    self.min_decryption_version = 1

  def rotate(self) -> None:
    self.versions.append(os.urandom(32))


class SigningTransitKey:
  """An ecdsa-p256 or ed25519 transit key: one private key per version."""

  def __init__(self, kind: str = 'ecdsa-p256', derived: bool = False):
    self.kind = kind
    self.derived = derived
    self.versions: List = []
    self.min_decryption_version = 1
    self.rotate()

  def rotate(self) -> None:
    self.versions.append(ed25519.Ed25519PrivateKey.generate()
                         if self.kind == 'ed25519' else
                         ec.generate_private_key(ec.SECP256R1()))

  def public_key(self, version: int) -> str:
    pub = self.versions[version - 1].public_key()
    if self.kind == 'ed25519':
      return base64.b64encode(pub.public_bytes(
          serialization.Encoding.Raw,
          serialization.PublicFormat.Raw)).decode()
    return pub.public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo).decode()


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
      status, body = self._handle(path, headers, raw, method)
      return status, {'Content-Type': 'application/json'}, json.dumps(
          body).encode()

    self._http = LoopbackServer(handle, ssl_context, 'fake-vault')
    self.port = self._http.port

  # -- test API ---------------------------------------------------------------
  def add_key(self, name: str, mount: str = 'transit') -> TransitKey:
    key = TransitKey()
    self.mounts.setdefault(mount, {})[name] = key
    return key

  def add_signing_key(self, name: str, kind: str = 'ecdsa-p256',
                      mount: str = 'transit',
                      derived: bool = False) -> SigningTransitKey:
    key = SigningTransitKey(kind, derived)
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
  def _handle(self, path: str, headers, raw: bytes, method: str = 'POST'):
    m = _PATH_RE.match(path)
    token = headers.get('X-Vault-Token', '')
    with self._lock:
      self.seen_tokens.append(token)
      self.seen_namespaces.append(headers.get('X-Vault-Namespace'))
      if m:   # 'read' counts GET MOUNT/keys/NAME
        self.calls['read' if m.group('op') == 'keys' and method == 'GET'
                   else m.group('op')] += 1
      for f in self.faults:
        if f[0] > 0:
          f[0] -= 1
          return f[1], {'errors': f[2]}
    if not m or m.group('mount') not in self.mounts:
      return 404, {'errors': [f"no handler for route '{path[4:]}'. route "
                              'entry not found.']}
    op, mount, name = m.group('op'), m.group('mount'), m.group('name')
    if op == 'keys':
      op = 'read' if method == 'GET' else 'keys'
    allowed = self.tokens.get(token)
    if allowed is None or (allowed != '*' and (op, mount, name) not in allowed):
      return 403, {'errors': ['1 error occurred:\n\t* permission denied\n\n']}
    try:
      req = json.loads(raw or b'{}')
      aad = base64.b64decode(req.get('associated_data') or '', validate=True)
    except (ValueError, binascii.Error):
      return 400, {'errors': ['failed to parse request']}
    key = self.mounts[mount].get(name)
    if op == 'read':
      return self._read_key(key)
    if op == 'sign':
      return self._sign(key, req)
    if op == 'keys':
      return 405, {'errors': ['unsupported operation']}
    if isinstance(key, SigningTransitKey):
      return 400, {'errors': [f'key type {key.kind} does not support '
                              'encryption']}
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

  @staticmethod
  def _read_key(key):
    if key is None:
      return 404, {'errors': []}
    data = {'name': 'key', 'deletion_allowed': False, 'exportable': False,
            'min_decryption_version': key.min_decryption_version,
            'min_encryption_version': 0,
            'latest_version': len(key.versions)}
    if isinstance(key, SigningTransitKey):
      data.update(type=key.kind, derived=key.derived, supports_signing=True,
                  keys={str(v): {'creation_time': '2024-01-01T00:00:00Z',
                                 'name': ('ed25519' if key.kind == 'ed25519'
                                          else 'P-256'),
                                 'public_key': key.public_key(v)}
                        for v in range(1, len(key.versions) + 1)})
    else:
      data.update(type='aes256-gcm96', derived=False, supports_signing=False,
                  keys={str(v): 1700000000
                        for v in range(1, len(key.versions) + 1)})
    return 200, _envelope(data)

  @staticmethod
  def _sign(key, req):
    if key is None:
      return 400, {'errors': ['signing key not found']}
    if not isinstance(key, SigningTransitKey):
      return 400, {'errors': ['key type aes256-gcm96 does not support '
                              'signing']}
    if key.derived and not req.get('context'):
      return 400, {'errors': ['missing \'context\' for key derivation; the '
                              'key was created using a derived key, which '
                              'means additional, per-request information '
                              'must be included in order to perform '
                              'operations with the key']}
    version = int(req.get('key_version') or len(key.versions))
    if not 1 <= version <= len(key.versions):
      return 400, {'errors': ['requested version for signing does not '
                              'exist']}
    try:
      data = base64.b64decode(req.get('input', ''), validate=True)
    except (ValueError, binascii.Error):
      return 400, {'errors': ['unable to decode input as base64']}
    priv = key.versions[version - 1]
    if key.kind == 'ed25519':
      if req.get('prehashed'):
        return 400, {'errors': ['prehashed is not supported for ed25519 '
                                'keys']}
      sig = priv.sign(data)
    else:
      if req.get('hash_algorithm', 'sha2-256') != 'sha2-256':
        return 400, {'errors': ['unsupported hash algorithm (fake)']}
      if req.get('marshaling_algorithm', 'asn1') != 'asn1':
        return 400, {'errors': ['unsupported marshaling algorithm (fake)']}
      if req.get('prehashed'):
        if len(data) != 32:
          return 400, {'errors': ['prehashed input must be a SHA-256 digest '
                                  '(fake)']}
        sig = priv.sign(data, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
      else:
        sig = priv.sign(data, ec.ECDSA(hashes.SHA256()))
    return 200, _envelope({
        'signature': f'vault:v{version}:' + base64.b64encode(sig).decode(),
        'key_version': version})


def _envelope(data):
  return {'request_id': os.urandom(8).hex(), 'lease_id': '',
          'renewable': False, 'lease_duration': 0, 'data': data,
          'wrap_info': None, 'warnings': None, 'auth': None}
