"""Keys, ComponentSpec and parameter checks of the EncryptPusher component.

Mirrors `tfx/types/standard_component_specs.py`: the input keys are the TFX
Pusher's (`model`, `model_blessing`, `infra_blessing`, `pushed_model`,
`push_destination`, `custom_config`) so DAG code written for Pusher, and the
Pusher executor helpers (`CheckBlessing`, `GetModelPath`), work unchanged.

Key material is never an execution parameter: TFX persists every execution
property in ML Metadata and bakes it into compiled pipeline JSON. Parameters
that name keys take key URIs (a PEM file path, `file://`, `aws-kms://`,
`gcp-kms://`, `hcvault://`, `azure-kv://`, `pkcs11:`); values that look like
key material or credentials are refused with
`tfx_encrypt.errors.KeyMaterialInParameterError`, both when the component is
built and again in the executor (compiled pipelines can be edited by hand).
"""

import json
import math
import re
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional

from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter
from tfx.types.component_spec import ComponentSpec
from tfx.types.component_spec import ExecutionParameter
from tfx.types.system_executions import Deploy

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt import policy as policy_lib
from tfx_encrypt import types as tfxe_types

# Inputs (the TFX Pusher's names; see standard_component_specs).
MODEL_KEY = 'model'
MODEL_BLESSING_KEY = 'model_blessing'
INFRA_BLESSING_KEY = 'infra_blessing'
# Outputs.
ENCRYPTED_MODEL_KEY = 'encrypted_model'
PUSHED_MODEL_KEY = 'pushed_model'
# Execution parameters.
RECIPIENTS_KEY = 'recipients'
SIGNER_KEY = 'signer'
CIPHER_KEY = 'cipher'
HASH_ALG_KEY = 'hash_alg'
ENCRYPTION_CONTEXT_KEY = 'encryption_context'
PUSH_DESTINATION_KEY = 'push_destination'
CUSTOM_CONFIG_KEY = 'custom_config'
BUNDLE_KEY = 'bundle'
# Execution parameters read by the Beam executor only.
BEAM_WORKER_IDENTITY_KEY = 'beam_worker_identity'
BEAM_MIN_BYTES_KEY = 'beam_min_bytes'
BEAM_SEGMENT_BYTES_KEY = 'beam_segment_bytes'

# Custom property and encryption-context names (shared with the lineage
# layer, which must not import TFX).
from tfx_encrypt.mlmd_names import (  # pylint: disable=g-multiple-import,unused-import
    FORMAT_VERSION_PROPERTY,
    CIPHER_PROPERTY,
    HASH_ALG_PROPERTY,
    PACKAGE_ID_PROPERTY,
    RECIPIENT_KEY_IDS_PROPERTY,
    RECIPIENT_URIS_PROPERTY,
    SIGNER_ID_PROPERTY,
    SIGNATURE_ALG_PROPERTY,
    MODEL_FINGERPRINT_PROPERTY,
    CIPHERTEXT_DIGEST_PROPERTY,
    FILE_COUNT_PROPERTY,
    PLAINTEXT_BYTES_PROPERTY,
    CIPHERTEXT_BYTES_PROPERTY,
    BUNDLE_PROPERTY,
    ENCRYPTION_CONTEXT_PROPERTY,
    ENCRYPTED_MODEL_URI_PROPERTY,
    PUSHED_PROPERTY,
    PUSHED_DESTINATION_PROPERTY,
    PUSHED_VERSION_PROPERTY,
    CONTEXT_PIPELINE_NAME,
    CONTEXT_PIPELINE_RUN_ID,
    CONTEXT_COMPONENT_ID,
    CONTEXT_EXECUTION_ID,
    CONTEXT_MODEL_URI,
    CONTEXT_MODEL_ARTIFACT_ID,
    CONTEXT_MODEL_NAME,
    CONTEXT_MODEL_VERSION,
    RESERVED_CONTEXT_PREFIXES,
)

