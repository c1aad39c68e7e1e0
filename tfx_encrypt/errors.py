"""Typed errors shared by every layer of tfx-encrypt.

Every error carries a message that tells the user what to do next. None of
them ever contains key material, tokens or PINs: callers pass key *ids* or
URIs (with secret query parameters stripped) only.
"""


class TfxEncryptError(Exception):
  """Base class of every error raised by tfx-encrypt."""

  #: Process exit code used by the CLI for this class of error.
  exit_code = 1


class UsageError(TfxEncryptError):
  """The caller asked for something inconsistent (bad option, bad URI)."""
  exit_code = 2


class InvalidKeyUriError(UsageError):
  """A key URI could not be parsed or names no registered backend."""


class KeyRoleError(UsageError):
  """A key was given in a role it must not play.

  E.g. a private key as a recipient or as a trust anchor (it would spread a
  secret to every machine that encrypts or verifies), or a public key as an
  identity or signer. Raised before any key or package operation.
  """


class KeyMaterialInParameterError(UsageError):
  """A value that must be a key *reference* looks like key material."""


class EmptyModelError(UsageError):
  """The source directory holds no regular file to encrypt."""


class OutputExistsError(UsageError):
  """The destination exists and overwriting was not requested."""


class UnsafeOverwriteError(UsageError):
  """The output may not be written there, even with --force: it is inside
  the input, or it exists and is not something tfx-encrypt may replace (see
  docs/SECURITY.md)."""


class UnsupportedFormatError(TfxEncryptError):
  """The input is not a tfx-encrypt package this version can read."""
  exit_code = 3


class TamperedPackageError(TfxEncryptError):
  """Authentication failed: the package was modified, truncated or spliced."""
  exit_code = 4


class NoMatchingKeyError(TfxEncryptError):
  """None of the supplied identities can unwrap the package's data key."""
  exit_code = 5


class UntrustedSignerError(TfxEncryptError):
  """The package is unsigned, or signed by a key that is not trusted."""
  exit_code = 6


class UnsafePathError(TfxEncryptError):
  """A path is absolute, escapes its root, is a link/device, or collides."""
  exit_code = 7


class KeyBackendError(TfxEncryptError):
  """A key backend (KMS, HSM, Vault, ...) failed."""
  exit_code = 8


class KeyAccessDeniedError(KeyBackendError):
  """The backend refused the operation (permissions, policy)."""


class KeyDisabledError(KeyBackendError):
  """The key exists but is disabled or scheduled for deletion."""


class KeyNotFoundError(KeyBackendError):
  """The backend does not know the key."""


class BackendUnavailableError(KeyBackendError):
  """The backend could not be reached, or kept failing after retries."""


class PolicyError(TfxEncryptError):
  """Refused by the consumer's policy (tfx_encrypt.policy.Policy).

  The package is authentic (its signature was checked first), but its
  context does not say what the consumer requires: another model, another
  environment, or an older version than the consumer accepts. Raised before
  any key is unwrapped. Exit codes 9 and 10 are taken by OSError and the
  OCI RegistryError.
  """
  exit_code = 11
