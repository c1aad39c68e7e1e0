"""LocalDagRunner end to end with the pipeline root and push on gs://.

TFX reaches the pipeline root only through tf.io.gfile. TF 2.16's built-in
GCS filesystem has its endpoints compiled in, so it is pointed at
gcp-storage-emulator through the TEST-ONLY TLS-terminating loopback proxy of
tests/fakes/gcs_tls_proxy.py (`https_proxy` + `CURL_CA_BUNDLE`, both read by
TF's libcurl), and the emulator runs with the TEST-ONLY patches of
tests/fakes/gcs_emulator_tf.py (ifGenerationMatch=0; a zero-byte media
upload, which is how tf.io.gfile.makedirs makes a folder). tfx-encrypt talks
to the same emulator through google-cloud-storage (STORAGE_EMULATOR_HOST).

The model is produced upstream in that root (a Python function component
saving a SavedModel with tf.saved_model.save into its Model artifact on
gs://); EncryptPusher encrypts it from the store and pushes to gs://; the
pushed package decrypts to the model's objects byte for byte, and loads.

The same pipeline on s3:// (TF through tensorflow-io) is
tests/components/test_encrypt_pusher_s3_pipeline.py.
"""

import json
import os
import subprocess
import sys

import pytest

from tfx_encrypt import package as package_lib
from tfx_encrypt import storage
from tests import _util

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


@pytest.fixture
def tf_gcs(tmp_path):
  """The patched emulator, the TLS proxy, and both environments applied."""
  from tests.fakes.gcs_emulator_tf import TfGcsEmulator  # pylint: disable=g-import-not-at-top
  from tests.fakes.gcs_tls_proxy import GcsTlsProxy  # pylint: disable=g-import-not-at-top
  from tests.fakes.stores import GcsStore  # pylint: disable=g-import-not-at-top
  store = GcsStore.__new__(GcsStore)
  store.server = TfGcsEmulator()
  proxy = GcsTlsProxy(store.server.port, str(tmp_path))
  try:
    with store.applied():
      yield store, proxy
  finally:
    proxy.close()
    store.server.close()


@pytest.mark.slow
def test_pipeline_root_and_push_on_gcs(tmp_path, keys, predict_fn,
                                       expected_predictions, tf_gcs):
  store, proxy = tf_gcs
  bucket_base = store.new_base()  # gs://BUCKET/pkgs
  root = storage.join(bucket_base, 'pipeline_root')
  dest = storage.join(bucket_base, 'serving')
  env = dict(os.environ, **proxy.env())
  out = subprocess.run(
      [sys.executable, '-m', 'tests.components._store_pipeline', root, dest,
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
  # The model really is in the pipeline root on the store, written by TF.
  serving = storage.join(model_uri, 'Format-Serving')
  objects = {n: i for n, i in storage.list_objects(serving).items()
             if not storage.is_dir_marker(n, i.size)}
  assert 'saved_model.pb' in objects
  want = {}
  for name in objects:
    with storage.open_reader(storage.join(serving, name)) as r:
      want[name] = r.read_range(0, r.size)
  # The artifact and the push are the same package, and it decrypts to the
  # model's bytes exactly.
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
