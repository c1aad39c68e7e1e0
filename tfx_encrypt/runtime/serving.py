"""Keep a TF Serving model base path in sync with an encrypted push destination.

`sync_serving(source_base, serving_base, ...)` looks at the versions that
EncryptPusher (or anyone else) pushed to `source_base` -- `<version>/`
directories holding a package (`tfxe.header` + `payload/`, or one `*.tfxe`
bundle such as `model.tfxe`) and `<version>.tfxe` bundle files -- verifies the
publisher of the newest ones, decrypts them into `serving_base/<version>/`
atomically and removes the older versions it installed itself. TF Serving,
pointed at `serving_base` with `--model_base_path`, picks them up.

Standard library and the tfx-encrypt core only: no TensorFlow, so a serving
host needs nothing but `pip install tfx-encrypt`. `source_base` is a local
(or mounted) directory, or a `gs://` / `s3://` push base (the `[gcp]` /
`[aws]` extra): versions are then listed from the store, and each new one is
verified and decrypted straight from it (ranged reads, bounded memory, no
ciphertext staged locally). A version whose payload objects are there but
whose `tfxe.header` is not (a push still running, or one that failed: the
header is a push's commit point) is reported `incomplete`, never installed,
and looked at again on the next sync. `serving_base` is always local: TF
Serving loads from a path.

Layout of `serving_base` (TF Serving only loads directories whose names are
integers, so every name below that is not a version starts with a dot):

  <version>/              published model, owned by tfx-encrypt if it is
                          listed in .tfxe-managed.json, left alone otherwise
  .tfxe-managed.json      marker: the versions tfx-encrypt installed, with
                          package id, fingerprint, signer and source
  .tfxe-sync.lock         flock(2) so that two syncs never race
  .tfxe-tmp-<random>/     staging directory of a decryption in progress
  .tfxe-old-<random>      a version being removed

Every failure of one version (tampered, untrusted signer, refused by the
consumer policy, no key, conflicting directory) is reported in the returned
`SyncResult` and logged; nothing is published for it, and the other versions
are still synced.
"""

import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt import package as package_lib
from tfx_encrypt import policy as policy_lib
from tfx_encrypt import storage
from tfx_encrypt.package import KeyLike

logger = logging.getLogger(__name__)

MARKER_NAME = '.tfxe-managed.json'
LOCK_NAME = '.tfxe-sync.lock'
TMP_PREFIX = '.tfxe-tmp-'
OLD_PREFIX = '.tfxe-old-'
MARKER_FORMAT = 1

#: A version name: a canonical non-negative integer that fits TF Serving's
#: int64 version numbers (no sign, no leading zero: `007` and `7` would be
#: the same version for TF Serving).
_VERSION_RE = re.compile(r'0|[1-9][0-9]{0,18}')
_DIGITS_RE = re.compile(r'[0-9]+')
_BUNDLE_RE = re.compile(r'([0-9]+)' + re.escape(package_lib.BUNDLE_SUFFIX))
#: An object under `<version>/` that belongs to an incomplete push.
_PAYLOAD_OBJECT_RE = re.compile(
    re.escape(package_lib.PAYLOAD_DIR) + r'/[0-9]{8}')
#: Longest bundle object name under `<version>/` that is considered.
_MAX_NAME = 255



class ModelCheckError(errors.TfxEncryptError):
  """A decrypted version was rejected by the caller's `model_check`."""
  exit_code = 1


# Actions, in the order they are reported.
INSTALLED = 'installed'
KEPT = 'kept'
REMOVED = 'removed'
FAILED = 'failed'
#: A source version with payload objects but no header (a push running, or
#: one that failed): absent for serve-sync, reported, retried next sync.
INCOMPLETE = 'incomplete'


