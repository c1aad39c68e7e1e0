"""TFX artifact types defined by tfx-encrypt.

`EncryptedModel` is the output of the `EncryptPusher` component: an encrypted
(and optionally signed) tfx-encrypt package of a SavedModel.

* File structure:
   - `{uri}/`: the tfx-encrypt package (see docs/FORMAT.md); a bundle package
     is the single file `{uri}/<name>.tfxe`.

* Properties: none. Kubeflow V2 / Vertex AI Pipelines reject custom artifact
  types that declare `PROPERTIES`, and MLMD refuses to change the property set
  of a registered type later, so everything is recorded as custom properties:
   - `format_version` (int), `cipher`, `hash_alg`, `package_id`,
     `recipient_key_ids` (JSON list of public key ids), `recipient_uris`
     (JSON list of key URIs), `signer_id`, `signature_alg`,
     `model_fingerprint`, `ciphertext_digest`, `file_count` (int),
     `plaintext_bytes` (int), `ciphertext_bytes` (int), `bundle` (int),
     `encryption_context` (JSON object),
   - and, named as the TFX Pusher names them, `pushed` (int),
     `pushed_destination` and `pushed_version`.

`TYPE_NAME` has the form `<module>.<Class>` that Kubeflow V2 requires
(`^[a-z][a-z0-9-_]{2,20}[.][A-Z][a-zA-Z0-9-_]{2,49}$`); the Vertex container
resolves the class by importing that path, so `tfx_encrypt.EncryptedModel`
must stay importable from the top-level package.
"""

from tfx.types import artifact
from tfx.types import system_artifacts

from tfx_encrypt import mlmd_names

__all__ = ['EncryptedModel']


class EncryptedModel(artifact.Artifact):
  """An encrypted, optionally signed, tfx-encrypt package of a model."""

  TYPE_NAME = mlmd_names.ENCRYPTED_MODEL_TYPE
  TYPE_ANNOTATION = system_artifacts.Model
