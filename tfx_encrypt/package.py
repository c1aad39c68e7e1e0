"""Encrypt, decrypt, inspect, verify, rewrap and rotate model packages.

This is the only module that touches the filesystem for packages, so path
safety and atomic publication live here. The byte format is in
:mod:`tfx_encrypt.format` and docs/FORMAT.md; keys come from
:mod:`tfx_encrypt.keys`.

Performance: files are processed by a small thread pool (largest first).
Each worker streams its file through two reused 1 MiB buffers: `readinto`,
hash, seal/open in place with `encrypt_into`/`decrypt_into`, hash, write.
hashlib, file I/O and (for large buffers) OpenSSL release the GIL, so reads,
hashing and writes of different files overlap. Memory is O(workers x 2 MiB),
independent of model size.
"""

import concurrent.futures
import dataclasses
import datetime
import errno
import hmac
import logging
import os
import queue
import stat
import threading
import unicodedata
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import _signals
from tfx_encrypt import errors
from tfx_encrypt import keys as keys_lib
from tfx_encrypt import policy as policy_lib
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import paths as paths_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.format.header import FileEntry, Header, KeyGroups
from tfx_encrypt.format.header import SignatureBlock, SignerRef
from tfx_encrypt.keys import shamir
from tfx_encrypt.keys.base import KeyBackend, Stanza, WrapContext

_LOG = logging.getLogger(__name__)

KeyLike = Union[str, KeyBackend]
Progress = Optional[Callable[[int], None]]

HEADER_NAME = 'tfxe.header'
PAYLOAD_DIR = 'payload'
BUNDLE_SUFFIX = '.tfxe'
RESERVED_CONTEXT_PREFIX = header_lib.RESERVED_CONTEXT_PREFIX
#: Wrap-context key binding a Shamir share's stanza to its key group (§7.1).
SHARE_GROUP_KEY = 'tfxe:share-group'
#: Bytes of one key share: the 32-byte DEK's share values plus its x.
SHARE_SIZE = 32 + shamir.SHARE_OVERHEAD
_O_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)
_O_CLOEXEC = getattr(os, 'O_CLOEXEC', 0)


def default_workers() -> int:
  return max(2, min(8, (os.cpu_count() or 1) * 2))


def payload_name(i: int) -> str:
  return f'{i:08d}'


@dataclasses.dataclass
class PackageInfo:
  """What a package says about itself (and what an operation did)."""
  path: str
  bundle: bool
  format_version: int
  cipher: str
  suite: str
  hash_alg: str
  package_id: str
  created: str
  context: Dict[str, str]
  recipients: List[Dict[str, str]]
  signer: Optional[str]
  signature_alg: Optional[str]
  signature_verified: bool
  fingerprint: str
  payload_digest: str
  file_count: int
  ciphertext_bytes: int
  plaintext_bytes: Optional[int] = None
  header_bytes: int = 0
  #: None (any one recipient decrypts), or {'k': k, 'groups': [[key_id, ...],
  #: ...]}: recipients from k distinct groups are needed.
  threshold: Optional[Dict] = None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _info(h: Header, path: str, bundle: bool, header_len: int,
          verified: bool = False,
          plaintext_bytes: Optional[int] = None) -> PackageInfo:
  return PackageInfo(
      path=path, bundle=bundle, format_version=header_lib.FORMAT_VERSION,
      cipher=streaming.CIPHER_OF_SUITE.get(h.suite, h.suite), suite=h.suite,
      hash_alg=h.hash_alg, package_id=h.package_id.hex(), created=h.created,
      context=dict(h.context),
      recipients=[{'type': s.type, 'key_id': s.key_id} for s in h.recipients],
      signer=h.signature.key_id if h.signature else None,
      signature_alg=h.signature.alg if h.signature else None,
      signature_verified=verified, fingerprint=h.fingerprint,
      payload_digest=h.payload_digest(), file_count=len(h.payloads),
      ciphertext_bytes=h.ciphertext_bytes + header_len,
      plaintext_bytes=plaintext_bytes, header_bytes=header_len,
      threshold=None if h.threshold is None else {
          'k': h.threshold.k,
          'groups': [[h.recipients[i].key_id for i in g]
                     for g in h.threshold.groups]})


# --- keys ---------------------------------------------------------------------

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


# --- key groups: k of n, Shamir-split DEK (FORMAT.md §7.1) ------------------

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


# --- walking the source model -------------------------------------------------

@dataclasses.dataclass
class _SourceFile:
  path: str  # relative POSIX path
  abspath: str
  size: int


#: File names that make a directory look like a model (anywhere in the tree).
MODEL_MARKER_NAMES = frozenset(
    {'saved_model.pb', 'saved_model.pbtxt', 'fingerprint.pb'})
#: File name endings that do the same (Keras, TF Lite, HDF5).
MODEL_MARKER_SUFFIXES = ('.keras', '.tflite', '.h5')
_O_NONBLOCK = getattr(os, 'O_NONBLOCK', 0)


def _starts_with_magic(path: str) -> bool:
  """True if the file at `path` starts like a tfx-encrypt header (a bundle,
  or a directory package's header), of any format version."""
  fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
  try:
    return os.pread(fd, 6, 0) == header_lib.MAGIC[:6]
  finally:
    os.close(fd)


def _refuse_in_model(src_dir: str, relpath: str, what: str) -> errors.UsageError:
  if not relpath:
    return errors.UsageError(
        f'{_text.printable(src_dir)} is {what}, not a model; refusing to '
        'encrypt it, even with --any-dir (decrypt it, or rotate it to change '
        'its keys)')
  return errors.UsageError(
      f'{_text.printable(src_dir)} contains {what} at '
      f'{_text.quoted(relpath)}; refusing to encrypt it, even with '
      '--any-dir: move it out of the model directory')


