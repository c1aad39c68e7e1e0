"""Trusted runtime: verify, decrypt in memory, load with TensorFlow.

`load_model` verifies the publisher, decrypts every file into an anonymous
memory file (`memfd_create`; plaintext never touches a disk) and the
variables straight into their tensors where it can (`_restore`), hands
TensorFlow a private directory of links to the files, loads the SavedModel,
then frees the memory files. Needs TensorFlow (the `[tfx]` extra); the rest of
tfx-encrypt does not.

`serving.sync_serving` (`tfx-encrypt serve-sync`, no TensorFlow): TF Serving.
"""

import logging
import os
import re
import threading
import uuid
from typing import Callable, List, Optional, Sequence

from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import package as package_lib
from tfx_encrypt.runtime import _memfiles
from tfx_encrypt.package import KeyLike
from tfx_encrypt.policy import Policy


_LOG = logging.getLogger(__name__)


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
  also spreads its digests and decryption over a pipeline of threads).

  For an object-based (TF2) SavedModel the variables shards, which only the
  checkpoint restore reads, are decrypted while TensorFlow loads the graph
  from the other files, already verified (`LoadOptions(
  experimental_skip_checkpoint=True)`). Where the checkpoint holds only
  plain numeric variables (`_restore`), the shards are decrypted straight
  into the variables' tensors and, once verified, assigned to the variables
  matched as TensorFlow's restore matches them: no second copy. Otherwise
  the shards go to memfds too and the variables are restored with
  `tf.train.Checkpoint(root=model).read`, which is what
  `tf.saved_model.load` does itself. Should that restore not fit a model,
  the whole model, verified by then, is loaded again the plain way.

  Where memfds are unavailable (not Linux), it falls back to TensorFlow's
  `ram://` filesystem, which costs two more copies of the model.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.runtime import _restore  # pylint: disable=g-import-not-at-top  (numpy)
  src, h, keys, entries, dirs, _ = package_lib._open_authenticated(  # pylint: disable=protected-access
      package, identities, trusted, allow_unsigned, policy=policy)
  if not _memfiles.supported(len(entries)):
    return _load_via_ram(tf, src, h, keys, entries, tags)
  workers = workers or package_lib.default_workers()
  cancel = threading.Event()
  with _memfiles.MemoryTree(dirs) as tree:

    def decrypt_one(i):
      e = entries[i]
      fd = tree.create(e.path)

      def sink(mv):
        if cancel.is_set():
          raise _Cancelled()
        _fsutil.write_all(fd, mv)

      try:
        package_lib._decrypt_payload(src, h, keys, i, e, sink)  # pylint: disable=protected-access
      except BaseException:
        tree.discard(e.path)
        raise
      tree.done(e.path)

    def run(indices):
      package_lib._run_parallel(  # pylint: disable=protected-access
          decrypt_one, sorted(indices, key=lambda i: -entries[i].size),
          workers)

    shards = {i for i, e in enumerate(entries)
              if _VARIABLES_SHARD.fullmatch(e.path)}
    others = [i for i in range(len(entries)) if i not in shards]
    run(others)
    options = _skip_checkpoint_options(tf, tree, tags) if shards else None
    if options is None:
      run(shards)
      return tf.saved_model.load(tree.publish(), tags=tags)
    tree.publish([entries[i].path for i in others])
    plan = _memory_plan(_restore, tree, [entries[i] for i in shards])
    if plan is None:
      return _load_overlapped(tf, tree, lambda: run(shards), cancel, tags,
                              options)

    plan.allocate()

    def decrypt_shard(i):  # straight into the variables' tensors
      e = entries[i]
      write = plan.writer(plan.shard_names.index(e.path))

      def sink(mv):
        if cancel.is_set():
          raise _Cancelled()
        write(mv)
      package_lib._decrypt_payload(src, h, keys, i, e, sink)  # pylint: disable=protected-access

    def decrypt_shards():
      package_lib._run_parallel(  # pylint: disable=protected-access
          decrypt_shard, sorted(shards, key=lambda i: -entries[i].size),
          workers)

    def restore(model):
      try:
        n = plan.restore(model)
        _LOG.debug('load_model: %d variables restored in place', n)
        return model
      except _restore.NotRestorable as e:
        _LOG.debug('load_model: variables restored by TensorFlow (%s)',
                      _text.printable(str(e), 200))
      for k, path in enumerate(plan.shard_names):  # the same verified bytes
        fd = tree.create(path)
        for piece in plan.shard_pieces(k):
          _fsutil.write_all(fd, piece)
        tree.done(path)
      plan.release()
      return _restore_from_files(tf, tree, model, tags)

    try:
      return _load_overlapped(tf, tree, decrypt_shards, cancel, tags,
                              options, restore=restore)
    finally:
      plan.release()


