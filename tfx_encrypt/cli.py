"""The `tfx-encrypt` command line: thin wrappers over the Python API.

Every failure becomes one line on stderr (`tfx-encrypt: error: ...`) and a
non-zero exit code taken from the error class (see tfx_encrypt.errors).
"""

import contextlib
import errno
import functools
import json
import logging
import os
import select
import sys
import threading
import time
from typing import Dict, Optional, Sequence

import click

from tfx_encrypt import _fsutil
from tfx_encrypt import _signals
from tfx_encrypt import _text
from tfx_encrypt import audit as audit_lib
from tfx_encrypt import errors
from tfx_encrypt import package as pkg
from tfx_encrypt import policy as policy_lib
from tfx_encrypt.__about__ import __version__
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.keys import local as local_keys

PROGRESS_THRESHOLD = 64 << 20  # show a bar for models above 64 MiB


def _parse_context(pairs: Sequence[str]) -> Dict[str, str]:
  ctx = {}
  for p in pairs:
    k, sep, v = p.partition('=')
    if not sep or not k:
      raise errors.UsageError(f'--context expects KEY=VALUE, got {p!r}')
    if k in ctx:
      raise errors.UsageError(f'--context key {k!r} given twice')
    ctx[k] = v
  return ctx


@contextlib.contextmanager
def _progress(label: str, total: Optional[int]):
  """A thread-safe progress callback; a bar only on a terminal."""
  if not total or total < PROGRESS_THRESHOLD or not sys.stderr.isatty():
    yield None
    return
  lock = threading.Lock()
  with click.progressbar(length=total, label=label, file=sys.stderr,
                         show_pos=False, show_percent=True) as bar:
    def update(n):
      with lock:
        bar.update(n)
    yield update


def _key_groups(groups: Sequence[str], threshold: Optional[int]):
  """--key-group URI,URI ... and --threshold K into API arguments."""
  if not groups:
    if threshold is not None:
      raise errors.UsageError(
          '--threshold needs --key-group (at least two); with --recipient any '
          'one recipient decrypts')
    return None, None
  parsed = []
  for g in groups:
    uris = [u.strip() for u in g.split(',')]
    if not all(uris):
      raise errors.UsageError(
          f'--key-group expects a comma-separated list of key URIs, got {g!r}')
    parsed.append(uris)
  if threshold is None:
    raise errors.UsageError(
        f'--key-group needs --threshold K: how many of the {len(parsed)} '
        'groups must take part in decryption')
  return parsed, threshold


def _build_policy(require_context: Sequence[str], min_version: Optional[str],
                  version_key: Optional[str], policy_file: Optional[str]
                  ) -> Optional[policy_lib.Policy]:
  """--require-context/--min-version/--version-key or --policy, not both.

  Nothing is merged: a policy file is the whole policy, so combining it
  with the flags is refused rather than silently adding to or overriding it.
  """
  flags = [name for name, given in (
      ('--require-context', require_context),
      ('--min-version', min_version is not None),
      ('--version-key', version_key is not None)) if given]
  if policy_file is not None:
    if flags:
      raise errors.UsageError(
          f'--policy FILE is the whole policy; put {flags[0]} into the file '
          'instead of combining the two')
    return policy_lib.Policy.from_file(policy_file)
  if not flags:
    return None
  required = {}
  for p in require_context:
    k, sep, v = p.partition('=')
    if not sep or not k:
      raise errors.UsageError(
          f'--require-context expects KEY=VALUE, got {_text.quoted(p, 64)}')
    if k in required:
      raise errors.UsageError(
          f'--require-context key {_text.quoted(k, 64)} given twice')
    required[k] = v
  if version_key is not None and min_version is None:
    raise errors.UsageError('--version-key names the key --min-version '
                            'checks; pass --min-version N too')
  if min_version is not None and not policy_lib.is_canonical_version(
      min_version):
    raise errors.UsageError(
        f'--min-version expects a non-negative integer (ASCII digits, no '
        f'sign or leading zero, at most {policy_lib.MAX_VERSION_DIGITS}), '
        f'got {_text.quoted(min_version, 64)}')
  return policy_lib.Policy(
      require_context=required,
      min_version=None if min_version is None else int(min_version),
      version_key=(policy_lib.DEFAULT_VERSION_KEY if version_key is None
                   else version_key))


def _policy_options(f):
  """The consumer-policy options, defined once; the command gets `policy`.

  Used by every command that accepts a package: decrypt, verify, rotate,
  serve-sync and pull.
  """

  @functools.wraps(f)
  def command(*args, require_context, min_version, version_key, policy_file,
              **kwargs):
    return f(*args, policy=_build_policy(require_context, min_version,
                                         version_key, policy_file), **kwargs)

  options = (
      click.option('--require-context', 'require_context', multiple=True,
                   metavar='K=V',
                   help='Refuse a package whose signed context does not hold '
                   'K with exactly the value V (repeatable; exit 11).'),
      click.option('--min-version', 'min_version', metavar='N',
                   help='Refuse a package whose context version (see '
                   '--version-key) is missing, not an integer, or below N '
                   '(exit 11).'),
      click.option('--version-key', 'version_key', metavar='K',
                   help='Context key --min-version reads [default: version, '
                   'as EncryptPusher records it].'),
      click.option('--policy', 'policy_file', metavar='FILE',
                   type=click.Path(dir_okay=False),
                   help='The same rules from a JSON file ({"require_context": '
                   '{...}, "min_version": N, "version_key": "..."}); not '
                   'combined with the three options above.'),
  )
  for option in reversed(options):
    command = option(command)
  return command


def _require_trust(trusted: Sequence[str], allow_unsigned: bool) -> None:
  """Commands that read a package's origin have no default trust.

  The one "say whom you trust" check: decrypt, rewrap, rotate, serve-sync
  and pull call it first thing. verify does not: with no --trust it says
  who signed the package (UntrustedSignerError), which is its answer.
  """
  if not trusted and not allow_unsigned:
    raise errors.UsageError(
        'say whom you trust: --trust PUBLISHER_PUBLIC_KEY, or --allow-unsigned')


# --- options shared by several commands, each defined once ------------------

_TRUST_HELP = 'Public key of a trusted publisher (repeatable).'
_ALLOW_UNSIGNED_HELP = 'Accept a package without a signature.'


def _trust_options(trust_help: str = _TRUST_HELP,
                   allow_unsigned_help: str = _ALLOW_UNSIGNED_HELP):
  """--trust KEY_URI (repeatable) and --allow-unsigned.

  The command gets `trusted` and `allow_unsigned`, and checks them with
  `_require_trust`. A command may say more in the help (rewrap's checks
  the current signature before any key is used).
  """

  def decorate(f):
    f = click.option('--allow-unsigned', is_flag=True,
                     help=allow_unsigned_help)(f)
    return click.option('--trust', 'trusted', multiple=True,
                        metavar='KEY_URI', help=trust_help)(f)

  return decorate


