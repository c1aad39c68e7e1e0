"""Key-rotation lineage: `rewrap` / `rotate` recorded in ML Metadata.

A rotation is an execution of type `tfx_encrypt.KeyRotation` with the old
`EncryptedModel` as its INPUT and a new `EncryptedModel` (the rewritten
package: its new key ids, signer, package id) as its OUTPUT; its properties
say what changed (`operation`, `added_key_ids`, `removed_key_ids`,
`old_package_id`, `new_package_id`). The old artifact is marked
`superseded=1` in the same MLMD transaction (then `superseded_by=<new id>`),
so lineage queries leave it out of the live packages.

Only `ml_metadata` is imported: no TFX, no TensorFlow. Nothing secret is
written: key ids and the package facts a header shows.
"""

import json
import os
from typing import Any, Dict, List, Mapping, Optional

from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from tfx_encrypt import mlmd_names
from tfx_encrypt.lineage._query import has_package
from tfx_encrypt.lineage._store import LineageError
from tfx_encrypt.lineage._store import NoMatchError
from tfx_encrypt.lineage._store import package_properties

_Artifact = metadata_store_pb2.Artifact
_Event = metadata_store_pb2.Event
_Execution = metadata_store_pb2.Execution

OPERATIONS = ('rewrap', 'rotate')
_STRING = metadata_store_pb2.STRING
_EXECUTION_PROPERTIES = {
    mlmd_names.ROTATION_OPERATION_PROPERTY: _STRING,
    mlmd_names.ROTATION_ADDED_PROPERTY: _STRING,
    mlmd_names.ROTATION_REMOVED_PROPERTY: _STRING,
    'old_package_id': _STRING,
    'new_package_id': _STRING,
    'signer_id': _STRING,
}
# Package facts a rotation changes; everything else (fingerprint, encryption
# context, provenance, ...) is copied from the old artifact. recipient_uris
# is dropped: a rewrap knows key ids, not every recipient's URI.
_DROPPED = frozenset({mlmd_names.RECIPIENT_URIS_PROPERTY,
                      mlmd_names.SUPERSEDED_PROPERTY,
                      mlmd_names.SUPERSEDED_BY_PROPERTY})


def _info_get(info: Any, name: str, default=None):
  if isinstance(info, Mapping):
    return info.get(name, default)
  return getattr(info, name, default)


def key_ids(info: Any) -> List[str]:
  """Recipient key ids of a PackageInfo (or its dict), in header order."""
  return [r['key_id'] if isinstance(r, Mapping) else str(r)
          for r in (_info_get(info, 'recipients') or [])]


def _norm(path: Optional[str]) -> Optional[str]:
  if not path:
    return None
  if path.startswith('file://'):
    path = path[len('file://'):]
  if '://' in path:
    return path.rstrip('/')
  return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def served_at(props: Mapping[str, Any], uri: str) -> Optional[str]:
  """Where consumers read an artifact's package: its push, else its URI."""
  if props.get(mlmd_names.PUSHED_PROPERTY) and props.get(
      mlmd_names.PUSHED_DESTINATION_PROPERTY):
    return _norm(props[mlmd_names.PUSHED_DESTINATION_PROPERTY])
  return _norm(uri)


def find_recorded(store: metadata_store.MetadataStore, path: str,
                  package_id: str) -> _Artifact:
  """The live EncryptedModel recorded for the package at `path`.

  The artifact whose package id is the header's and whose URI or push
  destination is `path`; one that holds the package where consumers read
  it (its push) wins over one whose artifact directory it is.

  Raises:
    NoMatchError: no live EncryptedModel records this package.
  """
  want = _norm(path)
  best = None
  for a in store.get_artifacts_by_type(mlmd_names.ENCRYPTED_MODEL_TYPE):
    props = package_properties(a)
    if (not has_package(props) or props.get(mlmd_names.SUPERSEDED_PROPERTY)
        or str(props.get(mlmd_names.PACKAGE_ID_PROPERTY, '')).lower() !=
        package_id.lower()):
      continue
    if served_at(props, a.uri) == want:
      if best is None or best[0] != 0 or a.id > best[1].id:
        best = (0, a)
    elif _norm(a.uri) == want and (best is None or best[0] != 0):
      best = (1, a)
  if best is None:
    raise NoMatchError(
        f'no live {mlmd_names.ENCRYPTED_MODEL_TYPE} in ML Metadata records '
        f'the package at {path} (package id {package_id}); lineage is '
        'recorded for packages EncryptPusher (or an earlier rotation) '
        'recorded')
  return best[1]


def _register_type(store: metadata_store.MetadataStore) -> int:
  t = metadata_store_pb2.ExecutionType(name=mlmd_names.KEY_ROTATION_TYPE)
  for name, kind in _EXECUTION_PROPERTIES.items():
    t.properties[name] = kind
  return store.put_execution_type(t, can_add_fields=True)


