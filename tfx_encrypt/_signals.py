"""SIGINT, SIGTERM and SIGHUP: stop cleanly, never half-way through cleanup.

The CLI installs :func:`install` for the life of a command. The first signal
raises :class:`Interrupted` in the main thread (as Python does for SIGINT
with KeyboardInterrupt), and worker threads stop at their next segment
through :func:`check`. Code that must not be cut in half (removing a
temporary sibling, the final atomic rename) runs inside :func:`deferred`:
a signal that arrives there is raised when the block ends, unless the
command has already published its output (:func:`mark_committed`), in
which case the command finishes normally. Later signals are ignored while
the first one unwinds, so cleanup itself cannot be interrupted.

The Python API never installs handlers: a library must not take signals
from its host. Without them, KeyboardInterrupt still unwinds through the
same cleanup code.
"""

import contextlib
import signal
import threading
from typing import Dict, Optional

#: The signals a command handles, and the exit code each one gives.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
  """The command was asked to stop by a signal (a BaseException, as
  KeyboardInterrupt: `except Exception` must not swallow it)."""

  def __init__(self, signum: int):
    super().__init__(f'interrupted by {signal.Signals(signum).name}')
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class _State:

  def __init__(self):
    self.lock = threading.RLock()
    self.installed = False
    self.pending: Optional[int] = None
    self.raised = False
    self.committed = False
    self.commit_on_publish = True
    self.depth = 0
    self.previous: Dict[int, object] = {}


_STATE = _State()


def _handler(signum, frame):
  del frame  # unused
  s = _STATE
  if s.pending is None:
    s.pending = signum
  if s.raised or s.committed or s.depth > 0:
    return  # recorded; raised (or not) when the protected block ends
  s.raised = True
  raise Interrupted(signum)


def install(commit_on_publish: bool = True) -> None:
  """Handle SIGINT/SIGTERM/SIGHUP in this (main) thread until `uninstall`.

  With `commit_on_publish` (commands with one output), the output's atomic
  rename completes the command: a signal after it no longer undoes it.
  Multi-step commands (serve-sync) pass False and stop at the signal.
  """
  s = _STATE
  s.pending, s.raised, s.committed, s.depth = None, False, False, 0
  s.commit_on_publish = commit_on_publish
  s.previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
  s.installed = True


def uninstall() -> None:
  s = _STATE
  for sig, prev in s.previous.items():
    signal.signal(sig, prev)
  s.previous = {}
  s.installed = False


def pending() -> Optional[int]:
  """The first signal received since `install`, if any."""
  return _STATE.pending


def check() -> None:
  """Raise Interrupted in a worker thread once a signal has arrived.

  Called per segment by the payload workers, so that a signal stops a
  multi-GiB file within a segment instead of at its end.
  """
  s = _STATE
  if s.pending is not None and not s.committed:
    raise Interrupted(s.pending)


def mark_committed() -> None:
  """The command's output is published: later signals no longer undo it."""
  if _STATE.installed and _STATE.commit_on_publish:
    _STATE.committed = True


@contextlib.contextmanager
def deferred():
  """Hold signals for the block (cleanup, atomic renames); raise after it."""
  s = _STATE
  with s.lock:
    s.depth += 1
  try:
    yield
  finally:
    with s.lock:
      s.depth -= 1
      # Only the main thread raises here; workers stop through `check`.
      fire = (s.depth == 0 and s.installed and s.pending is not None and
              not s.raised and not s.committed and
              threading.current_thread() is threading.main_thread())
      if fire:
        s.raised = True
    if fire:
      raise Interrupted(s.pending)