#: The files only the checkpoint restore reads (TensorFlow's naming).
_VARIABLES_SHARD = re.compile(r'variables/variables\.data-[0-9]{5}-of-[0-9]{5}')


class _Cancelled(Exception):
  """Stops the decryption of the variables when the graph failed to load."""


def _skip_checkpoint_options(tf, tree, tags):
  """LoadOptions that skip the restore, if this model can be restored after.

  Only an object-based (TF2) SavedModel with one MetaGraph, as
  `tf.saved_model.save` and Keras write, is restored from its object graph;
  TF1 SavedModels (and a TensorFlow without the option) load the plain way.
  """
  try:
    options = tf.saved_model.LoadOptions(experimental_skip_checkpoint=True)
    from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
    sm = saved_model_pb2.SavedModel.FromString(tree.read('saved_model.pb'))
  except Exception:  # pylint: disable=broad-except
    return None  # no such option, no saved_model.pb (.pbtxt), or unreadable
  if len(sm.meta_graphs) != 1 or not sm.meta_graphs[0].HasField(
      'object_graph_def'):
    return None
  want = [tags] if isinstance(tags, str) else tags
  have = set(sm.meta_graphs[0].meta_info_def.tags)
  if want is not None and set(want) != have:
    return None  # tf.saved_model.load raises the usual error
  return options


def _memory_plan(_restore, tree, shard_entries):
  """How to decrypt the variables shards straight into the variables'
  memory (`_restore`), or None to restore them from memory files."""
  try:
    index = tree.read('variables/variables.index')
  except (KeyError, RuntimeError, OSError):
    return None
  return _restore.plan(index, {e.path: e.size for e in shard_entries})


def _load_overlapped(tf, tree, decrypt_shards: Callable[[], None],
                     cancel: threading.Event, tags, options,
                     restore: Optional[Callable[[object], object]] = None):
  """Load the graph while the variables shards decrypt, then restore them.

  TensorFlow only ever sees verified files: the graph load gets the links
  the caller published (every file but the shards), the shards are linked
  once every one of them passed its digests. With `restore`, the shards
  were decrypted somewhere else (into the variables' memory) and
  `restore(model)` finishes the load instead.
  """
  failures: List[BaseException] = []

  def work():
    try:
      decrypt_shards()
    except BaseException as e:  # pylint: disable=broad-except
      failures.append(e)

  root = tree.root
  worker = threading.Thread(target=work, name='tfxe-load-variables',
                            daemon=True)
  worker.start()
  try:
    model = tf.saved_model.load(root, tags=tags, options=options)
  except Exception as e:
    cancel.set()  # the decryption stops at its next segment
    worker.join()
    real = [f for f in failures if not isinstance(f, _Cancelled)]
    if real:  # a tampered shard says more than what TensorFlow made of it
      raise real[0] from e
    raise
  except BaseException:
    cancel.set()
    worker.join()
    raise
  worker.join()
  if failures:
    raise failures[0]
  if restore is not None:
    return restore(model)
  return _restore_from_files(tf, tree, model, tags)


def _restore_from_files(tf, tree, model, tags):
  """Restore `model`'s variables from the (verified) memory files."""
  root = tree.publish()
  prefix = os.path.join(root, 'variables', 'variables')
  try:
    with tf.init_scope():
      tf.train.Checkpoint(root=model).read(
          prefix).assert_existing_objects_matched()
  except Exception:  # pylint: disable=broad-except
    # Not restorable that way (an unusual SavedModel): load the whole
    # model, every file of which is verified and linked by now.
    return tf.saved_model.load(root, tags=tags)
  return model


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
