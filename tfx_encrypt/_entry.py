"""The `tfx-encrypt` console entry point (and `python -m tfx_encrypt`).

Signals are handled from the first line we run: until the CLI installs its
own handlers (tfx_encrypt._signals, around each command), SIGINT, SIGTERM
and SIGHUP end the process at once with 128 + the signal number, without a
traceback. Nothing has been written yet at that point, so there is nothing
to clean up. Only the standard library is imported before that. Once the
command has decided its exit code, the signals are blocked, so that
interpreter shutdown cannot turn a finished command into a killed one.
"""

import os
import signal

_EARLY_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _exit_now(signum, frame):
  del frame  # unused
  os._exit(128 + signum)  # pylint: disable=protected-access


def main():
  for sig in _EARLY_SIGNALS:
    signal.signal(sig, _exit_now)
  from tfx_encrypt import cli  # pylint: disable=g-import-not-at-top
  try:
    cli.main(prog_name='tfx-encrypt')  # pylint: disable=no-value-for-parameter
  finally:
    # The command is over (its exit code is decided): a signal during
    # interpreter shutdown, when Python restores the default handlers, must
    # not turn that into "killed by SIGTERM".
    signal.pthread_sigmask(signal.SIG_BLOCK, _EARLY_SIGNALS)


if __name__ == '__main__':
  main()
