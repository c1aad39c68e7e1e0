"""EncryptPusher: a TFX component that encrypts and pushes a blessed model.

Mirrors `tfx/components/pusher/component.py`. It sits where a Pusher would,
after Trainer (and Evaluator / InfraValidator), and takes the same inputs:

```python
from tfx_encrypt.components import EncryptPusher

encrypt_pusher = EncryptPusher(
    model=trainer.outputs['model'],
    model_blessing=evaluator.outputs['blessing'],
    recipients=['aws-kms://arn:aws:kms:eu-west-1:111122223333:key/...',
                '/etc/tfx-encrypt/ops-recipient.pub.pem'],
    signer='/etc/tfx-encrypt/release-signer.key.pem',
    push_destination='gs://my-bucket/encrypted-models/my-model',
)
```

Outputs:
  - `encrypted_model`: `tfx_encrypt.EncryptedModel`, the package.
  - `pushed_model`: `PushedModel`, with Pusher's `pushed`,
    `pushed_destination` and `pushed_version` custom properties.

Key material is never a parameter: recipients, signer and Beam worker identity
are key URIs, checked here and again in the executor.

`BeamEncryptPusher` is the same component with a Beam executor that fans the
encryption of large models out to Beam workers (`beam_pipeline_args`, e.g.
DirectRunner multi-processing, Dataflow, Flink, Spark).
"""

from typing import Any, Dict, Optional, Sequence, Union

from tfx import types
from tfx.dsl.components.base import base_beam_component
from tfx.dsl.components.base import base_component
from tfx.dsl.components.base import executor_spec
from tfx.proto import pusher_pb2
from tfx.types import standard_artifacts
from tfx.utils import json_utils

from tfx_encrypt import errors
from tfx_encrypt import types as tfxe_types
from tfx_encrypt.components.encrypt_pusher import beam_executor
from tfx_encrypt.components.encrypt_pusher import executor
from tfx_encrypt.components.encrypt_pusher import spec
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import streaming

KeyUri = Union[str, Any]  # a key URI, or a KeyBackend (its .uri is used)


def _uri_of(key: KeyUri, what: str) -> str:
  """A KeyBackend stands for its URI; anything else must be a URI string."""
  from tfx_encrypt.keys import base as keys_base  # pylint: disable=g-import-not-at-top
  if isinstance(key, keys_base.KeyBackend):
    key = key.uri
  return spec.check_key_uri(key, what)


