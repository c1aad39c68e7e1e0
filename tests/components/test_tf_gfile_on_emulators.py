"""What TFX's own file I/O (tf.io.gfile, TF 2.16) can do with the emulators.

TFX reaches a pipeline root through `tfx.dsl.io.fileio`, i.e. tf.io.gfile
(the launcher makes the output directories, the executor-output file, the
stateful working dirs; the Pusher's GetModelPath checks the model layout).
A LocalDagRunner pipeline whose root is on an emulated store needs
tf.io.gfile to reach that emulator. In .venv (TensorFlow 2.16.2,
tensorflow-io-gcs-filesystem 0.37.1, tensorflow-io 0.37.1) these tests
measure what it can do (docs/OBJECT_STORES.md):

* s3://: TF 2.16 has no S3 filesystem of its own (`UnimplementedError: File
  system scheme 's3' not implemented`); importing tensorflow-io registers
  one (`tfx_encrypt.components.filesystems.ensure_gfile_scheme`; TFX's
  tensorflow_transform imports it too, so `from tfx import v1` does), which
  reaches moto through `S3_ENDPOINT`: every call TFX and
  tf.saved_model.save make works. tensorflow-io 0.37.1 then aborts the
  process at exit ("pure virtual method called", SIGABRT; tensorflow/io
  #2039), after the work is done. The pipeline test:
  test_encrypt_pusher_s3_pipeline.py.
* gs:// through TF's built-in GCS filesystem: the endpoint is compiled in
  (https://www.googleapis.com/storage/v1/, storage.googleapis.com); no
  variable points it at an emulator (STORAGE_EMULATOR_HOST is ignored).
  The pipeline test goes through a TEST-ONLY TLS proxy instead
  (test_encrypt_pusher_store_pipeline.py).
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
def test_tf_gfile_has_no_s3_without_tensorflow_io(s3_store):
  uri = storage.join(s3_store.new_base(), 'x')
  storage.put(uri, b'x')
  rc, out = _probe(uri, S3_ENDPOINT=s3_store.server.url, S3_VERIFY_SSL='0')
  assert rc == 0, out
  assert "UnimplementedError File system scheme 's3' not implemented" in out


@pytest.mark.slow
def test_tfx_itself_imports_tensorflow_io():
  # tensorflow_transform/__init__.py imports tensorflow_io when it is
  # installed ("needed wherever we touch the filesystem"), and TFX imports
  # tensorflow_transform: in any TFX process (the LocalDagRunner script, the
  # KFP v2 entrypoint) s3:// is registered once tensorflow-io is installed.
  code = ('import importlib, sys\n'
          'import tensorflow as tf\n'
          'print("s3" in tf.io.gfile.get_registered_schemes())\n'
          'importlib.import_module(sys.argv[1])\n'
          'print("s3" in tf.io.gfile.get_registered_schemes())\n')
  for module in ('tfx.v1',
                 'tfx.orchestration.kubeflow.v2.container.'
                 'kubeflow_v2_run_executor'):
    r = subprocess.run([sys.executable, '-c', code, module], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       check=False)
    assert (r.returncode, r.stdout.split()) == (0, ['False', 'True']), (
        module, r.stderr[-3000:])


# What TFX's launcher and tf.saved_model.save do on a pipeline root, through
# tensorflow-io's S3 filesystem, registered as a user's pipeline module does.
_S3_PROBE = r"""
import sys
from tfx_encrypt.components.filesystems import ensure_gfile_scheme
ensure_gfile_scheme(sys.argv[1])
import tensorflow as tf
gfile = tf.io.gfile
base = sys.argv[1]
print('EXISTS', gfile.exists(base + '/x'), flush=True)
with gfile.GFile(base + '/x', 'rb') as f:
  print('READ', f.read(), flush=True)
gfile.makedirs(base + '/root/a/b')
with gfile.GFile(base + '/root/a/b/f', 'wb') as f:
  f.write(b'data' * 100000)
print('STAT', gfile.stat(base + '/root/a/b/f').length, flush=True)
print('ISDIR', gfile.isdir(base + '/root/a'), gfile.isdir(base + '/x'),
      flush=True)
print('LISTDIR', sorted(gfile.listdir(base + '/root/a')), flush=True)
gfile.rename(base + '/root/a/b/f', base + '/root/a/b/g', overwrite=True)
gfile.copy(base + '/root/a/b/g', base + '/root/a/c', overwrite=True)
print('GLOB', sorted(gfile.glob(base + '/root/a/*')), flush=True)
print('WALK', [(d[len(base):], sorted(s), sorted(f))
               for d, s, f in gfile.walk(base + '/root')], flush=True)
class M(tf.Module):
  def __init__(self):
    super().__init__()
    self.v = tf.Variable([1.0, 2.0])
  @tf.function(input_signature=[tf.TensorSpec([2], tf.float32)])
  def f(self, x):
    return x * self.v
tf.saved_model.save(M(), base + '/model')
loaded = tf.saved_model.load(base + '/model')
print('LOADED', loaded.f(tf.constant([3.0, 4.0])).numpy().tolist(),
      flush=True)
gfile.rmtree(base + '/root')
print('GONE', gfile.exists(base + '/root/a/c'), flush=True)
print('DONE', flush=True)
"""


@pytest.mark.slow
def test_tf_gfile_on_s3_with_tensorflow_io(s3_store):
  base = s3_store.new_base()
  storage.put(storage.join(base, 'x'), b'hello')
  r = subprocess.run(
      [sys.executable, '-c', _S3_PROBE, base], cwd=REPO, capture_output=True,
      text=True, timeout=300, check=False,
      env=dict(os.environ, S3_ENDPOINT=s3_store.server.url,
               S3_VERIFY_SSL='0'))
  lines = r.stdout.splitlines()
  assert lines == [
      'EXISTS True',
      "READ b'hello'",
      'STAT 400000',
      'ISDIR True False',
      "LISTDIR ['b']",
      f"GLOB ['{base}/root/a/b', '{base}/root/a/c']",
      "WALK [('/root', ['a'], []), ('/root/a', ['b'], ['c']), "
      "('/root/a/b', [], ['g'])]",
      'LOADED [3.0, 8.0]',
      'GONE False',
      'DONE'], (r.stdout, r.stderr[-3000:])
  # It really is on moto: boto3 sees what tf.io.gfile wrote.
  names = storage.list_names(base)
  assert 'model/saved_model.pb' in names, names
  assert not any(n.startswith('root/') for n in names), names
  # tensorflow-io 0.37.1 (the newest release for TF 2.16) aborts at exit a
  # process that used s3:// (aws-sdk-cpp's static EC2 metadata client logs
  # through a log system already destroyed): tensorflow/io#2039, fixed
  # upstream (tensorflow/io#2120) after the release. Everything above was
  # done before it.
  assert r.returncode == -signal.SIGABRT, (r.returncode, r.stderr[-3000:])
  assert 'pure virtual method called' in r.stderr


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
