"""`audit verify`: check an audit log's hash chain."""

import click

from tfx_encrypt import audit as audit_lib
from tfx_encrypt.cli._options import _show
from tfx_encrypt.cli._group import main


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
