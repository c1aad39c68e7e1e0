"""TEST-ONLY fake of the Azure Key Vault keys REST API (get, wrap, unwrap,
sign).

Served over HTTPS on a loopback port with a throwaway certificate, so the
backend is exercised through the real azure-keyvault-keys client, including
its bearer-challenge flow: a request without a valid ``Authorization``
header gets ``401`` with a ``WWW-Authenticate: Bearer authorization=...,
resource=...`` challenge, after which the SDK asks the credential for a
token and repeats the request. It is not Key Vault: RSA keys with versions
live in memory, key ids carry the *public* vault name given to the
constructor (as the real service's do), and errors have Key Vault's
``{"error": {"code", "message", "innererror"}}`` shape. EC keys
(``add_key(name, kty='EC')``) are real `cryptography` P-256 keys: GET
answers their ``crv``/``x``/``y`` JWK, ``POST .../sign`` with ``alg=ES256``
signs the 32-byte digest and answers raw ``r || s`` (base64url), as Key
Vault does.
"""

import base64
import binascii
import collections
import json
import re
import ssl
import threading
import time
import uuid
from typing import Dict, List, Optional
from urllib.parse import urlparse

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from tests.fakes.httpserver import LoopbackServer

TENANT = '72f988bf-0000-0000-0000-000000000000'
CHALLENGE = (f'Bearer authorization="https://login.microsoftonline.com/'
             f'{TENANT}", resource="https://vault.azure.net"')
_PATH_RE = re.compile(r'^/keys/(?P<name>[A-Za-z0-9-]+)(?:/(?P<version>'
                      r'[A-Za-z0-9]*))?(?:/(?P<op>wrapkey|unwrapkey|sign))?/?$')
_OAEP256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                        algorithm=hashes.SHA256(), label=None)


def _b64url(data: bytes) -> str:
  return base64.urlsafe_b64encode(data).rstrip(b'=').decode()


def _unb64url(text: str) -> bytes:
  return base64.urlsafe_b64decode(text + '=' * (-len(text) % 4))


