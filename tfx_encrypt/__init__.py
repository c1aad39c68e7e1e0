"""tfx-encrypt: encrypted, signed, traceable TensorFlow model packages.

The core (this package, `format`, `keys`) needs only `cryptography` and the
standard library. TFX, TensorFlow, Beam and MLMD are used only by
`tfx_encrypt.components`, `tfx_encrypt.runtime` and `tfx_encrypt.lineage`.
"""

from tfx_encrypt.__about__ import __version__  # noqa: F401
from tfx_encrypt.errors import (  # noqa: F401
    EmptyModelError, KeyBackendError, NoMatchingKeyError, OutputExistsError,
    PolicyError, TamperedPackageError, TfxEncryptError, UnsafePathError,
    UnsupportedFormatError, UntrustedSignerError, UsageError)

# The package operations are imported on first use (PEP 562), so that
# `import tfx_encrypt.<anything>` stays cheap: the CLI entry point handles
# signals before the crypto stack is loaded.
_PACKAGE_API = ('PackageInfo', 'decrypt_model', 'encrypt_model',
                'inspect_package', 'iter_decrypted_files', 'rewrap_package',
                'rotate_package', 'verify_package')
__all__ = ['__version__', 'EncryptedModel', 'Policy', *_PACKAGE_API]


def __getattr__(name):
  if name == 'Policy':  # the consumer policy (stdlib only)
    from tfx_encrypt.policy import Policy  # pylint: disable=g-import-not-at-top
    return Policy
  if name in _PACKAGE_API:
    from tfx_encrypt import package  # pylint: disable=g-import-not-at-top
    return getattr(package, name)
  # `tfx_encrypt.EncryptedModel` must be importable from its TYPE_NAME
  # ('tfx_encrypt.EncryptedModel') for Vertex / KubeflowV2 to resolve the
  # artifact class at run time. Imported lazily: it needs TFX, the core does
  # not.
  if name == 'EncryptedModel':
    from tfx_encrypt.types import EncryptedModel  # pylint: disable=g-import-not-at-top
    return EncryptedModel
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
