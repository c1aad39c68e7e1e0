"""EncryptPusher: a TFX component that encrypts and pushes a blessed model.

Mirrors `tfx/components/pusher/component.py`. EncryptPusher *replaces*
Pusher: it goes where a Pusher would, after Trainer (and Evaluator /
InfraValidator), takes the same inputs, and is the last step of the model's
path; there is no stock Pusher after it (see "Position in the DAG" below):

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

Position in the DAG: a stock `Pusher` cannot follow EncryptPusher. Pusher's
`model` input takes a `Model`, and the package is a `tfx_encrypt.EncryptedModel`
(TFX refuses the channel when the pipeline is built); wiring Pusher to the
Trainer's `Model` instead would push the plaintext model. Nothing here
pretends the package is a `Model`: Pusher's serving-path logic and TF
Serving could not load it anyway. `pushed_model` is a standard `PushedModel`
with Pusher's custom properties, so anything downstream that reads a
Pusher's output reads this one. To put the package somewhere else as well,
add a second EncryptPusher with its own `push_destination` (it makes
its own package), consume `encrypted_model` in your own component, or
distribute from the push destination (`tfx-encrypt push` to an OCI
registry; `tfx-encrypt serve-sync` next to TF Serving on the consumer
side). docs/COMPONENT.md, "Position in the DAG", has the details.

Key material is never a parameter: recipients, signer and Beam worker identity
are key URIs. Everything that can be checked without the network is checked
when the component is built (and again in the executor): key-URI forms per
backend for recipients, signer and Beam worker identity
(`tfx_encrypt.keys.check_uri_form`), that Beam workers have a key to unwrap
with, and the push destination's form (a local path, `file:///`, `gs://`,
`s3://`).

On Kubeflow Pipelines v2 / Vertex AI the package's provenance (pipeline
name, run id, component id) comes from KFP runtime placeholders and the
compile-time pipeline name (`kfp_v2.py`).

`BeamEncryptPusher` is the same component with a Beam executor that fans the
encryption of large models out to Beam workers (`beam_pipeline_args`, e.g.
DirectRunner multi-processing, Dataflow, Flink, Spark).
"""

import json
from typing import Any, Dict, Optional, Sequence, Union

from tfx import types
from tfx.dsl.components.base import base_beam_component
from tfx.dsl.components.base import base_component
from tfx.dsl.components.base import executor_spec
from tfx.proto import pusher_pb2
from tfx.types import standard_artifacts

from tfx_encrypt import types as tfxe_types
from tfx_encrypt.components.encrypt_pusher import beam_executor
from tfx_encrypt.components.encrypt_pusher import executor
from tfx_encrypt.components.encrypt_pusher import params as params_lib
from tfx_encrypt.components.encrypt_pusher import spec
from tfx_encrypt.components.encrypt_pusher.params import KeyUri


