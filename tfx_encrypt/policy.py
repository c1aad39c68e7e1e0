"""Consumer policy: which authentic packages a consumer accepts.

A trusted signature says who published a package, not which one: any other
package by the same publisher (another model, another environment, last
month's version) is just as validly signed. A :class:`Policy` closes that
gap. It is checked against the package's encryption context, which the
signature covers, right after the signature check and before any key is
unwrapped (docs/FORMAT.md §10 step 3), so a refused package costs no KMS or
HSM call and no plaintext is ever written for it.

Rules (all must hold; :class:`~tfx_encrypt.errors.PolicyError`, exit 11,
otherwise):

* every `require_context` key is present in the context with exactly the
  required value (no normalisation: case, whitespace and Unicode form count);
* with `min_version`, the context value of `version_key` (default
  `version`, the key EncryptPusher records) exists, is a canonical version
  number -- ASCII decimal digits, no sign, no leading zero except `0` itself,
  at most 20 digits -- and is at least `min_version`. A missing or malformed
  version is refused, never read as 0.

The same policy can be given to `decrypt_model`, `iter_decrypted_files`,
`verify_package`, `rotate_package`, `runtime.load_model`,
`runtime.serving.sync_serving` and `distribution.oci.pull_package`, in code
or as a JSON file (:meth:`Policy.from_file`)::

  {"require_context": {"model": "taxi", "env": "prod"},
   "min_version": 1700000000, "version_key": "version"}

Standard library only (a core module).
"""

import dataclasses
import json
import os
import re
import types
from typing import Any, Mapping, Optional

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.errors import PolicyError  # noqa: F401  (re-exported)

#: The context key EncryptPusher records the push version under.
DEFAULT_VERSION_KEY = 'version'
#: Most digits of a version number (a Unix time in ns has 19).
MAX_VERSION_DIGITS = 20
#: A canonical version: ASCII digits only (`\d` would accept any Unicode
#: digit, e.g. '١٢'), no sign, no leading zero, 1-20 digits.
VERSION_RE = re.compile(r'0|[1-9][0-9]{0,%d}' % (MAX_VERSION_DIGITS - 1))
#: Largest policy file read (a policy is a few lines).
MAX_FILE_BYTES = 1 << 20

_FILE_KEYS = frozenset({'require_context', 'min_version', 'version_key'})
_REFUSED = 'refused by the consumer policy'


def is_canonical_version(value: Any) -> bool:
  """Whether `value` is a str holding a canonical version number."""
  return isinstance(value, str) and VERSION_RE.fullmatch(value) is not None


def _q(value: Any, limit: int) -> str:
  return _text.quoted(value, limit)