@dataclasses.dataclass
class SyncAction:
  """What happened to one version."""
  action: str  # installed | kept | removed | failed | incomplete
  version: str
  path: str  # serving_base/<version> (installed, kept, removed) or source
  source: Optional[str] = None
  package_id: Optional[str] = None
  fingerprint: Optional[str] = None
  signer: Optional[str] = None
  error: Optional[str] = None  # error class name, for `failed`
  message: Optional[str] = None

  def to_dict(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items()
            if v is not None}

  def line(self) -> str:
    """One human-readable line; every field is escaped (tfx_encrypt._text),
    since signer, paths and messages can come from a package."""
    f = {k: _text.printable(v, limit=None) if isinstance(v, str) else v
         for k, v in dataclasses.asdict(self).items()}
    if self.action == FAILED:
      return f'failed {f["version"]}: {f["error"]}: {f["message"]}'
    if self.action == INCOMPLETE:
      return f'incomplete {f["version"]} ({f["path"]}): {f["message"]}'
    if self.action == INSTALLED:
      who = (f'signed by trusted {f["signer"]}' if self.signer
             else 'UNSIGNED (accepted by allow_unsigned)')
      return (f'installed {f["version"]} into {f["path"]} from {f["source"]}; '
              f'{who}; fingerprint {f["fingerprint"]}')
    return f'{f["action"]} {f["version"]} ({f["path"]})'


class _Reported(list):
  """SyncResult.actions that passes each action to `report` as it is
  appended (sync_serving's `on_action`)."""

  def __init__(self, report):
    super().__init__()
    self._report = report

  def append(self, action: SyncAction) -> None:
    super().append(action)
    self._report(action)


@dataclasses.dataclass
class SyncResult:
  """Everything one `sync_serving` call did, in order."""
  source_base: str
  serving_base: str
  actions: List[SyncAction] = dataclasses.field(default_factory=list)

  def _of(self, action: str) -> List[SyncAction]:
    return [a for a in self.actions if a.action == action]

  @property
  def installed(self) -> List[SyncAction]:
    return self._of(INSTALLED)

  @property
  def kept(self) -> List[SyncAction]:
    return self._of(KEPT)

  @property
  def removed(self) -> List[SyncAction]:
    return self._of(REMOVED)

  @property
  def failed(self) -> List[SyncAction]:
    return self._of(FAILED)

  @property
  def incomplete(self) -> List[SyncAction]:
    """Versions skipped because their push is not complete (not failures)."""
    return self._of(INCOMPLETE)

  @property
  def ok(self) -> bool:
    """True when no version failed."""
    return not self.failed

  @property
  def changed(self) -> bool:
    return bool(self.installed or self.removed)

  def to_dict(self) -> dict:
    return {'source_base': self.source_base,
            'serving_base': self.serving_base,
            'ok': self.ok,
            'actions': [a.to_dict() for a in self.actions]}


# --- source ------------------------------------------------------------------

def _version_key(version: str) -> Tuple[int, str]:
  return int(version), version


@dataclasses.dataclass
class SourceVersions:
  """What `scan_source` found in a source base."""
  packages: Dict[str, str] = dataclasses.field(default_factory=dict)
  """{version: package path or URI} of the versions that hold a package."""
  bad: Dict[str, errors.TfxEncryptError] = dataclasses.field(
      default_factory=dict)
  """{version: why it is not a package} (reported failed)."""
  incomplete: Dict[str, str] = dataclasses.field(default_factory=dict)
  """{version: what is there} of pushes without their header yet."""


def _is_version(name: str, ignored: set) -> bool:
  """True for a canonical version name; other digit strings are collected
  in `ignored` (logged once per sync by `_log_ignored`)."""
  if _VERSION_RE.fullmatch(name):
    return True
  if _DIGITS_RE.fullmatch(name):
    ignored.add(name)
  return False


def _log_ignored(ignored: set, source_base: str) -> None:
  for name in sorted(ignored)[:20]:
    logger.warning(
        'serve-sync: ignoring %s in %s: not a canonical version number '
        '(no leading zero, at most 19 digits)', _text.printable(name, 64),
        _text.printable(source_base))


def _incomplete_message(what: str) -> str:
  return (f'{what} but no {package_lib.HEADER_NAME} (a push still running, '
          'or one that failed); not installed, looked at again on the next '
          'sync')


def _duplicate(version: str, source_base: str, names) -> errors.UsageError:
  return errors.UsageError(
      f'version {version} exists twice in {_text.printable(source_base)} '
      f'({", ".join(_text.printable(n) for n in sorted(names))}); '
      'remove one of them')