def scan_model(src_dir: str, any_dir: bool = False
               ) -> Tuple[List[_SourceFile], List[str]]:
  """List regular files and directories under src_dir, refusing anything else.

  Symlinks (anywhere below the root), devices, FIFOs and sockets raise
  UnsafePathError; they are never followed.

  It must look like a model: some file in the tree is named as in
  MODEL_MARKER_NAMES or ends as in MODEL_MARKER_SUFFIXES, unless `any_dir`.
  A tree holding a tfx-encrypt package (a `tfxe.header`, or a file starting
  with the format's magic) or a tfx-encrypt temporary sibling is refused
  even with `any_dir`: encrypting it is a mistake (a package inside a
  package, or a half-written output). Only files of at least a header
  prefix's size are opened to read their magic (a few microseconds each).
  """
  root = os.path.abspath(src_dir)
  try:
    st = os.stat(root)
  except FileNotFoundError:
    raise errors.UsageError(f'model directory {src_dir} does not exist') from None
  if not stat.S_ISDIR(st.st_mode):
    raise errors.UsageError(
        f'{src_dir} is not a directory; pass a SavedModel directory')
  files: List[_SourceFile] = []
  dirs: List[str] = []
  looks_like_model = False
  stack = ['']
  while stack:
    rel = stack.pop()
    base = os.path.join(root, rel) if rel else root
    try:
      entries = list(os.scandir(base))
    except PermissionError:
      raise errors.UsageError(f'cannot read directory {base}') from None
    for e in entries:
      name = e.name
      if unicodedata.normalize('NFC', name) != name:
        raise errors.UnsafePathError(
            f'file name {os.path.join(rel, name)!r} is not NFC-normalised '
            'Unicode; rename it')
      relpath = f'{rel}/{name}' if rel else name
      if _fsutil.is_temp_name(name):
        raise errors.UsageError(
            f'{_text.printable(src_dir)} contains a tfx-encrypt temporary '
            f'file {_text.quoted(relpath)} (a command is writing it, or was '
            'interrupted); refusing to encrypt it, even with --any-dir: wait '
            'for that command, or delete it')
      st = e.stat(follow_symlinks=False)
      if stat.S_ISLNK(st.st_mode):
        raise errors.UnsafePathError(
            f'{relpath!r} is a symbolic link; links are never followed. '
            'Replace it with the file it points to.')
      if stat.S_ISDIR(st.st_mode):
        dirs.append(relpath)
        stack.append(relpath)
      elif stat.S_ISREG(st.st_mode):
        if name == HEADER_NAME:
          raise _refuse_in_model(src_dir, rel, 'a tfx-encrypt package')
        if (st.st_size >= header_lib.PREFIX_SIZE and
            _starts_with_magic(e.path)):
          raise _refuse_in_model(src_dir, relpath, 'a tfx-encrypt bundle')
        if not looks_like_model and (
            name in MODEL_MARKER_NAMES or
            name.lower().endswith(MODEL_MARKER_SUFFIXES)):
          looks_like_model = True
        files.append(_SourceFile(relpath, e.path, st.st_size))
      else:
        raise errors.UnsafePathError(
            f'{relpath!r} is not a regular file or directory (device, FIFO or '
            'socket); remove it from the model directory')
  if not files:
    raise errors.EmptyModelError(
        f'{src_dir} contains no files; point at a SavedModel directory (it '
        'should contain saved_model.pb)')
  if len(files) > header_lib.MAX_FILES or len(dirs) > header_lib.MAX_DIRS:
    raise errors.UsageError(
        f'model has more than {header_lib.MAX_FILES} files or directories')
  files.sort(key=lambda f: f.path)
  for f in files:
    if f.size > header_lib.MAX_FILE_SIZE:
      raise errors.UsageError(f'{f.path} is larger than 1 PiB')
  dirs = paths_lib.check_tree([f.path for f in files], dirs)
  if not looks_like_model and not any_dir:
    raise errors.UsageError(
        f'{_text.printable(src_dir)} does not look like a model directory: no '
        f'{", ".join(sorted(MODEL_MARKER_NAMES))} or '
        f'{", ".join("*" + x for x in MODEL_MARKER_SUFFIXES)} file in it; '
        'pass --any-dir (any_dir=True) to encrypt it anyway')
  return files, dirs


# --- per-file stream workers ---------------------------------------------------

class _Buffers(threading.local):
  """Two reusable segment buffers per worker thread."""

  def __init__(self):
    super().__init__()
    self.plain = bytearray(streaming.PLAINTEXT_SEGMENT_SIZE)
    self.cipher = bytearray(streaming.SEGMENT_SIZE)


_BUFS = _Buffers()


# Files with at least this many segments are sealed by a two-stage pipeline:
# this thread reads, hashes the plaintext and encrypts; a second thread hashes
# the ciphertext and writes. The two SHA passes then run on two cores even
# when the model is a single large variables shard.
PIPELINE_MIN_SEGMENTS = 8
_PIPELINE_DEPTH = 3


def _seal_stream(read_segment: Callable[[int, memoryview], None], size: int,
                 sc: streaming.StreamCipher, out_fd: int, hash_alg: str,
                 progress: Progress) -> Tuple[str, str, int]:
  """Encrypt one stream. Returns (plaintext digest, ciphertext digest, size)."""
  ph = digest_lib.new_hash(hash_alg)
  ch = digest_lib.new_hash(hash_alg)
  plain = memoryview(_BUFS.plain)
  n = streaming.num_segments(size)
  ch.update(sc.header)
  _fsutil.write_all(out_fd, sc.header)
  total = len(sc.header)
  if n < PIPELINE_MIN_SEGMENTS:
    cipher = memoryview(_BUFS.cipher)
    for i in range(n):
      _signals.check()
      _, ln = streaming.plaintext_segment(i, size)
      seg = plain[:ln]
      read_segment(i, seg)
      ph.update(seg)
      k = sc.encrypt_into(i, i == n - 1, seg, cipher)
      ch.update(cipher[:k])
      _fsutil.write_all(out_fd, cipher[:k])
      total += k
      if progress:
        progress(ln)
    return ph.hexdigest(), ch.hexdigest(), total

  free: 'queue.Queue' = queue.Queue()
  for _ in range(_PIPELINE_DEPTH):
    free.put(bytearray(streaming.SEGMENT_SIZE))
  work: 'queue.Queue' = queue.Queue()
  failed: List[BaseException] = []

  def sink():
    while True:
      item = work.get()
      if item is None:
        return
      buf, k = item
      if not failed:
        try:
          mv = memoryview(buf)[:k]
          ch.update(mv)
          _fsutil.write_all(out_fd, mv)
        except BaseException as e:  # pylint: disable=broad-except
          failed.append(e)
      free.put(buf)

  writer = threading.Thread(target=sink, name='tfxe-seal-writer', daemon=True)
  writer.start()
  try:
    for i in range(n):
      if failed:
        break
      _signals.check()
      _, ln = streaming.plaintext_segment(i, size)
      seg = plain[:ln]
      read_segment(i, seg)
      ph.update(seg)
      buf = free.get()
      k = sc.encrypt_into(i, i == n - 1, seg, buf)
      work.put((buf, k))
      total += k
      if progress:
        progress(ln)
  finally:
    work.put(None)
    writer.join()
  if failed:
    raise failed[0]
  return ph.hexdigest(), ch.hexdigest(), total


