"""Lineage of encrypted models, read from ML Metadata.

Answers "which model, which run, which keys, pushed where" for the
`tfx_encrypt.EncryptedModel` artifacts that `EncryptPusher` records:

* `encrypted_models(store, key_id=..., fingerprint=..., package_id=...,
  pipeline_name=..., pushed_only=...)` lists the matching artifacts, newest
  first;
* `trace(store, artifact_id)` follows the MLMD events of one of them: the
  producing execution and its pipeline / run contexts, the input `Model` and
  blessings, and the sibling `PushedModel`;
* `open_sqlite(path)` opens an existing SQLite store read-only.

Only `ml_metadata` is imported here: no TFX, no TensorFlow. The property
names below therefore mirror `tfx_encrypt.components.encrypt_pusher.spec`
(a test keeps them in step). Nothing secret is returned: fields are picked one
by one from artifact and execution properties, which hold key ids and key
URIs only, and execution parameters are never copied wholesale.
"""

import datetime
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

from google.protobuf import json_format
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from tfx_encrypt import errors
# Custom property and context names, shared with the EncryptPusher writer.
from tfx_encrypt.mlmd_names import (  # pylint: disable=g-multiple-import
    ENCRYPTED_MODEL_TYPE,
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
    PUSHED_PROPERTY,
    PUSHED_DESTINATION_PROPERTY,
    PUSHED_VERSION_PROPERTY,
    CONTEXT_PIPELINE_NAME,
    CONTEXT_PIPELINE_RUN_ID,
    CONTEXT_COMPONENT_ID,
    CONTEXT_MODEL_NAME,
    CONTEXT_MODEL_VERSION,
)

__all__ = [
    'ENCRYPTED_MODEL_TYPE', 'LineageError', 'MetadataStoreError',
    'MetadataStoreNotFoundError', 'NoMatchError', 'decode_value',
    'decode_properties', 'encrypted_models', 'open_sqlite', 'trace',
]

MODEL_TYPE = 'Model'
PUSHED_MODEL_TYPE = 'PushedModel'
BLESSING_TYPES = ('ModelBlessing', 'InfraBlessing')

# TFX context type names (tfx/orchestration/portable/mlmd/context_lib.py).
_PIPELINE_CONTEXT = 'pipeline'
_PIPELINE_RUN_CONTEXT = 'pipeline_run'
_NODE_CONTEXT = 'node'

# The properties reported for an EncryptedModel / PushedModel, in this order.
_PACKAGE_PROPERTIES = (
    FORMAT_VERSION_PROPERTY, CIPHER_PROPERTY, HASH_ALG_PROPERTY,
    PACKAGE_ID_PROPERTY, RECIPIENT_KEY_IDS_PROPERTY, RECIPIENT_URIS_PROPERTY,
    SIGNER_ID_PROPERTY, SIGNATURE_ALG_PROPERTY, MODEL_FINGERPRINT_PROPERTY,
    CIPHERTEXT_DIGEST_PROPERTY, FILE_COUNT_PROPERTY, PLAINTEXT_BYTES_PROPERTY,
    CIPHERTEXT_BYTES_PROPERTY, BUNDLE_PROPERTY, ENCRYPTION_CONTEXT_PROPERTY,
    PUSHED_PROPERTY, PUSHED_DESTINATION_PROPERTY, PUSHED_VERSION_PROPERTY,
    'tfx_version')
_JSON_PROPERTIES = frozenset({RECIPIENT_KEY_IDS_PROPERTY,
                              RECIPIENT_URIS_PROPERTY,
                              ENCRYPTION_CONTEXT_PROPERTY})
# Properties of a Model artifact that name it (TFX or user conventions).
_MODEL_NAME_PROPERTIES = ('model_name', 'name')
_MODEL_VERSION_PROPERTIES = ('model_version', 'version')

_Event = metadata_store_pb2.Event
_Execution = metadata_store_pb2.Execution
_Artifact = metadata_store_pb2.Artifact
_OUTPUT_EVENTS = (_Event.OUTPUT, _Event.DECLARED_OUTPUT)
_INPUT_EVENTS = (_Event.INPUT, _Event.DECLARED_INPUT)


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


# --------------------------------------------------------------------------
# Opening a store and decoding values.
# --------------------------------------------------------------------------


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


def _package_properties(artifact: _Artifact) -> Dict[str, Any]:
  props = decode_properties(artifact, _PACKAGE_PROPERTIES)
  for k in _JSON_PROPERTIES & props.keys():
    if isinstance(props[k], str):
      try:
        props[k] = json.loads(props[k])
      except ValueError:
        pass  # leave a malformed value as recorded
  return props


def _iso(ms: int) -> Optional[str]:
  if not ms:
    return None
  return datetime.datetime.fromtimestamp(
      ms / 1000.0, tz=datetime.timezone.utc).isoformat(timespec='seconds')


# --------------------------------------------------------------------------
# Queries.
# --------------------------------------------------------------------------


