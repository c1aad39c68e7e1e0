"""Options and helpers shared by several commands, each defined once."""

import contextlib
import functools
import json
import logging
import os
import sys
import threading
from typing import Dict, Optional, Sequence

import click

from tfx_encrypt import _text
from tfx_encrypt import audit as audit_lib
from tfx_encrypt import errors
from tfx_encrypt import package as pkg
from tfx_encrypt import policy as policy_lib
from tfx_encrypt.format import streaming


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


_audit_location = audit_lib.location  # a local path absolute, a URI as is


def _audit_input(package: str, *, as_source: bool = False) -> None:
  """Record the package a command reads, as its header says (signer not
  verified), so that the event of a failed command names it too; the
  command's verified result replaces it. Never fails: the command itself
  reports what is wrong with the package."""
  if audit_lib.current() is None:
    return
  audit_lib.note(package=audit_lib.location(package))
  try:
    audit_lib.record(pkg.inspect_package(package), as_source=as_source)
  except (errors.TfxEncryptError, OSError, ValueError):
    pass


def _ask_passphrase(text: str) -> str:
  """A hidden prompt on stderr (never echoed, never logged)."""
  return click.prompt(text.rstrip(': '), hide_input=True, err=True)


def _can_prompt() -> bool:
  return sys.stdin.isatty() and sys.stderr.isatty()


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