def _scan_local(source_base: str) -> SourceVersions:
  found: Dict[str, List[str]] = {}
  ignored = set()
  for name in os.listdir(source_base):
    path = os.path.join(source_base, name)
    m = _BUNDLE_RE.fullmatch(name)
    if m and os.path.isfile(path) and _is_version(m.group(1), ignored):
      found.setdefault(m.group(1), []).append(path)
    elif (_DIGITS_RE.fullmatch(name) and os.path.isdir(path) and
          _is_version(name, ignored)):
      found.setdefault(name, []).append(path)
  _log_ignored(ignored, source_base)
  out = SourceVersions()
  for version, paths in found.items():
    if len(paths) > 1:
      out.bad[version] = _duplicate(version, source_base,
                                    (os.path.basename(p) for p in paths))
      continue
    path = paths[0]
    if os.path.isdir(path) and not os.path.lexists(
        os.path.join(path, package_lib.HEADER_NAME)):
      names = os.listdir(path)
      bundles = sorted(n for n in names
                       if n.endswith(package_lib.BUNDLE_SUFFIX) and
                       os.path.isfile(os.path.join(path, n)))
      if len(bundles) != 1:
        if names == [package_lib.PAYLOAD_DIR]:  # payloads, no header (yet)
          out.incomplete[version] = _incomplete_message(
              f'{package_lib.PAYLOAD_DIR}/')
          continue
        out.bad[version] = errors.UnsupportedFormatError(
            f'{_text.printable(path)} holds neither a package '
            f'({package_lib.HEADER_NAME}) nor exactly one '
            f'*{package_lib.BUNDLE_SUFFIX} bundle (found {len(bundles)})')
        continue
      path = os.path.join(path, bundles[0])
    out.packages[version] = path
  return out


def _scan_store(source_base: str) -> SourceVersions:
  """The same layout on `gs://` / `s3://`: objects `V/tfxe.header` +
  `V/payload/NNNNNNNN` (EncryptPusher), `V/NAME.tfxe` or `V.tfxe`.

  Object names come from the store: only those whose version part is a
  canonical version number are used, a bundle name only if it is one
  plain name of at most 255 characters without control, separator or bidi
  characters; every name shown is escaped.
  """
  under: Dict[str, List[str]] = {}
  top: Dict[str, List[str]] = {}
  ignored = set()
  for name, size in sorted(storage.list_sizes(source_base).items()):
    if size == 0 and (name == '' or name.endswith('/')):
      continue  # a "folder" marker (consoles, gsutil, tf.io.gfile): empty
    first, slash, rest = name.partition('/')
    if not slash:
      m = _BUNDLE_RE.fullmatch(name)
      if m and _is_version(m.group(1), ignored):
        top.setdefault(m.group(1), []).append(name)
    elif _DIGITS_RE.fullmatch(first) and _is_version(first, ignored):
      under.setdefault(first, []).append(rest)
  _log_ignored(ignored, source_base)
  out = SourceVersions()
  for version in set(under) | set(top):
    names = under.get(version, [])
    shown = list(top.get(version, [])) + ([f'{version}/'] if names else [])
    if len(shown) > 1:  # as on disk: `V/` and `V.tfxe`, or two bundles
      out.bad[version] = _duplicate(version, source_base, shown)
      continue
    if not names:
      out.packages[version] = storage.join(source_base, top[version][0])
      continue
    where = storage.join(source_base, version)
    if package_lib.HEADER_NAME in names:
      out.packages[version] = where  # the directory form (checked on open)
      continue
    bundles = [n for n in names
               if '/' not in n and n.endswith(package_lib.BUNDLE_SUFFIX)]
    if len(bundles) == 1:
      b = bundles[0]
      if len(b) > _MAX_NAME or b.startswith('.') or _text.UNSAFE.search(b):
        out.bad[version] = errors.UnsafePathError(
            f'{_text.printable(where)} holds a bundle named '
            f'{_text.quoted(b, 64)}: only plain names (no leading dot, no '
            'control, separator or bidi characters, at most '
            f'{_MAX_NAME} characters) are read')
      else:
        out.packages[version] = storage.join(where, b)
    elif all(_PAYLOAD_OBJECT_RE.fullmatch(n) for n in names):
      out.incomplete[version] = _incomplete_message(
          f'{len(names)} payload object(s)')
    else:
      out.bad[version] = errors.UnsupportedFormatError(
          f'{_text.printable(where)} holds neither a package '
          f'({package_lib.HEADER_NAME}) nor exactly one '
          f'*{package_lib.BUNDLE_SUFFIX} bundle (found {len(bundles)} among '
          f'{len(names)} object(s))')
  return out


