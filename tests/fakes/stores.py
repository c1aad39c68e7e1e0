"""Object-store emulators for tests: s3:// on moto, gs:// on the GCS emulator.

Each store starts its server on a free loopback port, points the default SDK
chains at it (AWS_ENDPOINT_URL + dummy credentials; STORAGE_EMULATOR_HOST)
and hands out fresh bucket-level bases, so tests never share objects.
"""

import contextlib
import itertools
import os
from typing import Dict

from tests.fakes.backends import AWS_ENV_TO_CLEAR, AWS_REGION
from tests.fakes.gcs_emulator import GcsEmulator
from tests.fakes.servers import MotoServer

_counter = itertools.count()


class _Store:
  scheme = ''

  def env(self) -> Dict[str, str]:
    raise NotImplementedError

  def clear(self):
    return ()

  @contextlib.contextmanager
  def applied(self):
    """The environment the SDKs' default chains read, set and restored."""
    from tfx_encrypt import storage  # pylint: disable=g-import-not-at-top
    saved = {k: os.environ.get(k) for k in list(self.env()) + list(
        self.clear())}
    os.environ.update(self.env())
    for k in self.clear():
      os.environ.pop(k, None)
    storage.reset_clients()
    try:
      yield self
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      storage.reset_clients()

  def new_base(self) -> str:
    bucket = f'tfxe-{os.getpid()}-{next(_counter)}'
    self.create_bucket(bucket)
    return f'{self.scheme}://{bucket}/pkgs'

  def create_bucket(self, bucket: str) -> None:
    raise NotImplementedError


class S3Store(_Store):
  """moto's standalone server (real boto3, real HTTP)."""
  scheme = 's3'

  def __init__(self):
    self.server = MotoServer()

  def env(self):
    return {
        'AWS_ENDPOINT_URL': self.server.url,
        'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing',
        'AWS_DEFAULT_REGION': AWS_REGION, 'AWS_EC2_METADATA_DISABLED': 'true',
        'AWS_CONFIG_FILE': os.devnull,
        'AWS_SHARED_CREDENTIALS_FILE': os.devnull}

  def clear(self):
    return AWS_ENV_TO_CLEAR + ('AWS_ENDPOINT_URL_S3',)

  def create_bucket(self, bucket):
    from tfx_encrypt import storage  # pylint: disable=g-import-not-at-top
    storage._s3().create_bucket(Bucket=bucket)  # pylint: disable=protected-access

  def close(self):
    self.server.close()


class GcsStore(_Store):
  """gcp-storage-emulator (real google-cloud-storage client, real HTTP);
  with `enforce_preconditions`, the TEST-ONLY ifGenerationMatch patch."""
  scheme = 'gs'

  def __init__(self, enforce_preconditions: bool = True,
               linear_resumable: bool = False):
    self.server = GcsEmulator(enforce_preconditions, linear_resumable)

  def env(self):
    return {'STORAGE_EMULATOR_HOST': self.server.url,
            'GOOGLE_CLOUD_PROJECT': 'test'}

  def create_bucket(self, bucket):
    from tfx_encrypt import storage  # pylint: disable=g-import-not-at-top
    storage._gcs().create_bucket(bucket)  # pylint: disable=protected-access

  def new_base(self):
    # The client reads STORAGE_EMULATOR_HOST: bases are made while applied.
    if os.environ.get('STORAGE_EMULATOR_HOST') != self.server.url:
      with self.applied():
        return super().new_base()
    return super().new_base()

  def close(self):
    self.server.close()