def _file_reader(fd: int, relpath: str, size: int):
  def read_segment(i, mv):
    if _fsutil.read_into_exact(fd, mv) != len(mv):
      raise errors.UsageError(
          f'{relpath} shrank while it was being encrypted; do not modify the '
          'model during encryption')
  def check_eof():
    if os.read(fd, 1):
      raise errors.UsageError(
          f'{relpath} grew while it was being encrypted; do not modify the '
          'model during encryption')
  return read_segment, check_eof


def _open_source(f: _SourceFile) -> int:
  fd = os.open(f.abspath, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
  st = os.fstat(fd)
  if not stat.S_ISREG(st.st_mode):
    os.close(fd)
    raise errors.UnsafePathError(f'{f.path!r} is no longer a regular file')
  if st.st_size != f.size:
    os.close(fd)
    raise errors.UsageError(
        f'{f.path} changed size during encryption; do not modify the model '
        'during encryption')
  return fd


def _create(path: str, mode: int = 0o600) -> int:
  return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW |
                 _O_CLOEXEC, mode)


def _run_parallel(fn, items: Sequence, workers: int) -> list:
  """Run fn over items on a thread pool; first error cancels the rest."""
  if workers <= 1 or len(items) <= 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(workers) as ex:
    futs = [ex.submit(fn, x) for x in items]
    try:
      return [f.result() for f in futs]
    except BaseException:
      for f in futs:
        f.cancel()
      raise


# --- package sources (reading) -------------------------------------------------

# O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
# (then fstat refuses it); it means nothing for the regular files we read.
_READ_FLAGS = (os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC |
               getattr(os, 'O_NONBLOCK', 0))


def _open_regular(path: str, what: str) -> Tuple[int, os.stat_result]:
  """Open a file of a package for reading: a regular file, or refused.

  Links are not followed and a FIFO, device, socket or directory raises
  UnsafePathError before a single byte is read (the type comes from fstat of
  the opened descriptor, so a rename after a check cannot slip one in).
  Returns (fd, its stat); other OSErrors (missing, permission) propagate.
  """
  try:
    fd = os.open(path, _READ_FLAGS)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise errors.UnsafePathError(
          f'{what} {_text.printable(path)} is a symbolic link; links are '
          'never followed') from None
    raise
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      raise errors.UnsafePathError(
          f'{what} {_text.printable(path)} is not a regular file (a FIFO, '
          'device, socket or directory); only regular files are read')
    if _READ_FLAGS & getattr(os, 'O_NONBLOCK', 0):
      os.set_blocking(fd, True)
  except BaseException:
    os.close(fd)
    raise
  return fd, st


class _Source:
  """An opened package, directory or bundle form."""

  def __init__(self, path: str):
    self.path = path
    try:
      st = os.stat(path)
    except FileNotFoundError:
      raise errors.UsageError(f'package {path} does not exist') from None
    self.bundle = stat.S_ISREG(st.st_mode)
    if not self.bundle and not stat.S_ISDIR(st.st_mode):
      raise errors.UnsafePathError(
          f'{_text.printable(path)} is neither a regular file (a bundle) nor '
          'a directory (a package); FIFOs, devices and sockets are never read')
    hpath = path if self.bundle else os.path.join(path, HEADER_NAME)
    try:
      fd, _ = _open_regular(hpath, 'bundle' if self.bundle else
                            'package header')
    except FileNotFoundError:
      raise errors.UnsupportedFormatError(
          f'{path} is not a tfx-encrypt package (no {HEADER_NAME})') from None
    except OSError as e:
      raise errors.UnsafePathError(f'cannot open {hpath}: {e.strerror}') from None
    with os.fdopen(fd, 'rb') as f:
      self.header, self.header_len = Header.read(f)
      f.seek(0, os.SEEK_END)
      self._hfile_size = f.tell()
    sizes = [s for s, _ in self.header.payloads]
    if self.bundle:
      if self._hfile_size != self.header_len + sum(sizes):
        raise errors.TamperedPackageError(
            f'bundle {path} has the wrong length for its header (truncated or '
            'extended); fetch a fresh copy')
      self.offsets = []
      off = self.header_len
      for s in sizes:
        self.offsets.append(off)
        off += s
    else:
      if self._hfile_size != self.header_len:
        raise errors.TamperedPackageError(
            f'{hpath} has trailing data after the header')
      self._check_dir(sizes)

  def _check_dir(self, sizes):
    names = set(os.listdir(self.path))
    if names != {HEADER_NAME, PAYLOAD_DIR}:
      extra = sorted(names - {HEADER_NAME, PAYLOAD_DIR})
      shown = ', '.join(_text.quoted(n, 64) for n in extra[:5])
      if len(extra) > 5:
        shown += f' and {len(extra) - 5} more'
      raise errors.TamperedPackageError(
          f'package directory {self.path} has unexpected entries '
          f'[{shown}] or is missing '
          f'{sorted({HEADER_NAME, PAYLOAD_DIR} - names)}')
    pdir = os.path.join(self.path, PAYLOAD_DIR)
    pmode = os.lstat(pdir).st_mode
    if stat.S_ISLNK(pmode):
      raise errors.UnsafePathError(f'{pdir} is a symbolic link')
    if not stat.S_ISDIR(pmode):
      raise errors.UnsafePathError(f'{pdir} is not a directory')
    want = {payload_name(i) for i in range(len(sizes))}
    have = set(os.listdir(pdir))
    if have != want:
      raise errors.TamperedPackageError(
          f'payload files of {self.path} do not match its header: '
          f'{len(have - want)} unexpected, {len(want - have)} missing')
    for i, s in enumerate(sizes):
      p = os.path.join(pdir, payload_name(i))
      st = os.lstat(p)
      if not stat.S_ISREG(st.st_mode):
        raise errors.UnsafePathError(f'{p} is not a regular file')
      if st.st_size != s:
        raise errors.TamperedPackageError(
            f'payload {i} of {self.path} has the wrong size (truncated or '
            'extended); fetch a fresh copy')

  def open_payload(self, i: int) -> Tuple[int, int]:
    """Return (fd, offset of the stream within fd).

    The file is opened anew, so it is checked anew: a regular file (never a
    FIFO that would block, a device or a link), of the expected size.
    """
    if self.bundle:
      fd, st = _open_regular(self.path, 'bundle')
      want, offset = self._hfile_size, self.offsets[i]
    else:
      p = os.path.join(self.path, PAYLOAD_DIR, payload_name(i))
      fd, st = _open_regular(p, 'payload file')
      want, offset = self.header.payloads[i][0], 0
    if st.st_size != want:
      os.close(fd)
      raise errors.TamperedPackageError(
          f'{self.path} changed while it was being read (payload {i} has the '
          'wrong size); fetch a fresh copy')
    return fd, offset

  def read_stream_header(self, fd: int, offset: int) -> bytes:
    buf = bytearray(streaming.HEADER_SIZE)
    if _fsutil.read_into_exact(fd, buf, offset) != len(buf):
      raise errors.TamperedPackageError('payload stream is truncated')
    return bytes(buf)


