"""Key backends, chosen by key URI.

Built-in schemes are listed in `_BUILTIN`. Third parties add a scheme by
declaring an entry point in the group ``tfx_encrypt.key_backends`` whose name
is the URI scheme and whose value is a :class:`KeyBackend` subclass, e.g.::

    [options.entry_points]
    tfx_encrypt.key_backends =
        mykms = my_package.backend:MyKmsBackend

Cloud SDKs are imported lazily by their backend module, so resolving a local
key never imports boto3, google-cloud-kms, hvac, azure or pkcs11.

Every key is resolved for a role (`resolve(uri, role=...)`: 'recipient',
'identity', 'trust' or 'signer') and refused with KeyRoleError when it
cannot play it, e.g. a private key as a recipient (docs/BACKENDS.md, "Key
roles"). The URI ``-`` is an identity read from standard input.
"""

import functools
import importlib
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.keys.base import ROLE_OPTIONS, ROLES, KeyBackend, Stanza, WrapContext, spki_key_id  # pylint: disable=unused-import

#: The key URI that means "read the key from standard input" (as age's -i -).
STDIN = '-'

ENTRY_POINT_GROUP = 'tfx_encrypt.key_backends'

# scheme -> "module:Class". Modules are imported only when the scheme is used.
_BUILTIN: Dict[str, str] = {
    'file': 'tfx_encrypt.keys.local:LocalKey',
    'aws-kms': 'tfx_encrypt.keys.aws_kms:AwsKmsKey',
    'gcp-kms': 'tfx_encrypt.keys.gcp_kms:GcpKmsKey',
    'hcvault': 'tfx_encrypt.keys.vault:VaultKey',
    'azure-kv': 'tfx_encrypt.keys.azure_kv:AzureKeyVaultKey',
    'pkcs11': 'tfx_encrypt.keys.pkcs11:Pkcs11Key',
}

_SCHEME_RE = re.compile(r'^([a-z][a-z0-9+.-]*):')


def uri_scheme(uri: str) -> str:
  """The scheme of a key URI; a bare filesystem path counts as 'file'."""
  if not isinstance(uri, str) or not uri:
    raise errors.InvalidKeyUriError('a key URI must be a non-empty string')
  m = _SCHEME_RE.match(uri)
  if not m:
    return 'file'
  scheme = m.group(1)
  # "C:" style drive letters are not an issue on POSIX; treat one-letter
  # schemes as paths anyway to be safe.
  return 'file' if len(scheme) == 1 else scheme


def _entry_point_backends() -> Dict[str, str]:
  """Scheme -> target from installed entry points.

  Scanning distributions costs ~10 ms, so the result is cached per sys.path
  (which is what decides the installed distributions).
  """
  return _scan_entry_points(tuple(sys.path))


@functools.lru_cache(maxsize=4)
def _scan_entry_points(path: Tuple[str, ...]) -> Dict[str, str]:
  del path  # the cache key
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    eps = metadata.entry_points()
    group = (eps.select(group=ENTRY_POINT_GROUP)
             if hasattr(eps, 'select') else eps.get(ENTRY_POINT_GROUP, []))
  except Exception:  # pylint: disable=broad-except
    return {}
  return {ep.name: ep.value for ep in group}


def available_schemes() -> List[str]:
  return sorted(set(_BUILTIN) | set(_entry_point_backends()))


def backend_class(scheme: str):
  # Built-in schemes cannot be overridden by a third-party entry point.
  target = _BUILTIN.get(scheme) or _entry_point_backends().get(scheme)
  if target is None:
    raise errors.InvalidKeyUriError(
        f'no key backend handles the scheme {scheme!r}; known schemes: '
        f'{", ".join(available_schemes())}. Install the backend package '
        f'that provides it (entry point group {ENTRY_POINT_GROUP!r}).')
  module_name, _, attr = target.partition(':')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    extra = {'aws-kms': 'aws', 'gcp-kms': 'gcp', 'hcvault': 'vault',
             'azure-kv': 'azure', 'pkcs11': 'pkcs11'}.get(scheme)
    hint = (f"pip install 'tfx-encrypt[{extra}]'" if extra else
            'install the package that provides it')
    raise errors.InvalidKeyUriError(
        f'the {scheme!r} key backend is not available ({e.name or e} is not '
        f'installed): {hint}') from e
  cls = getattr(module, attr, None)
  if not (isinstance(cls, type) and issubclass(cls, KeyBackend)):
    raise errors.InvalidKeyUriError(
        f'{target} (backend for {scheme!r}) is not a KeyBackend subclass')
  return cls


