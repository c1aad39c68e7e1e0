"""Fixtures for the EncryptPusher tests: a tiny real SavedModel and keys."""

import os

import numpy as np
import pytest


def pytest_configure(config):
  for marker in ('slow: takes more than a few seconds',
                 'tfx: needs TFX / TensorFlow / ML Metadata'):
    config.addinivalue_line('markers', marker)


# Every test in this directory uses TFX.
def pytest_collection_modifyitems(items):
  here = os.path.dirname(__file__)
  for item in items:
    if str(item.fspath).startswith(here):
      item.add_marker(pytest.mark.tfx)


INPUTS = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]], dtype=np.float32)


def write_saved_model(export_dir: str) -> None:
  """Saves the example pipeline's tiny tf.Module (y = xW + b)."""
  from pipelines import local_pipeline  # pylint: disable=g-import-not-at-top
  local_pipeline.write_tiny_model(export_dir)


def predict(export_dir: str) -> np.ndarray:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  loaded = tf.saved_model.load(export_dir)
  out = loaded.signatures['serving_default'](x=tf.constant(INPUTS))
  return out['y'].numpy()


@pytest.fixture(scope='session')
def model_uri(tmp_path_factory):
  """A TFX Model artifact directory: <uri>/Format-Serving/saved_model.pb."""
  uri = str(tmp_path_factory.mktemp('trainer_model'))
  write_saved_model(os.path.join(uri, 'Format-Serving'))
  return uri


@pytest.fixture(scope='session')
def serving_dir(model_uri):
  return os.path.join(model_uri, 'Format-Serving')


@pytest.fixture(scope='session')
def expected_predictions(serving_dir):
  return predict(serving_dir)


class Keys:
  """Key file paths (URIs) generated with tfx_encrypt.keys.local.keygen."""

  def __init__(self, root: str):
    from tfx_encrypt.keys import local  # pylint: disable=g-import-not-at-top
    self.recipient_key, self.recipient = local.keygen(
        'x25519', os.path.join(root, 'recipient'))
    self.other_key, self.other = local.keygen(
        'x25519', os.path.join(root, 'other'))
    self.signer, self.signer_pub = local.keygen(
        'ed25519', os.path.join(root, 'signer'))


@pytest.fixture(scope='session')
def predict_fn():
  """predict(export_dir) -> np.ndarray for the tiny model's inputs."""
  return predict


@pytest.fixture(scope='session')
def write_model_fn():
  return write_saved_model


@pytest.fixture(scope='session')
def keys(tmp_path_factory):
  return Keys(str(tmp_path_factory.mktemp('keys')))
