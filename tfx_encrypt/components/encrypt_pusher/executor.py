"""EncryptPusher executor: encrypt a blessed model and push the package.

Mirrors `tfx/components/pusher/executor.py` and subclasses its Executor, so
blessing checks (`CheckBlessing`), the model location (`GetModelPath`) and the
`pushed` / `pushed_destination` / `pushed_version` custom properties
(`_MarkPushed`, `_MarkNotPushed`) behave exactly as the TFX Pusher's.

What differs: the model is encrypted (and optionally signed) with
`tfx_encrypt.package.encrypt_model` into the `EncryptedModel` output artifact,
and that package, never the plaintext model, is what is pushed to
`<push_destination>/<version>/` (`push.push_package`: atomic, never replaces
a version). The executor holds no cryptography; it never sees key material,
only key URIs, and it logs URIs and key ids only.

Artifacts: the `EncryptedModel` directory holds the package; the ciphertext
that is pushed is byte-identical to it. Unlike Pusher, no archive copy is
written into the `PushedModel` directory (it would be a third copy of a
possibly large model); its `encrypted_model_uri` custom property points at the
package instead. Both artifacts carry the same custom properties.

The version is a Unix timestamp, as in Pusher, chosen before encrypting: the
package's signed encryption context records it as `version`
(spec.CONTEXT_VERSION, the key a consumer's `--min-version` reads), unless
the user's `encryption_context` sets `version` itself (then that value, a
canonical integer, is kept). The push directory normally carries the same
number; after a collision it moves to the next free one while the context
keeps the chosen one. If anything fails, temporary directories are removed
and the execution fails; nothing is left at the destination.
"""

import functools
import json
import time
from typing import Any, Dict, List, Mapping

from absl import logging
from tfx import types
from tfx.components.pusher import executor as pusher_executor
from tfx.types import artifact_utils
from tfx.utils import path_utils

from tfx_encrypt import _text
from tfx_encrypt import audit
from tfx_encrypt import mlmd_names
from tfx_encrypt import storage
from tfx_encrypt.components.encrypt_pusher import kfp_v2
from tfx_encrypt.components.encrypt_pusher import params as params_lib
from tfx_encrypt.components.encrypt_pusher import push
from tfx_encrypt.components.encrypt_pusher import spec
from tfx_encrypt.format import header as header_lib


def _info_get(info: Any, name: str, default=None):
  if isinstance(info, Mapping):
    return info.get(name, default)
  return getattr(info, name, default)


def _remote_serving_model_path(uri: str, is_old_artifact: bool) -> str:
  """tfx.utils.path_utils.serving_model_path on a store: the serving model
  directory, or the only export of an Estimator's `export/NAME/TS/`."""
  model_dir = path_utils.serving_model_dir(uri.rstrip('/'), is_old_artifact)
  export_dir = storage.join(model_dir, 'export')
  names = [n for n in storage.list_names(export_dir) if n.strip('/')]
  if not names:
    return model_dir
  for _ in range(2):  # export/<name>/<timestamp>/
    firsts = sorted({n.split('/', 1)[0] for n in names})
    if len(firsts) != 1:
      raise RuntimeError(f'expected exactly one directory under '
                         f'{_text.printable(export_dir)}, found '
                         f'{len(firsts)}')
    export_dir = storage.join(export_dir, firsts[0])
    names = [n.split('/', 1)[1] for n in names if '/' in n]
  return export_dir


def _audited(do):
  """Emit one audit event per execution to the `audit_log` exec property's
  sink, if set (tfx_encrypt.audit; docs/SECURITY.md §8), whatever happens."""

  @functools.wraps(do)
  def execute(self, input_dict, output_dict, exec_properties):
    with audit.execution(exec_properties.get(spec.AUDIT_LOG_KEY) or None,
                         'encrypt-pusher'):
      return do(self, input_dict, output_dict, exec_properties)

  return execute


