"""EncryptPusher execution parameters: parsed, normalised and checked.

The component stores parameters as TFX does (lists and dicts as JSON
strings); the executors read them back through `Params`. Both sides use the
same normalisers, and the executor checks again everything the component
checked, because a compiled pipeline can be edited by hand. Values that
name keys must be key URIs (`key_material`).
"""

import json
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from tfx.proto import pusher_pb2
from tfx.utils import json_utils

from tfx_encrypt import _text
from tfx_encrypt import audit
from tfx_encrypt import errors
from tfx_encrypt import policy as policy_lib
from tfx_encrypt.components.encrypt_pusher import key_material
from tfx_encrypt.components.encrypt_pusher import kfp_v2
from tfx_encrypt.components.encrypt_pusher import spec
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import streaming

KeyUri = Union[str, Any]  # a key URI, or a KeyBackend (its .uri is used)


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
  """Recipients as a non-empty list of distinct key URIs.

  Raises:
    UsageError: not a non-empty list, or a URI given twice.
    KeyMaterialInParameterError: an entry is key material, not a URI.
  """
  if isinstance(recipients, str):
    recipients = [recipients]
  if not isinstance(recipients, (list, tuple)) or not recipients:
    raise errors.UsageError(
        f'{spec.RECIPIENTS_KEY} must be a non-empty list of key URIs')
  out = []
  for i, r in enumerate(recipients):
    out.append(key_material.check_key_uri(r, f'{spec.RECIPIENTS_KEY}[{i}]'))
  if len(set(out)) != len(out):
    raise errors.UsageError(
        f'{spec.RECIPIENTS_KEY} lists the same key URI twice')
  return out


def normalize_context(context: Any) -> Dict[str, str]:
  """The user's encryption context as {str: str}, numbers as JSON.

  The reserved prefixes are refused so that the provenance the executor
  adds (`tfx.*`) cannot be spoofed; `version`, when given, must be the
  canonical integer a consumer's --min-version compares.

  Raises:
    UsageError: not a dict of string keys and string or number values, a
      reserved key, or a non-canonical `version`.
    KeyMaterialInParameterError: a key or value looks like a secret.
  """
  if context is None:
    return {}
  if not isinstance(context, Mapping):
    raise errors.UsageError(
        f'{spec.ENCRYPTION_CONTEXT_KEY} must be a dict of string keys and '
        'values')
  out = {}
  for k, v in context.items():
    if not isinstance(k, str) or not k:
      raise errors.UsageError(
          f'{spec.ENCRYPTION_CONTEXT_KEY} keys must be non-empty strings')
    if k.startswith(spec.RESERVED_CONTEXT_PREFIXES):
      raise errors.UsageError(
          f'{spec.ENCRYPTION_CONTEXT_KEY} key {k!r} uses a reserved prefix '
          f'({", ".join(spec.RESERVED_CONTEXT_PREFIXES)}); EncryptPusher sets '
          'those keys itself')
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
      raise errors.UsageError(
          f'{spec.ENCRYPTION_CONTEXT_KEY}[{k!r}] must be a string or a number')
    out[k] = v if isinstance(v, str) else json.dumps(v)
  version = spec.CONTEXT_VERSION
  if version in out and not policy_lib.is_canonical_version(out[version]):
    raise errors.UsageError(
        f'{spec.ENCRYPTION_CONTEXT_KEY}[{version!r}] must be a '
        'non-negative integer (ASCII digits, no sign or leading zero, at most '
        f'{policy_lib.MAX_VERSION_DIGITS} digits), got '
        f'{_text.quoted(out[version], 64)}: consumers compare it '
        'with --min-version. '
        'Leave it out to get the push version')
  key_material.check_value(out, spec.ENCRYPTION_CONTEXT_KEY)
  return out