def _contexts_info(contexts: Sequence[metadata_store_pb2.Context],
                   store: metadata_store.MetadataStore) -> Dict[str, Any]:
  """pipeline_name, pipeline_run_id and component_id from TFX contexts."""
  type_names = {}
  missing = {c.type_id for c in contexts if not c.type}
  if missing:
    type_names = {t.id: t.name
                  for t in store.get_context_types_by_id(list(missing))}
  out = {'pipeline_name': None, 'pipeline_run_id': None, 'component_id': None}
  for c in contexts:
    kind = c.type or type_names.get(c.type_id)
    if kind == _PIPELINE_CONTEXT:
      out['pipeline_name'] = c.name
    elif kind == _PIPELINE_RUN_CONTEXT:
      out['pipeline_run_id'] = c.name
    elif kind == _NODE_CONTEXT:
      out['component_id'] = c.name
  pipeline, node = out['pipeline_name'], out['component_id']
  if pipeline and node and node.startswith(pipeline + '.'):
    out['component_id'] = node[len(pipeline) + 1:]
  return out


def _fill_from_encryption_context(info: Dict[str, Any],
                                  props: Dict[str, Any]) -> None:
  """Falls back on the tfx.* keys the executor bound into the package."""
  ctx = props.get(ENCRYPTION_CONTEXT_PROPERTY)
  if not isinstance(ctx, dict):
    return
  for field, key in (('pipeline_name', CONTEXT_PIPELINE_NAME),
                     ('pipeline_run_id', CONTEXT_PIPELINE_RUN_ID),
                     ('component_id', CONTEXT_COMPONENT_ID)):
    if not info.get(field) and ctx.get(key):
      info[field] = ctx[key]


def _record(store: metadata_store.MetadataStore,
            artifact: _Artifact) -> Dict[str, Any]:
  props = _package_properties(artifact)
  info = _contexts_info(store.get_contexts_by_artifact(artifact.id), store)
  _fill_from_encryption_context(info, props)
  return {
      'id': artifact.id,
      'type': ENCRYPTED_MODEL_TYPE,
      'uri': artifact.uri,
      'state': _Artifact.State.Name(artifact.state),
      'created': _iso(artifact.create_time_since_epoch),
      **info,
      'properties': props,
  }


def _matches_key(props: Dict[str, Any], key_id: str) -> bool:
  ids = props.get(RECIPIENT_KEY_IDS_PROPERTY) or []
  uris = props.get(RECIPIENT_URIS_PROPERTY) or []
  candidates = set(ids if isinstance(ids, list) else [ids])
  candidates |= set(uris if isinstance(uris, list) else [uris])
  if props.get(SIGNER_ID_PROPERTY):
    candidates.add(props[SIGNER_ID_PROPERTY])
  return key_id in candidates


def _same_digest(recorded: Optional[str], wanted: str) -> bool:
  """'sha256:<hex>' matches itself or its bare hex, case-insensitively."""
  if not recorded:
    return False
  recorded, wanted = recorded.lower(), wanted.strip().lower()
  return recorded == wanted or recorded.split(':', 1)[-1] == wanted


def encrypted_models(store: metadata_store.MetadataStore,
                     *,
                     key_id: Optional[str] = None,
                     fingerprint: Optional[str] = None,
                     package_id: Optional[str] = None,
                     pipeline_name: Optional[str] = None,
                     pushed_only: bool = False) -> List[Dict[str, Any]]:
  """The EncryptedModel artifacts matching every given filter, newest first.

  Args:
    store: an ML Metadata store (e.g. from `open_sqlite`).
    key_id: a key id (or recipient key URI) that is one of the recipients or
      the signer.
    fingerprint: the model fingerprint (`sha256:<hex>` or just the hex).
    package_id: the package id (hex), as `tfx-encrypt inspect` shows it.
    pipeline_name: the TFX pipeline that produced the artifact.
    pushed_only: only artifacts whose package was pushed (`pushed=1`).

  Returns:
    One dict per artifact: `id`, `type`, `uri`, `state`, `created`,
    `pipeline_name`, `pipeline_run_id`, `component_id` and the decoded
    package `properties` (cipher, recipients, signer, fingerprint, digests,
    sizes, encryption context, pushed / destination / version).
  """
  artifacts = store.get_artifacts_by_type(ENCRYPTED_MODEL_TYPE)
  out = []
  for artifact in sorted(artifacts,
                         key=lambda a: (a.create_time_since_epoch, a.id),
                         reverse=True):
    props = _package_properties(artifact)
    if pushed_only and not props.get(PUSHED_PROPERTY):
      continue
    if key_id is not None and not _matches_key(props, key_id):
      continue
    if fingerprint is not None and not _same_digest(
        props.get(MODEL_FINGERPRINT_PROPERTY), fingerprint):
      continue
    if package_id is not None and (
        str(props.get(PACKAGE_ID_PROPERTY, '')).lower() !=
        package_id.strip().lower()):
      continue
    record = _record(store, artifact)
    if pipeline_name is not None and record['pipeline_name'] != pipeline_name:
      continue
    out.append(record)
  return out


def _artifact_entry(artifact: _Artifact, type_name: str,
                    key: Optional[str]) -> Dict[str, Any]:
  return {
      'id': artifact.id,
      'type': type_name,
      'key': key,
      'uri': artifact.uri,
      'state': _Artifact.State.Name(artifact.state),
      'created': _iso(artifact.create_time_since_epoch),
  }