def _push_destination_dir(
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
  spec.check_text(push_destination, spec.PUSH_DESTINATION_KEY)
  return push_destination


def _build_spec(model, model_blessing, infra_blessing, recipients, signer,
                cipher, hash_alg, encryption_context, push_destination,
                custom_config, bundle, beam_params=None
                ) -> spec.EncryptPusherSpec:
  """Validates the arguments and builds the ComponentSpec."""
  if model is None and infra_blessing is None:
    raise ValueError(
        'Either one of model or infra_blessing channel should be given. '
        'If infra_blessing is used in place of model, it must have been '
        'created with InfraValidator with RequestSpec.make_warmup = True.')
  if isinstance(recipients, (str, bytes)) or not isinstance(
      recipients, Sequence):
    recipients = [recipients]
  uris = spec.normalize_recipients(
      [_uri_of(r, f'{spec.RECIPIENTS_KEY}[{i}]')
       for i, r in enumerate(recipients)])
  signer_uri = _uri_of(signer, spec.SIGNER_KEY) if signer is not None else None
  if signer_uri is not None:
    # The URI's form, not the key: no network call at pipeline build time
    # (e.g. a Cloud KMS signer must name a CryptoKeyVersion).
    from tfx_encrypt import keys as keys_lib  # pylint: disable=g-import-not-at-top
    keys_lib.check_uri_form(signer_uri, 'signer', option=spec.SIGNER_KEY)
  for name, value, known in (
      (spec.CIPHER_KEY, cipher, tuple(streaming.CIPHERS)),
      (spec.HASH_ALG_KEY, hash_alg, tuple(digest_lib.HASHES))):
    if value is not None and value not in known:
      raise errors.UsageError(
          f'unknown {name} {value!r}; choose one of {", ".join(known)}')
  context = spec.normalize_context(encryption_context)
  if custom_config is not None and not isinstance(custom_config, dict):
    raise errors.UsageError('custom_config must be a dict')
  spec.check_value(custom_config or {}, spec.CUSTOM_CONFIG_KEY)
  params = dict(
      model=model,
      model_blessing=model_blessing,
      infra_blessing=infra_blessing,
      recipients=json_utils.dumps(uris),
      signer=signer_uri,
      cipher=cipher,
      hash_alg=hash_alg,
      encryption_context=json_utils.dumps(context) if context else None,
      push_destination=_push_destination_dir(push_destination),
      custom_config=json_utils.dumps(custom_config),
      bundle=int(bool(bundle)),
      encrypted_model=types.Channel(type=tfxe_types.EncryptedModel),
      pushed_model=types.Channel(type=standard_artifacts.PushedModel),
  )
  params.update(beam_params or {})
  return spec.EncryptPusherSpec(**params)


class EncryptPusher(base_component.BaseComponent):
  """Encrypts a blessed model for key URIs and pushes the package.

  A model that is not blessed (by `model_blessing` or `infra_blessing`) is not
  encrypted or pushed; the execution succeeds with `pushed=0`, as in Pusher.
  A blessed model is encrypted from its serving directory into the
  `encrypted_model` artifact and pushed to `<push_destination>/<version>/`,
  where version is a Unix timestamp; the push is atomic and never replaces an
  existing version.
  """

  SPEC_CLASS = spec.EncryptPusherSpec
  EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

  def __init__(
      self,
      model: Optional[types.BaseChannel] = None,
      model_blessing: Optional[types.BaseChannel] = None,
      infra_blessing: Optional[types.BaseChannel] = None,
      *,
      recipients: Sequence[KeyUri],
      signer: Optional[KeyUri] = None,
      cipher: Optional[str] = None,
      hash_alg: Optional[str] = None,
      encryption_context: Optional[Dict[str, str]] = None,
      push_destination: Union[None, str, pusher_pb2.PushDestination] = None,
      custom_config: Optional[Dict[str, Any]] = None,
      bundle: bool = False):
    """Constructs an EncryptPusher component.

    Args:
      model: A `Model` channel, usually `trainer.outputs['model']`.
      model_blessing: An optional `ModelBlessing` channel (Evaluator).
      infra_blessing: An optional `InfraBlessing` channel (InfraValidator).
      recipients: Key URIs of the recipients (at least one): PEM public key
        paths or `file://` URIs (RSA >= 3072 or X25519), `aws-kms://`,
        `gcp-kms://`, `hcvault://`, `azure-kv://`, `pkcs11:` URIs.
      signer: Optional key URI of an Ed25519 or ECDSA P-256 signing key.
      cipher: 'aes-256-gcm' (default) or 'chacha20-poly1305'.
      hash_alg: 'blake3' (default) or 'sha256' (FIPS).
      encryption_context: Extra string key/values bound to the package. The
        pipeline name, run id, component id and model are added
        automatically under the reserved `tfx.` prefix.
      push_destination: Base directory (local or any tf.io.gfile scheme) or
        a Pusher `PushDestination` with a filesystem destination. If None the
        package is only recorded as the EncryptedModel artifact (pushed=0).
      custom_config: Optional dict recorded with the execution.
      bundle: Write a single-file `.tfxe` bundle instead of a directory.

    Raises:
      KeyMaterialInParameterError: a parameter looks like key material.
      ValueError / UsageError: invalid arguments.
    """
    component_spec = _build_spec(
        model, model_blessing, infra_blessing, recipients, signer, cipher,
        hash_alg, encryption_context, push_destination, custom_config, bundle)
    super().__init__(spec=component_spec)


class BeamEncryptPusher(base_beam_component.BaseBeamComponent):
  """EncryptPusher whose encryption fans out to Beam workers.

  Files and segment ranges of large files are encrypted by Beam workers
  (`beam_pipeline_args`, e.g. `--direct_num_workers=2
  --direct_running_mode=multi_processing`). Workers unwrap the data key
  themselves from `beam_worker_identity` (a KMS key URI that is also a
  recipient, or a private key file readable by every worker); the plaintext
  data key is never part of the Beam job graph. The output is a standard
  package that `tfx-encrypt decrypt` reads.
  """

  SPEC_CLASS = spec.EncryptPusherSpec
  EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(beam_executor.Executor)

  def __init__(
      self,
      model: Optional[types.BaseChannel] = None,
      model_blessing: Optional[types.BaseChannel] = None,
      infra_blessing: Optional[types.BaseChannel] = None,
      *,
      recipients: Sequence[KeyUri],
      signer: Optional[KeyUri] = None,
      cipher: Optional[str] = None,
      hash_alg: Optional[str] = None,
      encryption_context: Optional[Dict[str, str]] = None,
      push_destination: Union[None, str, pusher_pb2.PushDestination] = None,
      custom_config: Optional[Dict[str, Any]] = None,
      bundle: bool = False,
      beam_worker_identity: Optional[KeyUri] = None,
      beam_min_bytes: int = 0,
      beam_segment_bytes: Optional[int] = None):
    """Constructs a BeamEncryptPusher component.

    Args:
      model: see `EncryptPusher`.
      model_blessing: see `EncryptPusher`.
      infra_blessing: see `EncryptPusher`.
      recipients: see `EncryptPusher`.
      signer: see `EncryptPusher`.
      cipher: see `EncryptPusher`.
      hash_alg: see `EncryptPusher`.
      encryption_context: see `EncryptPusher`.
      push_destination: see `EncryptPusher`.
      custom_config: see `EncryptPusher`.
      bundle: see `EncryptPusher`.
      beam_worker_identity: Key URI the Beam workers unwrap the data key with.
        Default: the first recipient that can unwrap (a KMS recipient).
      beam_min_bytes: Models smaller than this are encrypted in-process
        (no Beam job). Default 0: always use Beam.
      beam_segment_bytes: Plaintext bytes per Beam work item for large files
        (rounded to whole 1 MiB segments). Default 64 MiB.
    """
    beam_params = {
        spec.BEAM_WORKER_IDENTITY_KEY: (
            _uri_of(beam_worker_identity, spec.BEAM_WORKER_IDENTITY_KEY)
            if beam_worker_identity is not None else None),
        spec.BEAM_MIN_BYTES_KEY: int(beam_min_bytes),
        spec.BEAM_SEGMENT_BYTES_KEY: (int(beam_segment_bytes)
                                      if beam_segment_bytes else None),
    }
    if beam_min_bytes < 0 or (beam_segment_bytes is not None and
                              beam_segment_bytes <= 0):
      raise errors.UsageError(
          'beam_min_bytes must be >= 0 and beam_segment_bytes > 0')
    component_spec = _build_spec(
        model, model_blessing, infra_blessing, recipients, signer, cipher,
        hash_alg, encryption_context, push_destination, custom_config, bundle,
        beam_params)
    super().__init__(spec=component_spec)
