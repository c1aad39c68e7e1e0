"""The package operations: encrypt, decrypt, inspect, verify, rewrap, rotate.

FORMAT.md §10 (the reader procedure) on top of the envelope (keys),
layout (files) and stream (payload) building blocks. Every operation is
atomic: it publishes its output with one rename, and leaves nothing behind
on any error or signal (docs/SECURITY.md).
"""

import dataclasses
import os
import threading
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import _signals
from tfx_encrypt import errors
from tfx_encrypt import policy as policy_lib
from tfx_encrypt import storage
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.format.header import FileEntry, Header, KeyGroups
from tfx_encrypt.keys import shamir
from tfx_encrypt.storage import _bundle as bundle_lib
from tfx_encrypt.keys.base import KeyBackend, WrapContext
from tfx_encrypt.package.envelope import (
    KeyLike, _backend, _backends, _check_resign, _check_user_context,
    _plan_recipients, _require_trust_choice, _unwrap, _verify_signature,
    open_key_groups, prepare_envelope, resolve_signer, seal_header,
    share_context)
from tfx_encrypt.package.layout import (
    HEADER_NAME, PAYLOAD_DIR, _Source, _create,
    _write_header_only, build_header, check_remote_output, delete_objects,
    finish_package, open_for_rewrap, open_source, payload_name, scan_model,
    scan_remote_model, start_package)
from tfx_encrypt.package._streams import (
    Progress, _check_ciphertext, _decrypt_file_table, _decrypt_payload,
    _file_reader, _open_source, _open_stream, _remote_file_reader,
    pipelines_help,
    _run_parallel, _seal_stream, _segment_opener, default_workers)


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
  src = open_source(os.fspath(package))  # a path, or s3:// / gs://
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


def inspect_package(package) -> PackageInfo:
  """What the header says, without any key. The signer is *not* verified."""
  src = open_source(os.fspath(package))  # a path, or s3:// / gs://
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
  src = open_source(os.fspath(package))  # a path, or s3:// / gs://
  h = src.header
  verified = _verify_signature(h, trusted, allow_unsigned)
  if policy is not None:
    policy.check(h.context)

  def check(i):
    size, want = h.payloads[i]
    fd, offset = src.open_payload(i)
    try:
      got, hashed = _fsutil.hash_file(fd, h.hash_alg, offset=offset, size=size)
      if hashed != size:
        raise errors.TamperedPackageError(f'payload {i} is truncated')
      if got != want:
        raise errors.TamperedPackageError(
            f'payload {i} does not match its digest in the header; the '
            'package was modified')
    finally:
      _fsutil.close_fd(fd)
  _run_parallel(check, range(len(h.payloads)), workers or default_workers())
  return _info(h, src.path, src.bundle, src.header_len, verified)


#: At most this many files are encrypted at once from or to a `s3://` /
#: `gs://` store: each holds a 4 MiB read chunk and a 4-5 MiB upload part,
#: so memory stays bounded (docs/OBJECT_STORES.md) whatever the model.
REMOTE_WORKERS = 4


