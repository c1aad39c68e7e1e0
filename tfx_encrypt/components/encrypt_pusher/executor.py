"""EncryptPusher executor: encrypt a blessed model and push the package.

Mirrors `tfx/components/pusher/executor.py` and subclasses its Executor, so
blessing checks (`CheckBlessing`), the model location (`GetModelPath`) and the
`pushed` / `pushed_destination` / `pushed_version` custom properties
(`_MarkPushed`, `_MarkNotPushed`) behave exactly as the TFX Pusher's.

What differs: the model is encrypted (and optionally signed) with
`tfx_encrypt.package.encrypt_model` into the `EncryptedModel` output artifact,
and that package, never the plaintext model, is what is pushed to
`<push_destination>/<version>/`. The executor holds no cryptography; it never
sees key material, only key URIs, and it logs URIs and key ids only.

Artifacts: the `EncryptedModel` directory holds the package; the ciphertext
that is pushed is byte-identical to it. Unlike Pusher, no archive copy is
written into the `PushedModel` directory (it would be a third copy of a
possibly large model); its `encrypted_model_uri` custom property points at the
package instead. Both artifacts carry the same custom properties.

Push semantics:
* The version is a Unix timestamp, as in Pusher (`str(int(time.time()))`),
  chosen before encrypting: the package's signed encryption context records
  it as `version` (spec.CONTEXT_VERSION, the key a consumer's
  `--min-version` reads), unless the user's `encryption_context` sets
  `version` itself (then that value, a canonical integer, is kept). The push
  directory normally carries the same number; after a collision it moves to
  the next free one while the context keeps the chosen one.
* The package is copied into a hidden temporary sibling inside the
  destination base directory (`<base>/.tmp-<version>-<random>/`) and then
  renamed to `<base>/<version>` with an atomic create-if-absent rename
  (`renameat2(RENAME_NOREPLACE)` on Linux, through `tfx_encrypt._fsutil`). An existing version is never overwritten:
  on collision, e.g. two runs pushing in the same second, the version is
  bumped (`<ts>+1`, ...) so version names stay integers that sort in push
  order, as TF Serving style consumers expect.
* On object stores (`gs://`, `s3://`, ...) reached through `tf.io.gfile`
  there is no atomic directory rename or create-if-absent: the first free
  version is chosen by an existence check and the package is copied into it,
  payload first and header last (best effort; see `_push_remote`).
* If anything fails, temporary directories are removed and the execution
  fails; nothing is left at the destination.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from absl import logging
from tfx import types
from tfx.components.pusher import executor as pusher_executor
from tfx.dsl.io import fileio
from tfx.types import artifact_utils
from tfx.utils import io_utils

from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.components.encrypt_pusher import spec

# Default file name of a bundle package inside the artifact / version dir.
BUNDLE_FILE_NAME = 'model.tfxe'
# How many consecutive versions to try after a collision.
_MAX_VERSION_ATTEMPTS = 1000
# tfx_encrypt.format.header.MAX_CONTEXT_VALUE
_MAX_CONTEXT_VALUE = 1024


# --------------------------------------------------------------------------
# Filesystem helpers.
# --------------------------------------------------------------------------


_URL_SCHEME_RE = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')


def is_local_path(path: str) -> bool:
  """True for a plain path or a file:// URI (a POSIX filesystem)."""
  m = _URL_SCHEME_RE.match(path)
  return not m or m.group(1).lower() == 'file'


def local_path(path: str) -> str:
  return path[len('file://'):] if path.startswith('file://') else path


def rename_noreplace(src: str, dst: str) -> None:
  """Renames src to dst, failing with FileExistsError if dst exists.

  Atomic on Linux (renameat2 with RENAME_NOREPLACE, via
  `tfx_encrypt._fsutil.publish`). Elsewhere it falls back to an existence
  check and rename(2), which still never replaces a non-empty directory.

  Raises:
    FileExistsError: dst exists.
  """
  try:
    _fsutil.publish(src, dst, force=False)
  except errors.OutputExistsError as e:
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from e
  except OSError as e:
    if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
      raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST),
                            dst) from e
    raise


