"""The command group: one line and an exit code for every failure,
signals, a closed stdout, the audit event of each command."""

import errno
import os
import select
import sys
from typing import Optional

import click

from tfx_encrypt import _fsutil
from tfx_encrypt import _signals
from tfx_encrypt import _text
from tfx_encrypt import audit as audit_lib
from tfx_encrypt import errors
from tfx_encrypt.__about__ import __version__
from tfx_encrypt.keys import local as local_keys
from tfx_encrypt.cli._options import _ask_passphrase


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
