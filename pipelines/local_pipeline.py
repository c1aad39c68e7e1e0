"""Example: Importer -> EncryptPusher on LocalDagRunner with SQLite MLMD.

A tiny SavedModel is imported as a TFX `Model`, encrypted for a local X25519
recipient key, signed with a local Ed25519 key and pushed to a local
directory (`<workdir>/serving/<version>/`). The run is recorded in an SQLite
ML Metadata store, then the pushed package is decrypted and its predictions
are compared with the original model's.

Usage:

    python -m pipelines.local_pipeline --workdir demo-out

or, from Python, `run(workdir)`, which returns a summary dict. Swap the
recipient for a KMS key URI (e.g. `aws-kms://arn:aws:kms:...`) in a real
deployment; never put key material in component parameters.
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from absl import logging

PIPELINE_NAME = 'tfx-encrypt-local-demo'
_INPUTS = [[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]]


def create_pipeline(pipeline_name: str,
                    pipeline_root: str,
                    metadata_path: str,
                    model_uri: str,
                    recipients: Sequence[str],
                    push_destination: Optional[str],
                    signer: Optional[str] = None,
                    blessed: Optional[bool] = None,
                    encryption_context: Optional[Dict[str, str]] = None,
                    use_beam: bool = False,
                    beam_pipeline_args: Optional[List[str]] = None,
                    beam_worker_identity: Optional[str] = None,
                    beam_segment_bytes: Optional[int] = None,
                    enable_cache: bool = False):
  """Importer (+ optional blessing Importer) -> (Beam)EncryptPusher."""
  # pylint: disable=g-import-not-at-top
  from tfx import v1 as tfx
  from tfx_encrypt.components import BeamEncryptPusher
  from tfx_encrypt.components import EncryptPusher
  # pylint: enable=g-import-not-at-top

  components = []
  model_importer = tfx.dsl.Importer(
      source_uri=model_uri,
      artifact_type=tfx.types.standard_artifacts.Model,
      reimport=False).with_id('model_importer')
  components.append(model_importer)
  blessing = None
  if blessed is not None:
    blessing_dir = os.path.join(pipeline_root, 'blessings',
                                'blessed' if blessed else 'not_blessed')
    os.makedirs(blessing_dir, exist_ok=True)
    blessing_importer = tfx.dsl.Importer(
        source_uri=blessing_dir,
        artifact_type=tfx.types.standard_artifacts.ModelBlessing,
        custom_properties={'blessed': int(blessed)},
        reimport=False).with_id('blessing_importer')
    components.append(blessing_importer)
    blessing = blessing_importer.outputs['result']

  kwargs = dict(
      model=model_importer.outputs['result'],
      model_blessing=blessing,
      recipients=list(recipients),
      signer=signer,
      encryption_context=encryption_context,
      push_destination=push_destination)
  if use_beam:
    pusher = BeamEncryptPusher(beam_worker_identity=beam_worker_identity,
                               beam_segment_bytes=beam_segment_bytes,
                               **kwargs)
    if beam_pipeline_args:
      pusher.with_beam_pipeline_args(beam_pipeline_args)
  else:
    pusher = EncryptPusher(**kwargs)
  components.append(pusher.with_id('encrypt_pusher'))

  return tfx.dsl.Pipeline(
      pipeline_name=pipeline_name,
      pipeline_root=pipeline_root,
      metadata_connection_config=(
          tfx.orchestration.metadata.sqlite_metadata_connection_config(
              metadata_path)),
      components=components,
      enable_cache=enable_cache)


def write_tiny_model(export_dir: str) -> None:
  """Saves a tiny tf.Module (y = xW + b) with a serving signature."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  class Tiny(tf.Module):

    def __init__(self):
      super().__init__()
      self.w = tf.Variable([[1.5], [-2.0], [0.25]], dtype=tf.float32)
      self.b = tf.Variable([0.5], dtype=tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def serve(self, x):
      return {'y': tf.matmul(x, self.w) + self.b}

  module = Tiny()
  tf.saved_model.save(module, export_dir,
                      signatures={'serving_default': module.serve})


def _predict(export_dir: str) -> List[List[float]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  loaded = tf.saved_model.load(export_dir)
  y = loaded.signatures['serving_default'](x=tf.constant(_INPUTS))['y']
  return y.numpy().tolist()


def _encrypted_model_record(metadata_path: str) -> Dict[str, Any]:
  """The newest pushed EncryptedModel artifact, read back through ml_metadata.

  An unblessed run records an EncryptedModel too (TFX publishes every
  declared output) with `encrypted=0` and `pushed=0`, and a key rotation
  marks the artifact it replaced `superseded=1`: both are skipped
  (docs/COMPONENT.md "Unblessed models"). `tfx_encrypt.lineage` does the
  same, with filters.
  """
  # pylint: disable=g-import-not-at-top
  from ml_metadata.metadata_store import metadata_store
  from tfx.orchestration import metadata
  # pylint: enable=g-import-not-at-top
  store = metadata_store.MetadataStore(
      metadata.sqlite_metadata_connection_config(metadata_path))
  artifacts = [
      a for a in store.get_artifacts_by_type('tfx_encrypt.EncryptedModel')
      if 'pushed' in a.custom_properties
      and a.custom_properties['pushed'].int_value == 1
      and 'superseded' not in a.custom_properties]
  if not artifacts:
    raise RuntimeError('no pushed tfx_encrypt.EncryptedModel artifact in '
                       'MLMD')
  latest = max(artifacts, key=lambda a: a.id)
  props = {}
  for k, v in latest.custom_properties.items():
    kind = v.WhichOneof('value')
    props[k] = getattr(v, kind) if kind else None
  return {'id': latest.id, 'uri': latest.uri, 'properties': props}


def run(workdir: str) -> Dict[str, Any]:
  """Runs the demo pipeline under `workdir` and returns a summary dict."""
  # pylint: disable=g-import-not-at-top
  from tfx import v1 as tfx
  from tfx_encrypt import package as package_lib
  from tfx_encrypt.keys import local as local_keys
  # pylint: enable=g-import-not-at-top

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  model_uri = os.path.join(workdir, 'model')
  serving = os.path.join(model_uri, 'Format-Serving')
  if not os.path.exists(os.path.join(serving, 'saved_model.pb')):
    write_tiny_model(serving)
  key_dir = os.path.join(workdir, 'keys')
  os.makedirs(key_dir, exist_ok=True)
  prefix = {k: os.path.join(key_dir, k) for k in ('recipient', 'signer')}
  if not os.path.exists(prefix['recipient'] + '.pub.pem'):
    local_keys.keygen('x25519', prefix['recipient'], force=True)
  if not os.path.exists(prefix['signer'] + '.key.pem'):
    local_keys.keygen('ed25519', prefix['signer'], force=True)

  metadata_path = os.path.join(workdir, 'metadata.sqlite')
  push_destination = os.path.join(workdir, 'serving')
  pipeline = create_pipeline(
      pipeline_name=PIPELINE_NAME,
      pipeline_root=os.path.join(workdir, 'pipeline_root'),
      metadata_path=metadata_path,
      model_uri=model_uri,
      recipients=[prefix['recipient'] + '.pub.pem'],
      signer=prefix['signer'] + '.key.pem',
      push_destination=push_destination,
      encryption_context={'purpose': 'tfx-encrypt demo'})
  tfx.orchestration.LocalDagRunner().run(pipeline)

  record = _encrypted_model_record(metadata_path)
  props = record['properties']
  destination = props['pushed_destination']
  decrypted = os.path.join(workdir, 'decrypted',
                           str(props['pushed_version']))
  if not os.path.exists(decrypted):
    os.makedirs(os.path.dirname(decrypted), exist_ok=True)
    package_lib.decrypt_model(destination, decrypted,
                              identities=[prefix['recipient'] + '.key.pem'],
                              trusted=[prefix['signer'] + '.pub.pem'])
  original, roundtrip = _predict(serving), _predict(decrypted)
  return {
      'pipeline_name': PIPELINE_NAME,
      'metadata_path': metadata_path,
      'encrypted_model_artifact_id': record['id'],
      'encrypted_model_uri': record['uri'],
      'pushed': props.get('pushed'),
      'pushed_destination': destination,
      'pushed_version': props.get('pushed_version'),
      'model_fingerprint': props.get('model_fingerprint'),
      'ciphertext_digest': props.get('ciphertext_digest'),
      'recipient_key_ids': json.loads(props.get('recipient_key_ids', '[]')),
      'signer_id': props.get('signer_id'),
      'cipher': props.get('cipher'),
      'file_count': props.get('file_count'),
      'plaintext_bytes': props.get('plaintext_bytes'),
      'ciphertext_bytes': props.get('ciphertext_bytes'),
      'encryption_context': json.loads(props.get('encryption_context', '{}')),
      'decrypted_model': decrypted,
      'predictions_match': original == roundtrip,
  }


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='demo-out',
                      help='directory for the model, keys, pipeline root, '
                      'MLMD store and pushed packages (default: demo-out)')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  summary = run(args.workdir)
  print(json.dumps(summary, indent=2, sort_keys=True))
  print(_narrate(summary))
  return 0 if summary['predictions_match'] else 1


def _narrate(s: Dict[str, Any]) -> str:
  """A few lines saying what the demo just did, for humans."""
  ok = 'identical' if s['predictions_match'] else 'DIFFERENT'
  return '\n'.join([
      '',
      'tfx-encrypt demo: what happened',
      f'  1. LocalDagRunner ran pipeline {s["pipeline_name"]!r}: '
      'Importer(Model) -> EncryptPusher.',
      f'  2. EncryptPusher encrypted {s["file_count"]} files '
      f'({s["plaintext_bytes"]} bytes) with {s["cipher"]} for '
      f'{len(s["recipient_key_ids"])} recipient(s), signed by '
      f'{s["signer_id"]}.',
      f'  3. It pushed version {s["pushed_version"]} to '
      f'{s["pushed_destination"]} (atomic, never overwritten).',
      f'  4. MLMD ({s["metadata_path"]}) records EncryptedModel artifact '
      f'#{s["encrypted_model_artifact_id"]}: fingerprint '
      f'{s["model_fingerprint"]}, run {s["encryption_context"].get("tfx.pipeline_run_id")}.',
      f'  5. The pushed package was verified (trusted signer), decrypted to '
      f'{s["decrypted_model"]} and loaded: predictions {ok} to the '
      'original model.',
      '  Next: tfx-encrypt inspect ' + s['pushed_destination'],
  ])


if __name__ == '__main__':
  sys.exit(main())
