"""EncryptPusher with the model on gs:// / s3://: encrypted from the store.

No plaintext is staged on local disk: the model is streamed from the store
(ranged reads pinned to the listed versions) straight into the
EncryptedModel artifact on the store, and the push copies objects store to
store. Proved two ways: every file the process opens for writing (and
every mkdir / rename) is recorded with a PEP 578 audit hook while the
executor runs and there is none; TMPDIR points at an empty directory that
stays empty; and the old staging copy (`io_utils.copy_dir`) is made to fail.
Against moto (s3://) and the patched GCS emulator (gs://) on loopback.
"""

import os
import sys
import tempfile
import threading

import pytest

from tfx_encrypt import package as package_lib
from tfx_encrypt import storage
from tfx_encrypt.components.encrypt_pusher import spec
from tests import _util
from tests.package.test_remote_encrypt import upload_tree


@pytest.fixture(params=['s3', 'gs'])
def store(request):
  return request.getfixturevalue(f'{request.param}_store')


class _Writes:
  """Files opened for writing, dirs made, renames: in this process, while
  `recording` (an audit hook cannot be removed, so it is added once)."""
  recording = False
  seen = []
  _lock = threading.Lock()
  _installed = False

  @classmethod
  def install(cls):
    if cls._installed:
      return
    cls._installed = True

    def hook(event, args):
      if not cls.recording:
        return
      if event == 'open' and args[0] is not None and not isinstance(
          args[0], int):
        mode, flags = args[1], args[2] or 0
        if str(args[0]) == os.devnull:
          return
        if (mode and any(c in mode for c in 'wax+')) or (
            flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
          with cls._lock:
            cls.seen.append(('open', str(args[0])))
      elif event in ('os.mkdir', 'os.rename', 'os.link', 'os.symlink',
                     'shutil.copyfile', 'shutil.copytree'):
        with cls._lock:
          cls.seen.append((event, str(args[0])))
    sys.addaudithook(hook)


@pytest.mark.parametrize('bundle', [False, True], ids=['dir', 'bundle'])
def test_remote_model_is_never_staged_locally(tmp_path, model_uri, keys,
                                              store, monkeypatch, bundle):
  from tfx.utils import io_utils  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.components.encrypt_pusher import executor as executor_lib  # pylint: disable=g-import-not-at-top
  from tests.components import test_encrypt_pusher_executor as ext  # pylint: disable=g-import-not-at-top
  root = store.new_base()
  remote_model = storage.join(root, 'Trainer', 'model', '5')
  upload_tree(model_uri, remote_model)  # with tf.io.gfile's folder objects
  inputs, outputs, encrypted, pushed = ext._artifacts(  # pylint: disable=protected-access
      tmp_path, remote_model, blessed=True)
  encrypted.uri = storage.join(root, 'EncryptPusher', 'encrypted_model', '7')
  pushed.uri = storage.join(root, 'EncryptPusher', 'pushed_model', '7')
  props = ext._props(keys, storage.join(root, 'serving'))  # pylint: disable=protected-access
  if bundle:
    props[spec.BUNDLE_KEY] = 1
  ctx = ext._context(tmp_path)  # pylint: disable=protected-access

  def no_staging(*a, **k):
    raise AssertionError(f'the model was staged locally: copy_dir{a}')
  monkeypatch.setattr(io_utils, 'copy_dir', no_staging)
  empty = tmp_path / 'tmpdir'
  empty.mkdir()
  monkeypatch.setenv('TMPDIR', str(empty))
  monkeypatch.setattr(tempfile, 'tempdir', str(empty))
  ex = executor_lib.Executor(ctx)
  _Writes.install()
  _Writes.seen = []
  _Writes.recording = True
  try:
    ex.Do(inputs, outputs, props)
  finally:
    _Writes.recording = False
  writes = list(_Writes.seen)
  # Nothing at all, bundle included: a bundle's header precedes its
  # payloads in the one object, but its ciphertext is streamed into the
  # store too (storage/_bundle.py), never staged.
  assert writes == []
  assert os.listdir(empty) == []

  pkg = (storage.join(encrypted.uri, spec.BUNDLE_FILE_NAME) if bundle
         else encrypted.uri)
  info = package_lib.inspect_package(pkg)
  assert info.context[spec.CONTEXT_MODEL_URI] == remote_model
  dest = pushed.get_string_custom_property('pushed_destination')
  assert dest.startswith(storage.join(root, 'serving') + '/')
  pushed_pkg = storage.join(dest, spec.BUNDLE_FILE_NAME) if bundle else dest
  assert package_lib.inspect_package(pushed_pkg).payload_digest == \
      info.payload_digest
  package_lib.decrypt_model(pushed_pkg, tmp_path / 'decrypted',
                            identities=[keys.recipient_key],
                            trusted=[keys.signer_pub])
  want = os.path.join(model_uri, 'Format-Serving')
  assert _util.read_tree(tmp_path / 'decrypted') == _util.read_tree(want)


def test_a_remote_model_changed_during_the_push_fails_and_leaves_nothing(
    tmp_path, model_uri, keys, s3_store, monkeypatch):
  """The model is replaced while it is encrypted: the execution fails,
  nothing is pushed, and the artifact holds no package."""
  from tfx_encrypt.components.encrypt_pusher import executor as executor_lib  # pylint: disable=g-import-not-at-top
  from tfx_encrypt import errors  # pylint: disable=g-import-not-at-top
  from tests.components import test_encrypt_pusher_executor as ext  # pylint: disable=g-import-not-at-top
  root = s3_store.new_base()
  remote_model = storage.join(root, 'model')
  upload_tree(model_uri, remote_model)
  inputs, outputs, encrypted, _ = ext._artifacts(  # pylint: disable=protected-access
      tmp_path, remote_model, blessed=True)
  encrypted.uri = storage.join(root, 'encrypted_model', '7')
  victim = next(n for n in storage.list_names(remote_model)
                if n.endswith('saved_model.pb'))
  from tfx_encrypt.package import operations  # pylint: disable=g-import-not-at-top
  scan = operations.scan_remote_model

  def scan_then_change(*a, **k):
    # Replaced right after the one listing, before any read.
    out = scan(*a, **k)
    storage.put(storage.join(remote_model, victim), b'changed, same name')
    return out
  monkeypatch.setattr(operations, 'scan_remote_model', scan_then_change)
  with pytest.raises(errors.UsageError, match='replaced or removed'):
    executor_lib.Executor(ext._context(tmp_path)).Do(  # pylint: disable=protected-access
        inputs, outputs, ext._props(keys, storage.join(root, 'serving')))  # pylint: disable=protected-access
  assert storage.list_names(encrypted.uri) == []
  assert storage.list_names(storage.join(root, 'serving')) == []
