"""Lineage queries: which model, which run, which keys, pushed where.

`encrypted_models` lists the EncryptedModel artifacts matching filters;
`trace` follows the MLMD events of one of them to its producing execution,
pipeline and run, input Model and blessings, and sibling PushedModel. Fields
are picked one by one (`_store.package_properties`): execution parameters
are never copied wholesale.
"""

from typing import Any, Dict, Iterable, List, Optional, Sequence

from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from tfx_encrypt import mlmd_names
from tfx_encrypt.lineage._store import NoMatchError
from tfx_encrypt.lineage._store import decode_properties
from tfx_encrypt.lineage._store import iso_time
from tfx_encrypt.lineage._store import package_properties

MODEL_TYPE = 'Model'
PUSHED_MODEL_TYPE = 'PushedModel'
BLESSING_TYPES = ('ModelBlessing', 'InfraBlessing')

# TFX context type names (tfx/orchestration/portable/mlmd/context_lib.py).
_PIPELINE_CONTEXT = 'pipeline'
_PIPELINE_RUN_CONTEXT = 'pipeline_run'
_NODE_CONTEXT = 'node'

# Properties of a Model artifact that name it (TFX or user conventions).
_MODEL_NAME_PROPERTIES = ('model_name', 'name')
_MODEL_VERSION_PROPERTIES = ('model_version', 'version')

_Event = metadata_store_pb2.Event
_Execution = metadata_store_pb2.Execution
_Artifact = metadata_store_pb2.Artifact
_OUTPUT_EVENTS = (_Event.OUTPUT, _Event.DECLARED_OUTPUT)
_INPUT_EVENTS = (_Event.INPUT, _Event.DECLARED_INPUT)


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
  ctx = props.get(mlmd_names.ENCRYPTION_CONTEXT_PROPERTY)
  if not isinstance(ctx, dict):
    return
  for field, key in (('pipeline_name', mlmd_names.CONTEXT_PIPELINE_NAME),
                     ('pipeline_run_id', mlmd_names.CONTEXT_PIPELINE_RUN_ID),
                     ('component_id', mlmd_names.CONTEXT_COMPONENT_ID)):
    if not info.get(field) and ctx.get(key):
      info[field] = ctx[key]


def _record(store: metadata_store.MetadataStore,
            artifact: _Artifact) -> Dict[str, Any]:
  props = package_properties(artifact)
  info = _contexts_info(store.get_contexts_by_artifact(artifact.id), store)
  _fill_from_encryption_context(info, props)
  return {
      'id': artifact.id,
      'type': mlmd_names.ENCRYPTED_MODEL_TYPE,
      'uri': artifact.uri,
      'state': _Artifact.State.Name(artifact.state),
      'created': iso_time(artifact.create_time_since_epoch),
      **info,
      'properties': props,
  }


def _matches_key(props: Dict[str, Any], key_id: str) -> bool:
  ids = props.get(mlmd_names.RECIPIENT_KEY_IDS_PROPERTY) or []
  uris = props.get(mlmd_names.RECIPIENT_URIS_PROPERTY) or []
  candidates = set(ids if isinstance(ids, list) else [ids])
  candidates |= set(uris if isinstance(uris, list) else [uris])
  if props.get(mlmd_names.SIGNER_ID_PROPERTY):
    candidates.add(props[mlmd_names.SIGNER_ID_PROPERTY])
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
  artifacts = store.get_artifacts_by_type(mlmd_names.ENCRYPTED_MODEL_TYPE)
  out = []
  for artifact in sorted(artifacts,
                         key=lambda a: (a.create_time_since_epoch, a.id),
                         reverse=True):
    props = package_properties(artifact)
    if pushed_only and not props.get(mlmd_names.PUSHED_PROPERTY):
      continue
    if key_id is not None and not _matches_key(props, key_id):
      continue
    if fingerprint is not None and not _same_digest(
        props.get(mlmd_names.MODEL_FINGERPRINT_PROPERTY), fingerprint):
      continue
    if package_id is not None and (
        str(props.get(mlmd_names.PACKAGE_ID_PROPERTY, '')).lower() !=
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
      'created': iso_time(artifact.create_time_since_epoch),
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
  if type_name != mlmd_names.ENCRYPTED_MODEL_TYPE:
    raise NoMatchError(f'artifact {artifact_id} is a {type_name}, not a '
                       f'{mlmd_names.ENCRYPTED_MODEL_TYPE}')
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
      'created': iso_time(execution.create_time_since_epoch),
      'updated': iso_time(execution.last_update_time_since_epoch),
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
      mlmd_names.ENCRYPTION_CONTEXT_PROPERTY) or {}
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
        entry['name'] = entry['name'] or enc_ctx.get(
            mlmd_names.CONTEXT_MODEL_NAME)
        entry['version'] = entry['version'] or enc_ctx.get(
            mlmd_names.CONTEXT_MODEL_VERSION)
      result['models'].append(entry)
    elif is_input and type_name in BLESSING_TYPES:
      entry['blessed'] = props.get('blessed')
      result['blessings'].append(entry)
    elif not is_input and type_name == PUSHED_MODEL_TYPE:
      for k in (mlmd_names.PUSHED_PROPERTY,
                mlmd_names.PUSHED_DESTINATION_PROPERTY,
                mlmd_names.PUSHED_VERSION_PROPERTY):
        entry[k] = props.get(k)
      result['pushed_model'] = entry
  return result


def _type_names(store: metadata_store.MetadataStore,
                type_ids: Iterable[int]) -> Dict[int, str]:
  ids = sorted(set(type_ids))
  if not ids:
    return {}
  return {t.id: t.name for t in store.get_artifact_types_by_id(ids)}
