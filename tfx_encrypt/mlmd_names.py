"""Names tfx-encrypt writes into ML Metadata, shared by the writer
(`components/encrypt_pusher`) and the reader (`lineage`).

Standard library only, so the lineage layer can import it without TFX.
"""

#: Artifact type of the encrypted package (KubeflowV2/Vertex-compatible form).
ENCRYPTED_MODEL_TYPE = 'tfx_encrypt.EncryptedModel'

# Custom properties recorded on both output artifacts.
FORMAT_VERSION_PROPERTY = 'format_version'
CIPHER_PROPERTY = 'cipher'
HASH_ALG_PROPERTY = 'hash_alg'
PACKAGE_ID_PROPERTY = 'package_id'
RECIPIENT_KEY_IDS_PROPERTY = 'recipient_key_ids'
RECIPIENT_URIS_PROPERTY = 'recipient_uris'
SIGNER_ID_PROPERTY = 'signer_id'
SIGNATURE_ALG_PROPERTY = 'signature_alg'
MODEL_FINGERPRINT_PROPERTY = 'model_fingerprint'
CIPHERTEXT_DIGEST_PROPERTY = 'ciphertext_digest'
FILE_COUNT_PROPERTY = 'file_count'
PLAINTEXT_BYTES_PROPERTY = 'plaintext_bytes'
CIPHERTEXT_BYTES_PROPERTY = 'ciphertext_bytes'
BUNDLE_PROPERTY = 'bundle'
ENCRYPTION_CONTEXT_PROPERTY = 'encryption_context'
ENCRYPTED_MODEL_URI_PROPERTY = 'encrypted_model_uri'
# 1 when the artifact directory holds a package, 0 when the execution wrote
# none (model not blessed): TFX publishes every declared output, so an
# unblessed run still records an EncryptedModel; lineage skips encrypted=0.
ENCRYPTED_PROPERTY = 'encrypted'
# Set by a key rotation (`tfx-encrypt rewrap` / `rotate` with an MLMD
# connection) on the EncryptedModel it replaced: superseded=1, and the id of
# the new artifact.
SUPERSEDED_PROPERTY = 'superseded'
SUPERSEDED_BY_PROPERTY = 'superseded_by'
# Execution type recorded for a rewrap / rotate, and its properties.
KEY_ROTATION_TYPE = 'tfx_encrypt.KeyRotation'
ROTATION_OPERATION_PROPERTY = 'operation'
ROTATION_ADDED_PROPERTY = 'added_key_ids'
ROTATION_REMOVED_PROPERTY = 'removed_key_ids'
# The TFX Pusher's names (tfx/components/pusher/executor.py).
PUSHED_PROPERTY = 'pushed'
PUSHED_DESTINATION_PROPERTY = 'pushed_destination'
PUSHED_VERSION_PROPERTY = 'pushed_version'

# Encryption-context keys added automatically by the executor. User keys may
# not use these prefixes, so provenance in the context cannot be spoofed.
CONTEXT_PIPELINE_NAME = 'tfx.pipeline_name'
CONTEXT_PIPELINE_RUN_ID = 'tfx.pipeline_run_id'
# Kubeflow Pipelines v2 / Vertex AI only: the job's uuid ({{$.pipeline_job_uuid}});
# tfx.pipeline_run_id is then the job name ({{$.pipeline_job_name}}).
CONTEXT_PIPELINE_RUN_UUID = 'tfx.pipeline_run_uuid'
CONTEXT_COMPONENT_ID = 'tfx.component_id'
CONTEXT_EXECUTION_ID = 'tfx.execution_id'
CONTEXT_MODEL_URI = 'tfx.model_uri'
CONTEXT_MODEL_ARTIFACT_ID = 'tfx.model_artifact_id'
CONTEXT_MODEL_NAME = 'tfx.model_name'
CONTEXT_MODEL_VERSION = 'tfx.model_version'
RESERVED_CONTEXT_PREFIXES = ('tfx.', 'tfxe:', 'tfxe.')