_IDENTITY_HELP = ('Private key (X25519, RSA) or KMS/HSM key URI that can '
                  'decrypt (repeatable); - reads one PEM private key from '
                  'standard input.')
# --identity KEY_URI (repeatable, at least one); the command gets `identities`.
_identity_option = click.option('--identity', '-i', '--identity-file',
                                'identities', multiple=True, required=True,
                                metavar='KEY_URI', help=_IDENTITY_HELP)


def _force_option(output: str = 'OUT', help_text: Optional[str] = None):
  """--force: replace an existing output, atomically.

  Only what --force may replace (docs/SECURITY.md); the command gets
  `force`.
  """
  return click.option('--force', is_flag=True,
                      help=help_text or f'Replace {output} atomically.')


def _cipher_option(**kwargs):
  """--cipher, one of the stream suites' names (format/streaming.CIPHERS)."""
  return click.option('--cipher', type=click.Choice(list(streaming.CIPHERS)),
                      **kwargs)


class _EchoWarnings(logging.Handler):
  """Prints the API's warnings as `tfx-encrypt: warning: ...` lines."""

  def emit(self, record):
    message = ' '.join(record.getMessage().split())  # one line, always
    click.echo(f'tfx-encrypt: warning: {message}', err=True)


@contextlib.contextmanager
def _api_warnings():
  """Show package-level warnings (e.g. re-signing) once each, on stderr."""
  logger = logging.getLogger(pkg.__name__)
  handler = _EchoWarnings(logging.WARNING)
  propagate = logger.propagate
  logger.addHandler(handler)
  logger.propagate = False  # not a second time through a configured root
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.propagate = propagate


# The longest string a header may hold in a shown field (a key id, a context
# value): shown whole, escaped.
_SHOW_LIMIT = 1024


def _show(value) -> str:
  """A value nobody vouches for (read from a package, MLMD or a path), made
  safe for one line of human output: controls, escape sequences, line
  separators and bidi overrides escaped (tfx_encrypt._text)."""
  return _text.printable(value, limit=_SHOW_LIMIT)


def _json(obj, **kwargs) -> str:
  """--json output: exact values; ensure_ascii escapes every control (ESC
  too) and every non-ASCII character as \\uNNNN."""
  return json.dumps(obj, sort_keys=True, ensure_ascii=True, **kwargs)


def _summary(info: pkg.PackageInfo) -> str:
  signer = _show(info.signer or 'unsigned')
  who = f'{len(info.recipients)} recipient(s)'
  if info.threshold:
    who += (f' in {len(info.threshold["groups"])} key groups, '
            f'{info.threshold["k"]} needed')
  return (f'{_show(info.path)}: {info.file_count} files, {_show(info.cipher)}, '
          f'{who}, signer {signer}, fingerprint {_show(info.fingerprint)}')


# 128 + SIGPIPE: what a shell reports for a program that wrote to a pipe
# whose reader had gone away (`tfx-encrypt inspect PKG | head -1`).
EXIT_CLOSED_STDOUT = 141


def _stdout_closed(e: OSError) -> bool:
  """Whether `e` is EPIPE because nobody reads stdout any more.

  EPIPE from anything else (a socket to a key backend or a registry) is an
  ordinary operating-system error. A pipe whose readers are all gone polls
  as POLLERR on its write end.
  """
  if e.errno != errno.EPIPE:
    return False
  try:
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    events = poller.poll(0)
  except (AttributeError, OSError, ValueError):  # no real stdout
    return False
  return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in events)


def _exit_closed_stdout():
  """Exits quietly with 141, as a process that SIGPIPE killed would.

  stdout is pointed at /dev/null first, so that the interpreter's last flush
  of what is still buffered cannot print "Exception ignored ...
  BrokenPipeError" (the recipe of the note on SIGPIPE in the `signal`
  module's documentation).
  """
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stdout.fileno())
  os.close(devnull)
  sys.exit(EXIT_CLOSED_STDOUT)


def _os_error_text(e: OSError) -> str:
  """`STRERROR (PATH[ -> PATH2])`, naming the paths the user gave.

  A path inside a temporary sibling (`.NAME.tfxe-KIND-TOKEN`, gone with the
  failed command) is shown as the destination it stood for.
  """
  names = []
  for name in (getattr(e, 'filename', None), getattr(e, 'filename2', None)):
    if name is None:
      continue
    if isinstance(name, bytes):
      name = os.fsdecode(name)
    names.append(_text.printable(_fsutil.public_path(name), limit=None))
  if e.strerror is None:  # no errno: str(e) is all there is
    return _text.printable(str(e), limit=None)
  return e.strerror + (f' ({" -> ".join(names)})' if names else '')


# --- audit trail (tfx_encrypt.audit; docs/SECURITY.md §8) ---------------------


def _audit_warn(message: str) -> None:
  click.echo(f'tfx-encrypt: warning: {message}', err=True)


def _audit_begin(ctx: click.Context, spec: Optional[str]) -> None:
  """Start auditing the command `main` is about to run (--audit-log).

  The sink is checked first (a file is created, its last event read), so a
  command never runs while its event cannot be written. `audit` itself,
  which reads logs, is not audited.
  """
  name = ctx.invoked_subcommand
  if not spec or not name or name == 'audit':
    return
  sink = audit_lib.open_sink(spec)
  try:
    sink.check()
  except OSError as e:  # exit 9, saying which file or socket it was
    raise OSError(e.errno, f'audit log {sink.name}: {e.strerror or e}',
                  e.filename) from e
  audit_lib.start(audit_lib.Auditor(sink), name,
                  per_action=name == 'serve-sync', warn=_audit_warn)


def _audit_done(exc: Optional[BaseException]) -> None:
  """How the audited command ended (the first call counts)."""
  run = audit_lib.current()
  if run is not None:
    run.done(exc)


def _audit_finish() -> None:
  """Emit the command's event with signals held: the outcome is decided,
  and a signal now cannot change it or cut the line in half."""
  run = audit_lib.current()
  if run is None:
    return
  try:
    with _signals.deferred():
      run.finish()
  except _signals.Interrupted:
    pass  # arrived after the command ended: its outcome stands


def _audit_input(package: str, *, as_source: bool = False) -> None:
  """Record the package a command reads, as its header says (signer not
  verified), so that the event of a failed command names it too; the
  command's verified result replaces it. Never fails: the command itself
  reports what is wrong with the package."""
  if audit_lib.current() is None:
    return
  audit_lib.note(package=os.path.abspath(package))
  try:
    audit_lib.record(pkg.inspect_package(package), as_source=as_source)
  except (errors.TfxEncryptError, OSError, ValueError):
    pass


