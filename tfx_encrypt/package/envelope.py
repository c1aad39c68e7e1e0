"""A package's keys: recipients, unwrapping, key groups, signing.

FORMAT.md §5 (derived keys and the key commitment), §7 (recipient
stanzas), §7.1 (k-of-n key groups, Shamir-split data key) and §8 (the
signer named in the body, the signature over it). Everything here works on
headers and keys; nothing touches package files.
"""

import logging
import hmac
import os
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt import keys as keys_lib
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.format.header import Header, KeyGroups
from tfx_encrypt.format.header import SignatureBlock, SignerRef
from tfx_encrypt.keys import shamir
from tfx_encrypt.keys.base import KeyBackend, Stanza, WrapContext

_LOG = logging.getLogger(__name__)


KeyLike = Union[str, KeyBackend]


RESERVED_CONTEXT_PREFIX = header_lib.RESERVED_CONTEXT_PREFIX


#: Wrap-context key binding a Shamir share's stanza to its key group (§7.1).
SHARE_GROUP_KEY = 'tfxe:share-group'


#: Bytes of one key share: the 32-byte DEK's share values plus its x.
SHARE_SIZE = 32 + shamir.SHARE_OVERHEAD


def _backend(k: KeyLike, role: Optional[str],
             option: Optional[str] = None) -> KeyBackend:
  """Resolve `k` and check it may play `role` (keys_lib.ROLES, or None).

  Backends passed in as objects are checked too, so the Python API fails
  as closed as the CLI: e.g. a private key as a recipient raises
  KeyRoleError. role None (a key only named, as in remove_recipients)
  skips the check.
  """
  if isinstance(k, KeyBackend):
    return k if role is None else keys_lib.check_role(k, role, option)
  return keys_lib.resolve(k, role, option=option)


def _backends(ks: Optional[Iterable[KeyLike]], role: Optional[str],
              option: Optional[str] = None) -> List[KeyBackend]:
  if ks is None:
    return []
  if isinstance(ks, (str, KeyBackend)):
    ks = [ks]
  return [_backend(k, role, option) for k in ks]


def resolve_keys(ks: Optional[Iterable[KeyLike]], role: str,
                 option: Optional[str] = None) -> List[KeyBackend]:
  """Key URIs (or backends) as backends checked for `role`, for reuse.

  For callers that use the same keys many times (serve-sync): resolving
  once reads `-` (stdin) and asks for a passphrase once, and a key in the
  wrong role is refused before the first package is touched.
  """
  return _backends(ks, role, option)


def _describe_keys(ks: Sequence[KeyBackend]) -> str:
  """'a.pub.pem (sha256:...), aws-kms://...' for messages naming keys."""
  return ', '.join(k.describe() for k in ks)


def _check_user_context(context: Optional[Mapping[str, str]]) -> Dict[str, str]:
  ctx = header_lib.check_context(dict(context) if context else {})
  for k in ctx:
    if k.startswith(RESERVED_CONTEXT_PREFIX):
      raise errors.UsageError(
          f'encryption context key {_text.quoted(k, 64)} uses the reserved '
          f'prefix {RESERVED_CONTEXT_PREFIX!r}; rename it')
  return ctx


def seal_header(h: Header, mac_key: bytes,
                signer: Optional[KeyBackend]) -> None:
  """Name the signer in the body, then MAC it, then sign it (§3, §8).

  The body says who signs (or that nobody does) before the MAC is computed,
  so the signature can be neither stripped nor added without the data key.
  The signature is stored in its one canonical form: raw R || S for
  Ed25519, raw r || s with low S for ECDSA P-256.
  """
  if signer is not None and not signer.signature_alg:
    signer.sign(b'')  # raises a UsageError explaining what to pass
  h.invalidate()
  h.signer = (None if signer is None else
              SignerRef(signer.signature_alg, signer.signer_id))
  h.mac = h.compute_mac(mac_key)
  if signer is None:
    return
  sig = signer.sign(h.signature_message())  # exactly one (remote) call
  if signer.signature_alg == 'ecdsa-p256-sha256':
    sig = header_lib.ecdsa_der_to_raw(sig)
  header_lib.check_raw_signature(signer.signature_alg, sig)
  h.signature = SignatureBlock(signer.signature_alg, signer.signer_id, sig)