# Encryption-context key of the push version, set by the executor unless the
# user's encryption_context sets it (then it must be a canonical integer):
# the key a consumer's Policy(min_version=...) reads by default.
CONTEXT_VERSION = policy_lib.DEFAULT_VERSION_KEY


class EncryptPusherSpec(ComponentSpec):
  """EncryptPusher component spec."""

  PARAMETERS = {
      # JSON list of key URIs (json_utils.dumps, as TFX stores lists).
      RECIPIENTS_KEY: ExecutionParameter(type=str),
      SIGNER_KEY: ExecutionParameter(type=str, optional=True),
      CIPHER_KEY: ExecutionParameter(type=str, optional=True),
      HASH_ALG_KEY: ExecutionParameter(type=str, optional=True),
      # JSON object of extra string key/values.
      ENCRYPTION_CONTEXT_KEY: ExecutionParameter(type=str, optional=True),
      # Base directory; versions are pushed to <base>/<version>/.
      PUSH_DESTINATION_KEY: ExecutionParameter(type=str, optional=True),
      CUSTOM_CONFIG_KEY: ExecutionParameter(type=str, optional=True),
      BUNDLE_KEY: ExecutionParameter(type=int, optional=True),
      BEAM_WORKER_IDENTITY_KEY: ExecutionParameter(type=str, optional=True),
      BEAM_MIN_BYTES_KEY: ExecutionParameter(type=int, optional=True),
      BEAM_SEGMENT_BYTES_KEY: ExecutionParameter(type=int, optional=True),
  }
  INPUTS = {
      MODEL_KEY:
          ChannelParameter(type=standard_artifacts.Model, optional=True),
      MODEL_BLESSING_KEY:
          ChannelParameter(type=standard_artifacts.ModelBlessing,
                           optional=True),
      INFRA_BLESSING_KEY:
          ChannelParameter(type=standard_artifacts.InfraBlessing,
                           optional=True),
  }
  OUTPUTS = {
      ENCRYPTED_MODEL_KEY: ChannelParameter(type=tfxe_types.EncryptedModel),
      PUSHED_MODEL_KEY: ChannelParameter(type=standard_artifacts.PushedModel),
  }
  TYPE_ANNOTATION = Deploy


# --------------------------------------------------------------------------
# Key-material checks.
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Parameter parsing shared by the component and the executors.
# --------------------------------------------------------------------------


def _load_json(text: Optional[str], what: str, default):
  if text is None or text == '' or text == 'null':
    return default
  if not isinstance(text, str):
    return text
  try:
    return json.loads(text)
  except ValueError as e:
    raise errors.UsageError(f'{what} is not valid JSON: {e}') from e


def normalize_recipients(recipients: Any) -> List[str]:
  if isinstance(recipients, str):
    recipients = [recipients]
  if not isinstance(recipients, (list, tuple)) or not recipients:
    raise errors.UsageError(
        f'{RECIPIENTS_KEY} must be a non-empty list of key URIs')
  out = []
  for i, r in enumerate(recipients):
    out.append(check_key_uri(r, f'{RECIPIENTS_KEY}[{i}]'))
  if len(set(out)) != len(out):
    raise errors.UsageError(f'{RECIPIENTS_KEY} lists the same key URI twice')
  return out