def encrypt_model(src_dir, package, *,
                  recipients: Optional[Sequence[KeyLike]] = None,
                  key_groups: Optional[Sequence[Sequence[KeyLike]]] = None,
                  threshold: Optional[int] = None,
                  signer: Optional[KeyLike] = None,
                  context: Optional[Mapping[str, str]] = None,
                  cipher: str = 'aes-256-gcm', hash_alg: str = 'blake3',
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

  Object stores (docs/OBJECT_STORES.md): `src_dir` may be a `s3://` /
  `gs://` prefix. It is listed once and every file is streamed segment by
  segment through ranged reads pinned to the listed version: no plaintext
  reaches the local disk, memory does not grow with the model, and a model
  changed meanwhile fails the command. `package` may be a `s3://` /
  `gs://` URI too (never replaced; `force` is refused): the payload
  objects are streamed there create-only, then the header is written
  create-only as the commit point; on any failure the objects written are
  deleted. A remote bundle (its header comes first but is known last) is
  streamed too, into one create-only upload completed with the header
  (`storage._bundle`): nothing is staged on the local disk.
  """
  remote_src = storage.is_remote(os.fspath(src_dir))
  remote_dst = storage.is_remote(os.fspath(package))
  src_dir = os.fspath(src_dir)
  streaming.suite_for_cipher(cipher)
  digest_lib.new_hash(hash_alg)
  _check_user_context(context)
  sign_with = resolve_signer(signer)
  if remote_dst:
    package = check_remote_output(os.fspath(package), force=force,
                                  sources=[src_dir])
  else:
    package = os.path.abspath(os.fspath(package))
    package = _fsutil.check_output(
        package, force=force, sources=[] if remote_src else [src_dir])
  if remote_src:
    files, dirs = scan_remote_model(src_dir, any_dir=any_dir)
  else:
    files, dirs = scan_model(src_dir, any_dir=any_dir)
  env = prepare_envelope(recipients, context=context, cipher=cipher,
                         hash_alg=hash_alg, key_groups=key_groups,
                         threshold=threshold)
  workers = workers or default_workers()
  if remote_src or remote_dst:
    workers = min(workers, REMOTE_WORKERS)
  order = sorted(range(len(files)), key=lambda i: -files[i].size)
  results: Dict[int, Tuple[str, str, int]] = {}
  # A remote bundle seals one file at a time (its order): let large files
  # spread over two threads.
  pipeline = (remote_dst and bundle) or pipelines_help(
      (f.size for f in files), workers)

  def seal_into(i, out):
    f = files[i]
    if remote_src:
      try:
        with storage.open_reader(f.abspath, version=f.version) as reader:
          read_segment, check_eof = _remote_file_reader(reader, f, src_dir)
          results[i] = _seal_stream(read_segment, f.size, env.new_stream(i),
                                    out, hash_alg, progress, pipeline)
          check_eof()
      except storage.ObjectChangedError:
        raise errors.UsageError(
            f'{_text.quoted(f.path)} in {_text.printable(src_dir)} was '
            'replaced or removed while it was being encrypted; do not modify '
            'the model during encryption') from None
      return
    fd = _open_source(f)
    try:
      read_segment, check_eof = _file_reader(fd, f.path, f.size)
      results[i] = _seal_stream(read_segment, f.size, env.new_stream(i),
                                out, hash_alg, progress, pipeline)
      check_eof()
    finally:
      os.close(fd)

  def table():
    return dict(
        entries=[FileEntry(f.path, f.size, results[i][0])
                 for i, f in enumerate(files)],
        dirs=dirs,
        payloads=[(results[i][2], results[i][1]) for i in range(len(files))],
        signer=sign_with)

  if remote_dst and not bundle:
    h, hlen = _encrypt_to_store(package, files, seal_into, order, workers,
                                lambda: build_header(env, **table()))
  elif remote_dst:  # a remote bundle: streamed, nothing staged locally
    h, hlen = _encrypt_to_store_bundle(package, files, seal_into,
                                       lambda: build_header(env, **table()))
  else:
    tmp = start_package(package, force)
    try:
      pdir = os.path.join(tmp, PAYLOAD_DIR)

      def encrypt_one(i):
        out = _create(os.path.join(pdir, payload_name(i)), 0o644)
        try:
          seal_into(i, out)
          if fsync:
            os.fsync(out)
        finally:
          os.close(out)

      _run_parallel(encrypt_one, order, workers)
      h, hlen = finish_package(env, tmp, package, bundle=bundle,
                               force=force, fsync=fsync, **table())
    except BaseException:
      _fsutil.remove_tree(tmp)
      raise
  return _info(h, package, bundle, hlen, verified=sign_with is not None,
               plaintext_bytes=sum(f.size for f in files))


def _encrypt_to_store(package: str, files, seal_into, order, workers: int,
                      make_header) -> Tuple[Header, int]:
  """Directory form on a store: every payload object is streamed
  create-only (nothing is visible before its upload completes), then the
  header, create-only: the commit point (docs/OBJECT_STORES.md). On any
  failure or signal the objects written are deleted."""
  written: List[str] = []
  lock = threading.Lock()

  def encrypt_one(i):
    uri = storage.join(package, PAYLOAD_DIR, payload_name(i))
    w = storage.open_writer(uri, streaming.ciphertext_size(files[i].size))
    try:
      seal_into(i, w)
      w.commit()
    except BaseException:
      w.abort()
      raise
    with lock:
      written.append(uri)

  try:
    _run_parallel(encrypt_one, order, workers)
    h, hbytes = make_header()
    storage.put_create_only(storage.join(package, HEADER_NAME), hbytes)
  except BaseException:
    with lock:
      done = sorted(written)
    with _signals.deferred():
      delete_objects(done)
    raise
  return h, len(hbytes)


def _encrypt_to_store_bundle(package: str, files, seal_into, make_header
                             ) -> Tuple[Header, int]:
  """A bundle on a store, streamed with bounded memory and nothing on the
  local disk (docs/OBJECT_STORES.md): the payload streams are sealed in
  index order, the bundle's order, into `storage._bundle`'s writer, which
  uploads them as they come; the header, known only once the last one is
  sealed, goes in last, and the create-only completion of the one object
  is the commit point. On any failure or signal the upload is aborted and
  its temporaries deleted: nothing is left at `package`."""
  total = sum(streaming.ciphertext_size(f.size) for f in files)
  w = bundle_lib.open_bundle_writer(package, total)
  try:
    for i in range(len(files)):
      seal_into(i, w)
    h, hbytes = make_header()
    w.commit(hbytes)
  except BaseException:
    with _signals.deferred():
      w.abort()
    raise
  return h, len(hbytes)


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
    pipeline = pipelines_help((e.size for e in entries),
                              workers or default_workers())

    def decrypt_one(i):
      e = entries[i]
      path = os.path.join(tmp, *e.path.split('/'))
      out = files.create(path, 0o600)
      try:
        _decrypt_payload(src, h, keys, i, e,
                         lambda mv: _fsutil.write_all(out, mv), progress,
                         pipeline)
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

  `package` may also be a directory-form package on `s3://` / `gs://`:
  the same checks, then its header object is replaced only if it is still
  the version that was read and verified (S3 `If-Match`, GCS
  `ifGenerationMatch`); if it changed meanwhile, nothing is replaced
  (ObjectChangedError). The payload objects are not touched. A bundle on
  a store is written anew, the new header and its unchanged payload bytes,
  under the same condition (`storage._bundle.rewrite_bundle_header`; on
  gs:// this moves the payload bytes through this process: O(size)).

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
  src = open_for_rewrap(os.fspath(package))  # a path, or s3:// / gs://
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
  _replace_header(src, h)
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
  _replace_header(src, h)
  return _info(h, src.path, src.bundle, len(h.serialize()),
               verified=sign_with is not None)


def _replace_header(src: _Source, h: Header) -> None:
  """Publish rewrap's new header (the payloads stay as they are).

  Locally: the header (or bundle) is replaced atomically
  (`layout._write_header_only`). On `s3://` / `gs://` the header object (a
  bundle: the one object) is the commit point, replaced only if it is
  still the version `src` read and verified (docs/OBJECT_STORES.md,
  "rewrap in place"); if another writer changed or removed it meanwhile,
  nothing is replaced.
  """
  if not storage.is_remote(src.path):
    _write_header_only(src, h)
    return
  what = src.path if src.bundle else storage.join(src.path, HEADER_NAME)
  try:
    if src.bundle:
      # One object: written anew, the new header and the old payload bytes
      # (server-side copies on S3, streamed through on GCS), replacing the
      # bundle only if it is still the version read and verified.
      bundle_lib.rewrite_bundle_header(src.path, h.serialize(),
                                       src.header_len, src.header_version)
    else:
      with _signals.deferred():  # one request: done, or not at all
        storage.put_if_unchanged(what, h.serialize(), src.header_version)
        _signals.mark_committed()
  except storage.ObjectChangedError:
    raise storage.ObjectChangedError(
        f'{_text.printable(what)} changed after rewrap read and verified it '
        '(another rewrap or writer); nothing was replaced: run rewrap '
        'again') from None


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
    pipeline = pipelines_help((e.size for e in entries),
                              workers or default_workers())

    def rotate_one(i):
      e = entries[i]
      fd, offset, old_sc, ct_hash = _open_stream(src, h, old_keys, i)
      try:
        read_segment = _segment_opener(src, i, old_sc, fd, offset,
                                       h.payloads[i][0], ct_hash)
        outfd = _create(os.path.join(pdir, payload_name(i)), 0o644)
        try:
          results[i] = _seal_stream(read_segment, e.size, env.new_stream(i),
                                    outfd, h.hash_alg, progress, pipeline)
        finally:
          os.close(outfd)
      finally:
        _fsutil.close_fd(fd)
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
