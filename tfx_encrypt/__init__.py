"""tfx-encrypt: encrypted, signed, traceable TensorFlow model packages.

The core (this package, `format`, `keys`) needs only `cryptography` and the
standard library. TFX, TensorFlow, Beam and MLMD are used only by
`tfx_encrypt.components`, `tfx_encrypt.runtime` and `tfx_encrypt.lineage`.
"""

from tfx_encrypt.__about__ import __version__  # noqa: F401
from tfx_encrypt.errors import (  # noqa: F401
    EmptyModelError, KeyBackendError, NoMatchingKeyError, OutputExistsError,
    TamperedPackageError, TfxEncryptError, UnsafePathError,
    UnsupportedFormatError, UntrustedSignerError, UsageError)
from tfx_encrypt.package import (  # noqa: F401
    PackageInfo, decrypt_model, encrypt_model, inspect_package,
    iter_decrypted_files, rewrap_package, rotate_package, verify_package)