def _copy_tree(src: str, dst: str) -> None:
  """Copies a local file or directory tree `src` to the new path `dst`."""
  if os.path.isdir(src):
    shutil.copytree(src, dst, symlinks=False, copy_function=shutil.copyfile)
  else:
    os.makedirs(os.path.dirname(dst) or '.', exist_ok=True)
    shutil.copyfile(src, dst)


def _remove_tree(path: str) -> None:
  try:
    if is_local_path(path):
      _fsutil.remove_tree(local_path(path))
    elif fileio.exists(path):
      if fileio.isdir(path):
        fileio.rmtree(path)
      else:
        fileio.remove(path)
  except Exception:  # pylint: disable=broad-except
    logging.warning('Could not remove temporary path %s',
                    _text.printable(path), exc_info=True)


def _is_empty_or_package(uri: str) -> bool:
  """A remote directory tfx-encrypt may replace (docs/SECURITY.md §1)."""
  from tfx_encrypt.format import header  # pylint: disable=g-import-not-at-top
  if not fileio.isdir(uri):
    return False
  names = sorted(n.rstrip('/') for n in fileio.listdir(uri))
  if not names:
    return True
  if names == ['payload', 'tfxe.header']:
    first = os.path.join(uri, 'tfxe.header')
  elif names == [BUNDLE_FILE_NAME]:
    first = os.path.join(uri, BUNDLE_FILE_NAME)
  else:
    return False
  with fileio.open(first, 'rb') as f:
    return f.read(len(header.MAGIC)) == header.MAGIC


def push_package(package_path: str,
                 base_directory: str,
                 version: Optional[str] = None) -> Tuple[str, str]:
  """Pushes a package to `<base_directory>/<version>/` without overwriting.

  Args:
    package_path: the local package directory (or a directory holding a
      bundle).
    base_directory: destination base dir, local or any tf.io.gfile scheme.
    version: integer version to try first; default the current Unix time.

  Returns:
    (destination path, version string).

  Raises:
    OSError / errors.TfxEncryptError: the push failed; nothing was left at the
      destination.
  """
  start = int(version) if version is not None else int(time.time())
  if is_local_path(base_directory):
    _, v = _push_local(package_path, local_path(base_directory), start)
    return os.path.join(base_directory, v), v  # as the user spelled it
  return _push_remote(package_path, base_directory, start)


def _push_local(package_path: str, base: str, start: int) -> Tuple[str, str]:
  """Temp sibling in `base`, then an atomic no-replace rename per version."""
  os.makedirs(base, exist_ok=True)
  # An owned temporary sibling (docs/SECURITY.md): a SIGKILLed push leaves
  # it for the next command writing into `base` (or tfx-encrypt clean).
  tmp = _fsutil.temp_sibling(os.path.join(base, str(start)), 'push')
  try:
    _copy_tree(package_path, tmp)
    for v in range(start, start + _MAX_VERSION_ATTEMPTS):
      target = os.path.join(base, str(v))
      try:
        rename_noreplace(tmp, target)
      except FileExistsError:
        logging.info('Version %s already exists under %s; trying %s.', v,
                     _text.printable(base), v + 1)
        continue
      return target, str(v)
    raise errors.OutputExistsError(
        f'could not find a free version under {base} after '
        f'{_MAX_VERSION_ATTEMPTS} attempts starting at {start}')
  except BaseException:
    _remove_tree(tmp)
    raise


