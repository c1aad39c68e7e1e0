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

import os

import pytest

from tfx_encrypt import storage
from tests.components import _store_checks


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
  model_uri, encrypted_uri, destination = _store_checks.run_pipeline(
      ['-m', 'tests.components._store_pipeline'], env, tmp_path, keys, root,
      dest)
  _store_checks.check_pushed_model(
      tmp_path, keys, model_uri, encrypted_uri, destination, predict_fn,
      expected_predictions)