def _segment_opener(src: _Source, index: int, sc: streaming.StreamCipher,
                    fd: int, offset: int, ct_size: int,
                    ct_hash):
  """A read_segment(i, mv) that decrypts old segment i into mv (rotation),
  feeding the ciphertext into `ct_hash` (check it with _check_ciphertext)."""
  del src  # unused
  n = streaming.segments_of_ciphertext(ct_size)
  cbuf = bytearray(streaming.SEGMENT_SIZE)

  def read_segment(i, mv):
    off, ln = streaming.ciphertext_segment(i, ct_size)
    seg = memoryview(cbuf)[:ln]
    if _fsutil.read_into_exact(fd, seg, offset + off) != ln:
      raise errors.TamperedPackageError(f'payload {index} is truncated')
    ct_hash.update(seg)
    k = sc.decrypt_into(i, i == n - 1, seg, mv)
    if k != len(mv):
      raise errors.TamperedPackageError(f'payload {index} has a bad segment')
  return read_segment


def _check_ciphertext(h: Header, index: int, ct_hash) -> None:
  """The streamed ciphertext must be the one the header (and so the
  signature) names: a recipient cannot re-encrypt a payload (§10 step 6)."""
  if not hmac.compare_digest(ct_hash.hexdigest(), h.payloads[index][1]):
    raise errors.TamperedPackageError(
        f'payload {index} does not match its ciphertext digest in the '
        'header: it was re-encrypted or modified after signing')


def _open_stream(src: _Source, h: Header, keys: header_lib.DerivedKeys,
                 index: int):
  """Open payload `index`: (fd, offset, stream cipher, ciphertext hash
  already fed with the stream header)."""
  fd, offset = src.open_payload(index)
  try:
    sh = src.read_stream_header(fd, offset)
    sc = streaming.StreamCipher.from_header(
        h.suite, keys.stream_key,
        header_lib.payload_aad(h.package_id, index, h.ctx_digest), sh)
  except BaseException:
    os.close(fd)
    raise
  ct_hash = digest_lib.new_hash(h.hash_alg)
  ct_hash.update(sh)
  return fd, offset, sc, ct_hash


def _decrypt_payload(src: _Source, h: Header, keys: header_lib.DerivedKeys,
                     index: int, entry: FileEntry,
                     sink: Callable[[memoryview], None],
                     progress: Progress = None) -> None:
  """Open payload `index` segment by segment into `sink`, then check its
  plaintext digest. `sink` gets a reused buffer: copy it if you keep it."""
  ct_size = h.payloads[index][0]
  if ct_size != streaming.ciphertext_size(entry.size):
    raise errors.TamperedPackageError(
        f'payload {index} size does not match the file table')
  fd, offset, sc, ct_hash = _open_stream(src, h, keys, index)
  try:
    n = streaming.num_segments(entry.size)
    ph = digest_lib.new_hash(h.hash_alg)

    def open_segment(i: int, cipher: memoryview, plain: memoryview) -> int:
      """Read, hash and decrypt ciphertext segment i into `plain`."""
      off, ln = streaming.ciphertext_segment(i, ct_size)
      seg = cipher[:ln]
      if _fsutil.read_into_exact(fd, seg, offset + off) != ln:
        raise errors.TamperedPackageError(f'payload {index} is truncated')
      ct_hash.update(seg)
      return sc.decrypt_into(i, i == n - 1, seg, plain)

    def consume(mv: memoryview) -> None:
      ph.update(mv)
      sink(mv)
      if progress:
        progress(len(mv))

    if n < PIPELINE_MIN_SEGMENTS:
      plain, cipher = memoryview(_BUFS.plain), memoryview(_BUFS.cipher)
      for i in range(n):
        _signals.check()
        k = open_segment(i, cipher, plain)
        consume(plain[:k])
    else:
      _open_pipelined(n, open_segment, consume)
    _check_ciphertext(h, index, ct_hash)
    if ph.hexdigest() != entry.digest:
      raise errors.TamperedPackageError(
          f'{_text.printable(entry.path)}: plaintext digest does not match '
          'the signed file '
          'table; the package was modified by a key holder')
  finally:
    os.close(fd)


def _open_pipelined(n: int,
                    open_segment: Callable[[int, memoryview, memoryview], int],
                    consume: Callable[[memoryview], None]) -> None:
  """Decrypt a large payload with two threads (the mirror of _seal_stream).

  A helper thread reads segment i + 1, hashes its ciphertext and decrypts
  it while this thread hashes segment i's plaintext and hands it to the
  sink, so the two digests run on two cores even for a model that is one
  large variables shard. Segments reach `consume` in order; the first
  error on either side stops both, and this thread raises it.
  """
  free: 'queue.Queue' = queue.Queue()
  for _ in range(_PIPELINE_DEPTH):
    free.put(bytearray(streaming.PLAINTEXT_SEGMENT_SIZE))
  ready: 'queue.Queue' = queue.Queue()
  stop = threading.Event()

  def produce():
    cipher = memoryview(bytearray(streaming.SEGMENT_SIZE))
    try:
      for i in range(n):
        buf = free.get()
        if stop.is_set():
          return
        _signals.check()
        ready.put((buf, open_segment(i, cipher, memoryview(buf))))
    except BaseException as e:  # pylint: disable=broad-except
      ready.put(e)

  opener = threading.Thread(target=produce, name='tfxe-open-reader',
                            daemon=True)
  opener.start()
  try:
    for _ in range(n):
      item = ready.get()
      if isinstance(item, BaseException):
        raise item
      buf, k = item
      _signals.check()
      consume(memoryview(buf)[:k])
      free.put(buf)
  finally:
    stop.set()
    free.put(bytearray(0))  # wakes the helper if it waits for a buffer
    opener.join()


def _decrypt_file_table(h: Header, keys: header_lib.DerivedKeys
                        ) -> Tuple[List[FileEntry], List[str]]:
  data = streaming.decrypt_bytes(
      h.suite, keys.stream_key,
      header_lib.file_table_aad(h.package_id, h.ctx_digest), h.file_table)
  entries, dirs = header_lib.decode_file_table(data, len(h.payloads))
  for i, e in enumerate(entries):
    if h.payloads[i][0] != streaming.ciphertext_size(e.size):
      raise errors.TamperedPackageError(
          f'payload {i} size does not match the file table')
  if digest_lib.root_digest(h.hash_alg, (e.digest for e in entries)) != \
      h.fingerprint:
    raise errors.TamperedPackageError(
        'the model fingerprint does not match the file table')
  return entries, dirs


