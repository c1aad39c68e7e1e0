"""Distribution of packages through OCI registries (the `[oci]` extra).

Importing this package never imports `oras`: the registry client is loaded
only when `push_package` or `pull_package` runs. See docs/DISTRIBUTION.md.
"""

from tfx_encrypt.distribution.oci import ArtifactNotFoundError
from tfx_encrypt.distribution.oci import ArtifactTooLargeError
from tfx_encrypt.distribution.oci import ClientCertificateError
from tfx_encrypt.distribution.oci import CONFIG_MEDIA_TYPE
from tfx_encrypt.distribution.oci import DEFAULT_MAX_PACKAGE_BYTES
from tfx_encrypt.distribution.oci import NotAPackageArtifactError
from tfx_encrypt.distribution.oci import PACKAGE_MEDIA_TYPE
from tfx_encrypt.distribution.oci import pull_package
from tfx_encrypt.distribution.oci import PullResult
from tfx_encrypt.distribution.oci import push_package
from tfx_encrypt.distribution.oci import RegistryAuth
from tfx_encrypt.distribution.oci import RegistryAuthError
from tfx_encrypt.distribution.oci import RegistryError
from tfx_encrypt.distribution.oci import RegistryUnavailableError