def _int_to_bytes(n: int) -> bytes:
  return n.to_bytes((n.bit_length() + 7) // 8, 'big')


class FakeAzureKey:

  def __init__(self, bits: int = 2048, kty: str = 'RSA'):
    self.kty = kty           # 'RSA', or 'EC' (P-256)
    self.versions: Dict[str, object] = {}
    self.enabled = True
    self.expires = None      # unix time, or None
    self.key_ops = (['sign', 'verify'] if kty == 'EC' else
                    ['encrypt', 'decrypt', 'wrapKey', 'unwrapKey'])
    self.rotate(bits)

  def rotate(self, bits: int = 2048) -> str:
    version = uuid.uuid4().hex
    self.versions[version] = (ec.generate_private_key(ec.SECP256R1())
                              if self.kty == 'EC' else
                              rsa.generate_private_key(65537, bits))
    self.latest = version
    return version


class FakeAzureKeyVault:
  """Key Vault on https://127.0.0.1:<free port>, answering as `vault_host`."""

  def __init__(self, ssl_context: Optional[ssl.SSLContext], token: str,
               vault_host: str = 'tfxe-test.vault.azure.net'):
    self.vault_host = vault_host
    self.token = token
    self.keys: Dict[str, FakeAzureKey] = {}
    self.calls = collections.Counter()   # authorised operations only
    self.challenges = 0
    self.denied = set()                  # operations answered with 403
    self.faults: List[List] = []         # [count, status, code, message]
    self.seen_auth: List[str] = []
    self._lock = threading.Lock()
    self._http = LoopbackServer(self._handle, ssl_context, 'fake-azure-kv')
    self.endpoint = self._http.url

  # -- test API ---------------------------------------------------------------
  def add_key(self, name: str, bits: int = 2048,
              kty: str = 'RSA') -> FakeAzureKey:
    key = FakeAzureKey(bits, kty)
    self.keys[name] = key
    return key

  def uri(self, name: str, version: str = '') -> str:
    v = f'/{version}' if version else ''
    return f'azure-kv://{self.vault_host}/keys/{name}{v}'

  def inject(self, count: int, status: int, code: str, message: str) -> None:
    with self._lock:
      self.faults.append([count, status, code, message])

  def stop(self) -> None:
    self._http.stop()

  # -- service ----------------------------------------------------------------
  def _handle(self, method, path, headers, raw):
    url = urlparse(path)
    auth = headers.get('Authorization', '')
    with self._lock:
      self.seen_auth.append(auth)
      if auth != f'Bearer {self.token}':
        self.challenges += 1
        return self._reply(401, {'error': {
            'code': 'Unauthorized',
            'message': 'AKV10000: Request is missing a Bearer or PoP token.'}},
                           {'WWW-Authenticate': CHALLENGE})
      if 'api-version=' not in (url.query or ''):
        return self._error(400, 'BadParameter', 'api-version is required')
      m = _PATH_RE.match(url.path)
      op = None
      if m:
        op = m.group('op') or ('get' if method == 'GET' else None)
      if op is None:
        return self._error(404, 'NotFound', 'route not found')
      self.calls[op] += 1
      for f in self.faults:
        if f[0] > 0:
          f[0] -= 1
          return self._error(f[1], f[2], f[3],
                             {'Retry-After': '0'} if f[1] == 429 else None)
    name, version = m.group('name'), m.group('version') or ''
    key = self.keys.get(name)
    if op in self.denied:
      return self._error(
          403, 'Forbidden',
          f"The user, group or application 'appid=test' does not have keys "
          f"{op} permission on key vault '{self.vault_host}'.",
          inner='ForbiddenByPolicy')
    if key is None or (version and version not in key.versions):
      return self._error(
          404, 'KeyNotFound',
          f'A key with (name/id) {name} was not found in this key vault.')
    if not key.enabled:
      return self._error(
          403, 'Forbidden', f'Operation {op} is not allowed on a disabled key.',
          inner='KeyDisabled')
    version = version or key.latest
    priv = key.versions[version]
    kid = f'https://{self.vault_host}/keys/{name}/{version}'
    if op == 'get':
      nums = priv.public_key().public_numbers()
      now = int(time.time())
      attributes = {'enabled': key.enabled, 'created': now, 'updated': now,
                    'recoveryLevel': 'Recoverable+Purgeable',
                    'recoverableDays': 90}
      if key.expires is not None:
        attributes['exp'] = key.expires
      if key.kty == 'EC':
        jwk = {'kid': kid, 'kty': 'EC', 'key_ops': key.key_ops,
               'crv': 'P-256', 'x': _b64url(nums.x.to_bytes(32, 'big')),
               'y': _b64url(nums.y.to_bytes(32, 'big'))}
      else:
        jwk = {'kid': kid, 'kty': 'RSA', 'key_ops': key.key_ops,
               'n': _b64url(_int_to_bytes(nums.n)),
               'e': _b64url(_int_to_bytes(nums.e))}
      return self._reply(200, {'key': jwk, 'attributes': attributes})
    try:
      req = json.loads(raw or b'{}')
      value = _unb64url(req['value'])
    except (ValueError, KeyError, TypeError, binascii.Error):
      return self._error(400, 'BadParameter', 'Invalid request body')
    if op == 'sign':
      if key.kty != 'EC' or req.get('alg') != 'ES256' or len(value) != 32:
        return self._error(400, 'BadParameter',
                           f'Invalid signing request (alg '
                           f'{req.get("alg")!r}, key type {key.kty}).')
      r, s = utils.decode_dss_signature(priv.sign(
          value, ec.ECDSA(utils.Prehashed(hashes.SHA256()))))
      raw = r.to_bytes(32, 'big') + s.to_bytes(32, 'big')
      return self._reply(200, {'kid': kid, 'value': _b64url(raw)})
    if key.kty != 'RSA':
      return self._error(400, 'BadParameter',
                         'Operation is not supported for this key type.')
    if req.get('alg') != 'RSA-OAEP-256':
      return self._error(400, 'BadParameter',
                         f'Unsupported algorithm {req.get("alg")!r}')
    if op == 'wrapkey':
      out = priv.public_key().encrypt(value, _OAEP256)
    else:
      try:
        out = priv.decrypt(value, _OAEP256)
      except ValueError:
        return self._error(400, 'BadParameter', 'The parameter is incorrect.')
    return self._reply(200, {'kid': kid, 'value': _b64url(out)})

  @staticmethod
  def _reply(status, body, headers=None):
    h = {'Content-Type': 'application/json; charset=utf-8'}
    h.update(headers or {})
    return status, h, json.dumps(body).encode()

  def _error(self, status, code, message, headers=None, inner=None):
    err = {'code': code, 'message': message}
    if inner:
      err['innererror'] = {'code': inner}
    return self._reply(status, {'error': err}, headers)
