"""Lineage queries: which model, which run, which keys, pushed where.

`encrypted_models` lists the EncryptedModel artifacts matching filters;
`trace` follows the MLMD events of one of them to its producing execution,
pipeline and run, input Model and blessings, and sibling PushedModel. Fields
are picked one by one (`_store.package_properties`): execution parameters
are never copied wholesale.
"""

import json
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ml_metadata import errors as mlmd_errors
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


def _no_not_found(method, node_id: int) -> List[Any]:
  """The contexts of a node; none rather than NotFoundError (which the
  MySQL backend raises for a node in no context, SQLite does not)."""
  try:
    return list(method(node_id))
  except mlmd_errors.NotFoundError:
    return []


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


def has_package(props: Dict[str, Any]) -> bool:
  """False for the EncryptedModel of a run that wrote no package.

  `encrypted=0` (an unblessed model); artifacts recorded before that
  property existed count as packages when they carry a package id.
  """
  marked = props.get(mlmd_names.ENCRYPTED_PROPERTY)
  if marked is not None:
    return bool(marked)
  return bool(props.get(mlmd_names.PACKAGE_ID_PROPERTY))


def status(artifact: _Artifact, props: Dict[str, Any]) -> str:
  """'live', 'superseded' (a key rotation replaced it), 'no package'
  (encrypted=0: the model was not blessed) or the MLMD state
  ('deleted', ...) of an artifact that is no longer LIVE."""
  if not has_package(props):
    return 'no package'
  if props.get(mlmd_names.SUPERSEDED_PROPERTY):
    return 'superseded'
  if artifact.state not in (_Artifact.LIVE, _Artifact.UNKNOWN):
    return _Artifact.State.Name(artifact.state).lower()
  return 'live'


def _record(store: metadata_store.MetadataStore,
            artifact: _Artifact) -> Dict[str, Any]:
  props = package_properties(artifact)
  info = _contexts_info(
      _no_not_found(store.get_contexts_by_artifact, artifact.id), store)
  _fill_from_encryption_context(info, props)
  return {
      'id': artifact.id,
      'type': mlmd_names.ENCRYPTED_MODEL_TYPE,
      'uri': artifact.uri,
      'state': _Artifact.State.Name(artifact.state),
      'status': status(artifact, props),
      'superseded_by': props.get(mlmd_names.SUPERSEDED_BY_PROPERTY),
      'created': iso_time(artifact.create_time_since_epoch),
      **info,
      'properties': props,
  }


