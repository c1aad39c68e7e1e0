"""What TFX's own file I/O (tf.io.gfile, TF 2.16) can do with the emulators.

TFX reaches a pipeline root through `tfx.dsl.io.fileio`, i.e. tf.io.gfile
(the launcher makes the output directories, the executor-output file, the
stateful working dirs; the Pusher's GetModelPath checks the model layout).
A LocalDagRunner pipeline whose root is on an emulated store needs
tf.io.gfile to reach that emulator. In .venv (TensorFlow 2.16.2,
tensorflow-io-gcs-filesystem 0.37.1, no tensorflow-io) it cannot by any
setting; these tests measure why (docs/OBJECT_STORES.md). For gs:// the
pipeline test goes through a TEST-ONLY TLS proxy instead
(test_encrypt_pusher_store_pipeline.py); for s3:// there is no way:

* s3://: TF 2.16 has no S3 filesystem (moved to tensorflow-io, not
  installed): `UnimplementedError: File system scheme 's3' not implemented`.
* gs:// through TF's built-in GCS filesystem: the endpoint is compiled in
  (https://www.googleapis.com/storage/v1/, storage.googleapis.com); no
  variable points it at an emulator (STORAGE_EMULATOR_HOST is ignored).
* gs:// through the tensorflow-io-gcs-filesystem plugin
  (TF_USE_MODULAR_FILESYSTEM=1, CLOUD_STORAGE_EMULATOR_ENDPOINT, which its
  google-cloud-cpp client reads): every call (exists, read, listdir,
  makedirs, write) dies with SIGSEGV.
"""

import os
import signal
import subprocess
import sys

import pytest

from tfx_encrypt import storage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

_PROBE = r'''
import sys
import tensorflow as tf
uri = sys.argv[1]
try:
  print('EXISTS', tf.io.gfile.exists(uri), flush=True)
except Exception as e:
  print('ERROR', type(e).__name__, str(e).replace('\n', ' ')[:400], flush=True)
'''


def _probe(uri, **env):
  r = subprocess.run([sys.executable, '-c', _PROBE, uri], cwd=REPO,
                     capture_output=True, text=True, timeout=300, check=False,
                     env=dict(os.environ, **env))
  return r.returncode, r.stdout.strip()


@pytest.mark.slow
def test_tf_gfile_has_no_s3(s3_store):
  uri = storage.join(s3_store.new_base(), 'x')
  storage.put(uri, b'x')
  rc, out = _probe(uri, S3_ENDPOINT=s3_store.server.url,
                   S3_USE_HTTPS='0', S3_VERIFY_SSL='0')
  assert rc == 0, out
  assert "UnimplementedError File system scheme 's3' not implemented" in out


@pytest.mark.slow
def test_tf_builtin_gcs_ignores_the_emulator(gs_store):
  uri = storage.join(gs_store.new_base(), 'x')
  storage.put(uri, b'x')
  rc, out = _probe(uri, GOOGLE_AUTH_TOKEN_FOR_TESTING='t', NO_GCE_CHECK='1',
                   GCS_RETRY_CONFIG_MAX_RETRIES='0')
  assert rc == 0, out
  # It never talks to STORAGE_EMULATOR_HOST: it goes to Google (no network
  # here) and fails, though the object exists on the emulator.
  assert out.startswith('ERROR') and 'googleapis.com' in out, out


@pytest.mark.slow
def test_tf_gcs_plugin_with_the_emulator_crashes(gs_store):
  uri = storage.join(gs_store.new_base(), 'x')
  storage.put(uri, b'x')
  rc, out = _probe(uri, TF_USE_MODULAR_FILESYSTEM='1',
                   CLOUD_STORAGE_EMULATOR_ENDPOINT=gs_store.server.url)
  assert rc == -signal.SIGSEGV, (rc, out)