def record_rotation(store: metadata_store.MetadataStore,
                    old: _Artifact, *, operation: str, old_info: Any,
                    new_info: Any, new_path: str) -> Dict[str, Any]:
  """Records one rewrap / rotate of the package `old` records.

  Args:
    store: a writable ML Metadata store.
    old: the EncryptedModel the rotation read (`find_recorded`).
    operation: 'rewrap' (header swap in place) or 'rotate' (new data key,
      new package at `new_path`).
    old_info: the old package's `PackageInfo` (or its dict), read before.
    new_info: the `PackageInfo` the operation returned.
    new_path: where the new package is (the same path for a rewrap).

  Returns:
    {'execution_id', 'artifact_id' (the new EncryptedModel),
    'superseded_id' (the old one, or None when the rotation wrote a package
    elsewhere than where the old one is read), 'added_key_ids',
    'removed_key_ids'}.
  """
  if operation not in OPERATIONS:
    raise ValueError(f'operation must be one of {OPERATIONS}')
  old_ids, new_ids = key_ids(old_info), key_ids(new_info)
  added = [k for k in new_ids if k not in old_ids]
  removed = [k for k in old_ids if k not in new_ids]
  old_props = package_properties(old)
  old_served = served_at(old_props, old.uri)
  same_place = _norm(new_path) == old_served

  if '://' not in new_path:
    new_path = os.path.abspath(new_path)
  new = _Artifact(type_id=old.type_id, uri=new_path,
                  state=_Artifact.LIVE)
  for k, v in old.custom_properties.items():
    if k not in _DROPPED:
      new.custom_properties[k].CopyFrom(v)
  for k, v in old.properties.items():
    new.properties[k].CopyFrom(v)
  cp = new.custom_properties

  def set_str(key, value):
    cp[key].string_value = '' if value is None else str(value)

  set_str(mlmd_names.PACKAGE_ID_PROPERTY, _info_get(new_info, 'package_id'))
  set_str(mlmd_names.RECIPIENT_KEY_IDS_PROPERTY, json.dumps(new_ids))
  set_str(mlmd_names.SIGNER_ID_PROPERTY, _info_get(new_info, 'signer') or '')
  set_str(mlmd_names.SIGNATURE_ALG_PROPERTY,
          _info_get(new_info, 'signature_alg') or '')
  for key, name in ((mlmd_names.CIPHER_PROPERTY, 'cipher'),
                    (mlmd_names.HASH_ALG_PROPERTY, 'hash_alg'),
                    (mlmd_names.CIPHERTEXT_DIGEST_PROPERTY, 'payload_digest'),
                    (mlmd_names.MODEL_FINGERPRINT_PROPERTY, 'fingerprint')):
    if _info_get(new_info, name):
      set_str(key, _info_get(new_info, name))
  for key, name in ((mlmd_names.CIPHERTEXT_BYTES_PROPERTY, 'ciphertext_bytes'),
                    (mlmd_names.FILE_COUNT_PROPERTY, 'file_count')):
    if _info_get(new_info, name) is not None:
      cp[key].int_value = int(_info_get(new_info, name))
  bundle = _info_get(new_info, 'bundle')
  if bundle is not None:
    cp[mlmd_names.BUNDLE_PROPERTY].int_value = int(bool(bundle))
  cp[mlmd_names.ENCRYPTED_PROPERTY].int_value = 1
  if same_place:
    # A rewrap of the pushed version (or of an unpushed artifact): the new
    # artifact is that push; Pusher's properties stay as they were.
    pass
  else:
    # A package written elsewhere: pushed when it sits next to the old push
    # as another version directory, else only recorded.
    old_dest = old_props.get(mlmd_names.PUSHED_DESTINATION_PROPERTY)
    pushed = bool(old_props.get(mlmd_names.PUSHED_PROPERTY) and old_dest and
                  '://' not in new_path and
                  os.path.dirname(_norm(new_path)) ==
                  os.path.dirname(_norm(old_dest)))
    cp[mlmd_names.PUSHED_PROPERTY].int_value = int(pushed)
    if pushed:
      set_str(mlmd_names.PUSHED_DESTINATION_PROPERTY, new_path)
      set_str(mlmd_names.PUSHED_VERSION_PROPERTY,
              os.path.basename(_norm(new_path)))
    else:
      for k in (mlmd_names.PUSHED_DESTINATION_PROPERTY,
                mlmd_names.PUSHED_VERSION_PROPERTY):
        if k in cp:
          del cp[k]

  type_id = _register_type(store)
  execution = _Execution(type_id=type_id,
                         last_known_state=_Execution.COMPLETE)
  ep = execution.properties
  ep[mlmd_names.ROTATION_OPERATION_PROPERTY].string_value = operation
  ep[mlmd_names.ROTATION_ADDED_PROPERTY].string_value = json.dumps(added)
  ep[mlmd_names.ROTATION_REMOVED_PROPERTY].string_value = json.dumps(removed)
  ep['old_package_id'].string_value = str(
      _info_get(old_info, 'package_id') or '')
  ep['new_package_id'].string_value = str(
      _info_get(new_info, 'package_id') or '')
  ep['signer_id'].string_value = str(_info_get(new_info, 'signer') or '')

  updated_old = _Artifact()
  updated_old.CopyFrom(old)
  if same_place:
    updated_old.custom_properties[
        mlmd_names.SUPERSEDED_PROPERTY].int_value = 1

  def event(kind, key):
    e = _Event(type=kind)
    e.path.steps.add().key = key
    e.path.steps.add().index = 0
    return e

  try:
    execution_id, (old_id, new_id), _ = store.put_execution(
        execution,
        [(updated_old, event(_Event.INPUT, 'encrypted_model')),
         (new, event(_Event.OUTPUT, 'encrypted_model'))],
        [])
    if same_place:
      updated_old.custom_properties[
          mlmd_names.SUPERSEDED_BY_PROPERTY].int_value = new_id
      [updated] = store.get_artifacts_by_id([old_id])
      updated.custom_properties[
          mlmd_names.SUPERSEDED_BY_PROPERTY].int_value = new_id
      store.put_artifacts([updated])
  except Exception as e:  # MLMD raises RuntimeError or its own error types.
    reason = ' '.join(str(e).split())[:200] or type(e).__name__
    raise LineageError(
        f'could not record the {operation} in ML Metadata ({reason})') from e
  return {'execution_id': execution_id, 'artifact_id': new_id,
          'superseded_id': old_id if same_place else None,
          'added_key_ids': added, 'removed_key_ids': removed}
