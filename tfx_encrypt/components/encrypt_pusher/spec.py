"""Names and ComponentSpec of the EncryptPusher component.

Mirrors `tfx/types/standard_component_specs.py`: the input keys are the TFX
Pusher's (`model`, `model_blessing`, `infra_blessing`, `pushed_model`,
`push_destination`, `custom_config`) so DAG code written for Pusher, and the
Pusher executor helpers (`CheckBlessing`, `GetModelPath`), work unchanged.

Key material is never an execution parameter: TFX persists every execution
property in ML Metadata and bakes it into compiled pipeline JSON. Parameters
that name keys take key URIs, checked by `key_material` when the component
is built and again when the executor reads them (`params`).
"""

from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter
from tfx.types.component_spec import ComponentSpec
from tfx.types.component_spec import ExecutionParameter
from tfx.types.system_executions import Deploy

from tfx_encrypt import policy as policy_lib
from tfx_encrypt import types as tfxe_types

# Inputs (the TFX Pusher's names; see standard_component_specs).
MODEL_KEY = 'model'
MODEL_BLESSING_KEY = 'model_blessing'
INFRA_BLESSING_KEY = 'infra_blessing'
# Outputs.
ENCRYPTED_MODEL_KEY = 'encrypted_model'
PUSHED_MODEL_KEY = 'pushed_model'
# Execution parameters.
RECIPIENTS_KEY = 'recipients'
SIGNER_KEY = 'signer'
CIPHER_KEY = 'cipher'
HASH_ALG_KEY = 'hash_alg'
ENCRYPTION_CONTEXT_KEY = 'encryption_context'
PUSH_DESTINATION_KEY = 'push_destination'
CUSTOM_CONFIG_KEY = 'custom_config'
BUNDLE_KEY = 'bundle'
# Execution parameters read by the Beam executor only.
BEAM_WORKER_IDENTITY_KEY = 'beam_worker_identity'
BEAM_MIN_BYTES_KEY = 'beam_min_bytes'
BEAM_SEGMENT_BYTES_KEY = 'beam_segment_bytes'
# Where the executor writes its audit event (a tfx_encrypt.audit sink: a
# path, stderr, syslog[:ADDR] or logging; never a secret).
AUDIT_LOG_KEY = 'audit_log'
# Provenance on Kubeflow Pipelines v2 / Vertex AI (kfp_v2.py). The component
# sets the kfp_* ones to KFP runtime placeholders, which the orchestrator
# replaces with the running job's values; elsewhere they stay placeholders
# and are ignored. `pipeline_name` is recorded at compile time
# (kubeflow_v2.image_map), as KFP has no placeholder for it.
KFP_PIPELINE_JOB_NAME_KEY = 'kfp_pipeline_job_name'
KFP_PIPELINE_JOB_UUID_KEY = 'kfp_pipeline_job_uuid'
KFP_PIPELINE_TASK_NAME_KEY = 'kfp_pipeline_task_name'
KFP_PIPELINE_TASK_UUID_KEY = 'kfp_pipeline_task_uuid'
PIPELINE_NAME_KEY = 'pipeline_name'

# Custom property and encryption-context names (shared with the lineage
# layer, which must not import TFX).
from tfx_encrypt.mlmd_names import (  # pylint: disable=g-multiple-import,unused-import
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
    ENCRYPTED_MODEL_URI_PROPERTY,
    PUSHED_PROPERTY,
    PUSHED_DESTINATION_PROPERTY,
    PUSHED_VERSION_PROPERTY,
    CONTEXT_PIPELINE_NAME,
    CONTEXT_PIPELINE_RUN_ID,
    CONTEXT_COMPONENT_ID,
    CONTEXT_EXECUTION_ID,
    CONTEXT_MODEL_URI,
    CONTEXT_MODEL_ARTIFACT_ID,
    CONTEXT_MODEL_NAME,
    CONTEXT_MODEL_VERSION,
    RESERVED_CONTEXT_PREFIXES,
)

# Encryption-context key of the push version, set by the executor unless the
# user's encryption_context sets it (then it must be a canonical integer):
# the key a consumer's Policy(min_version=...) reads by default.
CONTEXT_VERSION = policy_lib.DEFAULT_VERSION_KEY

# File name of a bundle package inside the artifact and version directories.
BUNDLE_FILE_NAME = 'model.tfxe'


class EncryptPusherSpec(ComponentSpec):
  """EncryptPusher component spec."""

  PARAMETERS = {
      # JSON list of key URIs (json_utils.dumps, as TFX stores lists).
      RECIPIENTS_KEY: ExecutionParameter(type=str),
      SIGNER_KEY: ExecutionParameter(type=str, optional=True),
      CIPHER_KEY: ExecutionParameter(type=str, optional=True),
      HASH_ALG_KEY: ExecutionParameter(type=str, optional=True),
      # JSON object of extra string key/values.
      ENCRYPTION_CONTEXT_KEY: ExecutionParameter(type=str, optional=True),
      # Base directory; versions are pushed to <base>/<version>/.
      PUSH_DESTINATION_KEY: ExecutionParameter(type=str, optional=True),
      CUSTOM_CONFIG_KEY: ExecutionParameter(type=str, optional=True),
      BUNDLE_KEY: ExecutionParameter(type=int, optional=True),
      BEAM_WORKER_IDENTITY_KEY: ExecutionParameter(type=str, optional=True),
      BEAM_MIN_BYTES_KEY: ExecutionParameter(type=int, optional=True),
      BEAM_SEGMENT_BYTES_KEY: ExecutionParameter(type=int, optional=True),
      AUDIT_LOG_KEY: ExecutionParameter(type=str, optional=True),
      KFP_PIPELINE_JOB_NAME_KEY: ExecutionParameter(type=str, optional=True),
      KFP_PIPELINE_JOB_UUID_KEY: ExecutionParameter(type=str, optional=True),
      KFP_PIPELINE_TASK_NAME_KEY: ExecutionParameter(type=str, optional=True),
      KFP_PIPELINE_TASK_UUID_KEY: ExecutionParameter(type=str, optional=True),
      PIPELINE_NAME_KEY: ExecutionParameter(type=str, optional=True),
  }
  INPUTS = {
      MODEL_KEY:
          ChannelParameter(type=standard_artifacts.Model, optional=True),
      MODEL_BLESSING_KEY:
          ChannelParameter(type=standard_artifacts.ModelBlessing,
                           optional=True),
      INFRA_BLESSING_KEY:
          ChannelParameter(type=standard_artifacts.InfraBlessing,
                           optional=True),
  }
  OUTPUTS = {
      ENCRYPTED_MODEL_KEY: ChannelParameter(type=tfxe_types.EncryptedModel),
      PUSHED_MODEL_KEY: ChannelParameter(type=standard_artifacts.PushedModel),
  }
  TYPE_ANNOTATION = Deploy