def scan_source(source_base: str) -> SourceVersions:
  """The versions of `source_base`: a local directory or a `gs://` /
  `s3://` push base.

  A version is a `<digits>/` directory (holding a directory package, or
  exactly one `*.tfxe` bundle) or a `<digits>.tfxe` bundle file; on a store
  the objects of that layout. A `<digits>/` holding only payloads and no
  header is incomplete (a push still running or one that failed). Hidden
  and other entries (e.g. EncryptPusher's `.tmp-*` push in progress) are
  ignored.
  """
  if storage.is_remote(source_base):
    return _scan_store(source_base)
  return _scan_local(source_base)


def list_source_versions(
    source_base: str
) -> Tuple[Dict[str, str], Dict[str, errors.TfxEncryptError]]:
  """Return ({version: package path}, {version: error}) of `source_base`.

  Incomplete versions (see `scan_source`) are in neither: they are absent.
  """
  found = scan_source(source_base)
  return found.packages, found.bad


# --- marker ------------------------------------------------------------------

def read_marker(serving_base: str) -> Dict[str, dict]:
  """The versions tfx-encrypt installed in `serving_base` ({} if none)."""
  path = os.path.join(serving_base, MARKER_NAME)
  try:
    with open(path, 'rb') as f:
      doc = json.loads(f.read().decode('utf-8'))
  except FileNotFoundError:
    return {}
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.UsageError(
        f'{path} is not valid JSON ({e}); restore it, or delete it to make '
        'tfx-encrypt treat every existing version as foreign (never '
        'removed)') from None
  if (not isinstance(doc, dict) or doc.get('format') != MARKER_FORMAT or
      not isinstance(doc.get('versions'), dict)):
    raise errors.UsageError(
        f'{path} is not a tfx-encrypt marker of format {MARKER_FORMAT}; '
        'restore it, or delete it to treat every existing version as foreign')
  return doc['versions']


def _write_marker(serving_base: str, versions: Dict[str, dict]) -> None:
  path = os.path.join(serving_base, MARKER_NAME)
  tmp = os.path.join(serving_base, f'{TMP_PREFIX}{os.urandom(6).hex()}.json')
  doc = {'format': MARKER_FORMAT,
         'comment': 'versions installed by tfx-encrypt serve-sync; only these '
                    'are ever removed',
         'versions': dict(sorted(versions.items(),
                                 key=lambda kv: _version_key(kv[0])))}
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  try:
    try:
      _fsutil.write_all(fd, (json.dumps(doc, indent=2) + '\n').encode())
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    _fsutil.remove_tree(tmp)
    raise


# --- helpers -----------------------------------------------------------------

def _make_group_readable(root: str) -> None:
  """0750 for directories, 0640 for files (no links: decrypt makes none).

  Iterative (os.walk recurses once per level before Python 3.12), so a
  model with a directory chain deeper than the recursion limit works.
  """
  os.chmod(root, 0o750)
  stack = [root]
  while stack:
    with os.scandir(stack.pop()) as it:
      for e in it:
        if e.is_dir(follow_symlinks=False):
          os.chmod(e.path, 0o750, follow_symlinks=False)
          stack.append(e.path)
        elif e.is_file(follow_symlinks=False):
          os.chmod(e.path, 0o640, follow_symlinks=False)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%dT%H:%M:%SZ')


def _fail(result: SyncResult, version: str, path: str, e: BaseException
          ) -> None:
  message = str(e) if isinstance(e, errors.TfxEncryptError) else (
      f'{getattr(e, "strerror", None) or e}'
      # Never a hidden temporary sibling's name: the destination it stood for.
      + (f' ({_fsutil.public_path(e.filename)})'
         if getattr(e, 'filename', None) else ''))
  logger.warning('serve-sync: version %s not published: %s: %s',
                 _text.printable(version), type(e).__name__,
                 _text.printable(message, limit=None))
  result.actions.append(SyncAction(FAILED, version, path, source=path,
                                   error=type(e).__name__, message=message))