def _open_authenticated(package: str, identities, trusted, allow_unsigned,
                        before_unwrap: Optional[
                            Callable[['_Source', Header, bool], None]] = None,
                        policy: Optional[policy_lib.Policy] = None):
  """Open, verify the signature, then unwrap and check the whole header.

  `policy` is checked against the context right after the signature (a
  refused package costs no key call); then `before_unwrap(src, header,
  verified)` may refuse the package before any key call.
  """
  # Keys first: a key in the wrong role is refused before the package is
  # read, and `-` (stdin) is read before anything else can fail.
  trusted = _backends(trusted, 'trust')
  identities = _backends(identities, 'identity')
  src = _Source(os.fspath(package))
  h = src.header
  verified = _verify_signature(h, trusted, allow_unsigned)
  if policy is not None:  # §10 step 3: after the signature, before any key
    policy.check(h.context)
  if before_unwrap is not None:
    before_unwrap(src, h, verified)
  _, keys = _unwrap(h, identities)
  h.check_mac(keys.mac_key)
  entries, dirs = _decrypt_file_table(h, keys)
  return src, h, keys, entries, dirs, verified


# --- public API -----------------------------------------------------------------

def inspect_package(package) -> PackageInfo:
  """What the header says, without any key. The signer is *not* verified."""
  src = _Source(os.fspath(package))
  return _info(src.header, src.path, src.bundle, src.header_len)


def verify_package(package, *, trusted: Sequence[KeyLike] = (),
                   allow_unsigned: bool = False, workers: Optional[int] = None,
                   policy: Optional[policy_lib.Policy] = None
                   ) -> PackageInfo:
  """Key-less check: the signature, then every payload's ciphertext digest.

  With `policy`, the signed context must also satisfy it (PolicyError,
  checked right after the signature, before any payload is read).
  """
  trusted = _backends(trusted, 'trust')
  src = _Source(os.fspath(package))
  h = src.header
  verified = _verify_signature(h, trusted, allow_unsigned)
  if policy is not None:
    policy.check(h.context)

  def check(i):
    size, want = h.payloads[i]
    fd, offset = src.open_payload(i)
    try:
      hh = digest_lib.new_hash(h.hash_alg)
      buf = memoryview(bytearray(min(size, 4 << 20)))
      pos = 0
      while pos < size:
        ln = min(len(buf), size - pos)
        if _fsutil.read_into_exact(fd, buf[:ln], offset + pos) != ln:
          raise errors.TamperedPackageError(f'payload {i} is truncated')
        hh.update(buf[:ln])
        pos += ln
      if hh.hexdigest() != want:
        raise errors.TamperedPackageError(
            f'payload {i} does not match its digest in the header; the '
            'package was modified')
    finally:
      os.close(fd)
  _run_parallel(check, range(len(h.payloads)), workers or default_workers())
  return _info(h, src.path, src.bundle, src.header_len, verified)


# --- building blocks for package writers (encrypt, rotate, Beam) -----------------

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
                     cipher: str = 'aes-256-gcm', hash_alg: str = 'sha256',
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


def start_package(package: str, force: bool = False) -> str:
  """Create the private temporary sibling `tmp/payload/` for a new package."""
  package = _fsutil.check_output(package, force=force)
  tmp = _fsutil.temp_sibling(package)
  os.mkdir(tmp, 0o700)
  try:
    os.mkdir(os.path.join(tmp, PAYLOAD_DIR), 0o700)
  except BaseException:
    _fsutil.remove_tree(tmp)
    raise
  return tmp


def finish_package(env: Envelope, tmp: str, package: str, *,
                   entries: Sequence[FileEntry], dirs: Sequence[str],
                   payloads: Sequence[Tuple[int, str]],
                   signer: Optional[KeyBackend], bundle: bool,
                   force: bool = False, fsync: bool = False
                   ) -> Tuple[Header, int]:
  """Build, MAC and sign the header over the sealed payloads in `tmp`, then
  publish the package atomically (directory form, or a bundle).

  Returns (header, header length). On failure the caller removes `tmp`;
  anything this function created besides it is removed here.
  """
  h = Header(
      suite=env.suite, hash_alg=env.hash_alg, package_id=env.package_id,
      created=_now(), context=env.context, recipients=env.stanzas,
      threshold=env.threshold, commitment=env.keys.commitment,
      fingerprint=digest_lib.root_digest(env.hash_alg,
                                         (e.digest for e in entries)),
      payloads=list(payloads),
      file_table=streaming.encrypt_bytes(
          env.suite, env.keys.stream_key,
          header_lib.file_table_aad(env.package_id, env.ctx_digest),
          header_lib.encode_file_table(entries, dirs)))
  seal_header(h, env.keys.mac_key, signer)
  hbytes = h.serialize()
  pdir = os.path.join(tmp, PAYLOAD_DIR)
  if bundle:
    out_tmp = _fsutil.temp_sibling(package)
    try:
      _write_bundle(out_tmp, hbytes, pdir, len(payloads), fsync)
      _fsutil.publish(out_tmp, package, force=force)
    except BaseException:
      _fsutil.remove_tree(out_tmp)
      raise
    _fsutil.remove_tree(tmp)
  else:
    hfd = _create(os.path.join(tmp, HEADER_NAME), 0o644)
    try:
      _fsutil.write_all(hfd, hbytes)
      if fsync:
        os.fsync(hfd)
    finally:
      os.close(hfd)
    os.chmod(pdir, 0o755)
    os.chmod(tmp, 0o755)
    if fsync:
      _fsutil.fsync_dir(pdir)
      _fsutil.fsync_dir(tmp)
    _fsutil.publish(tmp, package, force=force)
  if fsync:
    _fsutil.fsync_dir(os.path.dirname(package))
  return h, len(hbytes)