def _verify_signature(h: Header, trusted: Sequence[KeyBackend],
                      allow_unsigned: bool) -> bool:
  """Return True if verified, False if unsigned-and-allowed; else raise."""
  if h.signer is None:  # the MAC-covered body says so (§10 step 2)
    if allow_unsigned:
      return False
    raise errors.UntrustedSignerError(
        'package is not signed, so its publisher cannot be verified; pass '
        '--trust KEY for a signed package, or --allow-unsigned to accept it '
        'anyway')
  sig = h.signature
  if not trusted:
    raise errors.UntrustedSignerError(
        f'package is signed by {_text.printable(sig.key_id)} but no trusted '
        'key was given; '
        'pass the publisher\'s public key with --trust')
  msg = h.signature_message()
  raw = sig.sig
  if sig.alg == 'ecdsa-p256-sha256':  # canonical (low S) checked on parse
    raw = header_lib.ecdsa_raw_to_der(raw)
  for t in trusted:
    if t.signature_alg == sig.alg and t.signer_id == sig.key_id:
      if t.verify(msg, raw, sig.alg):
        return True
      raise errors.TamperedPackageError(
          f'the package signature by trusted key {t.describe()} '
          'is INVALID: the '
          'header was modified after signing, or the signature was forged')
  raise errors.UntrustedSignerError(
      f'package is signed by {_text.printable(sig.key_id)} '
      f'({_text.printable(sig.alg)}), which is not among the '
      f'trusted keys ({_describe_keys(trusted)}); pass that publisher\'s '
      'public key with --trust if you trust it')


def _require_trust_choice(trusted: Sequence[KeyLike], allow_unsigned: bool,
                          what: str) -> None:
  """Operations that re-sign must be told whom to trust: no default."""
  if not trusted and not allow_unsigned:
    raise errors.UsageError(
        f'{what} checks the package\'s current signature first; say whom you '
        'trust: --trust PUBLISHER_PUBLIC_KEY (trusted=[...]), or '
        '--allow-unsigned (allow_unsigned=True)')


def _check_resign(src_path: str, h: Header, verified: bool,
                  sign_with: Optional[KeyBackend],
                  resign_unsigned: bool) -> None:
  """Refuse to launder an unverified package into a signed one.

  Called after :func:`_verify_signature`, so a signed package here is
  verified; an unsigned one (accepted by allow_unsigned) gets the signer's
  signature only with `resign_unsigned`, and then a warning is logged.
  """
  if verified or h.signer is not None or sign_with is None:
    return
  if not resign_unsigned:
    raise errors.UsageError(
        f'package {_text.printable(src_path)} is UNSIGNED, so nobody vouches '
        f'for its origin; refusing to sign it with {sign_with.describe()}. Pass '
        '--resign-unsigned (resign_unsigned=True) to vouch for it yourself, '
        'or drop --sign-with to keep it unsigned')
  _LOG.warning('re-signing an UNSIGNED package with %s: %s had no signature, '
               'so its origin was never verified', sign_with.describe(),
               _text.printable(src_path))


