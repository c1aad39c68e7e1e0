"""Reading ML Metadata: opening a store, decoding artifacts and properties.

Also the lineage errors. Only `ml_metadata` is imported here: no TFX, no
TensorFlow. Property names come from `tfx_encrypt.mlmd_names`, which the
EncryptPusher executor writes with. Nothing secret is decoded: the
properties an EncryptedModel carries hold key ids and key URIs only.
"""

import datetime
import json
import os
from typing import Any, Dict, Iterable, Optional

from google.protobuf import json_format
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from tfx_encrypt import errors
from tfx_encrypt import mlmd_names

# The properties reported for an EncryptedModel / PushedModel, in this order.
PACKAGE_PROPERTIES = (
    mlmd_names.FORMAT_VERSION_PROPERTY,
    mlmd_names.CIPHER_PROPERTY,
    mlmd_names.HASH_ALG_PROPERTY,
    mlmd_names.PACKAGE_ID_PROPERTY,
    mlmd_names.RECIPIENT_KEY_IDS_PROPERTY,
    mlmd_names.RECIPIENT_URIS_PROPERTY,
    mlmd_names.SIGNER_ID_PROPERTY,
    mlmd_names.SIGNATURE_ALG_PROPERTY,
    mlmd_names.MODEL_FINGERPRINT_PROPERTY,
    mlmd_names.CIPHERTEXT_DIGEST_PROPERTY,
    mlmd_names.FILE_COUNT_PROPERTY,
    mlmd_names.PLAINTEXT_BYTES_PROPERTY,
    mlmd_names.CIPHERTEXT_BYTES_PROPERTY,
    mlmd_names.BUNDLE_PROPERTY,
    mlmd_names.ENCRYPTION_CONTEXT_PROPERTY,
    mlmd_names.PUSHED_PROPERTY,
    mlmd_names.PUSHED_DESTINATION_PROPERTY,
    mlmd_names.PUSHED_VERSION_PROPERTY,
    'tfx_version',  # written by TFX itself
)
# Recorded as JSON strings; decoded into lists and dicts.
_JSON_PROPERTIES = frozenset({mlmd_names.RECIPIENT_KEY_IDS_PROPERTY,
                              mlmd_names.RECIPIENT_URIS_PROPERTY,
                              mlmd_names.ENCRYPTION_CONTEXT_PROPERTY})


class LineageError(errors.TfxEncryptError):
  """A lineage query could not be answered."""
  exit_code = 1


class NoMatchError(LineageError):
  """No EncryptedModel artifact matches the query (CLI exit code 1)."""
  exit_code = 1


class MetadataStoreNotFoundError(LineageError, errors.UsageError):
  """The ML Metadata store named by the caller does not exist."""
  exit_code = 2


class MetadataStoreError(LineageError):
  """The path exists but is not an ML Metadata store that can be read."""
  exit_code = 3


def open_sqlite(path: str) -> metadata_store.MetadataStore:
  """Opens an existing SQLite ML Metadata store, read-only.

  Unlike `sqlite_metadata_connection_config`, never creates a new, empty
  store: a lineage query against a mistyped path must fail, not answer
  "nothing found".

  Args:
    path: the SQLite file written by the pipeline's metadata connection.

  Returns:
    A MetadataStore over a READONLY SQLite connection.

  Raises:
    MetadataStoreNotFoundError: `path` does not exist or is not a file.
    MetadataStoreError: the file is not an ML Metadata store.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    what = 'is not a file' if os.path.exists(path) else 'does not exist'
    raise MetadataStoreNotFoundError(
        f'ML Metadata store {path} {what}; pass the SQLite file of the '
        "pipeline's metadata connection (e.g. <workdir>/metadata.sqlite)")
  config = metadata_store_pb2.ConnectionConfig()
  config.sqlite.filename_uri = path
  config.sqlite.connection_mode = (
      metadata_store_pb2.SqliteMetadataSourceConfig.READONLY)
  try:
    store = metadata_store.MetadataStore(config)
    store.get_artifact_types()
  except Exception as e:  # MLMD raises RuntimeError or its own error types.
    reason = ' '.join(str(e).split()) or type(e).__name__
    # MLMD says "Error when executing query: <reason> query: <SQL>".
    reason = reason.replace('Error when executing query: ', '', 1)
    reason = reason.split(' query:', 1)[0][:200]
    raise MetadataStoreError(
        f'{path} is not a readable ML Metadata store ({reason})') from e
  return store


def decode_value(value: metadata_store_pb2.Value) -> Any:
  """An MLMD property value as plain Python.

  Args:
    value: a `metadata_store_pb2.Value` (a property or custom property).

  Returns:
    int, float, str or bool for scalar values; a dict (or list) for a struct;
    for an opaque proto, `{'@type': type_url}` (its bytes are not decoded);
    None when unset.
  """
  kind = value.WhichOneof('value')
  if kind is None:
    return None
  if kind == 'struct_value':
    return json_format.MessageToDict(value.struct_value)
  if kind == 'proto_value':
    return {'@type': value.proto_value.type_url}
  return getattr(value, kind)


def decode_properties(node: Any,
                      names: Optional[Iterable[str]] = None) -> Dict[str, Any]:
  """Decoded properties and custom properties of an artifact or execution.

  Args:
    node: an MLMD Artifact, Execution or Context.
    names: if given, only these names (in this order); others are skipped.

  Returns:
    {name: plain Python value}; custom properties win over properties of
    the same name.
  """
  merged = {}
  for k, v in node.properties.items():
    merged[k] = v
  for k, v in node.custom_properties.items():
    merged[k] = v
  keys = list(names) if names is not None else sorted(merged)
  return {k: decode_value(merged[k]) for k in keys if k in merged}


def package_properties(artifact: metadata_store_pb2.Artifact
                       ) -> Dict[str, Any]:
  """The package facts recorded on an EncryptedModel or PushedModel.

  The properties of PACKAGE_PROPERTIES that are present, JSON values
  decoded (a malformed one is left as recorded).
  """
  props = decode_properties(artifact, PACKAGE_PROPERTIES)
  for k in _JSON_PROPERTIES & props.keys():
    if isinstance(props[k], str):
      try:
        props[k] = json.loads(props[k])
      except ValueError:
        pass  # leave a malformed value as recorded
  return props


def iso_time(ms: int) -> Optional[str]:
  """MLMD milliseconds since the epoch as ISO 8601 UTC, or None if unset."""
  if not ms:
    return None
  return datetime.datetime.fromtimestamp(
      ms / 1000.0, tz=datetime.timezone.utc).isoformat(timespec='seconds')
