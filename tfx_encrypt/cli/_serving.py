"""`serve-sync`: keep a TF Serving base path in sync with a push
destination."""

import logging
import sys
import time

import click

from tfx_encrypt import _signals
from tfx_encrypt import _text
from tfx_encrypt import audit as audit_lib
from tfx_encrypt import errors
from tfx_encrypt import package as pkg
from tfx_encrypt.cli._options import (
    _identity_option, _json, _policy_options, _require_trust, _show,
    _trust_options)
from tfx_encrypt.cli._group import _os_error_text, _stdout_closed, main


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

  Decrypts the newest --keep versions pushed to SOURCE (a directory, or a
  gs:// or s3:// push base) into SERVING_BASE/<version>/ (publisher
  verified, atomic) and removes older versions that serve-sync installed
  itself. A version whose push is not complete (payloads, no header) is
  reported `incomplete` and installed by a later sync. With --once, exits 1
  when a version failed; with --interval, failures are reported and retried.
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
  # An incomplete version (a push running) is printed once, not at every
  # iteration until its header arrives.
  incomplete_shown = set()
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
        now_incomplete = set()
        for action in result.actions:
          if action.action == serving.INCOMPLETE:
            now_incomplete.add(action.version)
            if action.version in incomplete_shown:
              continue
          if action.action != serving.KEPT:
            click.echo(action.line())
        incomplete_shown = now_incomplete
    first = False
    sys.stdout.flush()
    time.sleep(interval)