def _audit_ref(ref: str) -> None:
  """Record a registry reference as parsed (no user info can be in it)."""
  if audit_lib.current() is None:
    return
  try:
    audit_lib.note(ref=str(_import_oci().parse_reference(ref)))
  except errors.TfxEncryptError:
    pass  # push/pull report it


class _Group(click.Group):
  """Turns every failure into one line on stderr and a non-zero exit code.

  TfxEncryptError and OSError are caught around each command; click's own
  usage errors (a missing option, a bad choice) are caught in `main`, which
  click would otherwise print as a multi-line usage block. A closed stdout
  (`| head -1`) ends the process quietly with 141, wherever it shows up.
  """

  def main(self, args=None, prog_name=None, complete_var=None,
           standalone_mode=True, **extra):
    if not standalone_mode:
      return super().main(args, prog_name, complete_var, False, **extra)
    try:
      rv = super().main(args, prog_name, complete_var, False, **extra)
      sys.stdout.flush()  # a closed stdout shows here, not at shutdown
    except OSError as e:
      if not _stdout_closed(e):
        raise
      _exit_closed_stdout()
    except click.ClickException as e:
      hint = ''
      if isinstance(e, click.UsageError) and e.ctx is not None:
        hint = f" (see '{e.ctx.command_path} --help')"
      message = ' '.join(e.format_message().split())  # one line, always
      click.echo(f'tfx-encrypt: error: {message}{hint}', err=True)
      sys.exit(e.exit_code)
    except click.Abort:
      click.echo('tfx-encrypt: error: aborted', err=True)
      sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)

  def invoke(self, ctx):
    # SIGINT/SIGTERM/SIGHUP: the command unwinds, every temporary sibling
    # it created is removed, and it exits 128 + the signal number.
    # With --audit-log, the command's run (started by `main`, which knows
    # the command) learns how it ended; `finally` emits its one event.
    _signals.install()
    try:
      rv = super().invoke(ctx)
      _audit_done(None)
      return rv
    except _signals.Interrupted as e:
      _audit_done(e)
      _fsutil.remove_all_temps()
      click.echo(f'tfx-encrypt: error: {e}; its temporary files were removed',
                 err=True)
      ctx.exit(e.exit_code)
    except errors.TfxEncryptError as e:
      _audit_done(e)
      # Messages escape what they quote from a package; this is the backstop.
      click.echo(f'tfx-encrypt: error: {_text.printable(str(e), limit=None)}',
                 err=True)
      ctx.exit(e.exit_code)
    except OSError as e:
      _audit_done(e)
      if _stdout_closed(e):  # also a subcommand's --help
        _exit_closed_stdout()
      click.echo(f'tfx-encrypt: error: {_os_error_text(e)}', err=True)
      ctx.exit(9)
    except BaseException as e:  # click's usage errors and exits, bugs
      _audit_done(e)
      raise
    finally:
      _audit_finish()
      # A backstop: the API removes its temporaries on every error itself.
      _fsutil.remove_all_temps()
      _signals.uninstall()

  def make_context(self, info_name, args, parent=None, **extra):
    # `tfx-encrypt --help | head -1`: the group's own --help and --version
    # print while its context is made, before `invoke`.
    try:
      return super().make_context(info_name, args, parent, **extra)
    except OSError as e:
      if not _stdout_closed(e):
        raise
      _exit_closed_stdout()


