"""Trusted runtime: verify, decrypt in memory, load with TensorFlow.

`load_model` verifies the publisher, decrypts every file into an anonymous
memory file (`memfd_create`; plaintext never touches a disk), hands
TensorFlow a private directory of links to them, loads the SavedModel, then
frees the memory. Needs TensorFlow (the `[tfx]` extra); the rest of
tfx-encrypt does not.

`serving.sync_serving` (`tfx-encrypt serve-sync`, no TensorFlow): TF Serving.
"""

import os
import uuid
from typing import Optional, Sequence

from tfx_encrypt import _fsutil
from tfx_encrypt import package as package_lib
from tfx_encrypt.runtime import _memfiles
from tfx_encrypt.package import KeyLike
from tfx_encrypt.policy import Policy


def load_model(package, *, identities: Sequence[KeyLike],
               trusted: Sequence[KeyLike] = (), allow_unsigned: bool = False,
               tags: Optional[Sequence[str]] = None,
               policy: Optional[Policy] = None,
               workers: Optional[int] = None):
  """Return `tf.saved_model.load` of an encrypted package, never on disk.

  Raises the same typed errors as `decrypt_model` (UntrustedSignerError,
  PolicyError when the signed context does not satisfy `policy`,
  NoMatchingKeyError, TamperedPackageError, ...) before TensorFlow sees a
  single byte: the signature, policy, key commitment, MAC and fingerprint
  are checked first, then every file is decrypted into its own memfd and
  its ciphertext and plaintext digests are checked; TensorFlow gets the
  directory of links only when all files passed (see `_memfiles`). Files
  are decrypted in parallel (`workers` threads, largest first; a large file
  uses a second thread for its ciphertext digest and decryption). Where
  memfds are unavailable (not Linux), it falls back to TensorFlow's
  `ram://` filesystem, which costs two more copies of the model.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  src, h, keys, entries, dirs, _ = package_lib._open_authenticated(  # pylint: disable=protected-access
      package, identities, trusted, allow_unsigned, policy=policy)
  if not _memfiles.supported(len(entries)):
    return _load_via_ram(tf, src, h, keys, entries, tags)
  with _memfiles.MemoryTree(dirs) as tree:

    def decrypt_one(i):
      e = entries[i]
      fd = tree.create(e.path)
      try:
        package_lib._decrypt_payload(  # pylint: disable=protected-access
            src, h, keys, i, e, lambda mv: _fsutil.write_all(fd, mv))
      except BaseException:
        tree.discard(e.path)
        raise
      tree.done(e.path)

    order = sorted(range(len(entries)), key=lambda i: -entries[i].size)
    package_lib._run_parallel(  # pylint: disable=protected-access
        decrypt_one, order, workers or package_lib.default_workers())
    return tf.saved_model.load(tree.publish(), tags=tags)


def _load_via_ram(tf, src, h, keys, entries, tags):
  """load_model through TensorFlow's `ram://` filesystem (no memfd)."""
  root = f'ram://tfx-encrypt/{uuid.uuid4().hex}'
  try:
    for i, e in enumerate(entries):
      data = bytearray()
      package_lib._decrypt_payload(src, h, keys, i, e, data.extend)  # pylint: disable=protected-access
      path = root + '/' + e.path
      tf.io.gfile.makedirs(os.path.dirname(path))
      with tf.io.gfile.GFile(path, 'wb') as f:
        f.write(data)
      del data
    return tf.saved_model.load(root, tags=tags)
  finally:
    if tf.io.gfile.exists(root):
      tf.io.gfile.rmtree(root)
