"""Refuses key material and credentials in EncryptPusher parameters.

TFX records every execution parameter verbatim in ML Metadata and bakes it
into compiled pipeline JSON, so a parameter that names a key must be a key
*reference* (a PEM file path, `file://`, `aws-kms://`, `gcp-kms://`,
`hcvault://`, `azure-kv://`, `pkcs11:`), never the key, a PIN or a token.
These checks run when the component is built and again in the executor
(compiled pipelines can be edited by hand); a value that looks like a secret
raises `tfx_encrypt.errors.KeyMaterialInParameterError`, whose message names
the parameter and the reason but never the value.

Heuristics, tuned to refuse raw keys (PEM, hex or base64 runs of 256 bits,
age identities, JWKs, ssh keys, cloud tokens) and credentials carried in
URIs, while accepting long resource names and identifiers.
"""

import math
import re
import urllib.parse
from typing import Any, Mapping

from tfx_encrypt import errors

_HINT = ('Pass a key URI instead (a path or file:// URI of a PEM key file, '
         'aws-kms://, gcp-kms://, hcvault://, azure-kv://, pkcs11:...), and '
         'keep secrets such as PINs and tokens in the environment or a secret '
         'store: TFX records execution parameters verbatim in ML Metadata and '
         'in compiled pipeline definitions.')

_SCHEME_RE = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*):')
_PEM_RE = re.compile(r'-----\s*BEGIN|-----\s*END|PRIVATE KEY-----', re.I)
_MARKER_RE = re.compile(
    r'AGE-SECRET-KEY-1|AGE-PLUGIN-[A-Z0-9]+-1|'  # age identities
    r'\bhv[sbr]\.[A-Za-z0-9_-]{20,}|'  # Vault tokens
    r'\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|'  # AWS access key ids
    r'"kty"\s*:|'  # JWK
    r'\bssh-(?:rsa|ed25519|dss)\s+AAAA|ecdsa-sha2-nistp\d+\s+AAAA|'
    r'PuTTY-User-Key-File')
# Hex runs of 256 bits or more, unless labelled as a digest ("sha256:<hex>").
_HEX_RE = re.compile(
    r'(?<![0-9A-Za-z])(?<!sha256:)(?<!sha384:)(?<!sha512:)(?<!blake2b:)'
    r'(?<!blake3:)(?<!sha1:)(?<!md5:)[0-9a-fA-F]{64,}')
_B64_RUN_RE = re.compile(r'[A-Za-z0-9+/_-]{40,}={0,2}')
# Query/attribute names whose value is a secret.
_SECRET_PARAM_NAMES = frozenset({
    'pin-value', 'pin', 'password', 'passwd', 'pwd', 'passphrase', 'secret',
    'client_secret', 'client-secret', 'clientsecret', 'token', 'access_token',
    'access-token', 'auth_token', 'id_token', 'refresh_token', 'api_key',
    'api-key', 'apikey', 'key', 'private_key', 'private-key', 'privatekey',
    'secret_key', 'secret-key', 'secret_access_key', 'aws_secret_access_key',
    'session_token', 'aws_session_token', 'x-amz-security-token',
    'x-amz-signature', 'x-goog-signature', 'x-vault-token', 'sig',
    'signature', 'sas', 'sas_token', 'credential', 'credentials',
    'key_material', 'dek', 'kek', 'identity_key', 'seed',
})
# Dict entry names (custom_config, encryption_context) that hold a secret;
# narrower than the URI parameter list ('key' often names a key *URI*).
_SECRET_ENTRY_NAMES = _SECRET_PARAM_NAMES - frozenset(
    {'key', 'sig', 'signature', 'seed', 'credential', 'credentials'})
# Names that are fine even though they contain a secret-sounding word.
_PKCS11_PUBLIC_ATTRS = frozenset({
    'token', 'object', 'id', 'type', 'manufacturer', 'model', 'serial',
    'library-manufacturer', 'library-description', 'library-version',
    'slot-description', 'slot-manufacturer', 'slot-id', 'pin-source',
    'module-name', 'module-path'})


def _fail(what: str, why: str) -> 'errors.KeyMaterialInParameterError':
  # The message names the parameter and the reason, never the value.
  return errors.KeyMaterialInParameterError(
      f'{what} looks like key material or a credential ({why}); it would be '
      f'stored in ML Metadata. {_HINT}')


def _entropy(s: str) -> float:
  counts = {}
  for ch in s:
    counts[ch] = counts.get(ch, 0) + 1
  n = float(len(s))
  return -sum(c / n * math.log2(c / n) for c in counts.values())


def _looks_like_b64_blob(token: str) -> bool:
  """A long, high-entropy run of base64 characters (a raw key, a token).

  Random base64 mixes upper case (~40%), lower case (~40%) and digits (~16%)
  with few long lower-case runs; identifiers, file and resource names are
  mostly made of lower-case words. Tuned on random 256-bit keys (about 0.1%
  missed) against long CamelCase / snake_case names.
  """
  body = token.rstrip('=')
  n = len(body)
  if n < 40:
    return False
  upper = sum(c.isupper() for c in body)
  lower = sum(c.islower() for c in body)
  if upper < 0.1 * n or lower < 0.1 * n or not any(
      c.isdigit() for c in body):
    return False
  words = sum(len(m) for m in re.findall(r'[a-z]{3,}', body))
  if words > 0.5 * n:
    return False
  return _entropy(body) >= 4.2