def _push_remote(package_path: str, base: str, start: int
                 ) -> Tuple[str, str]:
  """Best effort on object stores: no atomic rename or create-if-absent.

  Picks the first version that does not exist and copies the package into
  it, the payload files first and the header (or the single bundle object)
  last: one object write is atomic on GCS and S3, so a reader that waits for
  the header never sees a partial package. Two writers checking the same
  version at the same instant are not excluded; use a local or mounted
  destination when concurrent pushes must be strictly serialised.
  """
  fileio.makedirs(base)
  for v in range(start, start + _MAX_VERSION_ATTEMPTS):
    target = os.path.join(base, str(v))
    if fileio.exists(target):
      logging.info('Version %s already exists under %s; trying %s.', v,
                   _text.printable(base), v + 1)
      continue
    try:
      last = []
      for root, _, names in os.walk(package_path):
        rel = os.path.relpath(root, package_path)
        for name in sorted(names):
          src = os.path.join(root, name)
          dst = os.path.join(target, name) if rel == '.' else os.path.join(
              target, rel, name)
          if rel == '.':
            last.append((src, dst))  # header / bundle: written last
          else:
            io_utils.copy_file(src, dst)
      for src, dst in last:
        io_utils.copy_file(src, dst)
    except BaseException:
      _remove_tree(target)
      raise
    return target, str(v)
  raise errors.OutputExistsError(
      f'could not find a free version under {base} after '
      f'{_MAX_VERSION_ATTEMPTS} attempts starting at {start}')


# --------------------------------------------------------------------------
# The executor.
# --------------------------------------------------------------------------


def _info_get(info: Any, name: str, default=None):
  if isinstance(info, Mapping):
    return info.get(name, default)
  return getattr(info, name, default)