class Params:
  """Typed, validated view of the EncryptPusher execution properties."""

  def __init__(self, exec_properties: Mapping[str, Any]):
    get = exec_properties.get
    self.recipients: List[str] = normalize_recipients(
        _load_json(get(spec.RECIPIENTS_KEY), spec.RECIPIENTS_KEY, None))
    signer = get(spec.SIGNER_KEY) or None
    self.signer: Optional[str] = (
        key_material.check_key_uri(signer, spec.SIGNER_KEY) if signer
        else None)
    self.cipher: Optional[str] = get(spec.CIPHER_KEY) or None
    self.hash_alg: Optional[str] = get(spec.HASH_ALG_KEY) or None
    for name, v in ((spec.CIPHER_KEY, self.cipher),
                    (spec.HASH_ALG_KEY, self.hash_alg)):
      if v is not None:
        if not isinstance(v, str):
          raise errors.UsageError(f'{name} must be a string')
        key_material.check_text(v, name)
    self.encryption_context: Dict[str, str] = normalize_context(
        _load_json(get(spec.ENCRYPTION_CONTEXT_KEY),
                   spec.ENCRYPTION_CONTEXT_KEY, None))
    dest = get(spec.PUSH_DESTINATION_KEY) or None
    if dest is not None:
      if not isinstance(dest, str):
        raise errors.UsageError(
            f'{spec.PUSH_DESTINATION_KEY} must be a string')
      # Also refuses credentials in a URI's user part or query.
      key_material.check_text(dest, spec.PUSH_DESTINATION_KEY)
      check_destination_form(dest)
    self.push_destination: Optional[str] = dest
    self.custom_config: Dict[str, Any] = _load_json(
        get(spec.CUSTOM_CONFIG_KEY), spec.CUSTOM_CONFIG_KEY, {}) or {}
    if not isinstance(self.custom_config, dict):
      raise errors.UsageError(f'{spec.CUSTOM_CONFIG_KEY} must be a dict')
    key_material.check_value(self.custom_config, spec.CUSTOM_CONFIG_KEY)
    self.bundle: bool = bool(get(spec.BUNDLE_KEY) or 0)
    identity = get(spec.BEAM_WORKER_IDENTITY_KEY) or None
    self.beam_worker_identity: Optional[str] = (
        key_material.check_key_uri(identity, spec.BEAM_WORKER_IDENTITY_KEY)
        if identity else None)
    self.beam_min_bytes: int = int(get(spec.BEAM_MIN_BYTES_KEY) or 0)
    self.beam_segment_bytes: Optional[int] = (
        int(get(spec.BEAM_SEGMENT_BYTES_KEY))
        if get(spec.BEAM_SEGMENT_BYTES_KEY) else None)
    if self.beam_min_bytes < 0 or (self.beam_segment_bytes is not None and
                                   self.beam_segment_bytes <= 0):
      raise errors.UsageError(
          f'{spec.BEAM_MIN_BYTES_KEY} must be >= 0 and '
          f'{spec.BEAM_SEGMENT_BYTES_KEY} > 0')
    # Run identity on Kubeflow Pipelines v2 / Vertex AI (kfp_v2.py): the
    # placeholders the orchestrator resolved, and the compile-time name.
    self.kfp: Dict[str, str] = kfp_v2.runtime_values(exec_properties)
    self.pipeline_name: Optional[str] = kfp_v2.resolved(
        get(spec.PIPELINE_NAME_KEY))
    for name, value in list(self.kfp.items()) + [
        (spec.PIPELINE_NAME_KEY, self.pipeline_name)]:
      if value is not None:
        key_material.check_text(value, name)

  def package_options(self) -> Dict[str, Any]:
    """Keyword arguments of `package.encrypt_model` (and its Beam twin).

    An unset cipher or hash is left out, so the package API's default
    applies rather than a second copy of it here.
    """
    options = dict(recipients=list(self.recipients), signer=self.signer,
                   bundle=self.bundle)
    if self.cipher:
      options['cipher'] = self.cipher
    if self.hash_alg:
      options['hash_alg'] = self.hash_alg
    return options


# --------------------------------------------------------------------------
# The component's side: arguments into execution properties.
# --------------------------------------------------------------------------


def key_uri(key: KeyUri, what: str) -> str:
  """A KeyBackend stands for its URI; anything else must be a URI string."""
  from tfx_encrypt.keys import base as keys_base  # pylint: disable=g-import-not-at-top
  if isinstance(key, keys_base.KeyBackend):
    key = key.uri
  return key_material.check_key_uri(key, what)