def encrypt_model(src_dir, package, *,
                  recipients: Optional[Sequence[KeyLike]] = None,
                  key_groups: Optional[Sequence[Sequence[KeyLike]]] = None,
                  threshold: Optional[int] = None,
                  signer: Optional[KeyLike] = None,
                  context: Optional[Mapping[str, str]] = None,
                  cipher: str = 'aes-256-gcm', hash_alg: str = 'sha256',
                  bundle: bool = False, force: bool = False,
                  progress: Progress = None, workers: Optional[int] = None,
                  fsync: bool = False, any_dir: bool = False) -> PackageInfo:
  """Encrypt a model directory into a package (directory, or `.tfxe` bundle).

  The data key is wrapped once per recipient (one KMS call each) before any
  payload is written. The package is written into a temporary sibling and
  renamed into place; on any error nothing is left behind.

  Either `recipients` (any one of them decrypts), or `key_groups` (a list
  of n lists of keys) and `threshold` k: the data key is Shamir-split so
  that recipients from k distinct groups are needed (FORMAT.md §7.1).

  `src_dir` must look like a model (a saved_model.pb, *.keras, ... in it;
  see :func:`scan_model`) unless `any_dir`; a tree holding a tfx-encrypt
  package or temporary file is refused either way.
  """
  package = os.path.abspath(os.fspath(package))
  streaming.suite_for_cipher(cipher)
  digest_lib.new_hash(hash_alg)
  _check_user_context(context)
  sign_with = resolve_signer(signer)
  package = _fsutil.check_output(package, force=force, sources=[src_dir])
  files, dirs = scan_model(os.fspath(src_dir), any_dir=any_dir)
  env = prepare_envelope(recipients, context=context, cipher=cipher,
                         hash_alg=hash_alg, key_groups=key_groups,
                         threshold=threshold)
  tmp = start_package(package, force)
  try:
    pdir = os.path.join(tmp, PAYLOAD_DIR)
    results: Dict[int, Tuple[str, str, int]] = {}

    def encrypt_one(i):
      f = files[i]
      fd = _open_source(f)
      try:
        out = _create(os.path.join(pdir, payload_name(i)), 0o644)
        try:
          read_segment, check_eof = _file_reader(fd, f.path, f.size)
          results[i] = _seal_stream(read_segment, f.size, env.new_stream(i),
                                    out, hash_alg, progress)
          check_eof()
          if fsync:
            os.fsync(out)
        finally:
          os.close(out)
      finally:
        os.close(fd)

    order = sorted(range(len(files)), key=lambda i: -files[i].size)
    _run_parallel(encrypt_one, order, workers or default_workers())
    h, hlen = finish_package(
        env, tmp, package,
        entries=[FileEntry(f.path, f.size, results[i][0])
                 for i, f in enumerate(files)],
        dirs=dirs,
        payloads=[(results[i][2], results[i][1]) for i in range(len(files))],
        signer=sign_with, bundle=bundle, force=force, fsync=fsync)
  except BaseException:
    _fsutil.remove_tree(tmp)
    raise
  return _info(h, package, bundle, hlen, verified=sign_with is not None,
               plaintext_bytes=sum(f.size for f in files))


def _write_bundle(path: str, hbytes: bytes, pdir: str, count: int,
                  fsync: bool) -> None:
  out = _create(path, 0o644)
  try:
    _fsutil.write_all(out, hbytes)
    for i in range(count):
      fd, st = _open_regular(os.path.join(pdir, payload_name(i)),
                             'payload file')
      try:
        _copy_fd(fd, out, st.st_size)
      finally:
        os.close(fd)
    if fsync:
      os.fsync(out)
  finally:
    os.close(out)


def bundle_directory_package(package, out) -> None:
  """Write the bundle form of a directory package to the new file `out`.

  The same bytes, one file (FORMAT.md §2): the header, then the payloads in
  index order, copied by the kernel. The directory is validated first
  (header parse, exact payload set and sizes, no links).
  """
  src = _Source(os.fspath(package))
  if src.bundle:
    raise errors.UsageError(f'{src.path} is already a bundle')
  fd, _ = _open_regular(os.path.join(src.path, HEADER_NAME), 'package header')
  try:
    hbytes = bytearray(src.header_len)
    if _fsutil.read_into_exact(fd, hbytes, 0) != src.header_len:
      raise errors.TamperedPackageError(f'{src.path}: header is truncated')
  finally:
    os.close(fd)
  _write_bundle(os.fspath(out), bytes(hbytes),
                os.path.join(src.path, PAYLOAD_DIR), len(src.header.payloads),
                fsync=False)


def _copy_fd(src: int, dst: int, size: int, src_offset: int = 0) -> None:
  """Kernel-side copy of `size` bytes (copy_file_range), with a fallback."""
  copied = 0
  if hasattr(os, 'copy_file_range'):
    try:
      while copied < size:
        n = os.copy_file_range(src, dst, size - copied, src_offset + copied)
        if n == 0:
          break
        copied += n
    except OSError:
      pass
  buf = memoryview(bytearray(1 << 20))
  while copied < size:
    ln = min(len(buf), size - copied)
    got = _fsutil.read_into_exact(src, buf[:ln], src_offset + copied)
    if got != ln:
      raise errors.TamperedPackageError('payload is truncated')
    _fsutil.write_all(dst, buf[:ln])
    copied += ln


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%dT%H:%M:%SZ')


def decrypt_model(package, out_dir, *, identities: Sequence[KeyLike],
                  trusted: Sequence[KeyLike] = (), allow_unsigned: bool = False,
                  force: bool = False, progress: Progress = None,
                  workers: Optional[int] = None, fsync: bool = False,
                  policy: Optional[policy_lib.Policy] = None
                  ) -> PackageInfo:
  """Verify and decrypt a package into `out_dir`, atomically.

  The signature is checked against `trusted` before any key is unwrapped;
  unsigned packages are refused unless `allow_unsigned`. Then `policy`, if
  given, is checked against the signed context (PolicyError), still before
  any key call. Plaintext is written only into a private (0700) temporary
  sibling of `out_dir`, which is renamed into place on success and deleted
  on any failure.
  """
  out_dir = _fsutil.check_output(out_dir, force=force, sources=[package])
  src, h, keys, entries, dirs, verified = _open_authenticated(
      package, identities, trusted, allow_unsigned, policy=policy)
  parent = os.path.dirname(out_dir)
  if not os.path.isdir(parent):
    raise errors.UsageError(f'parent directory {parent} does not exist')
  tmp = _fsutil.temp_sibling(out_dir)
  os.mkdir(tmp, 0o700)
  try:
    for d in dirs:  # sorted, so parents come first
      os.mkdir(os.path.join(tmp, *d.split('/')), 0o700)

    files = _fsutil.UnlinkedFiles(len(entries))

    def decrypt_one(i):
      e = entries[i]
      path = os.path.join(tmp, *e.path.split('/'))
      out = files.create(path, 0o600)
      try:
        _decrypt_payload(src, h, keys, i, e,
                         lambda mv: _fsutil.write_all(out, mv), progress)
        if fsync:
          os.fsync(out)
      except OSError as err:
        files.discard(out)
        if err.filename is not None or err.errno is None:
          raise
        # write()/fsync() name no file (disk full, EFBIG): say which one.
        raise OSError(err.errno, err.strerror, path) from err
      except BaseException:
        files.discard(out)
        raise
      files.done(path, out)

    order = sorted(range(len(entries)), key=lambda i: -entries[i].size)
    try:
      _run_parallel(decrypt_one, order, workers or default_workers())
      with _signals.deferred():
        files.link_all()
    finally:
      files.close_all()
    _fsutil.mark_decrypted(tmp, out_dir)
    _fsutil.publish(tmp, out_dir, force=force)
  except BaseException:
    _fsutil.remove_tree(tmp)
    raise
  return _info(h, src.path, src.bundle, src.header_len, verified,
               plaintext_bytes=sum(e.size for e in entries))


