"""A LocalDagRunner pipeline whose root and push destination are on gs://.

Run as `python -m tests.components._store_pipeline ROOT DEST METADATA
RECIPIENT SIGNER` (by tests/components/test_encrypt_pusher_store_pipeline.py)
with the environment of tests/fakes/gcs_tls_proxy.py, so that TFX's own file
I/O (tf.io.gfile's built-in GCS filesystem) and tfx-encrypt (the
google-cloud-storage client, STORAGE_EMULATOR_HOST) both reach the same
emulator. TinyTrainer writes a SavedModel into its Model artifact, i.e. into
the pipeline root on gs://, through tf.saved_model.save; EncryptPusher
encrypts it from there.
"""

import json
import os
import sys

from tfx import v1 as tfx
from tfx.dsl.component.experimental.annotations import OutputArtifact
from tfx.dsl.component.experimental.decorators import component
from tfx.types import standard_artifacts


@component
def TinyTrainer(model: OutputArtifact[standard_artifacts.Model]):  # pylint: disable=invalid-name
  """Saves the example pipeline's tiny tf.Module into `model.uri`."""
  from pipelines import local_pipeline  # pylint: disable=g-import-not-at-top
  local_pipeline.write_tiny_model(os.path.join(model.uri, 'Format-Serving'))


def main(argv):
  root, dest, metadata_path, recipient, signer = argv
  from tfx_encrypt.components import EncryptPusher  # pylint: disable=g-import-not-at-top
  trainer = TinyTrainer().with_id('trainer')
  pusher = EncryptPusher(model=trainer.outputs['model'],
                         recipients=[recipient], signer=signer,
                         push_destination=dest).with_id('encrypt_pusher')
  pipeline = tfx.dsl.Pipeline(
      pipeline_name='store-pipeline', pipeline_root=root,
      metadata_connection_config=(
          tfx.orchestration.metadata.sqlite_metadata_connection_config(
              metadata_path)),
      components=[trainer, pusher], enable_cache=False)
  tfx.orchestration.LocalDagRunner().run(pipeline)
  from ml_metadata.metadata_store import metadata_store  # pylint: disable=g-import-not-at-top
  store = metadata_store.MetadataStore(
      tfx.orchestration.metadata.sqlite_metadata_connection_config(
          metadata_path))
  out = {}
  for t in ('Model', 'tfx_encrypt.EncryptedModel', 'PushedModel'):
    [a] = store.get_artifacts_by_type(t)
    out[t] = {'uri': a.uri, 'props': {
        k: getattr(v, v.WhichOneof('value'))
        for k, v in a.custom_properties.items()}}
  print('RESULT ' + json.dumps(out, default=str))


if __name__ == '__main__':
  main(sys.argv[1:])
