"""What the LocalDagRunner pipelines rooted on a store share
(test_encrypt_pusher_store_pipeline.py on gs://,
test_encrypt_pusher_s3_pipeline.py on s3://): run the pipeline process,
read its RESULT line, and check that the pushed package is the artifact's,
decrypts to the model's objects byte for byte, and predicts as the model.
"""

import json
import os
import subprocess
import sys

from tfx_encrypt import package as package_lib
from tfx_encrypt import storage
from tests import _util

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def run_pipeline(command, env, tmp_path, keys, root, dest):
  """Run `command` (the pipeline: python args before ROOT DEST METADATA
  RECIPIENT SIGNER); returns (model URI, EncryptedModel URI, pushed
  destination), each checked to be under `root` / `dest`."""
  out = subprocess.run(
      [sys.executable, *command, root, dest,
       str(tmp_path / 'metadata.sqlite'), keys.recipient, keys.signer],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-6000:])
  result = json.loads(next(line for line in out.stdout.splitlines()
                           if line.startswith('RESULT '))[len('RESULT '):])
  model_uri = result['Model']['uri']
  encrypted_uri = result['tfx_encrypt.EncryptedModel']['uri']
  pushed = result['PushedModel']['props']
  assert model_uri.startswith(root + '/') and encrypted_uri.startswith(
      root + '/')
  assert pushed['pushed'] == 1
  destination = pushed['pushed_destination']
  assert destination.startswith(dest + '/')
  return model_uri, encrypted_uri, destination


def check_pushed_model(tmp_path, keys, model_uri, encrypted_uri, destination,
                       predict_fn, expected_predictions):
  """The model is in the pipeline root on the store (written by TF); the
  artifact and the push are the same package, which decrypts to the
  model's bytes exactly and predicts as it does. Returns the model's
  objects (name -> ObjectInfo)."""
  serving = storage.join(model_uri, 'Format-Serving')
  objects = {n: i for n, i in storage.list_objects(serving).items()
             if not storage.is_dir_marker(n, i.size)}
  assert 'saved_model.pb' in objects
  want = {}
  for name in objects:
    with storage.open_reader(storage.join(serving, name)) as r:
      want[name] = r.read_range(0, r.size)
  info = package_lib.inspect_package(destination)
  assert info.payload_digest == package_lib.inspect_package(
      encrypted_uri).payload_digest
  assert info.context['tfx.model_uri'] == model_uri
  package_lib.decrypt_model(destination, tmp_path / 'decrypted',
                            identities=[keys.recipient_key],
                            trusted=[keys.signer_pub])
  got = {k: v for k, v in _util.read_tree(tmp_path / 'decrypted').items()
         if v is not None}
  assert got == want
  assert predict_fn(str(tmp_path / 'decrypted')).tolist() == \
      expected_predictions.tolist()
  return objects
