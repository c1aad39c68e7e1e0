"""Trusted runtime: verify, decrypt in memory, load with TensorFlow.

`load_model` verifies the publisher, decrypts every file into TensorFlow's
in-memory `ram://` filesystem (plaintext never touches the disk), loads the
SavedModel, then deletes the in-memory copy. Needs TensorFlow (the `[tfx]`
extra); the rest of tfx-encrypt does not.

`serving.sync_serving` (`tfx-encrypt serve-sync`, no TensorFlow): TF Serving.
"""

import os
import uuid
from typing import Optional, Sequence

from tfx_encrypt import package as package_lib
from tfx_encrypt.package import KeyLike
from tfx_encrypt.policy import Policy


def load_model(package, *, identities: Sequence[KeyLike],
               trusted: Sequence[KeyLike] = (), allow_unsigned: bool = False,
               tags: Optional[Sequence[str]] = None,
               policy: Optional[Policy] = None):
  """Return `tf.saved_model.load` of an encrypted package, never on disk.

  Raises the same typed errors as `decrypt_model` (UntrustedSignerError,
  PolicyError when the signed context does not satisfy `policy`,
  NoMatchingKeyError, TamperedPackageError, ...) before TensorFlow sees a
  single byte: each file is authenticated (every segment tag, its digest,
  the signed fingerprint) before it is written to `ram://`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  root = f'ram://tfx-encrypt/{uuid.uuid4().hex}'
  try:
    for relpath, data in package_lib.iter_decrypted_files(
        package, identities=identities, trusted=trusted,
        allow_unsigned=allow_unsigned, policy=policy):
      path = root + '/' + relpath
      tf.io.gfile.makedirs(os.path.dirname(path))
      with tf.io.gfile.GFile(path, 'wb') as f:
        f.write(data)
      del data
    return tf.saved_model.load(root, tags=tags)
  finally:
    if tf.io.gfile.exists(root):
      tf.io.gfile.rmtree(root)