def _first(props: Dict[str, Any], names: Sequence[str]) -> Any:
  for n in names:
    if props.get(n) not in (None, ''):
      return props[n]
  return None


def trace(store: metadata_store.MetadataStore,
          artifact_id: int) -> Dict[str, Any]:
  """Follows the MLMD events of one EncryptedModel artifact.

  Args:
    store: an ML Metadata store (e.g. from `open_sqlite`).
    artifact_id: the id of a `tfx_encrypt.EncryptedModel` artifact.

  Returns:
    A dict with:
      * `encrypted_model`: as in `encrypted_models` (properties included);
      * `execution`: the producing execution's `id`, `type`, `state`, `name`,
        `pipeline_name`, `pipeline_run_id`, `component_id`, `created`,
        `updated` (or None if no OUTPUT event links one);
      * `models`: the input Model artifact(s): `id`, `uri`, `key`, `name`,
        `version` (when recorded), ...;
      * `blessings`: input ModelBlessing / InfraBlessing artifacts with their
        `blessed` value;
      * `pushed_model`: the sibling PushedModel (`pushed`,
        `pushed_destination`, `pushed_version`), or None.

  Raises:
    NoMatchError: no artifact has this id, or it is not an EncryptedModel.
  """
  found = store.get_artifacts_by_id([int(artifact_id)])
  if not found:
    raise NoMatchError(f'no artifact with id {artifact_id} in ML Metadata')
  artifact = found[0]
  type_name = artifact.type or _type_names(store, [artifact.type_id]).get(
      artifact.type_id)
  if type_name != ENCRYPTED_MODEL_TYPE:
    raise NoMatchError(f'artifact {artifact_id} is a {type_name}, not a '
                       f'{ENCRYPTED_MODEL_TYPE}')
  result = {
      'encrypted_model': _record(store, artifact),
      'execution': None,
      'models': [],
      'blessings': [],
      'pushed_model': None,
  }
  producers = [e.execution_id
               for e in store.get_events_by_artifact_ids([artifact.id])
               if e.type in _OUTPUT_EVENTS]
  if not producers:
    return result
  [execution] = store.get_executions_by_id([producers[-1]])
  exec_type = execution.type or (
      {t.id: t.name for t in store.get_execution_types_by_id(
          [execution.type_id])}.get(execution.type_id))
  info = _contexts_info(store.get_contexts_by_execution(execution.id), store)
  _fill_from_encryption_context(info,
                                result['encrypted_model']['properties'])
  result['execution'] = {
      'id': execution.id,
      'type': exec_type,
      'state': _Execution.State.Name(execution.last_known_state),
      'name': execution.name or None,
      **info,
      'created': _iso(execution.create_time_since_epoch),
      'updated': _iso(execution.last_update_time_since_epoch),
  }

  events = store.get_events_by_execution_ids([execution.id])
  keys = {}
  for e in events:
    steps = [s.key for s in e.path.steps if s.WhichOneof('value') == 'key']
    keys[(e.artifact_id, e.type in _INPUT_EVENTS)] = steps[0] if steps else None
  linked = sorted({e.artifact_id for e in events} - {artifact.id})
  artifacts = {a.id: a for a in store.get_artifacts_by_id(linked)}
  names = _type_names(store, {a.type_id for a in artifacts.values()})
  enc_ctx = result['encrypted_model']['properties'].get(
      ENCRYPTION_CONTEXT_PROPERTY) or {}
  for e in sorted(events, key=lambda ev: ev.artifact_id):
    a = artifacts.get(e.artifact_id)
    if a is None:
      continue
    type_name = a.type or names.get(a.type_id)
    is_input = e.type in _INPUT_EVENTS
    entry = _artifact_entry(a, type_name, keys.get((a.id, is_input)))
    props = decode_properties(a)
    if is_input and type_name == MODEL_TYPE:
      entry['name'] = a.name or _first(props, _MODEL_NAME_PROPERTIES)
      entry['version'] = _first(props, _MODEL_VERSION_PROPERTIES)
      if isinstance(enc_ctx, dict):
        entry['name'] = entry['name'] or enc_ctx.get(CONTEXT_MODEL_NAME)
        entry['version'] = entry['version'] or enc_ctx.get(
            CONTEXT_MODEL_VERSION)
      result['models'].append(entry)
    elif is_input and type_name in BLESSING_TYPES:
      entry['blessed'] = props.get('blessed')
      result['blessings'].append(entry)
    elif not is_input and type_name == PUSHED_MODEL_TYPE:
      for k in (PUSHED_PROPERTY, PUSHED_DESTINATION_PROPERTY,
                PUSHED_VERSION_PROPERTY):
        entry[k] = props.get(k)
      result['pushed_model'] = entry
  return result


def _type_names(store: metadata_store.MetadataStore,
                type_ids: Iterable[int]) -> Dict[int, str]:
  ids = sorted(set(type_ids))
  if not ids:
    return {}
  return {t.id: t.name for t in store.get_artifact_types_by_id(ids)}