def iter_decrypted_files(package, *, identities: Sequence[KeyLike],
                         trusted: Sequence[KeyLike] = (),
                         allow_unsigned: bool = False,
                         policy: Optional[policy_lib.Policy] = None):
  """Yield (relpath, bytes) for every file, decrypted in memory only.

  For runtimes that load a model without writing plaintext to disk. Each
  file's digest is checked before it is yielded, and the fingerprint was
  checked against the authenticated file table, so a consumer only ever
  sees authentic bytes. `policy` is checked as in :func:`decrypt_model`,
  when the first file is asked for (this is a generator).
  """
  src, h, keys, entries, dirs, _ = _open_authenticated(
      package, identities, trusted, allow_unsigned, policy=policy)
  del dirs
  for i, e in enumerate(entries):
    data = bytearray()
    _decrypt_payload(src, h, keys, i, e, data.extend)
    yield e.path, bytes(data)


def _write_header_only(src: _Source, h: Header) -> None:
  """Atomically replace a package's header, keeping its payloads."""
  hbytes = h.serialize()
  if not src.bundle:
    hpath = os.path.join(src.path, HEADER_NAME)
    tmp = _fsutil.temp_sibling(hpath)
    try:
      fd = _create(tmp, 0o644)
      try:
        _fsutil.write_all(fd, hbytes)
        os.fsync(fd)
      finally:
        os.close(fd)
      _fsutil.publish(tmp, hpath, force=True)  # a header: replaceable
    except BaseException:
      _fsutil.remove_tree(tmp)
      raise
    return
  tmp = _fsutil.temp_sibling(src.path)
  out = _create(tmp, 0o644)
  try:
    _fsutil.write_all(out, hbytes)
    fd, _ = _open_regular(src.path, 'bundle')
    try:
      _copy_fd(fd, out, h.ciphertext_bytes, src.header_len)
    finally:
      os.close(fd)
    os.fsync(out)
    os.close(out)
    out = None
    _fsutil.publish(tmp, src.path, force=True)  # a bundle: replaceable
  except BaseException:
    if out is not None:
      os.close(out)
    _fsutil.remove_tree(tmp)
    raise


def rewrap_package(package, *, identities: Sequence[KeyLike],
                   add_recipients: Sequence[KeyLike] = (),
                   remove_recipients: Sequence[KeyLike] = (),
                   add_to_group: Optional[int] = None,
                   signer: Optional[KeyLike] = None,
                   trusted: Sequence[KeyLike] = (),
                   allow_unsigned: bool = False,
                   resign_unsigned: bool = False) -> PackageInfo:
  """Change who can decrypt, without touching the payload (O(header)).

  The DEK is unwrapped with one identity (at most one KMS call), wrapped
  once for each added recipient, and the header is rewritten atomically.
  Removing a recipient does not revoke a DEK it has already seen; use
  :func:`rotate_package` after a suspected leak.

  The current signature is checked first, before any key call: pass the
  publisher's keys in `trusted`, or `allow_unsigned=True` to accept an
  unsigned package. A package signed by a key not in `trusted` is refused
  either way. An unsigned package is signed by `signer` only with
  `resign_unsigned=True` (and a warning is logged), so a signature never
  vouches for a package nobody verified.

  For a package with key groups, the identities must open k groups; added
  recipients join group `add_to_group` (they get that group's share), and
  removals must leave every group non-empty. The threshold and the number
  of groups never change here: use :func:`rotate_package` for that.
  """
  trust = _backends(trusted, 'trust')
  _require_trust_choice(trust, allow_unsigned, 'rewrap')
  identities = _backends(identities, 'identity')
  sign_with = _backend(signer, 'signer') if signer is not None else None
  adds = _backends(add_recipients, 'recipient', '--add-recipient')
  src = _Source(os.fspath(package))
  h = src.header
  verified = _verify_signature(h, trust, allow_unsigned)
  if h.signer is not None and sign_with is None:
    raise errors.UsageError(
        f'package is signed by {_text.printable(h.signature.key_id)}; '
        'rewrapping changes the '
        'header, so pass --sign-with KEY to re-sign it')
  _check_resign(src.path, h, verified, sign_with, resign_unsigned)
  remove_ids, removing = set(), {}
  for r in (remove_recipients or ()):
    # A key id, or any key (public, private, KMS): only its id is used.
    if isinstance(r, str) and (r.startswith('sha256:') or
                               any(s.key_id == r for s in h.recipients)):
      remove_ids.add(r)
      removing[r] = _text.printable(r)
    else:
      gone = _backend(r, None)
      remove_ids.add(gone.key_id)
      removing[gone.key_id] = gone.describe()
  unknown = remove_ids - {s.key_id for s in h.recipients}
  if unknown:
    raise errors.UsageError(
        f'cannot remove {", ".join(removing[u] for u in sorted(unknown))}: '
        'not a recipient of this package (see "tfx-encrypt inspect")')
  if h.threshold is not None:
    return _rewrap_groups(src, h, identities, adds, remove_ids,
                          add_to_group, sign_with)
  if add_to_group is not None:
    raise errors.UsageError(
        'this package has no key groups (any one recipient decrypts it), so '
        'there is no group to add to; drop --add-to-group, or use rotate '
        'with --key-group to create groups')
  # Plan everything before any key call.
  recipients = [s for s in h.recipients if s.key_id not in remove_ids]
  existing = {s.key_id for s in recipients}
  new = []
  for a in adds:
    if a.key_id not in existing:
      existing.add(a.key_id)
      new.append(a)
  if not recipients and not new:
    raise errors.UsageError(
        'rewrap would leave the package with no recipient; add one with '
        '--add-recipient')
  if len(recipients) + len(new) > header_lib.MAX_RECIPIENTS:
    raise errors.UsageError(
        f'a package can have at most {header_lib.MAX_RECIPIENTS} recipients')
  dek, keys = _unwrap(h, identities)
  h.check_mac(keys.mac_key)
  _decrypt_file_table(h, keys)  # full header authentication before changing
  wctx = WrapContext(h.package_id, h.context)
  recipients.extend(a.wrap(dek, wctx) for a in new)  # one call per recipient
  del dek
  h.recipients = recipients
  seal_header(h, keys.mac_key, sign_with)
  _write_header_only(src, h)
  return _info(h, src.path, src.bundle, len(h.serialize()),
               verified=sign_with is not None)