def unwrap_data_key(identities: Sequence[KeyBackend], stanzas: Sequence,
                    package_id: bytes, context: Mapping[str, str], suite: str,
                    commitment: bytes, threshold: Optional[KeyGroups] = None
                    ) -> Tuple[bytes, header_lib.DerivedKeys]:
  """Find the DEK with the first identity that can unwrap one of `stanzas`.

  Returns (dek, derived keys), after checking the key commitment. Stanzas an
  identity does not `match` are skipped without any call, so a KMS identity
  costs at most one call. With key groups (`threshold`), shares of k groups
  are unwrapped and combined instead (see :func:`open_key_groups`).
  """
  if not identities:
    raise errors.UsageError('no identity given; pass --identity KEY_URI')
  if threshold is not None:
    dek, keys, _ = open_key_groups(identities, stanzas, package_id, context,
                                   suite, commitment, threshold)
    return dek, keys
  derived = {}

  def accept(ident, dek):
    keys = header_lib.DerivedKeys(dek, package_id, suite)
    if not hmac.compare_digest(keys.commitment, commitment):
      return errors.TamperedPackageError(
          f'the data key unwrapped with {ident.describe()} does '
          'not match the '
          'package\'s key commitment: the recipient stanza was modified')
    derived['keys'] = keys
    return None

  attempts = _UnwrapAttempts(identities)
  dek = attempts.first(stanzas, WrapContext(package_id, context), accept)
  if dek is None:
    have = _describe_keys(identities)
    want = ', '.join(_text.printable(s.key_id) for s in stanzas)
    attempts.fail(f'none of the identities ({have}) can decrypt this package; '
                  f'it is encrypted for: {want}')
  return dek, derived['keys']


class _UnwrapAttempts:
  """Tries identities on the stanzas they `match`, one call per stanza.

  Remembers why attempts failed, so that after trying everything the most
  telling error is raised: tampering first, then a backend failure (e.g. the
  KMS is down), then "no matching key". An identity whose backend failed is
  not called again, which lets a recovery identity (an offline HSM key) open
  the package while the production KMS is unreachable.
  """

  def __init__(self, identities: Sequence[KeyBackend]):
    self.identities = identities
    self.tampered: Optional[errors.TfxEncryptError] = None
    self.backend_error: Optional[errors.KeyBackendError] = None
    self._failed = set()

  def first(self, stanzas: Sequence[Stanza], wctx: WrapContext,
            accept: Callable[[KeyBackend, bytes],
                             Optional[errors.TfxEncryptError]]
            ) -> Optional[bytes]:
    """The first unwrapped value `accept` finds no problem with, or None."""
    for n, ident in enumerate(self.identities):
      if n in self._failed:
        continue
      for stanza in stanzas:
        if not ident.matches(stanza):
          continue
        try:
          value = ident.unwrap(stanza, wctx)
        except errors.TamperedPackageError as e:
          self.tampered = e
          continue
        except errors.NoMatchingKeyError:
          continue
        except errors.KeyBackendError as e:
          self.backend_error = self.backend_error or e
          self._failed.add(n)
          break
        problem = accept(ident, value)
        if problem is None:
          return value
        self.tampered = problem
    return None

  def fail(self, no_match_message: str):
    if self.tampered is not None:
      raise self.tampered
    if self.backend_error is not None:
      raise self.backend_error
    raise errors.NoMatchingKeyError(no_match_message)


def _unwrap(h: Header, identities: Sequence[KeyBackend]
            ) -> Tuple[bytes, header_lib.DerivedKeys]:
  return unwrap_data_key(identities, h.recipients, h.package_id, h.context,
                         h.suite, h.commitment, h.threshold)


def share_context(package_id: bytes, context: Mapping[str, str],
                  group: int) -> WrapContext:
  """Wrap context of the stanzas of key group `group`: binds the share."""
  pairs = dict(context)
  pairs[SHARE_GROUP_KEY] = str(group)
  return WrapContext(package_id, pairs)


def split_key(secret: bytes, parts: int, threshold: int, *,
              randbytes: Callable[[int], bytes] = os.urandom) -> List[bytes]:
  """Shamir-split `secret` into `parts` shares, share i at x = i + 1.

  The x coordinates are fixed instead of random (:func:`shamir.split`'s
  default) so that `rewrap` can compute the share of any group from any k
  shares (:func:`shamir.interpolate`); the shares keep Vault's layout.
  """
  if not 2 <= threshold <= parts <= header_lib.MAX_KEY_GROUPS:
    raise errors.UsageError(
        f'key groups need 2 <= threshold <= groups <= '
        f'{header_lib.MAX_KEY_GROUPS} (got threshold {threshold}, '
        f'{parts} groups)')
  return shamir.split(secret, parts, threshold, randbytes=randbytes,
                      xs=range(1, parts + 1))