def normalize_context(context: Any) -> Dict[str, str]:
  if context is None:
    return {}
  if not isinstance(context, Mapping):
    raise errors.UsageError(
        f'{ENCRYPTION_CONTEXT_KEY} must be a dict of string keys and values')
  out = {}
  for k, v in context.items():
    if not isinstance(k, str) or not k:
      raise errors.UsageError(
          f'{ENCRYPTION_CONTEXT_KEY} keys must be non-empty strings')
    if k.startswith(RESERVED_CONTEXT_PREFIXES):
      raise errors.UsageError(
          f'{ENCRYPTION_CONTEXT_KEY} key {k!r} uses a reserved prefix '
          f'({", ".join(RESERVED_CONTEXT_PREFIXES)}); EncryptPusher sets '
          'those keys itself')
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
      raise errors.UsageError(
          f'{ENCRYPTION_CONTEXT_KEY}[{k!r}] must be a string or a number')
    out[k] = v if isinstance(v, str) else json.dumps(v)
  if CONTEXT_VERSION in out and not policy_lib.is_canonical_version(
      out[CONTEXT_VERSION]):
    raise errors.UsageError(
        f'{ENCRYPTION_CONTEXT_KEY}[{CONTEXT_VERSION!r}] must be a '
        'non-negative integer (ASCII digits, no sign or leading zero, at most '
        f'{policy_lib.MAX_VERSION_DIGITS} digits), got '
        f'{_text.quoted(out[CONTEXT_VERSION], 64)}: consumers compare it '
        'with --min-version. '
        'Leave it out to get the push version')
  check_value(out, ENCRYPTION_CONTEXT_KEY)
  return out


class Params:
  """Typed, validated view of the EncryptPusher execution properties."""

  def __init__(self, exec_properties: Mapping[str, Any]):
    get = exec_properties.get
    self.recipients: List[str] = normalize_recipients(
        _load_json(get(RECIPIENTS_KEY), RECIPIENTS_KEY, None))
    signer = get(SIGNER_KEY) or None
    self.signer: Optional[str] = (
        check_key_uri(signer, SIGNER_KEY) if signer else None)
    self.cipher: Optional[str] = get(CIPHER_KEY) or None
    self.hash_alg: Optional[str] = get(HASH_ALG_KEY) or None
    for name, v in ((CIPHER_KEY, self.cipher), (HASH_ALG_KEY, self.hash_alg)):
      if v is not None:
        if not isinstance(v, str):
          raise errors.UsageError(f'{name} must be a string')
        check_text(v, name)
    self.encryption_context: Dict[str, str] = normalize_context(
        _load_json(get(ENCRYPTION_CONTEXT_KEY), ENCRYPTION_CONTEXT_KEY, None))
    dest = get(PUSH_DESTINATION_KEY) or None
    if dest is not None:
      if not isinstance(dest, str):
        raise errors.UsageError(f'{PUSH_DESTINATION_KEY} must be a string')
      check_text(dest, PUSH_DESTINATION_KEY)
      if _SCHEME_RE.match(dest):
        _check_uri_secrets(dest, PUSH_DESTINATION_KEY)
    self.push_destination: Optional[str] = dest
    self.custom_config: Dict[str, Any] = _load_json(
        get(CUSTOM_CONFIG_KEY), CUSTOM_CONFIG_KEY, {}) or {}
    if not isinstance(self.custom_config, dict):
      raise errors.UsageError(f'{CUSTOM_CONFIG_KEY} must be a dict')
    check_value(self.custom_config, CUSTOM_CONFIG_KEY)
    self.bundle: bool = bool(get(BUNDLE_KEY) or 0)
    identity = get(BEAM_WORKER_IDENTITY_KEY) or None
    self.beam_worker_identity: Optional[str] = (
        check_key_uri(identity, BEAM_WORKER_IDENTITY_KEY)
        if identity else None)
    self.beam_min_bytes: int = int(get(BEAM_MIN_BYTES_KEY) or 0)
    self.beam_segment_bytes: Optional[int] = (
        int(get(BEAM_SEGMENT_BYTES_KEY)) if get(BEAM_SEGMENT_BYTES_KEY)
        else None)
    if self.beam_min_bytes < 0 or (self.beam_segment_bytes is not None and
                                   self.beam_segment_bytes <= 0):
      raise errors.UsageError(
          f'{BEAM_MIN_BYTES_KEY} must be >= 0 and {BEAM_SEGMENT_BYTES_KEY} > 0')