def wrapped_for(props: Dict[str, Any], key_id: str) -> bool:
  """`key_id` (a key id or recipient key URI) is one of the recipients."""
  ids = props.get(mlmd_names.RECIPIENT_KEY_IDS_PROPERTY) or []
  uris = props.get(mlmd_names.RECIPIENT_URIS_PROPERTY) or []
  candidates = set(ids if isinstance(ids, list) else [ids])
  candidates |= set(uris if isinstance(uris, list) else [uris])
  return key_id in candidates


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
                     pushed_only: bool = False,
                     version: Optional[str] = None,
                     include_superseded: bool = False,
                     include_unpackaged: bool = False
                     ) -> List[Dict[str, Any]]:
  """The EncryptedModel artifacts matching every given filter, newest first.

  By default only artifacts that hold a package and were not replaced by a
  key rotation (`status` 'live'): the EncryptedModel of an unblessed run
  (`encrypted=0`, no package) and the ones a `rewrap` / `rotate` superseded
  are left out unless asked for.

  Args:
    store: an ML Metadata store (e.g. from `open_sqlite`).
    key_id: a key id (or recipient key URI) that is one of the recipients or
      the signer.
    fingerprint: the model fingerprint (`sha256:<hex>` or just the hex).
    package_id: the package id (hex), as `tfx-encrypt inspect` shows it.
    pipeline_name: the TFX pipeline that produced the artifact.
    pushed_only: only artifacts whose package was pushed (`pushed=1`).
    version: only the package pushed as this version (`pushed_version`, the
      `<push_destination>/<version>` directory name).
    include_superseded: also artifacts a key rotation replaced.
    include_unpackaged: also artifacts of runs that wrote no package
      (`encrypted=0`: the model was not blessed).

  Returns:
    One dict per artifact: `id`, `type`, `uri`, `state`, `status` ('live',
    'superseded', 'no package'), `superseded_by`, `created`,
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
    if not include_unpackaged and not has_package(props):
      continue
    if not include_superseded and props.get(mlmd_names.SUPERSEDED_PROPERTY):
      continue
    if pushed_only and not props.get(mlmd_names.PUSHED_PROPERTY):
      continue
    if version is not None and (
        not props.get(mlmd_names.PUSHED_PROPERTY) or
        str(props.get(mlmd_names.PUSHED_VERSION_PROPERTY)) !=
        str(version).strip()):
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
        `pushed_destination`, `pushed_version`), or None;
      * `pushes`: every push of this package: the sibling PushedModel, the
        PushedModel outputs of executions downstream of it, and for a
        rotated package, the rewritten push location itself;
      * `models[i]['produced_by']`: the execution that produced the Model
        (a Trainer, or an Importer), with its `inputs` (Examples, Schema,
        ...) each with their own `produced_by` (ExampleGen, Transform, ...),
        a few executions deep; `examples` lists every Examples artifact met
        upstream with its producing execution;
      * `rotated_from`: for an artifact written by `tfx-encrypt rewrap` /
        `rotate`, the EncryptedModels it replaced, newest first, each with
        its `rotation` execution (`tfx_encrypt.KeyRotation`, with the added
        and removed key ids); `execution`, `models` and `blessings` are then
        those of the original EncryptPusher run;
      * `rotations`: the KeyRotation executions that replaced this artifact,
        with `new_artifact_id`.

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
      'rotated_from': [],
      'execution': None,
      'models': [],
      'blessings': [],
      'pushed_model': None,
      'pushes': [],
      'rotations': _rotations(store, artifact.id),
      'examples': [],
  }
  # An artifact a key rotation wrote: follow the rotations back to the
  # EncryptedModel EncryptPusher produced, whose execution, model and
  # pushes are reported.
  origin, seen = artifact, {artifact.id}
  while True:
    execution = _producer(store, origin.id)
    if execution is None or _exec_type(store, execution) != (
        mlmd_names.KEY_ROTATION_TYPE):
      break
    inputs = [e.artifact_id
              for e in store.get_events_by_execution_ids([execution.id])
              if e.type in _INPUT_EVENTS and e.artifact_id not in seen]
    if not inputs:
      break
    [origin] = store.get_artifacts_by_id([inputs[0]])
    seen.add(origin.id)
    result['rotated_from'].append({
        'id': origin.id, 'uri': origin.uri,
        'rotation': _execution_entry(store, execution)})
  if execution is None:
    return result
  enc_props = (package_properties(origin) if origin is not artifact
               else result['encrypted_model']['properties'])
  result['execution'] = _execution_entry(store, execution, enc_props)

  events = store.get_events_by_execution_ids([execution.id])
  keys = _event_keys(events)
  linked = sorted({e.artifact_id for e in events} - {origin.id})
  artifacts = {a.id: a for a in store.get_artifacts_by_id(linked)}
  names = _type_names(store, {a.type_id for a in artifacts.values()})
  enc_ctx = enc_props.get(mlmd_names.ENCRYPTION_CONTEXT_PROPERTY) or {}
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
      entry['produced_by'] = _upstream(store, a.id, _UPSTREAM_DEPTH,
                                       set(), result['examples'])
      result['models'].append(entry)
    elif is_input and type_name in BLESSING_TYPES:
      entry['blessed'] = props.get('blessed')
      result['blessings'].append(entry)
    elif not is_input and type_name == PUSHED_MODEL_TYPE:
      _push_fields(entry, props)
      result['pushed_model'] = entry
      if origin is artifact:
        result['pushes'].append(entry)
  if origin is not artifact:
    # The rotated package is where it was rewritten, pushed or not.
    props = result['encrypted_model']['properties']
    if props.get(mlmd_names.PUSHED_PROPERTY):
      result['pushes'].append({
          'id': None, 'type': mlmd_names.ENCRYPTED_MODEL_TYPE,
          'key': None, 'uri': artifact.uri,
          **{k: props.get(k) for k in _PUSH_FIELDS}})
  result['pushes'].extend(_downstream_pushes(store, artifact.id))
  return result


_PUSH_FIELDS = (mlmd_names.PUSHED_PROPERTY,
                mlmd_names.PUSHED_DESTINATION_PROPERTY,
                mlmd_names.PUSHED_VERSION_PROPERTY)
# How many executions upstream of the Model the trace follows (Trainer,
# then Transform / ExampleGen, then what fed those).
_UPSTREAM_DEPTH = 3
EXAMPLES_TYPE = 'Examples'


def _push_fields(entry: Dict[str, Any], props: Dict[str, Any]) -> None:
  for k in _PUSH_FIELDS:
    entry[k] = props.get(k)


def _event_keys(events) -> Dict[Any, Optional[str]]:
  keys = {}
  for e in events:
    steps = [s.key for s in e.path.steps if s.WhichOneof('value') == 'key']
    keys[(e.artifact_id, e.type in _INPUT_EVENTS)] = steps[0] if steps else None
  return keys


def _producer(store: metadata_store.MetadataStore,
              artifact_id: int) -> Optional[_Execution]:
  """The execution with the (last) OUTPUT event of an artifact, or None."""
  producers = [e.execution_id
               for e in store.get_events_by_artifact_ids([artifact_id])
               if e.type in _OUTPUT_EVENTS]
  if not producers:
    return None
  found = store.get_executions_by_id([producers[-1]])
  return found[0] if found else None


def _exec_type(store: metadata_store.MetadataStore,
               execution: _Execution) -> Optional[str]:
  return execution.type or (
      {t.id: t.name for t in store.get_execution_types_by_id(
          [execution.type_id])}.get(execution.type_id))


def _execution_entry(store: metadata_store.MetadataStore,
                     execution: _Execution,
                     enc_props: Optional[Dict[str, Any]] = None
                     ) -> Dict[str, Any]:
  info = _contexts_info(
      _no_not_found(store.get_contexts_by_execution, execution.id), store)
  if enc_props is not None:
    _fill_from_encryption_context(info, enc_props)
  entry = {
      'id': execution.id,
      'type': _exec_type(store, execution),
      'state': _Execution.State.Name(execution.last_known_state),
      'name': execution.name or None,
      **info,
      'created': iso_time(execution.create_time_since_epoch),
      'updated': iso_time(execution.last_update_time_since_epoch),
  }
  if entry['type'] == mlmd_names.KEY_ROTATION_TYPE:
    entry['properties'] = rotation_properties(execution)
  elif (entry['type'] or '').endswith('ExampleGen'):
    # Where the data came from: the one ExampleGen parameter reported
    # (parameters are never copied wholesale).
    base = decode_properties(execution, (_INPUT_BASE,)).get(_INPUT_BASE)
    if base:
      entry[_INPUT_BASE] = base
  return entry


# ExampleGen's execution parameter naming its input data (a directory).
_INPUT_BASE = 'input_base'


def rotation_properties(execution: _Execution) -> Dict[str, Any]:
  """What a KeyRotation execution recorded (operation, added / removed key
  ids, old / new package ids), JSON lists decoded."""
  props = decode_properties(execution)
  for k in (mlmd_names.ROTATION_ADDED_PROPERTY,
            mlmd_names.ROTATION_REMOVED_PROPERTY):
    if isinstance(props.get(k), str):
      try:
        props[k] = json.loads(props[k])
      except ValueError:
        pass
  return props


def _upstream(store: metadata_store.MetadataStore, artifact_id: int,
              depth: int, seen: set,
              examples: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
  """The execution that produced an artifact and, recursively, its inputs.

  For a trained Model: the Trainer execution, its Examples (and Schema,
  TransformGraph, ...) and the ExampleGen / Transform executions that
  produced those, `depth` executions deep. Every Examples artifact met is
  also appended to `examples` with its producer.
  """
  execution = _producer(store, artifact_id)
  if execution is None or execution.id in seen:
    return None
  seen.add(execution.id)
  entry = _execution_entry(store, execution)
  entry['inputs'] = []
  events = [e for e in store.get_events_by_execution_ids([execution.id])
            if e.type in _INPUT_EVENTS]
  keys = _event_keys(events)
  inputs = store.get_artifacts_by_id(sorted({e.artifact_id for e in events}))
  names = _type_names(store, {a.type_id for a in inputs})
  for a in sorted(inputs, key=lambda x: x.id):
    type_name = a.type or names.get(a.type_id)
    item = _artifact_entry(a, type_name, keys.get((a.id, True)))
    if type_name == EXAMPLES_TYPE:
      props = decode_properties(a)
      for k in ('span', 'version', 'split_names'):
        if k in props:
          item[k] = props[k]
    item['produced_by'] = (_upstream(store, a.id, depth - 1, seen, examples)
                           if depth > 1 else None)
    if type_name == EXAMPLES_TYPE and all(x['id'] != a.id for x in examples):
      # (once per artifact: the Trainer and StatisticsGen, say, read the
      # same Examples)
      producer = item['produced_by']
      if producer is None and depth <= 1:
        p = _producer(store, a.id)
        producer = _execution_entry(store, p) if p is not None else None
      examples.append({**{k: v for k, v in item.items()
                          if k != 'produced_by'},
                       'produced_by': (
                           {k: v for k, v in producer.items()
                            if k != 'inputs'} if producer else None)})
    entry['inputs'].append(item)
  return entry


def _downstream_pushes(store: metadata_store.MetadataStore,
                       artifact_id: int) -> List[Dict[str, Any]]:
  """PushedModel outputs of executions that consumed the EncryptedModel
  (a downstream pusher), other than key rotations."""
  consumers = sorted({e.execution_id
                      for e in store.get_events_by_artifact_ids([artifact_id])
                      if e.type in _INPUT_EVENTS})
  out = []
  for execution in store.get_executions_by_id(consumers):
    if _exec_type(store, execution) == mlmd_names.KEY_ROTATION_TYPE:
      continue
    events = [e for e in store.get_events_by_execution_ids([execution.id])
              if e.type in _OUTPUT_EVENTS]
    keys = _event_keys(events)
    outputs = store.get_artifacts_by_id(sorted({e.artifact_id
                                                for e in events}))
    names = _type_names(store, {a.type_id for a in outputs})
    for a in outputs:
      type_name = a.type or names.get(a.type_id)
      if type_name != PUSHED_MODEL_TYPE:
        continue
      entry = _artifact_entry(a, type_name, keys.get((a.id, False)))
      _push_fields(entry, decode_properties(a))
      entry['execution_id'] = execution.id
      out.append(entry)
  return out


def _rotations(store: metadata_store.MetadataStore,
               artifact_id: int) -> List[Dict[str, Any]]:
  """The KeyRotation executions that took this artifact as input, each
  with the id of the EncryptedModel it produced (`new_artifact_id`)."""
  consumers = sorted({e.execution_id
                      for e in store.get_events_by_artifact_ids([artifact_id])
                      if e.type in _INPUT_EVENTS})
  out = []
  for execution in store.get_executions_by_id(consumers):
    if _exec_type(store, execution) != mlmd_names.KEY_ROTATION_TYPE:
      continue
    entry = _execution_entry(store, execution)
    produced = [e.artifact_id
                for e in store.get_events_by_execution_ids([execution.id])
                if e.type in _OUTPUT_EVENTS]
    entry['new_artifact_id'] = produced[0] if produced else None
    out.append(entry)
  return out


def _type_names(store: metadata_store.MetadataStore,
                type_ids: Iterable[int]) -> Dict[int, str]:
  ids = sorted(set(type_ids))
  if not ids:
    return {}
  return {t.id: t.name for t in store.get_artifact_types_by_id(ids)}