def open_key_groups(identities: Sequence[KeyBackend], stanzas: Sequence[Stanza],
                    package_id: bytes, context: Mapping[str, str], suite: str,
                    commitment: bytes, groups: KeyGroups
                    ) -> Tuple[bytes, header_lib.DerivedKeys, Dict[int, bytes]]:
  """Rebuild the DEK from the shares of k key groups (§7.1, §10 step 3).

  Groups are tried in order; in each, every identity tries the stanzas it
  `matches` (one call each) until one yields the group's share; it stops
  after k shares. Returns (dek, derived keys, {group: share}) after checking
  the key commitment, so a forged share ends in TamperedPackageError.
  """
  shares: Dict[int, bytes] = {}
  attempts = _UnwrapAttempts(identities)
  for gi, idxs in enumerate(groups.groups):
    if len(shares) == groups.k:
      break

    def accept(ident, share, gi=gi):
      if len(share) != SHARE_SIZE or share[-1] != gi + 1:
        return errors.TamperedPackageError(
            f'the key share unwrapped with {ident.describe()} for '
            'key group '
            f'{gi} is malformed: the recipient stanza was modified')
      return None

    share = attempts.first([stanzas[i] for i in idxs],
                           share_context(package_id, context, gi), accept)
    if share is not None:
      shares[gi] = share
  if len(shares) < groups.k:
    have = _describe_keys(identities)
    opened = ', '.join(str(g) for g in sorted(shares)) or 'none'
    attempts.fail(
        f'{groups.k} of {groups.n} key groups needed, got {len(shares)}: the '
        f'identities ({have}) open key groups: {opened}. Pass identities '
        f'from {groups.k} different groups (see "tfx-encrypt inspect")')
  dek = shamir.combine(list(shares.values()))
  keys = header_lib.DerivedKeys(dek, package_id, suite)
  if not hmac.compare_digest(keys.commitment, commitment):
    raise errors.TamperedPackageError(
        'the data key rebuilt from the shares of key groups '
        f'{sorted(shares)} does not match the package\'s key commitment: a '
        'recipient stanza or the key groups were modified')
  return dek, keys, shares


def _plan_recipients(recipients: Optional[Sequence[KeyLike]],
                     key_groups: Optional[Sequence[Sequence[KeyLike]]],
                     threshold: Optional[int]
                     ) -> Tuple[List[KeyBackend],
                                Optional[List[List[KeyBackend]]]]:
  """Resolve and check recipients, or key groups and their threshold."""
  if key_groups is None:
    if threshold is not None:
      raise errors.UsageError(
          'a threshold needs key groups: pass --key-group (at least two) '
          'instead of --recipient, or drop --threshold')
    recips = _backends(recipients, 'recipient')
    if not recips:
      raise errors.UsageError('at least one --recipient is required')
    return recips, None
  if recipients:
    raise errors.UsageError(
        'pass either recipients (any one of them decrypts) or key groups '
        'with a threshold (k of n groups decrypt), not both')
  if isinstance(key_groups, (str, KeyBackend)):
    raise errors.UsageError('key_groups must be a list of lists of keys')
  groups = [_backends(g, 'recipient', '--key-group') for g in key_groups]
  n = len(groups)
  if not 2 <= n <= header_lib.MAX_KEY_GROUPS:
    raise errors.UsageError(
        f'key groups: pass 2 to {header_lib.MAX_KEY_GROUPS} groups '
        f'(--key-group), got {n}')
  if type(threshold) is not int or not 2 <= threshold <= n:  # pylint: disable=unidiomatic-typecheck
    raise errors.UsageError(
        f'with {n} key groups, --threshold must be an integer from 2 to {n} '
        f'(got {threshold!r})')
  out, where = [], {}
  for gi, g in enumerate(groups):
    if not g:
      raise errors.UsageError(f'key group {gi} is empty; give it a key')
    members = []
    for r in g:
      if r.key_id in where and where[r.key_id] != gi:
        raise errors.UsageError(
            f'key {r.describe()} is in key groups {where[r.key_id]} and {gi}; a '
            'key may be in only one group (it would hold two shares)')
      if r.key_id not in where:
        where[r.key_id] = gi
        members.append(r)
    out.append(members)
  if len(where) > header_lib.MAX_RECIPIENTS:
    raise errors.UsageError(
        f'a package can have at most {header_lib.MAX_RECIPIENTS} recipients')
  return [], out


