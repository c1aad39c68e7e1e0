"""Packaging for tfx-encrypt.

The core (`pip install tfx-encrypt`) needs only `cryptography`, `click` and
`blake3` (the default digest), so an edge device can decrypt a model without
TensorFlow or TFX. Everything else
is an extra. The tested, fully pinned environment is
`constraints/tfx-1.16-py310.txt`; `scripts/setup_env.sh` installs with it.
"""

import os
import re

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
  """Reads __version__ from tfx_encrypt/__about__.py without importing it."""
  with open(os.path.join(_HERE, 'tfx_encrypt', '__about__.py'),
            encoding='utf-8') as f:
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(),
                      re.MULTILINE)
  if not match:
    raise RuntimeError('no __version__ in tfx_encrypt/__about__.py')
  return match.group(1)


def _long_description():
  path = os.path.join(_HERE, 'README.md')
  if not os.path.exists(path):
    return ''
  with open(path, encoding='utf-8') as f:
    return f.read()


# What `pip install tfx-encrypt` brings. Keep it to these three: the test
# tests/test_packaging.py checks that nothing else creeps in. blake3 is the
# default digest (SHA-256 stays available with --hash sha256); OpenSSF
# model_signing depends on it too.
INSTALL_REQUIRES = [
    'cryptography>=47',
    'click>=8',
    'blake3>=1',
]

# Optional features, one extra each. The versions that were tested together
# are pinned in constraints/tfx-1.16-py310.txt.
_FEATURE_EXTRAS = {
    # TFX 1.16 runs on Python 3.9-3.10 only. `dill` is listed because
    # apache-beam / tfx-bsl need it and newer apache-beam no longer brings it.
    'tfx': [
        'tfx==1.16.*',
        'tensorflow>=2.16,<2.17',
        'apache-beam[gcp]>=2.59,<3',
        'ml-metadata>=1.16,<1.17',
        'dill',
    ],
    # 1.36: PutObject If-None-Match / If-Match (create-only, rewrap).
    'aws': ['boto3>=1.36'],
    # google-cloud-storage / boto3 also carry gs:// and s3:// packages
    # (tfx_encrypt/storage, docs/OBJECT_STORES.md).
    'gcp': ['google-cloud-kms', 'google-crc32c', 'google-cloud-storage'],
    'vault': ['hvac'],
    'azure': ['azure-keyvault-keys', 'azure-identity'],
    'pkcs11': ['python-pkcs11'],
    'oci': ['oras'],
    'kfp': ['kfp>=2.5,<2.6'],
    # Kept so that `pip install 'tfx-encrypt[fast]'` still works; blake3 is
    # now a core requirement.
    'fast': ['blake3'],
}


def _union(*lists):
  out = []
  for reqs in lists:
    for req in reqs:
      if req not in out:
        out.append(req)
  return out


_ALL = _union(*_FEATURE_EXTRAS.values())

# Test tools, plus every feature extra: the whole suite runs the TFX pipeline
# and every key backend against local fakes.
_DEV = _union(
    [
        'pytest',
        'pytest-timeout',
        'hypothesis',
        'nbmake',
        'moto[server]',  # moto_server, the AWS KMS fake the tests start
        'grpcio',  # the in-process fake GCP KMS server
        'gcp-storage-emulator',  # the gs:// emulator the tests start
        # tf.io.gfile's s3:// (TF 2.16 has none): the LocalDagRunner
        # pipeline rooted on s3:// (docs/OBJECT_STORES.md). Not an extra of
        # tfx-encrypt: only a pipeline's processes need it, and
        # tfx_encrypt.components.filesystems names it when it is missing.
        'tensorflow-io>=0.37,<0.38',
    ],
    _ALL,
)

EXTRAS_REQUIRE = dict(_FEATURE_EXTRAS, all=_ALL, dev=_DEV)

setup(
    name='tfx-encrypt',
    version=_version(),
    description=('Encrypt and sign TensorFlow SavedModels produced by TFX '
                 'pipelines; decrypt them anywhere with only cryptography.'),
    long_description=_long_description(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['tfx_encrypt', 'tfx_encrypt.*']),
    include_package_data=True,
    python_requires='>=3.9',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        'console_scripts': [
            'tfx-encrypt = tfx_encrypt._entry:main',
        ],
        # Key backends by URI scheme; third parties add their own scheme by
        # declaring an entry point in this group.
        'tfx_encrypt.key_backends': [
            'file = tfx_encrypt.keys.local:LocalKey',
            'aws-kms = tfx_encrypt.keys.aws_kms:AwsKmsKey',
            'gcp-kms = tfx_encrypt.keys.gcp_kms:GcpKmsKey',
            'hcvault = tfx_encrypt.keys.vault:VaultKey',
            'azure-kv = tfx_encrypt.keys.azure_kv:AzureKeyVaultKey',
            'pkcs11 = tfx_encrypt.keys.pkcs11:Pkcs11Key',
        ],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.9',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Topic :: Security :: Cryptography',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