def _rewrap_groups(src: '_Source', h: Header, identities: List[KeyBackend],
                   adds: List[KeyBackend], remove_ids: set,
                   add_to_group: Optional[int],
                   sign_with: Optional[KeyBackend]) -> PackageInfo:
  """rewrap_package for a package with key groups (FORMAT.md §7.1)."""
  kg = h.threshold
  if adds and add_to_group is None:
    raise errors.UsageError(
        f'this package needs {kg.k} of {kg.n} key groups; say which group '
        f'(0 to {kg.n - 1}) the new recipients join with --add-to-group N')
  if add_to_group is not None and (
      type(add_to_group) is not int or not 0 <= add_to_group < kg.n):  # pylint: disable=unidiomatic-typecheck
    raise errors.UsageError(
        f'--add-to-group must be a key group number from 0 to {kg.n - 1} '
        f'(got {add_to_group!r}; see "tfx-encrypt inspect")')
  # Plan everything before any key call.
  members = [[h.recipients[i] for i in g if h.recipients[i].key_id
              not in remove_ids] for g in kg.groups]
  new = []
  if adds:
    where = {s.key_id: gi for gi, g in enumerate(members) for s in g}
    for a in adds:
      gi = where.get(a.key_id)
      if gi is not None and gi != add_to_group:
        raise errors.UsageError(
            f'key {a.describe()} is already a recipient in key group {gi}; a key '
            'may be in only one group (it would hold two shares)')
      if gi is None:
        where[a.key_id] = add_to_group
        new.append(a)
  for gi, g in enumerate(members):
    if not g and not (new and gi == add_to_group):
      raise errors.UsageError(
          f'rewrap would leave key group {gi} with no recipient; add one with '
          f'--add-recipient KEY --add-to-group {gi}, or use rotate to change '
          'the key groups')
  if sum(len(g) for g in members) + len(new) > header_lib.MAX_RECIPIENTS:
    raise errors.UsageError(
        f'a package can have at most {header_lib.MAX_RECIPIENTS} recipients')
  dek, keys, shares = open_key_groups(
      identities, h.recipients, h.package_id, h.context, h.suite,
      h.commitment, kg)
  del dek
  h.check_mac(keys.mac_key)
  _decrypt_file_table(h, keys)  # full header authentication before changing
  if new:
    share = shamir.interpolate(list(shares.values()), add_to_group + 1)
    wctx = share_context(h.package_id, h.context, add_to_group)
    for a in new:
      members[add_to_group].append(a.wrap(share, wctx))
    del share
  del shares
  stanzas, indices = [], []
  for g in members:
    indices.append(list(range(len(stanzas), len(stanzas) + len(g))))
    stanzas.extend(g)
  h.recipients = stanzas
  h.threshold = KeyGroups(kg.k, indices)
  seal_header(h, keys.mac_key, sign_with)
  _write_header_only(src, h)
  return _info(h, src.path, src.bundle, len(h.serialize()),
               verified=sign_with is not None)


def rotate_package(package, out, *, identities: Sequence[KeyLike],
                   recipients: Optional[Sequence[KeyLike]] = None,
                   key_groups: Optional[Sequence[Sequence[KeyLike]]] = None,
                   threshold: Optional[int] = None,
                   trusted: Sequence[KeyLike] = (),
                   allow_unsigned: bool = False,
                   signer: Optional[KeyLike] = None,
                   context: Optional[Mapping[str, str]] = None,
                   cipher: Optional[str] = None, bundle: Optional[bool] = None,
                   force: bool = False, progress: Progress = None,
                   workers: Optional[int] = None,
                   resign_unsigned: bool = False,
                   policy: Optional[policy_lib.Policy] = None) -> PackageInfo:
  """Re-encrypt under a fresh DEK (after a suspected DEK leak).

  Streams each payload segment from the old package through decryption and
  re-encryption in memory: plaintext never touches the disk. The new
  package is for `recipients`, or for `key_groups` with `threshold` (as in
  :func:`encrypt_model`), whatever the old one had.

  The old package's signature is checked against `trusted` before any key
  call (or `allow_unsigned=True` accepts an unsigned one); an unsigned
  package is signed by `signer` only with `resign_unsigned=True`, as in
  :func:`rewrap_package`. `policy` is checked against the old package's
  context right after its signature, before any key call (PolicyError).
  """
  out = _fsutil.check_output(out, force=force, sources=[package])
  _require_trust_choice(trusted, allow_unsigned, 'rotate')
  _plan_recipients(recipients, key_groups, threshold)  # fail before any call
  sign_with = resolve_signer(signer)
  src, h, old_keys, entries, dirs, _ = _open_authenticated(
      package, identities, trusted, allow_unsigned,
      before_unwrap=lambda s, hh, verified: _check_resign(
          s.path, hh, verified, sign_with, resign_unsigned), policy=policy)
  env = prepare_envelope(
      recipients, context=h.context if context is None else context,
      hash_alg=h.hash_alg,
      suite=streaming.suite_for_cipher(cipher) if cipher else h.suite,
      key_groups=key_groups, threshold=threshold)
  bundle = src.bundle if bundle is None else bundle
  tmp = start_package(out, force)
  try:
    pdir = os.path.join(tmp, PAYLOAD_DIR)
    results = {}

    def rotate_one(i):
      e = entries[i]
      fd, offset, old_sc, ct_hash = _open_stream(src, h, old_keys, i)
      try:
        read_segment = _segment_opener(src, i, old_sc, fd, offset,
                                       h.payloads[i][0], ct_hash)
        outfd = _create(os.path.join(pdir, payload_name(i)), 0o644)
        try:
          results[i] = _seal_stream(read_segment, e.size, env.new_stream(i),
                                    outfd, h.hash_alg, progress)
        finally:
          os.close(outfd)
      finally:
        os.close(fd)
      _check_ciphertext(h, i, ct_hash)
      if results[i][0] != e.digest:
        raise errors.TamperedPackageError(
            f'{_text.printable(e.path)}: plaintext digest does not match the '
            'file table')

    order = sorted(range(len(entries)), key=lambda i: -entries[i].size)
    _run_parallel(rotate_one, order, workers or default_workers())
    nh, hlen = finish_package(
        env, tmp, out, entries=entries, dirs=dirs,
        payloads=[(results[i][2], results[i][1]) for i in range(len(entries))],
        signer=sign_with, bundle=bundle, force=force)
  except BaseException:
    _fsutil.remove_tree(tmp)
    raise
  return _info(nh, out, bundle, hlen, verified=sign_with is not None,
               plaintext_bytes=sum(e.size for e in entries))