class EncryptPusher(base_component.BaseComponent):
  """Encrypts a blessed model for key URIs and pushes the package.

  Use it instead of Pusher, not before it (module docstring). A model that
  is not blessed (by `model_blessing` or `infra_blessing`) is not
  encrypted or pushed; the execution succeeds with `pushed=0`, as in Pusher.
  A blessed model is encrypted from its serving directory into the
  `encrypted_model` artifact and pushed to `<push_destination>/<version>/`,
  where version is a Unix timestamp; the push is atomic and never replaces an
  existing version.
  """

  SPEC_CLASS = spec.EncryptPusherSpec
  EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)
  # `IMAGE`: the container image this component (and BeamEncryptPusher) runs
  # in on Kubeflow Pipelines v2 / Vertex AI (docker/component.Dockerfile).
  # tfx_encrypt.components.kubeflow_v2.image_map() puts it in
  # KubeflowV2DagRunnerConfig's per-component `default_image` map, TFX 1.16's
  # way to choose a step's image; kubeflow_v2.with_image() overrides it.
  from tfx_encrypt.__about__ import IMAGE  # pylint: disable=g-import-not-at-top

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
      audit_log: Optional[str] = None):
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
      push_destination: Base directory (a local path, `file:///PATH`,
        `gs://BUCKET/PATH`, `s3://BUCKET/PATH`, or another tf.io.gfile
        scheme) or a Pusher `PushDestination` with a filesystem destination;
        http(s), ftp, `gcs://`, malformed buckets, `~/...` are refused here.
        If None the package is only recorded as the EncryptedModel artifact
        (pushed=0).
      custom_config: Optional dict recorded with the execution.
      bundle: Write a single-file `.tfxe` bundle instead of a directory.
      audit_log: Optional audit sink on the executor's host: a file path
        (hash-chained JSON lines), 'stderr', 'syslog[:ADDR]' or 'logging';
        each execution writes one event (docs/SECURITY.md §8). Recorded as
        an exec property: a place, never a secret.

    Raises:
      KeyMaterialInParameterError: a parameter looks like key material.
      ValueError / UsageError: invalid arguments.
    """
    if model is None and infra_blessing is None:
      raise ValueError(
          'Either one of model or infra_blessing channel should be given. '
          'If infra_blessing is used in place of model, it must have been '
          'created with InfraValidator with RequestSpec.make_warmup = True.')
    parameters = params_lib.exec_properties(
        recipients=recipients, signer=signer, cipher=cipher,
        hash_alg=hash_alg, encryption_context=encryption_context,
        push_destination=push_destination, custom_config=custom_config,
        bundle=bundle, audit_log=audit_log)
    parameters.update(self._more_parameters(parameters))
    super().__init__(spec=spec.EncryptPusherSpec(
        model=model,
        model_blessing=model_blessing,
        infra_blessing=infra_blessing,
        encrypted_model=types.Channel(type=tfxe_types.EncryptedModel),
        pushed_model=types.Channel(type=standard_artifacts.PushedModel),
        **parameters))

  def _more_parameters(self, parameters: Dict[str, Any]) -> Dict[str, Any]:
    """Execution parameters a subclass adds to the spec (the Beam ones),
    checked against the `parameters` EncryptPusher has built."""
    del parameters
    return {}


class BeamEncryptPusher(EncryptPusher, base_beam_component.BaseBeamComponent):
  """EncryptPusher whose encryption fans out to Beam workers.

  Files and segment ranges of large files are encrypted by Beam workers
  (`beam_pipeline_args`, e.g. `--direct_num_workers=2
  --direct_running_mode=multi_processing`). Workers unwrap the data key
  themselves from `beam_worker_identity` (a KMS key URI that is also a
  recipient, or a private key file readable by every worker); the plaintext
  data key is never part of the Beam job graph. The output is a standard
  package that `tfx-encrypt decrypt` reads.
  """

  EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(beam_executor.Executor)

  def __init__(
      self,
      model: Optional[types.BaseChannel] = None,
      model_blessing: Optional[types.BaseChannel] = None,
      infra_blessing: Optional[types.BaseChannel] = None,
      *,
      beam_worker_identity: Optional[KeyUri] = None,
      beam_min_bytes: int = 0,
      beam_segment_bytes: Optional[int] = None,
      **kwargs):
    """Constructs a BeamEncryptPusher component.

    Args:
      model: see `EncryptPusher`.
      model_blessing: see `EncryptPusher`.
      infra_blessing: see `EncryptPusher`.
      beam_worker_identity: Key URI the Beam workers unwrap the data key with.
        Default: the first recipient that can unwrap (a KMS recipient).
        Without one, some recipient must be a KMS key or a PKCS#11 token
        key, or construction fails (UsageError): public key files cannot
        unwrap.
      beam_min_bytes: Models smaller than this are encrypted in-process
        (no Beam job). Default 0: always use Beam.
      beam_segment_bytes: Plaintext bytes per Beam work item for large files
        (rounded to whole 1 MiB segments). Default 64 MiB.
      **kwargs: the keyword arguments of `EncryptPusher` (`recipients`,
        `signer`, `cipher`, `hash_alg`, `encryption_context`,
        `push_destination`, `custom_config`, `bundle`, `audit_log`), defined
        there once.

    Raises:
      KeyMaterialInParameterError: a parameter looks like key material.
      ValueError / UsageError: invalid arguments.
    """
    # Checked before the arguments EncryptPusher checks.
    self._beam_parameters = params_lib.beam_exec_properties(
        beam_worker_identity, beam_min_bytes, beam_segment_bytes)
    super().__init__(model, model_blessing, infra_blessing, **kwargs)

  def _more_parameters(self, parameters: Dict[str, Any]) -> Dict[str, Any]:
    # Workers unwrap the data key themselves: refuse now a job they could
    # not run (no worker identity, and no recipient they can unwrap with).
    params_lib.check_beam_worker_identity(
        self._beam_parameters[spec.BEAM_WORKER_IDENTITY_KEY],
        json.loads(parameters[spec.RECIPIENTS_KEY]))
    return self._beam_parameters