def push_destination_dir(
    push_destination: Union[None, str, pusher_pb2.PushDestination]
) -> Optional[str]:
  """Accepts a base directory, or Pusher's PushDestination proto."""
  if push_destination is None:
    return None
  if isinstance(push_destination, pusher_pb2.PushDestination):
    if push_destination.WhichOneof('destination') != 'filesystem':
      raise errors.UsageError(
          'EncryptPusher supports PushDestination.filesystem only')
    fs = push_destination.filesystem
    if fs.versioning not in (pusher_pb2.Versioning.AUTO,
                             pusher_pb2.Versioning.UNIX_TIMESTAMP):
      raise errors.UsageError('EncryptPusher versions pushes by Unix time '
                              '(Versioning.AUTO or UNIX_TIMESTAMP)')
    push_destination = fs.base_directory
  if not isinstance(push_destination, str) or not push_destination:
    raise errors.UsageError(
        'push_destination must be a base directory (local path or a '
        'tf.io.gfile URI such as gs://bucket/dir) or a PushDestination')
  key_material.check_text(push_destination, spec.PUSH_DESTINATION_KEY)
  check_destination_form(push_destination)
  return push_destination


# Destination forms: a local path, file:///PATH, gs://BUCKET[/PATH],
# s3://BUCKET[/PATH] (another tf.io.gfile filesystem scheme, e.g. hdfs://,
# passes unjudged). Bucket names as GCS and S3 allow them (lower case,
# digits, '.', '-', '_' for GCS; 3-222 characters with dots).
_DEST_SCHEME_RE = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*):(//)?')
_BUCKET_RE = re.compile(r'^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$')
_BUCKET_SCHEMES = ('gs', 's3')
# Not filesystems: web and transfer protocols, registries, gcs:// (a typo).
_NOT_FILESYSTEMS = ('http', 'https', 'ftp', 'ftps', 'sftp', 'ssh', 'scp',
                    'rsync', 'git', 'data', 'mailto', 'oci', 'docker', 'gcs')
_KNOWN_URL_SCHEMES = ('file', 'hdfs', 'viewfs', 'ram') + _BUCKET_SCHEMES + (
    _NOT_FILESYSTEMS)


def check_destination_form(dest: str) -> None:
  """Refuses a push destination that cannot be what the user meant.

  Accepted: a local path (absolute, or relative to the executor's working
  directory), `file:///ABSOLUTE/PATH`, `gs://BUCKET[/PATH]`,
  `s3://BUCKET[/PATH]`, and other tf.io.gfile filesystem URIs
  (`hdfs://...`), not judged further. Checked for its form only: no I/O.

  Raises:
    UsageError: a scheme that is no filesystem (http, https, ftp, gcs, ...),
      a URI with a query or fragment, a missing or malformed bucket,
      `file://HOST/...`, a path starting with `~` (never expanded), or
      control characters.
  """
  what = spec.PUSH_DESTINATION_KEY
  shown = _text.quoted(dest, 120)
  if dest != dest.strip() or any(ord(c) < 32 or ord(c) == 127 for c in dest):
    raise errors.UsageError(
        f'{what} {shown} has surrounding spaces or control characters')
  m = _DEST_SCHEME_RE.match(dest)
  scheme = m.group(1).lower() if m else None
  if m and len(m.group(1)) == 1:
    scheme = None  # a drive letter, not a scheme
  if scheme is not None and not m.group(2) and (
      scheme not in _KNOWN_URL_SCHEMES):
    scheme = None  # "models:v1" is a relative path, not a URI
  if scheme is None:
    if dest.startswith('~'):
      raise errors.UsageError(
          f'{what} {shown} starts with "~", which is not expanded: give an '
          'absolute path')
    return
  if scheme in _NOT_FILESYSTEMS:
    raise errors.UsageError(
        f'{what} {shown}: EncryptPusher pushes to a filesystem or a bucket: '
        'a local path, file:///PATH, gs://BUCKET/PATH or s3://BUCKET/PATH' +
        (' (gs://, not gcs://)' if scheme == 'gcs' else ''))
  if not m.group(2):
    raise errors.UsageError(
        f'{what} {shown} is missing "//" after "{m.group(1)}:" '
        f'(e.g. {scheme}://...)')
  if '?' in dest or '#' in dest:
    raise errors.UsageError(
        f'{what} {shown} has a query or fragment; give the directory only')
  rest = dest[m.end():]
  if scheme == 'file':
    if not rest.startswith('/'):
      raise errors.UsageError(
          f'{what} {shown} names a host or a relative path; a file URI is '
          'file:///ABSOLUTE/PATH (three slashes)')
    return
  if scheme not in _BUCKET_SCHEMES:
    return  # another tf.io.gfile filesystem
  bucket, _, path = rest.partition('/')
  if not _BUCKET_RE.match(bucket) or '..' in bucket:
    raise errors.UsageError(
        f'{what} {shown} does not name a valid bucket: {scheme}://BUCKET/PATH '
        'with a bucket name of lower-case letters, digits, ".", "-" or "_"')
  if '..' in path.split('/'):
    raise errors.UsageError(
        f'{what} {shown} has a ".." path segment; object stores have no '
        'parent directories')


def exec_properties(*, recipients, signer, cipher, hash_alg,
                    encryption_context, push_destination, custom_config,
                    bundle, audit_log=None) -> Dict[str, Any]:
  """The EncryptPusher arguments as execution properties, checked.

  Checked when the pipeline is built, so a mistake fails there and not in
  the middle of a run; `Params` checks them again at run time. Signer URIs
  are checked for their form only: no network call at build time.

  Raises:
    KeyMaterialInParameterError: a parameter looks like key material.
    UsageError: an argument is malformed or unknown.
  """
  if isinstance(recipients, (str, bytes)) or not isinstance(
      recipients, Sequence):
    recipients = [recipients]
  uris = normalize_recipients(
      [key_uri(r, f'{spec.RECIPIENTS_KEY}[{i}]')
       for i, r in enumerate(recipients)])
  from tfx_encrypt import keys as keys_lib  # pylint: disable=g-import-not-at-top
  for i, uri in enumerate(uris):
    # e.g. a Cloud KMS recipient names a CryptoKey, not a key version.
    keys_lib.check_uri_form(uri, 'recipient',
                            option=f'{spec.RECIPIENTS_KEY}[{i}]')
  signer_uri = key_uri(signer, spec.SIGNER_KEY) if signer is not None else None
  if signer_uri is not None:
    # e.g. a Cloud KMS signer must name a CryptoKeyVersion.
    keys_lib.check_uri_form(signer_uri, 'signer', option=spec.SIGNER_KEY)
  for name, value, known in (
      (spec.CIPHER_KEY, cipher, tuple(streaming.CIPHERS)),
      (spec.HASH_ALG_KEY, hash_alg, tuple(digest_lib.HASHES))):
    if value is not None and value not in known:
      raise errors.UsageError(
          f'unknown {name} {value!r}; choose one of {", ".join(known)}')
  context = normalize_context(encryption_context)
  if custom_config is not None and not isinstance(custom_config, dict):
    raise errors.UsageError('custom_config must be a dict')
  key_material.check_value(custom_config or {}, spec.CUSTOM_CONFIG_KEY)
  if audit_log is not None:
    if not isinstance(audit_log, str):
      raise errors.UsageError(f'{spec.AUDIT_LOG_KEY} must be a string')
    key_material.check_text(audit_log, spec.AUDIT_LOG_KEY)
    audit.open_sink(audit_log)  # its form; opened by the executor
  return {
      spec.AUDIT_LOG_KEY: audit_log,
      spec.RECIPIENTS_KEY: json_utils.dumps(uris),
      spec.SIGNER_KEY: signer_uri,
      spec.CIPHER_KEY: cipher,
      spec.HASH_ALG_KEY: hash_alg,
      spec.ENCRYPTION_CONTEXT_KEY: (json_utils.dumps(context) if context
                                    else None),
      spec.PUSH_DESTINATION_KEY: push_destination_dir(push_destination),
      spec.CUSTOM_CONFIG_KEY: json_utils.dumps(custom_config),
      spec.BUNDLE_KEY: int(bool(bundle)),
      # Resolved by Kubeflow Pipelines v2 / Vertex AI only (kfp_v2.py).
      **kfp_v2.PLACEHOLDERS,
  }


def beam_exec_properties(worker_identity: Optional[KeyUri], min_bytes: int,
                         segment_bytes: Optional[int]) -> Dict[str, Any]:
  """BeamEncryptPusher's own arguments as execution properties, checked.

  Raises:
    KeyMaterialInParameterError: the worker identity is key material.
    UsageError: a negative threshold or a non-positive segment size.
  """
  properties = {
      spec.BEAM_WORKER_IDENTITY_KEY: (
          key_uri(worker_identity, spec.BEAM_WORKER_IDENTITY_KEY)
          if worker_identity is not None else None),
      spec.BEAM_MIN_BYTES_KEY: int(min_bytes),
      spec.BEAM_SEGMENT_BYTES_KEY: (int(segment_bytes) if segment_bytes
                                    else None),
  }
  if min_bytes < 0 or (segment_bytes is not None and segment_bytes <= 0):
    raise errors.UsageError(
        'beam_min_bytes must be >= 0 and beam_segment_bytes > 0')
  return properties


# Schemes whose recipient URI also unwraps (the KMS does it), so Beam workers
# can use the recipient itself as their identity.
_KMS_SCHEMES = ('aws-kms', 'gcp-kms', 'hcvault', 'azure-kv')


def _workers_can_unwrap_with(recipient: str) -> bool:
  """Whether Beam workers could unwrap with this recipient URI itself."""
  from tfx_encrypt import keys as keys_lib  # pylint: disable=g-import-not-at-top
  scheme = keys_lib.uri_scheme(recipient)
  if scheme == 'file':
    return False  # a recipient file is a public key: it cannot unwrap
  if scheme == 'pkcs11':
    # A key in a token (module-path=...) can; an exported public key cannot.
    return ('module-path=' in recipient and 'x-public-key' not in recipient
            and 'type=public' not in recipient)
  return True  # KMS; a third-party scheme is not judged here


def check_beam_worker_identity(identity: Optional[str],
                               recipients: Sequence[str]) -> None:
  """Refuses, when the pipeline is built, a Beam job whose workers could not
  unwrap the data key (they unwrap it themselves; beam_executor.py).

  Form only, no I/O: a private key file named as the identity is checked by
  the workers at run time (it may exist only there).

  Raises:
    UsageError: no identity and no recipient the workers can unwrap with; a
      recipient's public key file as the identity; a KMS identity that is
      not a recipient.
  """
  from tfx_encrypt import keys as keys_lib  # pylint: disable=g-import-not-at-top
  what = spec.BEAM_WORKER_IDENTITY_KEY
  if identity is not None:
    keys_lib.check_uri_form(identity, 'identity', option=what)
    scheme = keys_lib.uri_scheme(identity)
    shown = _text.quoted(identity, 200)
    if scheme == 'file' and identity in recipients:
      raise errors.UsageError(
          f'{what} {shown} is a recipient, i.e. a public key file, which '
          'cannot unwrap the data key: give the private key file of a '
          'recipient (readable by every Beam worker), or a KMS recipient')
    if scheme in _KMS_SCHEMES and identity not in recipients:
      raise errors.UsageError(
          f'{what} {shown} is a KMS key that is not among the recipients, so '
          'the data key is not wrapped for it: add it to recipients or name '
          'a KMS recipient')
    return
  if not any(_workers_can_unwrap_with(r) for r in recipients):
    raise errors.UsageError(
        'BeamEncryptPusher: Beam workers unwrap the data key themselves, and '
        'no recipient lets them (a public key file cannot unwrap): pass '
        f'{what}=<the private key file of a recipient, readable by every '
        'worker>, or add a KMS recipient (aws-kms://, gcp-kms://, hcvault://, '
        'azure-kv://) for the workers to unwrap with')