def check_role(key: KeyBackend, role: str,
               option: Optional[str] = None) -> KeyBackend:
  """Return `key` if it may be used as `role`; else raise KeyRoleError.

  Args:
    key: a resolved backend.
    role: one of ROLES: 'recipient', 'identity', 'trust', 'signer'.
    option: how the caller named the key's role in messages (default the
      role's CLI option, e.g. '--recipient'; '--key-group' for a key-group
      member).

  Fails closed: a private key given as a recipient or trust anchor (it would
  be copied to every host that encrypts or verifies), or a public key given
  as an identity or signer, is refused before any key operation, with the
  key as the user typed it and what to pass instead.
  """
  if role not in ROLE_OPTIONS:
    raise ValueError(f'unknown key role {role!r}; one of {ROLES}')
  problem = key.role_problem(role)
  if problem:
    raise errors.KeyRoleError(
        f'{option or ROLE_OPTIONS[role]} {key.display} {problem}')
  return key


# Built-in schemes whose module can judge a URI's form for a role without
# I/O or client library (module-level `role_form_problem(uri, role)`).
_FORM_CHECKED = ('aws-kms', 'gcp-kms', 'hcvault', 'azure-kv')


def check_uri_form(uri: str, role: Optional[str] = None, *,
                   option: Optional[str] = None) -> None:
  """Check a key URI's form for `role`, without any I/O or client library.

  For build-time validation (EncryptPusher, before a pipeline runs): a
  built-in KMS URI must parse (InvalidKeyUriError) and have the form its
  role needs, e.g. a Cloud KMS signer names a CryptoKeyVersion
  (KeyRoleError). Paths, ``pkcs11:`` and third-party schemes are left to
  :func:`resolve` at run time (the file or module may exist only there).
  """
  if role is not None and role not in ROLE_OPTIONS:
    raise ValueError(f'unknown key role {role!r}; one of {ROLES}')
  scheme = uri_scheme(uri)
  if scheme not in _FORM_CHECKED:
    return
  module = importlib.import_module(_BUILTIN[scheme].partition(':')[0])
  problem = module.role_form_problem(uri, role)
  if problem:
    from tfx_encrypt.keys.base import redact_uri  # pylint: disable=g-import-not-at-top
    raise errors.KeyRoleError(
        f'{option or ROLE_OPTIONS.get(role, "key")} '
        f'{_text.printable(redact_uri(uri))} '
        f'{problem}')


def resolve(uri: str, role: Optional[str] = None, *,
            option: Optional[str] = None) -> KeyBackend:
  """Return the backend object for a key URI, checked for `role` if given.

  Args:
    uri: a key URI or path as the user typed it; ``-`` reads one PEM private
      key from standard input (identities only, at most once per process).
    role: None (no check), or one of ROLES; see :func:`check_role`.
    option: the option named in role errors (see :func:`check_role`).
  """
  if uri == STDIN:
    if role != 'identity':
      name = option or ROLE_OPTIONS.get(role, 'a key')
      raise errors.KeyRoleError(
          f'{name} -: only an identity (--identity -) can be read from '
          'standard input; pass a key file or key URI')
    from tfx_encrypt.keys import local  # pylint: disable=g-import-not-at-top
    return check_role(local.LocalKey(STDIN), role, option)
  key = backend_class(uri_scheme(uri))(uri)
  return key if role is None else check_role(key, role, option)


def resolve_all(uris: Sequence[str], role: Optional[str] = None
                ) -> List[KeyBackend]:
  return [resolve(u, role) for u in uris]