@dataclasses.dataclass(frozen=True)
class Policy:
  """What a consumer requires of a package's (signed) context.

  Attributes:
    require_context: key -> exact value every accepted package's context
      must hold.
    min_version: refuse packages whose `version_key` is missing, not a
      canonical version number, or smaller than this; None: no version rule.
    version_key: the context key holding the version.
  """
  require_context: Mapping[str, str] = dataclasses.field(
      default_factory=dict)
  min_version: Optional[int] = None
  version_key: str = DEFAULT_VERSION_KEY

  def __post_init__(self):
    rc = self.require_context
    if rc is None:
      rc = {}
    if not isinstance(rc, Mapping):
      raise errors.UsageError(
          'policy require_context must be a mapping of context keys to '
          f'values, got {type(rc).__name__}')
    for k, v in rc.items():
      if not isinstance(k, str) or not k:
        raise errors.UsageError(
            'policy require_context keys must be non-empty strings, got '
            f'{_q(k, 64)}')
      if not isinstance(v, str):
        raise errors.UsageError(
            f'policy require_context[{_q(k, 64)}] must be a string, got '
            f'{type(v).__name__} (context values are strings: write "7", '
            'not 7)')
    # An immutable copy: a frozen policy cannot change behind the caller.
    object.__setattr__(self, 'require_context',
                       types.MappingProxyType(dict(rc)))
    mv = self.min_version
    if mv is not None:
      if isinstance(mv, bool) or not isinstance(mv, int):
        raise errors.UsageError(
            f'policy min_version must be an integer, got {type(mv).__name__}')
      if mv < 0 or mv >= 10 ** MAX_VERSION_DIGITS:
        raise errors.UsageError(
            f'policy min_version must be between 0 and {MAX_VERSION_DIGITS} '
            f'digits long, got {mv}')
    vk = self.version_key
    if not isinstance(vk, str) or not vk:
      raise errors.UsageError(
          'policy version_key must be a non-empty string, got '
          f'{_q(vk, 64)}')

  def __hash__(self):
    return hash((frozenset(self.require_context.items()), self.min_version,
                 self.version_key))

  def __reduce__(self):  # MappingProxyType does not pickle
    return (Policy, (dict(self.require_context), self.min_version,
                     self.version_key))

  @property
  def empty(self) -> bool:
    """True when the policy accepts every context."""
    return not self.require_context and self.min_version is None

  def check(self, context: Mapping[str, str]) -> None:
    """Raises PolicyError unless `context` satisfies every rule.

    Args:
      context: a package's encryption context (its signature checked first:
        an unsigned package's context is whatever its writer chose).

    Raises:
      PolicyError: one line naming the key, the required value and the
        package's value (escaped: they may come from anyone).
    """
    for key, want in self.require_context.items():
      if key not in context:
        raise PolicyError(
            f'{_REFUSED}: context key {_q(key, 64)} is missing; the policy '
            f'requires {_q(want, 128)}')
      got = context[key]
      if got != want:
        raise PolicyError(
            f'{_REFUSED}: context key {_q(key, 64)} is {_q(got, 128)}; the '
            f'policy requires {_q(want, 128)}')
    if self.min_version is None:
      return
    key, need = self.version_key, f'a version >= {self.min_version}'
    if key not in context:
      raise PolicyError(
          f'{_REFUSED}: context key {_q(key, 64)} is missing; the policy '
          f'requires {need}')
    got = context[key]
    if not is_canonical_version(got):
      raise PolicyError(
          f'{_REFUSED}: context key {_q(key, 64)} is {_q(got, 64)}, not a '
          'version number (ASCII digits, no sign or leading zero, at most '
          f'{MAX_VERSION_DIGITS} digits); the policy requires {need}')
    if int(got) < self.min_version:
      raise PolicyError(
          f'{_REFUSED}: context key {_q(key, 64)} is {_q(got, 64)}; the '
          f'policy requires {need}')

  def to_dict(self) -> dict:
    """The policy file's JSON object (what :meth:`from_dict` reads)."""
    out = {'require_context': dict(self.require_context),
           'version_key': self.version_key}
    if self.min_version is not None:
      out['min_version'] = self.min_version
    return out

  @classmethod
  def from_dict(cls, obj: Any, source: str = 'policy') -> 'Policy':
    """A policy from a parsed policy-file object; UsageError if malformed.

    Unknown keys are refused (a misspelt rule must not be silently
    dropped); `min_version` must be a JSON integer.
    """
    if not isinstance(obj, dict):
      raise errors.UsageError(f'{source}: a policy is a JSON object')
    unknown = sorted(set(obj) - _FILE_KEYS)
    if unknown:
      raise errors.UsageError(
          f'{source}: unknown policy key {_q(unknown[0], 64)}; the keys are '
          f'{", ".join(sorted(_FILE_KEYS))}')
    rc = obj.get('require_context', {})
    if not isinstance(rc, dict):
      raise errors.UsageError(
          f'{source}: require_context must be a JSON object of strings')
    mv = obj.get('min_version')
    if 'min_version' in obj and (isinstance(mv, bool) or
                                 not isinstance(mv, int)):
      raise errors.UsageError(
          f'{source}: min_version must be a JSON integer, got {_q(mv, 64)}')
    try:
      return cls(require_context=rc, min_version=mv,
                 version_key=obj.get('version_key', DEFAULT_VERSION_KEY))
    except errors.UsageError as e:
      raise errors.UsageError(f'{source}: {e}') from None

  @classmethod
  def from_file(cls, path) -> 'Policy':
    """Reads a JSON policy file, strictly.

    Strict: UTF-8, one JSON object, no duplicate keys, no NaN/Infinity, no
    floats, no unknown keys (see :meth:`from_dict`), at most 1 MiB.

    Raises:
      UsageError: the file is not a valid policy.
      OSError: it cannot be read.
    """
    path = os.fspath(path)
    name = _text.printable(path)
    with open(path, 'rb') as f:
      data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
      raise errors.UsageError(
          f'policy file {name} is larger than {MAX_FILE_BYTES} bytes')
    try:
      text = data.decode('utf-8')
      obj = json.loads(text, object_pairs_hook=_no_duplicates,
                       parse_float=_no_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
      raise errors.UsageError(
          f'policy file {name} is not valid JSON: '
          f'{_text.printable(str(e), 128)}') from None
    return cls.from_dict(obj, f'policy file {name}')


def _no_duplicates(pairs):
  out = {}
  for k, v in pairs:
    if k in out:
      raise ValueError(f'duplicate key {k!r}')
    out[k] = v
  return out


def _no_float(s):
  raise ValueError(f'{s} is not an integer')


def _no_constant(s):
  raise ValueError(f'{s} is not allowed')