class Executor(pusher_executor.Executor):
  """Encrypts a blessed model into an EncryptedModel artifact and pushes it.

  Execution properties (see `spec.EncryptPusherSpec`): `recipients` (JSON list
  of key URIs), `signer`, `cipher`, `hash_alg`, `encryption_context` (JSON
  object), `push_destination` (base directory), `custom_config` (JSON),
  `bundle`.
  """

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
    params = spec.Params(exec_properties)
    encrypted_model = artifact_utils.get_single_instance(
        output_dict[spec.ENCRYPTED_MODEL_KEY])
    model_push = artifact_utils.get_single_instance(
        output_dict[spec.PUSHED_MODEL_KEY])

    if not self.CheckBlessing(input_dict):
      logging.info('Model is not blessed: not encrypting, not pushing.')
      self._MarkNotPushed(model_push)
      self._MarkNotPushed(encrypted_model)
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

    with self._EncryptToArtifact(model_path, encrypted_model.uri, params,
                                 context) as (info, local_package):
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

      destination, version = push_package(local_package,
                                          params.push_destination,
                                          version=push_version)
    logging.info('Encrypted model pushed to %s (version %s).',
                 _text.printable(destination), _text.printable(version))
    for artifact in (encrypted_model, model_push):
      self._MarkPushed(artifact, pushed_destination=destination,
                       pushed_version=version)

  # -- pieces a subclass (the Beam executor) can override ------------------

  def EncryptionContext(self, input_dict: Dict[str, List[types.Artifact]],
                        params: spec.Params) -> Dict[str, str]:
    """The user's encryption context plus pipeline and model provenance."""
    context = dict(params.encryption_context)
    auto = {}
    ctx = self._context
    pipeline_info = getattr(ctx, 'pipeline_info', None) if ctx else None
    if pipeline_info is not None and pipeline_info.id:
      auto[spec.CONTEXT_PIPELINE_NAME] = pipeline_info.id
    run_id = getattr(ctx, 'pipeline_run_id', None) if ctx else None
    if run_id:
      auto[spec.CONTEXT_PIPELINE_RUN_ID] = str(run_id)
    node = getattr(ctx, 'pipeline_node', None) if ctx else None
    if node is not None and node.node_info.id:
      auto[spec.CONTEXT_COMPONENT_ID] = node.node_info.id
    unique_id = getattr(ctx, '_unique_id', None) if ctx else None
    if unique_id:
      auto[spec.CONTEXT_EXECUTION_ID] = str(unique_id)
    models = input_dict.get(spec.MODEL_KEY) or input_dict.get(
        spec.INFRA_BLESSING_KEY)
    if models:
      model = artifact_utils.get_single_instance(models)
      auto[spec.CONTEXT_MODEL_URI] = model.uri
      if model.id:
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
      if len(value) > _MAX_CONTEXT_VALUE:
        logging.warning('Not adding %s to the encryption context: longer than '
                        '%d characters.', key, _MAX_CONTEXT_VALUE)
        continue
      context[key] = value
    return context

  @contextlib.contextmanager
  def _EncryptToArtifact(self, model_path: str, artifact_uri: str,
                         params: spec.Params, context: Mapping[str, str]
                         ) -> Iterator[Tuple[Any, str]]:
    """Encrypts `model_path` so that `artifact_uri` holds the package.

    The package is written into a temporary sibling of the artifact directory
    and renamed into place (or, for a remote pipeline root, staged locally
    and copied), so a failed run never leaves a partial package.

    Yields:
      (PackageInfo, path of a local copy of the package to push from); the
      local staging is removed when the context exits.
    """
    local_artifact = is_local_path(artifact_uri)
    if local_artifact:
      uri = local_path(artifact_uri).rstrip('/')
      parent = os.path.dirname(uri)
      os.makedirs(parent, exist_ok=True)
      staging_root = _fsutil.temp_sibling(uri, 'stage')
      os.mkdir(staging_root, 0o700)
    else:
      staging_root = tempfile.mkdtemp(prefix='tfx-encrypt-staging-')
    try:
      if is_local_path(model_path):
        src = local_path(model_path)
      else:
        # encrypt_model reads a local directory: fetch the model first, into
        # the private (0700) staging directory, and delete it right after.
        src = os.path.join(staging_root, 'plaintext-model')
        io_utils.copy_dir(model_path, src)
      pkg_root = os.path.join(staging_root, 'package')
      if params.bundle:
        os.makedirs(pkg_root)
        package = os.path.join(pkg_root, BUNDLE_FILE_NAME)
      else:
        package = pkg_root
      try:
        info = self.EncryptModel(src, package, params, context)
      finally:
        if src.startswith(staging_root + os.sep):
          _fsutil.remove_tree(src)
      if local_artifact:
        if os.path.isdir(uri) and not os.listdir(uri):
          os.rmdir(uri)  # TFX pre-creates output dirs; replace the empty one.
        rename_noreplace(pkg_root, uri)
        yield info, uri
      else:
        if fileio.exists(artifact_uri):
          # TFX creates the output directory: replace it only empty, or
          # holding a package (an earlier attempt of this execution).
          if _is_empty_or_package(artifact_uri):
            fileio.rmtree(artifact_uri)
          else:
            raise errors.OutputExistsError(
                f'the EncryptedModel artifact {artifact_uri} already has '
                'content; tfx-encrypt never replaces what it did not write')
        io_utils.copy_dir(pkg_root, artifact_uri)
        yield info, pkg_root
    finally:
      _fsutil.remove_tree(staging_root)

  def EncryptModel(self, model_dir: str, package: str, params: spec.Params,
                   context: Mapping[str, str]) -> Any:
    """Encrypts the local SavedModel directory `model_dir` into `package`."""
    from tfx_encrypt import package as package_lib  # pylint: disable=g-import-not-at-top
    kwargs = {}
    if params.cipher:
      kwargs['cipher'] = params.cipher
    if params.hash_alg:
      kwargs['hash_alg'] = params.hash_alg
    return package_lib.encrypt_model(
        model_dir, package,
        recipients=list(params.recipients),
        signer=params.signer,
        context=dict(context),
        bundle=params.bundle,
        **kwargs)

  def _MarkEncrypted(self, artifact: types.Artifact, info: Any,
                     params: spec.Params, context: Mapping[str, str]) -> None:
    """Records the package facts (never secrets) as custom properties."""
    def set_int(key, value):
      if value is not None:
        artifact.set_int_custom_property(key, int(value))

    def set_str(key, value):
      if value is not None:
        artifact.set_string_custom_property(key, str(value))

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
