"""LocalDagRunner end to end with the pipeline root and push on s3://.

TFX reaches the pipeline root only through tf.io.gfile, and TF 2.16 has no
s3:// filesystem: tensorflow-io 0.37.1 (pinned in constraints/, installed by
scripts/setup_env.sh through setup.py's [dev] requirements) registers it
when imported (TFX's tensorflow_transform imports it too, once installed;
test_tf_gfile_on_emulators.py). The pipeline process does
what a user's pipeline module does (docs/OBJECT_STORES.md):
`tfx_encrypt.components.filesystems.ensure_gfile_scheme(root)` before
`LocalDagRunner().run()`, with tensorflow-io's S3 settings (`S3_ENDPOINT`,
which ensure_gfile_scheme sets from boto3's `AWS_ENDPOINT_URL`) pointing at
moto's standalone server, which tfx-encrypt reaches through boto3.

The model is produced upstream in that root (a Python function component
saving a SavedModel with tf.saved_model.save into its Model artifact on
s3://, through tensorflow-io); EncryptPusher encrypts it from the store and
pushes to s3://; the pushed package decrypts to the model's objects byte for
byte, and loads.

tensorflow-io 0.37.1 aborts a process that used s3:// when it exits
("pure virtual method called", SIGABRT, tensorflow/io#2039;
test_tf_gfile_on_emulators.py measures it), after everything is done: the
pipeline process below ends with os._exit once the run and its report are
complete, as docs/OBJECT_STORES.md tells a user's pipeline script to.
"""

import os
import subprocess
import sys

import pytest

from tfx_encrypt import storage
from tests.components import _store_checks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# The user's pipeline module: register s3:// for tf.io.gfile, build and run
# the pipeline (tests/components/_store_pipeline.py), then leave without
# running tensorflow-io's crashing static destructors.
_RUN = r'''
import os
import sys
from tfx_encrypt.components.filesystems import ensure_gfile_scheme
ensure_gfile_scheme(sys.argv[1])
from tests.components import _store_pipeline
_store_pipeline.main(sys.argv[1:])
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


@pytest.mark.slow
def test_pipeline_root_and_push_on_s3(tmp_path, keys, predict_fn,
                                      expected_predictions, s3_store):
  import tensorflow_io  # pylint: disable=g-import-not-at-top,unused-import  # a missing dependency fails, never skips
  bucket_base = s3_store.new_base()  # s3://BUCKET/pkgs
  root = storage.join(bucket_base, 'pipeline_root')
  dest = storage.join(bucket_base, 'serving')
  # One endpoint setting, boto3's (AWS_ENDPOINT_URL, set by s3_store), as a
  # user of MinIO would have: ensure_gfile_scheme gives it to tensorflow-io
  # as S3_ENDPOINT, so TFX and tfx-encrypt reach the same server.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('S3_') and k != 'AWS_ENDPOINT_URL_S3'}
  assert env['AWS_ENDPOINT_URL'] == s3_store.server.url
  model_uri, encrypted_uri, destination = _store_checks.run_pipeline(
      ['-c', _RUN], env, tmp_path, keys, root, dest)
  objects = _store_checks.check_pushed_model(
      tmp_path, keys, model_uri, encrypted_uri, destination, predict_fn,
      expected_predictions)
  assert any(n.startswith('variables/variables.data-') for n in objects)
  # Nothing else is left in the root: tf.saved_model.save's temporary
  # checkpoint objects were renamed (copy and delete on S3) into place.
  model_rel = model_uri[len(root) + 1:]
  encrypted_rel = encrypted_uri[len(root) + 1:]
  leftovers = [n for n in storage.list_names(root)
               if not n.startswith((model_rel + '/', encrypted_rel + '/'))]
  assert leftovers == []


def _python(code, *args):
  r = subprocess.run([sys.executable, '-c', code, *args], cwd=REPO,
                     capture_output=True, text=True, timeout=300,
                     check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout.strip()


def test_ensure_gfile_scheme_registers_s3_only():
  # Any other scheme is left alone: tensorflow-io is not even imported, so
  # gs:// stays TensorFlow's own GCS filesystem.
  out = _python(
      'import sys\n'
      'from tfx_encrypt.components.filesystems import ensure_gfile_scheme\n'
      'for uri in sys.argv[1:]:\n'
      '  ensure_gfile_scheme(uri)\n'
      'print(sorted(m for m in sys.modules if m.startswith(("tensorflow_io",'
      ' "tensorflow"))))\n', 'gs://b/root', '/tmp/root', 'file:///tmp/root',
      'hdfs://nn/root', 'relative/root')
  assert out == '[]'
  out = _python(
      'import sys\n'
      'from tfx_encrypt.components.filesystems import ensure_gfile_scheme\n'
      'ensure_gfile_scheme("s3://b/root")\n'
      'ensure_gfile_scheme("s3://b/other")\n'
      'import tensorflow as tf\n'
      'print("tensorflow_io" in sys.modules,'
      ' "s3" in tf.io.gfile.get_registered_schemes())\n')
  assert out == 'True True'


def test_ensure_gfile_scheme_gives_boto3s_endpoint_to_tensorflow_io():
  code = ('import os\n'
          'from tfx_encrypt.components.filesystems import ensure_gfile_scheme\n'
          'ensure_gfile_scheme("s3://b/root")\n'
          'print(os.environ.get("S3_ENDPOINT"))\n')

  def s3_endpoint(**env):
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(('S3_', 'AWS_ENDPOINT_URL'))}
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                       env=dict(base, **env), capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()

  assert s3_endpoint() == 'None'
  assert s3_endpoint(AWS_ENDPOINT_URL='http://127.0.0.1:1') == (
      'http://127.0.0.1:1')
  assert s3_endpoint(AWS_ENDPOINT_URL='http://127.0.0.1:1',
                     AWS_ENDPOINT_URL_S3='http://127.0.0.1:2') == (
                         'http://127.0.0.1:2')
  # tensorflow-io's own setting wins.
  assert s3_endpoint(AWS_ENDPOINT_URL='http://127.0.0.1:1',
                     S3_ENDPOINT='http://127.0.0.1:3') == 'http://127.0.0.1:3'


def test_ensure_gfile_scheme_without_tensorflow_io_names_the_package():
  out = _python(
      'import sys\n'
      'sys.modules["tensorflow_io"] = None  # as if not installed\n'
      'from tfx_encrypt.components.filesystems import ensure_gfile_scheme\n'
      'try:\n'
      '  ensure_gfile_scheme("s3://b/root")\n'
      'except ImportError as e:\n'
      '  print(e)\n')
  assert out.startswith(
      "an s3:// pipeline root (tf.io.gfile, TFX's file I/O) needs "
      'tensorflow-io with TensorFlow 2.16: pip install "tensorflow-io==0.37.1"'
  ), out


def test_the_requirement_named_is_the_pinned_one():
  from tfx_encrypt.components import filesystems  # pylint: disable=g-import-not-at-top
  pins = {}
  with open(os.path.join(REPO, 'constraints', 'tfx-1.16-py310.txt'),
            encoding='utf-8') as f:
    for line in f:
      name, sep, version = line.split('#', 1)[0].strip().partition('==')
      if sep:
        pins[name.lower()] = version
  assert filesystems.TENSORFLOW_IO_REQUIREMENT == (
      f'tensorflow-io=={pins["tensorflow-io"]}')