def _clean_stale(serving_base: str) -> None:
  """Remove staging leftovers of an interrupted sync (we hold the lock)."""
  for name in os.listdir(serving_base):
    if name.startswith((TMP_PREFIX, OLD_PREFIX)):
      logger.info('serve-sync: removing leftover %s', _text.printable(name))
      _fsutil.remove_tree(os.path.join(serving_base, name))


class _Lock:
  """An exclusive, non-blocking flock on serving_base/.tfxe-sync.lock."""

  def __init__(self, serving_base: str):
    self.path = os.path.join(serving_base, LOCK_NAME)
    self.fd = -1

  def __enter__(self):
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(self.fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        raise errors.UsageError(
            f'another serve-sync is working on {os.path.dirname(self.path)} '
            f'(it holds {self.path}); run one sync per serving base') from None
      raise
    return self

  def __exit__(self, *exc):
    os.close(self.fd)  # releases the lock


def _install(version: str, package: str, serving_base: str,
             managed: Dict[str, dict], identities, trusted, allow_unsigned,
             group_readable: bool, model_check=None,
             policy: Optional[policy_lib.Policy] = None) -> SyncAction:
  """Decrypt `package` to serving_base/<version>; update `managed`."""
  target = os.path.join(serving_base, version)
  stage = os.path.join(serving_base, TMP_PREFIX + os.urandom(8).hex())
  os.mkdir(stage, 0o700)
  try:
    staged = os.path.join(stage, version)
    info = package_lib.decrypt_model(
        package, staged, identities=identities, trusted=trusted,
        allow_unsigned=allow_unsigned, policy=policy)
    if model_check is not None:
      try:
        model_check(staged)
      except Exception as e:  # pylint: disable=broad-except
        raise ModelCheckError(
            f'model_check rejected version {version}: {type(e).__name__}: '
            f'{e}') from e
    if group_readable:
      _make_group_readable(staged)
    entry = {'package_id': info.package_id, 'fingerprint': info.fingerprint,
             'signer': info.signer if info.signature_verified else None,
             'source': (package if storage.is_remote(package)
                        else os.path.abspath(package)),
             'installed': _now(),
             # Authenticated with the package: a later sync re-checks a
             # changed policy against it without reading the package.
             'context': dict(info.context)}
    # Record first: after a crash between the two steps the marker names a
    # missing directory, which the next sync forgets; the opposite order
    # would leave a version that looks foreign and is never removed.
    managed[version] = entry
    _write_marker(serving_base, managed)
    try:
      _fsutil.publish(staged, target)  # no-replace
    except BaseException:
      del managed[version]
      _write_marker(serving_base, managed)
      raise
  finally:
    _fsutil.remove_tree(stage)
  logger.info('serve-sync: installed version %s (package %s, fingerprint %s)',
              _text.printable(version), _text.printable(info.package_id),
              _text.printable(info.fingerprint))
  return SyncAction(INSTALLED, version, target, source=package,
                    package_id=info.package_id, fingerprint=info.fingerprint,
                    signer=entry['signer'])


def _recheck(version: str, entry: dict, package: Optional[str],
             serving_base: str, managed: Dict[str, dict], trusted,
             allow_unsigned: bool, policy: policy_lib.Policy) -> None:
  """Raise PolicyError if installed `version` no longer satisfies `policy`.

  Uses the context recorded in the marker at install time. A version
  installed before the marker recorded contexts is checked once against its
  source package (signature and ciphertext digests verified, no key; the
  same package id required), and its context is then recorded.
  """
  context = entry.get('context')
  if not isinstance(context, dict):
    try:
      if package is None:
        raise errors.UsageError('its source package is gone')
      info = package_lib.verify_package(package, trusted=trusted,
                                        allow_unsigned=allow_unsigned)
      if info.package_id != entry.get('package_id'):
        raise errors.UsageError(
            f'its source {package} now holds another package')
    except (errors.TfxEncryptError, OSError) as e:
      raise policy_lib.PolicyError(
          f'installed version {version} recorded no context, and it cannot '
          f'be checked against the policy: {e}') from e
    context = entry['context'] = dict(info.context)
    _write_marker(serving_base, managed)
  policy.check(context)


def _remove(version: str, serving_base: str, managed: Dict[str, dict]
            ) -> SyncAction:
  """Take serving_base/<version> away atomically, then delete it."""
  target = os.path.join(serving_base, version)
  entry = managed[version]
  old = os.path.join(serving_base, OLD_PREFIX + os.urandom(8).hex())
  os.rename(target, old)  # gone for TF Serving in one step
  del managed[version]
  _write_marker(serving_base, managed)
  _fsutil.remove_tree(old)
  logger.info('serve-sync: removed version %s', version)
  return SyncAction(REMOVED, version, target,
                    package_id=entry.get('package_id'),
                    fingerprint=entry.get('fingerprint'))


# --- public API --------------------------------------------------------------

def sync_serving(source_base, serving_base, *, identities: Sequence[KeyLike],
                 trusted: Sequence[KeyLike] = (), allow_unsigned: bool = False,
                 keep: int = 2, group_readable: bool = False,
                 model_check=None,
                 policy: Optional[policy_lib.Policy] = None,
                 on_action=None) -> SyncResult:
  """Make `serving_base` hold the newest `keep` versions of `source_base`.

  Versions are taken newest first; each one that is not yet in
  `serving_base` is verified (a signature by one of `trusted` is required
  unless `allow_unsigned`) and decrypted into a hidden staging directory
  inside `serving_base`, then renamed to `serving_base/<version>` without
  replacing anything. A version that fails is reported and skipped, and the
  next older one is tried instead, so that `keep` good versions are served
  when the source has them. Versions older than the oldest kept one are then
  removed, but only those listed in the marker file (installed by
  tfx-encrypt); any other directory is never touched. A second call with
  nothing new changes nothing.

  With `policy`, every version must also satisfy it: a new one is checked
  (per version, right after its signature, before any key call) and
  reported failed with PolicyError if refused; an installed one is
  re-checked against the context recorded when it was installed, and one
  the policy now refuses (e.g. after raising `min_version`) is reported
  failed and removed.

  Args:
    source_base: where the packages are pushed to (EncryptPusher's
      `push_destination`): a local directory, `file://`, or a `gs://` /
      `s3://` push base (read through tfx_encrypt.storage: listed each
      sync, each new version verified and decrypted streaming from the
      store). Versions with payloads but no header are reported
      `incomplete` and not installed.
    serving_base: local directory TF Serving loads (`--model_base_path`);
      created (0700, or 0750 with `group_readable`) if missing.
    identities: key URIs (or backends) that can unwrap the packages.
    trusted: public keys of trusted publishers.
    allow_unsigned: accept packages without a signature.
    keep: how many versions to serve (>= 1).
    group_readable: chmod published versions 0750/0640 (default 0700/0600),
      for a TF Serving that runs as another user in the owner's group.
    model_check: optional callable(path) run on each decrypted version before
      it is published; raising rejects the version (reported as failed).
    policy: optional tfx_encrypt.policy.Policy every version must satisfy.
    on_action: optional callable(SyncAction), called as each action is
      taken (before the next one starts), e.g. to audit it
      (tfx_encrypt.audit.sync_action): a sync a signal stops half-way has
      still reported what it did.

  Returns:
    A SyncResult listing every installed, kept, removed and failed version.

  Raises:
    UsageError: bad arguments, a missing source, another sync holding the
      lock, or an unreadable marker file. Failures of single versions are
      reported in the result instead.
  """
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
    raise errors.UsageError(f'keep must be an integer >= 1, got {keep!r}')
  if policy is not None and not isinstance(policy, policy_lib.Policy):
    raise errors.UsageError(
        f'policy must be a tfx_encrypt.policy.Policy, got '
        f'{type(policy).__name__}')
  if not trusted and not allow_unsigned:
    raise errors.UsageError(
        'say whom you trust: trusted=[PUBLISHER_PUBLIC_KEY], or '
        'allow_unsigned=True')
  if not identities:
    raise errors.UsageError('no identity given: pass the key URI(s) that can '
                            'decrypt the packages')
  # Resolved once per sync, before anything is touched: a key in the wrong
  # role (a public key as identity, a private one as trust) is a
  # KeyRoleError here, not a failure of every version.
  identities = package_lib.resolve_keys(identities, 'identity')
  trusted = package_lib.resolve_keys(trusted, 'trust')
  source_base = os.fspath(source_base)
  serving_base = os.fspath(serving_base)
  if '://' in serving_base and not serving_base.startswith('file://'):
    raise errors.UsageError(
        f'serving base {_text.printable(serving_base)}: must be a local '
        'path (TF Serving loads models from a path); the source may be '
        'gs:// or s3://')
  remote = storage.is_remote(source_base)
  if remote:
    storage.split(source_base)  # names a bucket (UsageError otherwise)
    source_base = source_base.rstrip('/')
  elif '://' in source_base and not source_base.startswith('file://'):
    raise errors.UsageError(
        f'source {_text.printable(source_base)}: serve-sync reads local '
        'paths, file://, gs:// and s3:// push bases; mount or copy it')
  else:
    source_base = os.path.abspath(source_base.removeprefix('file://'))
  serving_base = os.path.abspath(serving_base.removeprefix('file://'))
  if not remote and not os.path.isdir(source_base):
    raise errors.UsageError(f'source {source_base} is not a directory')
  if not remote and (os.path.realpath(serving_base) ==
                     os.path.realpath(source_base)):
    raise errors.UsageError('source and serving base must be different '
                            'directories')
  if not os.path.isdir(serving_base):
    if not os.path.isdir(os.path.dirname(serving_base)):
      raise errors.UsageError(
          f'parent directory of serving base {serving_base} does not exist')
    try:
      os.mkdir(serving_base, 0o750 if group_readable else 0o700)
    except FileExistsError:
      pass
  identities, trusted = list(identities), list(trusted)
  result = SyncResult(source_base, serving_base)
  if on_action is not None:
    result.actions = _Reported(on_action)
  with _Lock(serving_base):
    _clean_stale(serving_base)
    managed = read_marker(serving_base)
    gone = [v for v in managed
            if not os.path.lexists(os.path.join(serving_base, v))]
    if gone:  # deleted by hand, or a crash between marker and publish
      for v in gone:
        del managed[v]
      _write_marker(serving_base, managed)
    found = scan_source(source_base)
    packages, bad = found.packages, found.bad
    candidates = sorted(set(packages) | set(bad) | set(found.incomplete),
                        key=_version_key, reverse=True)
    kept: List[str] = []
    for version in candidates:
      if len(kept) >= keep:
        break
      target = os.path.join(serving_base, version)
      if version in found.incomplete:
        # Absent until its header (the push's commit point) is there; an
        # installed copy is handled as a version deleted at the source.
        where = storage.join(source_base, version)
        message = found.incomplete[version]
        logger.warning('serve-sync: version %s in %s is incomplete: %s',
                       _text.printable(version), _text.printable(where),
                       _text.printable(message, limit=None))
        result.actions.append(SyncAction(INCOMPLETE, version, where,
                                         source=where, message=message))
        continue
      if version in bad:
        _fail(result, version, storage.join(source_base, version),
              bad[version])
        continue
      if version in managed:
        e = managed[version]
        if policy is not None:
          try:
            _recheck(version, e, packages.get(version), serving_base, managed,
                     trusted, allow_unsigned, policy)
          except errors.PolicyError as err:
            _fail(result, version, target, err)
            try:  # ours, and no longer acceptable: take it down
              result.actions.append(_remove(version, serving_base, managed))
            except OSError as err2:
              _fail(result, version, target, err2)
            continue
        kept.append(version)
        result.actions.append(SyncAction(
            KEPT, version, target, source=e.get('source'),
            package_id=e.get('package_id'), fingerprint=e.get('fingerprint'),
            signer=e.get('signer')))
        continue
      if os.path.lexists(target):
        _fail(result, version, target, errors.OutputExistsError(
            f'{target} exists and was not installed by tfx-encrypt (not in '
            f'{MARKER_NAME}); left alone. Remove it to let serve-sync install '
            f'version {version}'))
        continue
      try:
        action = _install(version, packages[version], serving_base, managed,
                          identities, trusted, allow_unsigned, group_readable,
                          model_check, policy)
      except (errors.TfxEncryptError, OSError, ValueError) as e:
        _fail(result, version, packages[version], e)
        continue
      kept.append(version)
      result.actions.append(action)
    if kept:
      oldest = _version_key(min(kept, key=_version_key))
      for version in sorted(managed, key=_version_key):
        if version not in kept and _version_key(version) < oldest:
          try:
            result.actions.append(_remove(version, serving_base, managed))
          except OSError as e:
            _fail(result, version, os.path.join(serving_base, version), e)
  return result

