"""Recipient stanzas and their wrap context (docs/FORMAT.md §7, §7.1).

A stanza is one recipient's wrapped copy of the data key, as the header
stores it; the wrap context is what every wrap is bound to. Both are bytes
and JSON only: the key backends in :mod:`tfx_encrypt.keys` produce and
consume them, and this module imports nothing from there.
"""

import base64
import json
from typing import Dict, Mapping

from tfx_encrypt import errors

# Limits a stanza must respect; enforced when a header is parsed.
MAX_STANZA_TYPE_LEN = 64
MAX_KEY_ID_LEN = 1024
MAX_STANZA_BODY_FIELDS = 16
MAX_STANZA_FIELD_LEN = 16384


def b64e(data: bytes) -> str:
  return base64.b64encode(data).decode('ascii')


def b64d(text: str, what: str = 'field') -> bytes:
  try:
    out = base64.b64decode(text.encode('ascii'), validate=True)
  except (ValueError, UnicodeEncodeError) as e:
    raise errors.TamperedPackageError(
        f'package header {what} is not valid base64; the package is '
        'corrupt or was modified') from e
  # One byte form only (FORMAT.md §4): the padding bits must be zero.
  if base64.b64encode(out).decode('ascii') != text:
    raise errors.TamperedPackageError(
        f'package header {what} is not canonical base64; the package is '
        'corrupt or was modified')
  return out


class WrapContext:
  """What a key wrap is bound to: the package id and the encryption context.

  `aad()` is the canonical byte string that backends with an associated-data
  input (RSA-OAEP label, HPKE info, GCP KMS AAD, Vault associated_data) bind
  to. Backends with a key/value context (AWS KMS EncryptionContext) use
  `as_dict()` instead.
  """

  def __init__(self, package_id: bytes, pairs: Mapping[str, str]):
    self.package_id = bytes(package_id)
    self.pairs = dict(pairs)

  def as_dict(self) -> Dict[str, str]:
    d = dict(self.pairs)
    d['tfxe:package-id'] = self.package_id.hex()
    return d

  def aad(self) -> bytes:
    return b'tfxe1 wrap\x00' + json.dumps(
        self.as_dict(), sort_keys=True, separators=(',', ':'),
        ensure_ascii=True).encode('ascii')


class Stanza:
  """One recipient's wrapped copy of the DEK, as stored in the header."""

  __slots__ = ('type', 'key_id', 'body')

  def __init__(self, type: str, key_id: str, body: Mapping[str, str]):  # pylint: disable=redefined-builtin
    self.type = type
    self.key_id = key_id
    self.body = dict(body)

  def to_json(self) -> dict:
    return {'type': self.type, 'key_id': self.key_id, 'body': dict(self.body)}

  @classmethod
  def from_json(cls, obj) -> 'Stanza':
    bad = errors.TamperedPackageError(
        'a recipient stanza in the package header is malformed; the package '
        'is corrupt or was modified')
    if not isinstance(obj, dict) or set(obj) != {'type', 'key_id', 'body'}:
      raise bad
    t, k, body = obj['type'], obj['key_id'], obj['body']
    if not (isinstance(t, str) and 0 < len(t) <= MAX_STANZA_TYPE_LEN and
            isinstance(k, str) and 0 < len(k) <= MAX_KEY_ID_LEN and
            isinstance(body, dict) and len(body) <= MAX_STANZA_BODY_FIELDS):
      raise bad
    for bk, bv in body.items():
      if not (isinstance(bk, str) and isinstance(bv, str) and
              len(bk) <= 64 and len(bv) <= MAX_STANZA_FIELD_LEN):
        raise bad
    return cls(t, k, body)

  def __eq__(self, other):
    return isinstance(other, Stanza) and self.to_json() == other.to_json()

  def __repr__(self):
    return f'Stanza(type={self.type!r}, key_id={self.key_id!r})'