def _check_blobs(text: str, what: str, split_slashes: bool) -> None:
  if _HEX_RE.search(text):
    raise _fail(what, 'a long hexadecimal string')
  seps = r'[\s,;:=&?@"\'.()\[\]{}<>|]' if not split_slashes else (
      r'[\s,;:=&?@"\'.()\[\]{}<>|/]')
  compact = re.sub(r'\s+', '', text)
  if _B64_RUN_RE.fullmatch(compact) and (
      _looks_like_b64_blob(compact)):
    raise _fail(what, 'a long base64 string')
  for token in re.split(seps, text):
    for run in _B64_RUN_RE.findall(token):
      if _looks_like_b64_blob(run):
        raise _fail(what, 'a long base64 string')


def _check_uri_secrets(uri: str, what: str) -> None:
  """Refuses credentials carried inside a URI (userinfo, query, attrs)."""
  m = _SCHEME_RE.match(uri)
  scheme = m.group(1).lower() if m and len(m.group(1)) > 1 else ''
  if scheme == 'pkcs11':
    # RFC 7512: path attributes separated by ';', query attributes by '&'.
    rest = uri[len('pkcs11:'):]
    path, _, query = rest.partition('?')
    for part in re.split(r'[;&]', path) + re.split(r'[&;]', query):
      name = urllib.parse.unquote(part.partition('=')[0]).strip().lower()
      if not name or name in _PKCS11_PUBLIC_ATTRS:
        continue
      if name in _SECRET_PARAM_NAMES or 'pin' == name or 'pin-value' in name:
        raise _fail(what, f'the URI carries the attribute {name!r}')
    return
  if scheme:
    try:
      parts = urllib.parse.urlsplit(uri)
    except ValueError:
      return
    if parts.password is not None:
      raise _fail(what, 'the URI carries a password')
    if parts.username and len(parts.username) >= 20:
      raise _fail(what, 'the URI carries credentials in its user part')
    query = parts.query
    fragment = parts.fragment
  else:
    _, _, query = uri.partition('?')
    fragment = ''
  for q in (query, fragment):
    for name, _ in urllib.parse.parse_qsl(q, keep_blank_values=True):
      if name.strip().lower() in _SECRET_PARAM_NAMES:
        raise _fail(what, f'the URI carries the parameter {name!r}')


def check_text(value: str, what: str) -> None:
  """Raises KeyMaterialInParameterError if `value` looks like key material.

  Used for free-form parameter values (encryption context, custom config).

  Args:
    value: the string to check.
    what: name of the parameter, used in the error message.
  """
  if _PEM_RE.search(value):
    raise _fail(what, 'it contains a PEM block')
  if _MARKER_RE.search(value):
    raise _fail(what, 'it contains a private key or token')
  uri_like = bool(_SCHEME_RE.match(value)) or value.startswith(('/', './',
                                                                  '~'))
  if uri_like:
    _check_uri_secrets(value, what)
  _check_blobs(value, what, split_slashes=uri_like)


def check_key_uri(value: Any, what: str) -> str:
  """Checks that `value` is a key *reference* (URI or path) and returns it.

  Args:
    value: the candidate key URI.
    what: name of the parameter, used in error messages.

  Returns:
    The URI, unchanged.

  Raises:
    KeyMaterialInParameterError: the value looks like key material, or the URI
      carries a PIN, token, password or other credential.
    InvalidKeyUriError: the value is not a non-empty string.
  """
  if isinstance(value, (bytes, bytearray, memoryview)):
    raise _fail(what, 'it is raw bytes')
  if hasattr(value, 'private_bytes') or hasattr(value, 'public_bytes'):
    raise _fail(what, 'it is a key object')
  if not isinstance(value, str) or not value.strip():
    raise errors.InvalidKeyUriError(
        f'{what} must be a non-empty key URI string, got '
        f'{type(value).__name__}. {_HINT}')
  if _PEM_RE.search(value):
    raise _fail(what, 'it contains a PEM block')
  if _MARKER_RE.search(value):
    raise _fail(what, 'it contains a private key or token')
  if any(c in value for c in '\r\n\t') or value != value.strip():
    raise _fail(what, 'it contains whitespace or line breaks, which key URIs '
                'never do')
  _check_uri_secrets(value, what)
  _check_blobs(value, what, split_slashes=True)
  return value


_MAX_DEPTH = 16


def check_value(value: Any, what: str, depth: int = 0) -> None:
  """Recursively checks a JSON-like value (dict keys, strings, lists)."""
  if depth > _MAX_DEPTH:
    raise errors.UsageError(f'{what} is nested too deeply')
  if isinstance(value, (bytes, bytearray, memoryview)):
    raise _fail(what, 'it is raw bytes')
  if isinstance(value, str):
    check_text(value, what)
  elif isinstance(value, Mapping):
    for k, v in value.items():
      name = f'{what}[{k!r}]'
      if not isinstance(k, str):
        raise errors.UsageError(f'{what} keys must be strings')
      check_text(k, f'a key of {what}')
      if (k.strip().lower().replace(' ', '_') in _SECRET_ENTRY_NAMES and
          v not in (None, '', [], {})):
        raise _fail(name, f'the entry is named {k!r}')
      check_value(v, name, depth + 1)
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      check_value(v, f'{what}[{i}]', depth + 1)
  elif hasattr(value, 'private_bytes') or hasattr(value, 'public_bytes'):
    raise _fail(what, 'it is a key object')