class Executor(pusher_executor.Executor):
  """Encrypts a blessed model into an EncryptedModel artifact and pushes it.

  Execution properties (see `spec.EncryptPusherSpec`): `recipients` (JSON list
  of key URIs), `signer`, `cipher`, `hash_alg`, `encryption_context` (JSON
  object), `push_destination` (base directory), `custom_config` (JSON),
  `bundle`, `audit_log` (an audit sink: one event per execution).
  """

  @_audited
  def Do(self, input_dict: Dict[str, List[types.Artifact]],
         output_dict: Dict[str, List[types.Artifact]],
         exec_properties: Dict[str, Any]) -> None:
    """Encrypts the model if blessed, and pushes the package.

    Args:
      input_dict: `model`, and optionally `model_blessing`, `infra_blessing`.
      output_dict: `encrypted_model` and `pushed_model`, one artifact each.
      exec_properties: see the class docstring.

    Raises:
      KeyMaterialInParameterError: a parameter carries key material.
      TfxEncryptError: encryption or push failed (the execution fails).
    """
    self._log_startup(input_dict, output_dict, exec_properties)
    params = params_lib.Params(exec_properties)
    encrypted_model = artifact_utils.get_single_instance(
        output_dict[spec.ENCRYPTED_MODEL_KEY])
    model_push = artifact_utils.get_single_instance(
        output_dict[spec.PUSHED_MODEL_KEY])

    if not self.CheckBlessing(input_dict):
      logging.info('Model is not blessed: not encrypting, not pushing.')
      audit.note(blessed=False, pushed=False)
      self._MarkNotPushed(model_push)
      self._MarkNotPushed(encrypted_model)
      # TFX publishes every declared output: say that this one holds no
      # package (docs/COMPONENT.md "Unblessed models"); lineage skips it.
      encrypted_model.set_int_custom_property(
          mlmd_names.ENCRYPTED_PROPERTY, 0)
      return

    model_path = self.GetModelPath(input_dict)
    # The version is chosen before encrypting so that the signed context can
    # carry it; push_package tries it first.
    push_version = str(int(time.time()))
    context = self.EncryptionContext(input_dict, params)
    context.setdefault(spec.CONTEXT_VERSION, push_version)
    # Log lines show artifact URIs and parameters escaped (tfx_encrypt._text):
    # a newline or escape sequence in one cannot forge another log record.
    logging.info(
        'Encrypting %s for recipients %s (signer: %s, cipher: %s).',
        _text.printable(model_path),
        _text.printable(params.recipients, limit=None),
        _text.printable(params.signer or 'none'),
        _text.printable(params.cipher or 'default'))

    encrypt = functools.partial(self.EncryptModel, params=params,
                                context=context)
    staged = push.encrypt_to_artifact(model_path, encrypted_model.uri,
                                      params.bundle, encrypt)
    with staged as (info, local_package):
      audit.record(info)
      audit.note(package=encrypted_model.uri, blessed=True, pushed=False,
                 pipeline=context.get(spec.CONTEXT_PIPELINE_NAME),
                 run_id=context.get(spec.CONTEXT_PIPELINE_RUN_ID))
      for artifact in (encrypted_model, model_push):
        self._MarkEncrypted(artifact, info, params, context)
      model_push.set_string_custom_property(
          spec.ENCRYPTED_MODEL_URI_PROPERTY, encrypted_model.uri)

      if not params.push_destination:
        logging.info('No push_destination: the package is only recorded as '
                     'the EncryptedModel artifact at %s.',
                     _text.printable(encrypted_model.uri))
        self._MarkNotPushed(model_push)
        self._MarkNotPushed(encrypted_model)
        return

      destination, version = push.push_package(local_package,
                                               params.push_destination,
                                               version=push_version)
    logging.info('Encrypted model pushed to %s (version %s).',
                 _text.printable(destination), _text.printable(version))
    audit.note(pushed=True, destination=destination, version=version)
    for artifact in (encrypted_model, model_push):
      self._MarkPushed(artifact, pushed_destination=destination,
                       pushed_version=version)

  def GetModelPath(self, input_dict: Dict[str, List[types.Artifact]]) -> str:
    """The Pusher's model path; for a model on `gs://` / `s3://` found with
    the object-store SDKs (tfx_encrypt.storage) instead of tf.io.gfile,
    which may not reach that store (docs/OBJECT_STORES.md)."""
    models = input_dict.get(spec.MODEL_KEY)
    if models:
      model = artifact_utils.get_single_instance(models)
      if storage.is_remote(model.uri):
        return _remote_serving_model_path(
            model.uri, path_utils.is_old_model_artifact(model))
    return super().GetModelPath(input_dict)

  # -- pieces a subclass (the Beam executor) can override ------------------

  def EncryptionContext(self, input_dict: Dict[str, List[types.Artifact]],
                        params: params_lib.Params) -> Dict[str, str]:
    """The user's encryption context plus pipeline and model provenance."""
    context = dict(params.encryption_context)
    auto = {}
    ctx = self._context
    # On Kubeflow Pipelines v2 / Vertex AI, TFX's container entrypoint gives
    # no pipeline info, run id or node: they come from the KFP placeholders
    # the orchestrator resolved and the compile-time pipeline name (kfp_v2).
    kfp = params.kfp
    pipeline_info = getattr(ctx, 'pipeline_info', None) if ctx else None
    if pipeline_info is not None and pipeline_info.id:
      auto[spec.CONTEXT_PIPELINE_NAME] = pipeline_info.id
    elif params.pipeline_name:
      auto[spec.CONTEXT_PIPELINE_NAME] = params.pipeline_name
    run_id = getattr(ctx, 'pipeline_run_id', None) if ctx else None
    run_id = run_id or kfp.get(spec.KFP_PIPELINE_JOB_NAME_KEY)
    if run_id:
      auto[spec.CONTEXT_PIPELINE_RUN_ID] = str(run_id)
    if kfp.get(spec.KFP_PIPELINE_JOB_UUID_KEY):
      auto[mlmd_names.CONTEXT_PIPELINE_RUN_UUID] = kfp[
          spec.KFP_PIPELINE_JOB_UUID_KEY]
    node = getattr(ctx, 'pipeline_node', None) if ctx else None
    if node is not None and node.node_info.id:
      auto[spec.CONTEXT_COMPONENT_ID] = node.node_info.id
    elif kfp.get(spec.KFP_PIPELINE_TASK_NAME_KEY):
      auto[spec.CONTEXT_COMPONENT_ID] = kfp[spec.KFP_PIPELINE_TASK_NAME_KEY]
    unique_id = getattr(ctx, '_unique_id', None) if ctx else None
    unique_id = kfp.get(spec.KFP_PIPELINE_TASK_UUID_KEY) or unique_id
    if unique_id:
      auto[spec.CONTEXT_EXECUTION_ID] = str(unique_id)
    models = input_dict.get(spec.MODEL_KEY) or input_dict.get(
        spec.INFRA_BLESSING_KEY)
    if models:
      model = artifact_utils.get_single_instance(models)
      auto[spec.CONTEXT_MODEL_URI] = model.uri
      # Under TFX's KFP v2 entrypoint an artifact id is a hash of the
      # artifact's runtime name: record that name (on Vertex, its ML
      # Metadata resource name) instead, never the hash.
      runtime_names = kfp_v2.runtime_artifact_names()
      if runtime_names is not None:
        if model.id and runtime_names.get(model.id):
          auto[spec.CONTEXT_MODEL_ARTIFACT_ID] = runtime_names[model.id]
      elif model.id:
        auto[spec.CONTEXT_MODEL_ARTIFACT_ID] = str(model.id)
      name = model.name or ''
      for key in ('model_name', 'name'):
        if not name and model.has_custom_property(key):
          name = str(model.get_custom_property(key))
      if name:
        auto[spec.CONTEXT_MODEL_NAME] = name
      for key in ('model_version', 'version'):
        if model.has_custom_property(key):
          auto[spec.CONTEXT_MODEL_VERSION] = str(model.get_custom_property(key))
          break
    for key, value in auto.items():
      if len(value) > header_lib.MAX_CONTEXT_VALUE:
        logging.warning('Not adding %s to the encryption context: longer than '
                        '%d characters.', key, header_lib.MAX_CONTEXT_VALUE)
        continue
      context[key] = value
    return context

  def EncryptModel(self, model_dir: str, package: str,
                   params: params_lib.Params,
                   context: Mapping[str, str]) -> Any:
    """Encrypts the SavedModel directory `model_dir` (a local path, or a
    `gs://` / `s3://` URI, streamed) into `package` (a path or URI)."""
    from tfx_encrypt import package as package_lib  # pylint: disable=g-import-not-at-top
    return package_lib.encrypt_model(model_dir, package, context=dict(context),
                                     **params.package_options())

  def _MarkEncrypted(self, artifact: types.Artifact, info: Any,
                     params: params_lib.Params,
                     context: Mapping[str, str]) -> None:
    """Records the package facts (never secrets) as custom properties."""
    def set_int(key, value):
      if value is not None:
        artifact.set_int_custom_property(key, int(value))

    def set_str(key, value):
      if value is not None:
        artifact.set_string_custom_property(key, str(value))

    set_int(mlmd_names.ENCRYPTED_PROPERTY, 1)
    set_int(spec.FORMAT_VERSION_PROPERTY, _info_get(info, 'format_version'))
    set_str(spec.CIPHER_PROPERTY, _info_get(info, 'cipher'))
    set_str(spec.HASH_ALG_PROPERTY, _info_get(info, 'hash_alg'))
    set_str(spec.PACKAGE_ID_PROPERTY, _info_get(info, 'package_id'))
    key_ids = [r['key_id'] if isinstance(r, Mapping) else str(r)
               for r in (_info_get(info, 'recipients') or [])]
    set_str(spec.RECIPIENT_KEY_IDS_PROPERTY, json.dumps(key_ids))
    set_str(spec.RECIPIENT_URIS_PROPERTY, json.dumps(params.recipients))
    set_str(spec.SIGNER_ID_PROPERTY, _info_get(info, 'signer') or '')
    set_str(spec.SIGNATURE_ALG_PROPERTY, _info_get(info, 'signature_alg') or '')
    set_str(spec.MODEL_FINGERPRINT_PROPERTY, _info_get(info, 'fingerprint'))
    set_str(spec.CIPHERTEXT_DIGEST_PROPERTY,
            _info_get(info, 'payload_digest'))
    set_int(spec.FILE_COUNT_PROPERTY, _info_get(info, 'file_count'))
    set_int(spec.PLAINTEXT_BYTES_PROPERTY, _info_get(info, 'plaintext_bytes'))
    set_int(spec.CIPHERTEXT_BYTES_PROPERTY,
            _info_get(info, 'ciphertext_bytes'))
    set_int(spec.BUNDLE_PROPERTY, bool(_info_get(info, 'bundle',
                                                 params.bundle)))
    set_str(spec.ENCRYPTION_CONTEXT_PROPERTY,
            json.dumps(dict(context), sort_keys=True))
