"""tf.io.gfile schemes TensorFlow 2.16 does not have: `s3://`.

TFX reaches a pipeline root only through `tfx.dsl.io.fileio`, i.e.
tf.io.gfile: the launcher makes every output directory there, a Trainer
saves its model there. TensorFlow 2.16 has no `s3://` filesystem
(`UnimplementedError: File system scheme 's3' not implemented`); it is in
tensorflow-io (0.37.1 for TF 2.16), whose import registers it in the
process. tfx-encrypt itself does not need it (its object-store I/O goes
through boto3); a *pipeline* with its root on `s3://` does, in every
process that runs a TFX launcher on that root. Once it is installed, TFX
imports it itself (tensorflow_transform/__init__.py does, and `tfx.v1`
imports tensorflow_transform); the pipeline script still calls, before
`run()`::

  from tfx_encrypt.components.filesystems import ensure_gfile_scheme

  ensure_gfile_scheme(pipeline_root)   # before LocalDagRunner().run(...)

which does not depend on that, fails at once naming the package when it is
missing, and gives tensorflow-io the endpoint (below).

Only `s3://` is registered; any other URI is left alone (`gs://` stays
TensorFlow's own GCS filesystem). Configuration is tensorflow-io's, read
from the environment when it first opens `s3://` (docs/OBJECT_STORES.md):
aws-sdk-cpp's credential chain and region, `S3_ENDPOINT` (e.g.
`http://127.0.0.1:9000` for MinIO), `S3_VERIFY_SSL=0`, `S3_CA_FILE`.
tensorflow-io does not read boto3's `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`, which tfx-encrypt's own S3 I/O uses: without
`S3_ENDPOINT` it goes to AWS while tfx-encrypt goes to the endpoint (and
`tf.io.gfile.exists` answers False rather than failing). So when
`S3_ENDPOINT` is unset and one of those is set, `ensure_gfile_scheme`
sets `S3_ENDPOINT` to it: TFX and tfx-encrypt reach the same store.
"""

import os
import threading

from absl import logging

_lock = threading.Lock()
_registered = set()

#: What to install; constraints/tfx-1.16-py310.txt pins the tested version.
TENSORFLOW_IO_REQUIREMENT = 'tensorflow-io==0.37.1'


def _register_s3() -> None:
  try:
    # Registers tensorflow-io's filesystem plugins with tf.io.gfile
    # (tf.experimental.register_filesystem_plugin): s3, az, hdfs, viewfs,
    # har, http, https, oss. None of them is a scheme TF 2.16 has.
    import tensorflow_io  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError(
        'an s3:// pipeline root (tf.io.gfile, TFX\'s file I/O) needs '
        f'tensorflow-io with TensorFlow 2.16: pip install '
        f'"{TENSORFLOW_IO_REQUIREMENT}" ({e})') from e


def ensure_gfile_scheme(uri: str) -> None:
  """Makes tf.io.gfile able to open `uri`'s scheme in this process.

  `s3://`: imports tensorflow-io once (ImportError naming the package to
  install if it is missing) and sets `S3_ENDPOINT` from boto3's endpoint
  variables if it is unset (module docstring). Anything else: nothing to
  do.
  """
  if not str(uri).startswith('s3://'):
    return
  scheme = 's3'
  with _lock:
    if scheme in _registered:
      return
    _register_s3()
    endpoint = (os.environ.get('AWS_ENDPOINT_URL_S3') or
                os.environ.get('AWS_ENDPOINT_URL'))
    if endpoint and not os.environ.get('S3_ENDPOINT'):
      os.environ['S3_ENDPOINT'] = endpoint
      logging.info('tf.io.gfile s3:// (tensorflow-io): S3_ENDPOINT=%s, as '
                   'AWS_ENDPOINT_URL(_S3)', endpoint)
    _registered.add(scheme)