@click.group(cls=_Group, context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(__version__, prog_name='tfx-encrypt')
@click.option('--audit-log', 'audit_log', envvar=audit_lib.ENV,
              metavar='PATH|stderr|syslog[:ADDR]|logging',
              help='Write one audit event per action (JSON): to a '
              'hash-chained file of JSON lines (check it with `audit '
              'verify`), stderr, syslog (/dev/log, syslog:/SOCKET or '
              'syslog:HOST[:PORT] over UDP) or the Python logger '
              f'tfx_encrypt.audit. Default: ${audit_lib.ENV}.')
@click.pass_context
def main(ctx, audit_log):
  """Encrypt, sign and verify TensorFlow model packages."""
  # The keys layer asks for the passphrase of an encrypted key only on a
  # terminal; the CLI asks with click, like keygen --passphrase.
  local_keys.set_passphrase_prompt(_ask_passphrase)
  _audit_begin(ctx, audit_log)


def _ask_passphrase(text: str) -> str:
  """A hidden prompt on stderr (never echoed, never logged)."""
  return click.prompt(text.rstrip(': '), hide_input=True, err=True)


def _can_prompt() -> bool:
  return sys.stdin.isatty() and sys.stderr.isatty()


def _new_key_passphrase(passphrase_file: Optional[str]) -> bytes:
  """The passphrase of a new key: the file, the environment, or asked twice.

  Called by local_keys.keygen only after it checked that the outputs can be
  written, so nobody types a passphrase twice to learn the prefix is taken.
  """
  if passphrase_file:
    return local_keys.read_passphrase_file(passphrase_file,
                                           '--passphrase-file')
  found = local_keys.passphrase_from_environment()
  if found is not None:
    return found[0]
  if not _can_prompt():
    raise errors.UsageError(
        'keygen --passphrase needs a passphrase and there is no terminal to '
        'ask on: pass --passphrase-file FILE (its first line), or set '
        f'{local_keys.PASSPHRASE_ENV}')
  value = click.prompt('Passphrase for the new private key', hide_input=True,
                       confirmation_prompt=True, err=True)
  return value.encode('utf-8')


@main.command()
@click.argument('kind', type=click.Choice(local_keys.KEY_KINDS))
@click.argument('out_prefix')
@_force_option(help_text='Overwrite existing key files.')
@click.option('--passphrase', 'protect', is_flag=True,
              help='Encrypt the private key with a passphrase: asked twice on '
              'a terminal, or from --passphrase-file, $TFXE_KEY_PASSPHRASE or '
              '$TFXE_KEY_PASSPHRASE_FILE.')
@click.option('--passphrase-file', type=click.Path(dir_okay=False),
              metavar='FILE',
              help='Read the passphrase from the first line of FILE '
              '(implies --passphrase).')
def keygen(kind, out_prefix, force, protect, passphrase_file):
  """Write OUT_PREFIX.key.pem (mode 0600) and OUT_PREFIX.pub.pem."""
  passphrase = None
  if protect or passphrase_file:
    passphrase = lambda: _new_key_passphrase(passphrase_file)  # pylint: disable=unnecessary-lambda-assignment
  priv, pub = local_keys.keygen(kind, out_prefix, force=force,
                                passphrase=passphrase)
  key_id = local_keys.LocalKey(pub).key_id
  audit_lib.note(key_id=key_id, key_kind=kind)
  how = ', passphrase-protected' if passphrase else ''
  click.echo(f'wrote {priv} (private, 0600{how}) and {pub} (public); '
             f'key id {key_id}')


@main.command()
@click.argument('key')
def pubkey(key):
  """Print the public key of KEY as PEM on stdout, its key id on stderr.

  KEY is a local key file (private or public) or the URI of a KMS signing
  key (aws-kms://, gcp-kms://.../cryptoKeyVersions/N, hcvault://,
  azure-kv://), whose public key is fetched from the service, or a pkcs11:
  key pair in a token (HSM, TPM; read from its public key object): e.g.
  `tfx-encrypt pubkey aws-kms://arn:... > release.pub.pem` gives consumers
  a --trust key with the same key id as the KMS key.
  """
  from tfx_encrypt import keys as keys_lib  # pylint: disable=g-import-not-at-top
  backend = keys_lib.resolve(key)
  pem = backend.public_key_pem()
  key_id = backend.signer_id
  audit_lib.note(key_id=key_id)
  click.echo(pem.decode('ascii'), nl=False)
  click.echo(f'key id {_text.printable(key_id)}', err=True)


@main.command()
@click.argument('src_dir', type=click.Path(file_okay=False))
@click.argument('package')
@click.option('--recipient', '-r', 'recipients', multiple=True,
              metavar='KEY_URI',
              help='Who can decrypt, any one alone (repeatable).')
@click.option('--key-group', 'key_groups', multiple=True,
              metavar='KEY_URI[,KEY_URI...]',
              help='A key group (repeatable; groups are numbered 0, 1, ... in '
              'order). Instead of --recipient: recipients from --threshold '
              'distinct groups are needed to decrypt.')
@click.option('--threshold', type=int, metavar='K',
              help='With --key-group: how many groups must take part.')
@click.option('--sign-with', metavar='KEY_URI',
              help='Ed25519/ECDSA P-256 private key to sign the header.')
@click.option('--context', 'context', multiple=True, metavar='K=V',
              help='Encryption context entry bound to the package.')
@_cipher_option(default='aes-256-gcm', show_default=True)
@click.option('--hash', 'hash_alg',
              type=click.Choice(sorted(digest_lib.HASHES)),
              default='blake3', show_default=True,
              help='Digest of every file and payload (the fingerprint '
              'root is SHA-256 either way); sha256 for FIPS-bound users.')
@click.option('--bundle', is_flag=True, help='Write a single .tfxe file.')
@_force_option('PACKAGE')
@click.option('--fsync', is_flag=True, help='fsync before publishing.')
@click.option('--any-dir', is_flag=True,
              help='Encrypt SRC_DIR even if it holds no model file '
              '(saved_model.pb, *.keras, *.tflite, *.h5, ...).')
def encrypt(src_dir, package, recipients, key_groups, threshold, sign_with,
            context, cipher, hash_alg, bundle, force, fsync, any_dir):
  """Encrypt SRC_DIR (a SavedModel) into PACKAGE."""
  audit_lib.note(package=os.path.abspath(package))
  ctx = _parse_context(context)
  groups, k = _key_groups(key_groups, threshold)
  if groups and recipients:
    raise errors.UsageError(
        'pass either --recipient (any one decrypts) or --key-group with '
        '--threshold (k of n groups decrypt), not both')
  if not groups and not recipients:
    raise errors.UsageError(
        'say who can decrypt: --recipient KEY_URI, or --key-group URI[,URI] '
        '(at least two) with --threshold K')
  with _progress('encrypting', _fsutil.tree_size(src_dir)) as progress:
    info = pkg.encrypt_model(src_dir, package, recipients=list(recipients),
                             key_groups=groups, threshold=k,
                             signer=sign_with, context=ctx, cipher=cipher,
                             hash_alg=hash_alg, bundle=bundle, force=force,
                             progress=progress, fsync=fsync, any_dir=any_dir)
  audit_lib.record(info)
  click.echo(f'encrypted {_summary(info)}')


@main.command()
@click.argument('package')
@click.argument('out_dir')
@_identity_option
@_trust_options()
@_force_option('OUT_DIR')
@click.option('--fsync', is_flag=True, help='fsync before publishing.')
@_policy_options
def decrypt(package, out_dir, identities, trusted, allow_unsigned, force,
            fsync, policy):
  """Verify and decrypt PACKAGE into OUT_DIR."""
  _audit_input(package)
  _require_trust(trusted, allow_unsigned)
  total = pkg.inspect_package(package).ciphertext_bytes
  with _progress('decrypting', total) as progress:
    info = pkg.decrypt_model(package, out_dir, identities=list(identities),
                             trusted=list(trusted),
                             allow_unsigned=allow_unsigned, force=force,
                             progress=progress, fsync=fsync, policy=policy)
  audit_lib.record(info)
  who = (f'signed by trusted {_show(info.signer)}' if info.signature_verified
         else 'UNSIGNED (accepted by --allow-unsigned)')
  click.echo(f'decrypted {info.file_count} files into {_show(out_dir)}; {who}; '
             f'fingerprint {_show(info.fingerprint)}')


@main.command()
@click.argument('package')
@click.option('--json', 'as_json', is_flag=True, help='Machine-readable output.')
def inspect(package, as_json):
  """Show what PACKAGE says about itself (no key needed, signer NOT verified)."""
  audit_lib.note(package=os.path.abspath(package))
  info = pkg.inspect_package(package)
  audit_lib.record(info)
  if as_json:
    click.echo(_json(info.to_dict(), indent=2))
    return
  # Every string below but the numbers comes from the (unverified) header:
  # each goes through _show.
  click.echo(f'package:     {_show(info.path)} '
             f'({"bundle" if info.bundle else "directory"})')
  click.echo(f'format:      tfx-encrypt/{info.format_version}, '
             f'{_show(info.suite)}, hash {_show(info.hash_alg)}')
  click.echo(f'package id:  {_show(info.package_id)}')
  click.echo(f'created:     {_show(info.created)}')
  click.echo(f'files:       {info.file_count} ({info.ciphertext_bytes} bytes '
             'encrypted)')
  click.echo(f'fingerprint: {_show(info.fingerprint)}')
  click.echo(f'ciphertext:  {_show(info.payload_digest)}')
  click.echo(f'signer:      {_show(info.signer or "unsigned")}'
             + (f' ({_show(info.signature_alg)}, not verified)'
                if info.signer else ''))
  if info.threshold:
    groups = info.threshold['groups']
    click.echo(f'threshold:   {info.threshold["k"]} of {len(groups)} key '
               'groups needed to decrypt')
    types = {r['key_id']: r['type'] for r in info.recipients}
    click.echo('key groups:')
    for gi, g in enumerate(groups):
      click.echo(f'  group {gi}:')
      for key_id in g:
        click.echo(f'    - {_show(types.get(key_id, "?"))}: {_show(key_id)}')
  else:
    click.echo('threshold:   none (any one recipient decrypts)')
    click.echo('recipients:')
    for r in info.recipients:
      click.echo(f'  - {_show(r["type"])}: {_show(r["key_id"])}')
  click.echo('context:')
  for k, v in sorted(info.context.items()):
    click.echo(f'  {_show(k)} = {_show(v)}')


@main.command()
@click.argument('package')
@_trust_options()
@_policy_options
def verify(package, trusted, allow_unsigned, policy):
  """Check the signature and every ciphertext digest, without any key."""
  _audit_input(package)
  info = pkg.verify_package(package, trusted=list(trusted),
                            allow_unsigned=allow_unsigned, policy=policy)
  audit_lib.record(info)
  who = (f'signed by trusted {_show(info.signer)}' if info.signature_verified
         else 'UNSIGNED')
  click.echo(f'OK: {info.file_count} payloads match their digests; {who}')


def _mlmd_options(f):
  """The ML Metadata connection options, defined once (lineage, rewrap,
  rotate); the command gets `mlmd`: a dict for lineage.connect, or None.

  The MySQL password is never an argument: TFXE_MLMD_PASSWORD or one line
  on stdin (--mlmd-password-stdin).
  """

  @functools.wraps(f)
  def command(*args, mlmd_sqlite, mlmd_mysql, mlmd_user, mlmd_password_stdin,
              mlmd_config, mlmd_grpc, **kwargs):
    mlmd = None
    if mlmd_sqlite or mlmd_mysql or mlmd_config or mlmd_grpc or mlmd_user:
      password = os.environ.get('TFXE_MLMD_PASSWORD') or None
      if mlmd_password_stdin:
        password = sys.stdin.readline().rstrip('\r\n') or None
      mlmd = dict(sqlite=mlmd_sqlite, mysql=mlmd_mysql, user=mlmd_user,
                  password=password, config_file=mlmd_config, grpc=mlmd_grpc)
    elif mlmd_password_stdin:
      raise errors.UsageError('--mlmd-password-stdin goes with --mlmd-mysql '
                              'or --mlmd-config')
    return f(*args, mlmd=mlmd, **kwargs)

  for option in reversed((
      click.option('--mlmd-sqlite', metavar='PATH',
                   help='SQLite ML Metadata store of the pipeline (never '
                   'created).'),
      click.option('--mlmd-mysql', metavar='HOST:PORT/DB',
                   help='MySQL / MariaDB ML Metadata store (Kubeflow), with '
                   '--mlmd-user; password from TFXE_MLMD_PASSWORD or '
                   '--mlmd-password-stdin.'),
      click.option('--mlmd-user', metavar='NAME', help='MySQL user.'),
      click.option('--mlmd-password-stdin', is_flag=True,
                   help='Read the MySQL password from the first line of '
                   'stdin.'),
      click.option('--mlmd-config', metavar='FILE',
                   help="ml_metadata ConnectionConfig (or "
                   "MetadataStoreClientConfig) text proto."),
      click.option('--mlmd-grpc', metavar='HOST:PORT',
                   help='A metadata gRPC service (metadata_store_server).'))):
    command = option(command)
  return command


def _rotation_lineage(mlmd, package):
  """With --mlmd-*: (lineage module, writable store, old PackageInfo, the
  recorded EncryptedModel), checked before the package is touched."""
  if mlmd is None:
    return None
  lineage_lib = _import_lineage()
  store = _connect_mlmd(lineage_lib, mlmd, read_only=False)
  old_info = pkg.inspect_package(package)
  old = lineage_lib.find_recorded(store, package, old_info.package_id)
  return lineage_lib, store, old_info, old


def _record_rotation(recorder, operation, info, new_path):
  if recorder is None:
    return
  lineage_lib, store, old_info, old = recorder
  try:
    done = lineage_lib.record_rotation(store, old, operation=operation,
                                       old_info=old_info, new_info=info,
                                       new_path=new_path)
  except lineage_lib.LineageError as e:
    raise lineage_lib.LineageError(
        f'{operation} done ({new_path}), but not recorded: {e}') from e
  what = (f'supersedes EncryptedModel {done["superseded_id"]}'
          if done['superseded_id'] is not None
          else f'from EncryptedModel {old.id}')
  click.echo(f'recorded in ML Metadata: {lineage_lib.KEY_ROTATION_TYPE} '
             f'execution {done["execution_id"]}, EncryptedModel '
             f'{done["artifact_id"]} ({what})')


@main.command()
@click.argument('package')
@_identity_option
@click.option('--add-recipient', 'adds', multiple=True, metavar='KEY_URI')
@click.option('--remove-recipient', 'removes', multiple=True,
              metavar='KEY_URI_OR_ID')
@click.option('--add-to-group', type=int, metavar='N',
              help='Key group (0, 1, ...) the added recipients join; '
              'required for a package with key groups.')
@click.option('--sign-with', metavar='KEY_URI',
              help='Re-sign the new header (required if PACKAGE is signed).')
@_trust_options(
    trust_help='Public key of a trusted publisher (repeatable); the current '
    'signature is verified before any key is used.',
    allow_unsigned_help='Accept an unsigned PACKAGE (a signed one must still '
    'be signed by a --trust key).')
@click.option('--resign-unsigned', is_flag=True,
              help='With --allow-unsigned and --sign-with: sign an UNSIGNED '
              'package, vouching for it yourself.')
@_mlmd_options
def rewrap(package, identities, adds, removes, add_to_group, sign_with,
           trusted, allow_unsigned, resign_unsigned, mlmd):
  """Change PACKAGE's recipients without re-encrypting the payload."""
  _audit_input(package, as_source=True)
  _require_trust(trusted, allow_unsigned)
  if not adds and not removes:
    raise errors.UsageError('nothing to do: pass --add-recipient and/or '
                            '--remove-recipient')
  recorder = _rotation_lineage(mlmd, package)
  with _api_warnings():
    info = pkg.rewrap_package(package, identities=list(identities),
                              add_recipients=list(adds),
                              remove_recipients=list(removes),
                              add_to_group=add_to_group, signer=sign_with,
                              trusted=list(trusted),
                              allow_unsigned=allow_unsigned,
                              resign_unsigned=resign_unsigned)
  audit_lib.record(info)
  click.echo(f'rewrapped {_summary(info)}')
  _record_rotation(recorder, 'rewrap', info, package)


@main.command()
@click.argument('package')
@click.argument('out')
@_identity_option
@click.option('--recipient', '-r', 'recipients', multiple=True,
              metavar='KEY_URI')
@click.option('--key-group', 'key_groups', multiple=True,
              metavar='KEY_URI[,KEY_URI...]',
              help='As for encrypt: new key groups instead of --recipient.')
@click.option('--threshold', type=int, metavar='K')
@_trust_options()
@click.option('--sign-with', metavar='KEY_URI')
@click.option('--resign-unsigned', is_flag=True,
              help='With --allow-unsigned and --sign-with: sign the output of '
              'an UNSIGNED package, vouching for it yourself.')
@_cipher_option()
@click.option('--bundle/--directory', 'bundle', default=None,
              help='Output form (default: same as PACKAGE).')
@_force_option('OUT')
@_policy_options
@_mlmd_options
def rotate(package, out, identities, recipients, key_groups, threshold,
           trusted, allow_unsigned, sign_with, resign_unsigned, cipher, bundle,
           force, policy, mlmd):
  """Re-encrypt PACKAGE under a fresh data key into OUT (no plaintext on disk)."""
  _audit_input(package, as_source=True)
  _require_trust(trusted, allow_unsigned)
  groups, k = _key_groups(key_groups, threshold)
  if bool(groups) == bool(recipients):
    raise errors.UsageError(
        'say who can decrypt the new package: --recipient KEY_URI, or '
        '--key-group URI[,URI] (at least two) with --threshold K, not both')
  total = pkg.inspect_package(package).ciphertext_bytes
  recorder = _rotation_lineage(mlmd, package)
  with _progress('rotating', total) as p, _api_warnings():
    info = pkg.rotate_package(package, out, identities=list(identities),
                              recipients=list(recipients),
                              key_groups=groups, threshold=k,
                              trusted=list(trusted),
                              allow_unsigned=allow_unsigned, signer=sign_with,
                              resign_unsigned=resign_unsigned,
                              cipher=cipher, bundle=bundle, force=force,
                              progress=p, policy=policy)
  audit_lib.record(info)
  click.echo(f'rotated into {_summary(info)}')
  _record_rotation(recorder, 'rotate', info, out)



def _import_lineage():
  """tfx_encrypt.lineage, or a UsageError when ML Metadata is missing."""
  try:
    from tfx_encrypt import lineage  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if (e.name or '').split('.')[0] not in ('ml_metadata', 'google'):
      raise
    raise errors.UsageError(
        'tfx-encrypt lineage needs ML Metadata, which is not installed: '
        "pip install 'tfx-encrypt[tfx]'") from e
  return lineage


@contextlib.contextmanager
def _native_stderr_quiet():
  """ML Metadata's C++ layer logs connection failures straight to fd 2;
  the CLI reports them in its one error line instead."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, 'wb') as null:
      os.dup2(null.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def _connect_mlmd(lineage_lib, mlmd, read_only=True):
  with _native_stderr_quiet():
    return lineage_lib.connect(read_only=read_only, **(mlmd or {}))


def _lineage_row(t: dict) -> Sequence[str]:
  em, ex = t['encrypted_model'], t['execution'] or {}
  props = em['properties']
  pipeline = ex.get('pipeline_name') or em.get('pipeline_name') or '?'
  run = ex.get('pipeline_run_id') or em.get('pipeline_run_id') or '?'
  model = ', '.join(m['uri'] for m in t['models']) or (
      (props.get('encryption_context') or {}).get('tfx.model_uri', '?'))
  pushed = (t['pushed_model'] if not t.get('rotated_from') else None) or props
  if pushed.get('pushed'):
    where = (f'{pushed.get("pushed_destination")} '
             f'(version {pushed.get("pushed_version")})')
  else:
    where = 'not pushed'
  return [_show(str(em['id'])), f'{_show(pipeline)} / {_show(run)}',
          _show(model), _show(where)]


def _exec_label(ex: Optional[dict]) -> str:
  if not ex:
    return '?'
  kind = (ex.get('type') or '?').rsplit('.', 1)[-1]
  return f'{_show(kind)} execution {ex["id"]}'


def _lineage_details(t: dict) -> Sequence[str]:
  """The indented lines under a row: keys, status, rotations, upstream."""
  em = t['encrypted_model']
  props = em['properties']
  out = [f'recipient {_show(rid)}'
         for rid in props.get('recipient_key_ids') or []]
  out.append(f'signer    {_show(props.get("signer_id") or "unsigned")}')
  if em.get('status') != 'live':
    by = em.get('superseded_by')
    out.append(f'status    {_show(em.get("status"))}' +
               (f' (replaced by EncryptedModel {by})' if by else ''))
  for r in t.get('rotations') or []:
    p = r.get('properties') or {}
    out.append(f'rotated   {_show(p.get("operation"))} -> EncryptedModel '
               f'{r.get("new_artifact_id")} ({_exec_label(r)}; added '
               f'{_show(", ".join(p.get("added_key_ids") or []) or "none")}; '
               'removed '
               f'{_show(", ".join(p.get("removed_key_ids") or []) or "none")})')
  for r in t.get('rotated_from') or []:
    out.append(f'rotated from EncryptedModel {r["id"]} '
               f'({_exec_label(r.get("rotation"))})')
  for m in t.get('models') or []:
    producer = m.get('produced_by')
    if producer:
      inputs = ', '.join(f'{_show(i["type"])} {i["id"]}'
                         for i in producer.get('inputs') or [])
      out.append(f'model     {_show(m["type"])} {m["id"]} from '
                 f'{_exec_label(producer)}' +
                 (f' <- {inputs}' if inputs else ''))
  for e in t.get('examples') or []:
    source = (e.get('produced_by') or {}).get('input_base')
    out.append(f'examples  {_show(e["uri"])} (Examples {e["id"]}, from '
               f'{_exec_label(e.get("produced_by"))}'
               + (f' <- {_show(source)})' if source else ')'))
  pushes = t.get('pushes') or []
  for push in pushes[1:] if not t.get('rotated_from') else pushes:
    if push.get('pushed'):
      out.append(f'pushed    {_show(push.get("pushed_destination"))} '
                 f'(version {_show(push.get("pushed_version"))})')
  return out


@main.command()
@_mlmd_options
@click.option('--key-id', metavar='ID',
              help='Only packages with this recipient or signer key id (or '
              'recipient key URI): the live ones still wrapped for it (the '
              'rotation worklist), then those a rotation replaced, marked '
              'as such.')
@click.option('--fingerprint', metavar='FP',
              help='Only this model fingerprint (sha256:<hex> or the hex).')
@click.option('--package', 'package', metavar='PKG',
              help="Only the artifact of this package (its header's package "
              'id; no key needed).')
@click.option('--pipeline', 'pipeline_name', metavar='NAME',
              help='Only artifacts produced by this TFX pipeline.')
@click.option('--version', 'version', metavar='V',
              help='Only the package pushed as version V (the '
              '<push_destination>/V directory).')
@click.option('--pushed-only', is_flag=True,
              help='Only packages that were pushed.')
@click.option('--all', 'show_all', is_flag=True,
              help='Also artifacts a key rotation replaced and those of '
              'unblessed runs (encrypted=0, no package).')
@click.option('--json', 'as_json', is_flag=True,
              help='The full trace of each match, as JSON.')
def lineage(mlmd, key_id, fingerprint, package, pipeline_name, version,
            pushed_only, show_all, as_json):
  """Which model, which run, which keys, pushed where (needs ML Metadata).

  Lists the EncryptedModel artifacts recorded by EncryptPusher (and by
  rewrap / rotate), newest first; exits 1 when none matches. Name the store
  with one of --mlmd-sqlite, --mlmd-mysql (+ --mlmd-user), --mlmd-config or
  --mlmd-grpc.
  """
  lineage_lib = _import_lineage()
  if mlmd is None:
    mlmd = {}
  package_id = pkg.inspect_package(package).package_id if package else None
  store = _connect_mlmd(lineage_lib, mlmd)
  filters = dict(key_id=key_id, fingerprint=fingerprint,
                 package_id=package_id, pipeline_name=pipeline_name,
                 pushed_only=pushed_only, version=version)
  matches = lineage_lib.encrypted_models(store, include_superseded=show_all,
                                         include_unpackaged=show_all,
                                         **filters)
  if key_id is not None and not show_all:
    # The worklist first, then what a rotation already took off it.
    matches += [m for m in lineage_lib.encrypted_models(
        store, include_superseded=True, **filters)
                if m['status'] == 'superseded']
  if not matches:
    described = [f'{name} {value}' for name, value in (
        ('key id', key_id), ('fingerprint', fingerprint),
        ('package id', package_id), ('pipeline', pipeline_name),
        ('version', version)) if value]
    if pushed_only:
      described.append('pushed')
    where = (mlmd.get('sqlite') or mlmd.get('mysql') or mlmd.get('grpc') or
             mlmd.get('config_file'))
    raise lineage_lib.NoMatchError(
        f'no EncryptedModel matches in {where}'
        + (f' ({", ".join(described)})' if described else ''))
  traces = [lineage_lib.trace(store, m['id']) for m in matches]
  if as_json:
    click.echo(_json(traces, indent=2))
    return
  rows = [['ID', 'PIPELINE / RUN', 'MODEL', 'PUSHED TO']]
  rows += [_lineage_row(t) for t in traces]
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  for i, row in enumerate(rows):
    click.echo('  '.join(c.ljust(w) for c, w in zip(row, widths)) +
               '  ' + row[3])
    if i:
      pad = ' ' * (widths[0] + 2)
      for line in _lineage_details(traces[i - 1]):
        click.echo(pad + line)


@main.command()
@click.argument('directory', type=click.Path(file_okay=False, exists=True))
def clean(directory):
  """Remove stale temporary files of interrupted tfx-encrypt commands.

  Only hidden `.NAME.tfxe-KIND-TOKEN` siblings whose owning command is gone
  (its lock is free) are removed; those of running commands, and anything
  else, are left alone. Commands that write into a directory do this too.
  """
  removed = _fsutil.sweep(directory)
  for name in removed:
    click.echo(f'removed {_text.printable(os.path.join(directory, name))}')
  if not removed:
    click.echo(f'nothing to clean in {_text.printable(directory)}')


# --- serve-sync ---------------------------------------------------------------


def _print_sync(result, as_json: bool) -> None:
  if as_json:
    click.echo(_json(result.to_dict()))  # one line
    return
  for action in result.actions:
    click.echo(action.line())  # escapes what it shows
  if not result.actions:
    click.echo(f'nothing to do: no version in {_show(result.source_base)}')


@main.command('serve-sync')
@click.argument('source')
@click.argument('serving_base')
@_identity_option
@_trust_options(allow_unsigned_help='Accept packages without a signature.')
@click.option('--keep', type=click.IntRange(min=1), default=2,
              show_default=True, help='How many newest versions to serve.')
@click.option('--once', is_flag=True, help='Sync once and exit.')
@click.option('--interval', type=click.FloatRange(min=0.1), metavar='SECONDS',
              help='Sync every SECONDS until SIGINT/SIGTERM.')
@click.option('--group-readable', is_flag=True,
              help='Publish versions 0750/0640 instead of 0700/0600, for a '
              'TF Serving running as another user of the same group.')
@click.option('--json', 'as_json', is_flag=True,
              help='One JSON object per sync instead of one line per action.')
@_policy_options
def serve_sync(source, serving_base, identities, trusted, allow_unsigned, keep,
               once, interval, group_readable, as_json, policy):
  """Keep SERVING_BASE (TF Serving's model base path) in sync with SOURCE.

  Decrypts the newest --keep versions pushed to SOURCE into
  SERVING_BASE/<version>/ (publisher verified, atomic) and removes older
  versions that serve-sync installed itself. With --once, exits 1 when a
  version failed; with --interval, failures are reported and retried.
  """
  import logging  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.runtime import serving  # pylint: disable=g-import-not-at-top
  if once == (interval is not None):
    raise errors.UsageError('say how to run: --once, or --interval SECONDS '
                            '(not both)')
  _require_trust(trusted, allow_unsigned)
  # Failures are printed as actions; keep logging's last-resort handler from
  # printing them a second time (a configured root logger still gets them).
  logging.getLogger(serving.__name__).addHandler(logging.NullHandler())
  # Once, up front: a key in the wrong role is a usage error before the
  # first sync, `-` (stdin) is read once and a passphrase asked once.
  identities = pkg.resolve_keys(identities, 'identity')
  trusted = pkg.resolve_keys(trusted, 'trust')

  def sync():
    return serving.sync_serving(
        source, serving_base, identities=list(identities),
        trusted=list(trusted), allow_unsigned=allow_unsigned, keep=keep,
        group_readable=group_readable, policy=policy,
        on_action=audit_lib.sync_action)  # one audit event per action

  if once:
    _signals.install(commit_on_publish=False)
    result = sync()
    _print_sync(result, as_json)
    if not result.ok:
      click.get_current_context().exit(1)
    return
  # A sync installs several versions: a signal stops it where it is (the
  # version being installed is cleaned up; installed ones stay).
  _signals.install(commit_on_publish=False)
  first = True
  while True:
    try:
      result = sync()
    except errors.UsageError as e:
      if first:  # bad arguments: give up at once
        raise
      click.echo(f'tfx-encrypt: error: {_text.printable(str(e), limit=None)}',
                 err=True)  # keep going
    except errors.TfxEncryptError as e:
      click.echo(f'tfx-encrypt: error: {_text.printable(str(e), limit=None)}',
                 err=True)
    except OSError as e:
      if _stdout_closed(e):
        raise
      click.echo(f'tfx-encrypt: error: {_os_error_text(e)}', err=True)
    else:
      if as_json:
        _print_sync(result, True)
      else:  # only what changed or failed; `kept` every time is noise
        for action in result.actions:
          if action.action != serving.KEPT:
            click.echo(action.line())
    first = False
    sys.stdout.flush()
    time.sleep(interval)


def _import_oci():
  """tfx_encrypt.distribution.oci (oras itself is imported only when used)."""
  from tfx_encrypt.distribution import oci  # pylint: disable=g-import-not-at-top
  return oci


#: Where `--username` finds its password when not on stdin.
REGISTRY_PASSWORD_ENV = 'TFXE_REGISTRY_PASSWORD'


def _registry_password(password_stdin: bool) -> str:
  """The registry password: stdin, the environment, or a hidden prompt."""
  if password_stdin:
    password = sys.stdin.readline().rstrip('\r\n')
    if not password:
      raise errors.UsageError('--password-stdin: standard input is empty')
    return password
  password = os.environ.get(REGISTRY_PASSWORD_ENV)
  if password:
    return password
  if sys.stdin.isatty() and sys.stderr.isatty():
    return click.prompt('Registry password', hide_input=True, err=True)
  raise errors.UsageError(
      f'--username needs a password: pipe it with --password-stdin or set '
      f'{REGISTRY_PASSWORD_ENV} (never on the command line)')


def _registry_options(f):
  """Registry credentials and TLS (oras / docker names); gets `registry_auth`.

  Used by push and pull. Without --username, credentials come from the
  docker config (docs/DISTRIBUTION.md).
  """

  @functools.wraps(f)
  def command(*args, username, password_stdin, password_argv, ca_file,
              cert_file, key_file, **kwargs):
    if password_argv is not None:
      raise errors.UsageError(
          'a password on the command line is visible to every user (ps, '
          'shell history): pass --password-stdin or set '
          f'{REGISTRY_PASSWORD_ENV}')
    if password_stdin and username is None:
      raise errors.UsageError('--password-stdin needs --username')
    password = None if username is None else _registry_password(
        password_stdin)
    auth = _import_oci().RegistryAuth(
        username=username, password=password, ca_file=ca_file,
        cert_file=cert_file, key_file=key_file)
    return f(*args, registry_auth=auth, **kwargs)

  options = (
      click.option('--username', '-u', metavar='USER',
                   help='Registry user name (HTTP basic auth); the password '
                   f'comes from --password-stdin or ${REGISTRY_PASSWORD_ENV}. '
                   'Default: the docker config\'s credentials.'),
      click.option('--password-stdin', is_flag=True,
                   help='Read the registry password from standard input.'),
      click.option('--password', '-p', 'password_argv', hidden=True),
      click.option('--ca-file', '--ca-cert', 'ca_file', metavar='PEM',
                   help='CA certificate(s) that issued the registry\'s TLS '
                   'certificate (instead of the system CAs).'),
      click.option('--cert-file', '--cert', 'cert_file', metavar='PEM',
                   help='TLS client certificate (mutual TLS), with '
                   '--key-file.'),
      click.option('--key-file', '--key', 'key_file', metavar='PEM',
                   help='Private key of --cert-file (unencrypted PEM).'),
  )
  for option in reversed(options):
    command = option(command)
  return command


@main.command()
@click.argument('package')
@click.argument('ref')
@click.option('--insecure', is_flag=True,
              help='Plain HTTP, for a loopback registry only (tests).')
@_registry_options
def push(package, ref, insecure, registry_auth):
  """Push PACKAGE to an OCI registry as REF (REGISTRY/REPOSITORY:TAG).

  One layer: the package's bundle bytes. Credentials come from --username
  (with --password-stdin), else the docker config (~/.docker/config.json,
  $DOCKER_CONFIG, credential helpers); --cert-file/--key-file for mutual TLS.
  """
  _audit_input(package)
  _audit_ref(ref)
  digest = _import_oci().push_package(package, ref, insecure=insecure,
                                      auth=registry_auth)
  audit_lib.note(manifest_digest=digest)
  click.echo(f'pushed {package} to {ref}; manifest digest {digest}')


@main.command()
@click.argument('ref')
@click.argument('out')
@_trust_options()
@click.option('--insecure', is_flag=True,
              help='Plain HTTP, for a loopback registry only (tests).')
@_force_option('OUT')
@_policy_options
@_registry_options
def pull(ref, out, trusted, allow_unsigned, insecure, force, policy,
         registry_auth):
  """Pull REF into the bundle file OUT, verified before it appears.

  Checks the manifest's shape and the layer's digest, then the signature
  and every ciphertext digest (no key needed); on any failure nothing is
  written at OUT.
  """
  _audit_ref(ref)
  _require_trust(trusted, allow_unsigned)
  res = _import_oci().pull_package(ref, out, trusted=list(trusted),
                                   allow_unsigned=allow_unsigned,
                                   insecure=insecure, force=force,
                                   policy=policy, auth=registry_auth)
  info = res.info
  audit_lib.record(info)
  audit_lib.note(manifest_digest=res.manifest_digest)
  who = (f'signed by trusted {_show(info.signer)}' if info.signature_verified
         else 'UNSIGNED (accepted by --allow-unsigned)')
  click.echo(f'pulled {_show(ref)} ({_show(res.manifest_digest)}) into '
             f'{_show(out)}: {info.file_count} payloads verified; {who}; '
             f'fingerprint {_show(info.fingerprint)}')


# --- audit --------------------------------------------------------------------


@main.group('audit')
def audit():
  """Check an audit log written with --audit-log PATH."""


@audit.command('verify')
@click.argument('log', type=click.Path(dir_okay=False))
@click.option('--expect-head', 'expect_head', metavar='HASH',
              help='A head printed by an earlier `audit verify` and kept '
              'elsewhere: refuse the log (exit 4) unless that event is '
              'still in its chain.')
def audit_verify(log, expect_head):
  """Check LOG's hash chain and print its head (the last event's hash).

  Exits 4 with one line naming the first line that was edited, deleted,
  inserted or moved, or a cut last line. A rewrite of the whole file, or
  the newest events removed, show only against a head kept elsewhere
  (--expect-head).
  """
  found = audit_lib.verify_log(log, expect_head=expect_head)
  anchored = ''
  if expect_head is not None:
    anchored = (f'; the expected head is event {found.anchor_seq}'
                if found.anchor_seq else '; the expected head is the genesis')
  click.echo(f'OK: {_show(log)}: {found.events} events, chain intact; head '
             f'{found.head}{anchored}')


if __name__ == '__main__':
  main()  # pylint: disable=no-value-for-parameter