class Envelope:
  """A new package's keys and recipient stanzas, ready for payload streams.

  Made by :func:`prepare_envelope` before any payload work, so a failing KMS
  costs nothing. It keeps the keys derived from the DEK (the raw DEK is
  discarded right after wrapping) and refuses to be pickled: it must never
  reach a job graph, a log or MLMD.
  """

  def __init__(self, suite: str, hash_alg: str, package_id: bytes,
               context: Dict[str, str], stanzas: List, keys,
               threshold: Optional[KeyGroups] = None):
    self.suite = suite
    self.threshold = threshold
    self.hash_alg = hash_alg
    self.package_id = package_id
    self.context = context
    self.stanzas = stanzas
    self.keys = keys
    self.ctx_digest = header_lib.context_digest(context)

  def payload_aad(self, index: int) -> bytes:
    return header_lib.payload_aad(self.package_id, index, self.ctx_digest)

  def new_stream(self, index: int) -> streaming.StreamCipher:
    """A fresh stream (random salt and nonce prefix) for payload `index`."""
    return streaming.StreamCipher.new(self.suite, self.keys.stream_key,
                                      self.payload_aad(index))

  def __reduce__(self):
    raise TypeError('an Envelope holds key material and must not be pickled')


def prepare_envelope(recipients: Optional[Sequence[KeyLike]], *,
                     context: Optional[Mapping[str, str]] = None,
                     cipher: str = 'aes-256-gcm', hash_alg: str = 'blake3',
                     suite: Optional[str] = None,
                     key_groups: Optional[Sequence[Sequence[KeyLike]]] = None,
                     threshold: Optional[int] = None) -> Envelope:
  """Fresh DEK and package id; wrap the DEK once per distinct recipient.

  With `key_groups` (n groups) and `threshold` (k) instead of recipients,
  the DEK is Shamir-split into n shares and share i is wrapped once for each
  recipient of group i; any k groups together decrypt (FORMAT.md §7.1).
  """
  suite = suite or streaming.suite_for_cipher(cipher)
  digest_lib.new_hash(hash_alg)  # fail early if unavailable
  ctx = _check_user_context(context)
  recips, groups = _plan_recipients(recipients, key_groups, threshold)
  dek = os.urandom(32)
  package_id = os.urandom(16)
  keys = header_lib.DerivedKeys(dek, package_id, suite)
  stanzas, seen = [], set()
  kg = None
  if groups is None:
    wctx = WrapContext(package_id, ctx)
    for r in recips:
      if r.key_id not in seen:
        seen.add(r.key_id)
        stanzas.append(r.wrap(dek, wctx))  # exactly one call per recipient
  else:
    shares = split_key(dek, len(groups), threshold)
    indices = []
    for gi, members in enumerate(groups):
      wctx = share_context(package_id, ctx, gi)
      indices.append(list(range(len(stanzas), len(stanzas) + len(members))))
      for r in members:
        stanzas.append(r.wrap(shares[gi], wctx))  # one call per recipient
    del shares
    kg = KeyGroups(threshold, indices)
  del dek
  return Envelope(suite, hash_alg, package_id, ctx, stanzas, keys, kg)


def resolve_signer(signer: Optional[KeyLike]) -> Optional[KeyBackend]:
  """The signing backend, checked to be able to sign, or None."""
  if signer is None:
    return None
  sign_with = _backend(signer, 'signer')
  if not sign_with.signature_alg:
    sign_with.sign(b'')  # raises a KeyRoleError naming the right key types
  return sign_with
