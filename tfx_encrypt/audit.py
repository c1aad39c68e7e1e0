"""Audit trail: one structured event per action, to a configurable sink.

Every CLI command (from `cli._Group.invoke`), every serve-sync action and
every EncryptPusher execution emits one event: a flat JSON object

  {"v": 1, "time": "2026-05-09T07:34:36.123456Z", "actor": "alice",
   "uid": 1000, "host": "build-7", "pid": 4242, "tool": "tfx-encrypt/0.4.0",
   "action": "decrypt", "outcome": "ok", "error": null, "exit_code": 0,
   "package": "/srv/model.pkg", "package_id": "...", "fingerprint": "...",
   "recipients": ["sha256:..."], "signer": "sha256:...",
   "signer_verified": true}

(`docs/SECURITY.md` §8 lists every field). An event names packages by the
path given and by what their header says (package id, fingerprint,
recipient and signer key ids); it never holds key material, key URIs,
tokens, PINs, passphrases, error messages or the names of the model's files
(the file table is encrypted). Strings read from a package are stored
exactly; every sink writes JSON with `ensure_ascii`, so no control, escape
sequence, line separator or bidi character reaches a terminal or a log raw,
and :func:`verify_log` escapes what it quotes (tfx_encrypt._text).

Sinks (:func:`open_sink`): a file of JSON lines, stderr, syslog
(`logging.handlers.SysLogHandler`: /dev/log, another Unix socket, or UDP
`HOST[:PORT]`) or the Python logger `tfx_encrypt.audit`.

The file sink is tamper-evident, as a transparency log is: every event
carries `seq` (1, 2, ...) and `prev`, the SHA-256 (hex) of the previous
line's bytes (the first line's `prev` is :data:`GENESIS`). A line is the
event's canonical JSON (sorted keys, no spaces, ASCII), so its hash is the
hash of the event. An append holds `flock(LOCK_EX)` on the file, reads the
last line under it and writes the new line with one `write` on an
`O_APPEND` descriptor: concurrent processes interleave whole lines and the
chain stays linear. :func:`verify_log` (`tfx-encrypt audit verify`) finds
the first edited, deleted, inserted or reordered event, and a cut last
line. It cannot see a rewrite of the whole file (the chain can be
recomputed) or the removal of the newest events: compare the head hash it
prints with one recorded elsewhere (`--expect-head`).

Standard library and click only (and tfx_encrypt's errors, _text and
_signals).
"""

import contextlib
import contextvars
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import ipaddress
import json
import logging
import logging.handlers
import os
import pwd
import re
import signal
import socket
import sys
from typing import Any, Callable, Dict, List, Optional

import click

from tfx_encrypt import _signals
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.__about__ import __version__

#: Version of the event schema (the `v` field).
SCHEMA_VERSION = 1
#: `prev` of a log's first event.
GENESIS = '0' * 64
#: Where the CLI finds the sink when `--audit-log` is not given.
ENV = 'TFXE_AUDIT_LOG'
#: The Python logger of the `logging` sink.
LOGGER_NAME = 'tfx_encrypt.audit'

OK = 'ok'
ERROR = 'error'
INTERRUPTED = 'interrupted'

#: Every field an event may carry (anything else is a programming error:
#: nothing reaches a sink by accident).
FIELDS = frozenset({
    # who, where, when, what, how it ended
    'v', 'time', 'actor', 'uid', 'host', 'pid', 'tool', 'action', 'outcome',
    'error', 'exit_code', 'signal',
    # the package, as its header says (signer_verified: by a trusted key)
    'package', 'package_id', 'fingerprint', 'recipients', 'signer',
    'signer_verified',
    # rewrap / rotate: the package before (same fields, nested)
    'source',
    # push / pull, serve-sync, EncryptPusher, keygen / pubkey
    'ref', 'manifest_digest', 'version', 'destination', 'pushed', 'blessed',
    'pipeline', 'run_id', 'key_id', 'key_kind',
    # the file sink's chain
    'seq', 'prev',
})

#: The longest line `verify_log` and an append accept (an event holds at
#: most a few header strings; a longer line is not one of ours).
MAX_LINE = 4 << 20
_HASH_RE = re.compile(r'[0-9a-f]{64}')


class AuditLogError(errors.TfxEncryptError):
  """The audit log's chain is broken: an event was edited, deleted,
  inserted or reordered, its last line is cut, or it is not an audit log
  (exit 4, as a tampered package)."""
  exit_code = 4


# --- events -------------------------------------------------------------------


def canonical(event: Dict[str, Any]) -> bytes:
  """The bytes of `event` that are written and hashed (one line, no LF)."""
  return json.dumps(event, sort_keys=True, separators=(',', ':'),
                    ensure_ascii=True, allow_nan=False).encode('ascii')


def line_hash(line: bytes) -> str:
  """SHA-256 (hex) of one log line without its newline: the next `prev`."""
  return hashlib.sha256(line).hexdigest()


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%dT%H:%M:%S.%fZ')


def _actor():
  """(user name, uid) of the effective user; not $USER, which anyone sets."""
  uid = os.geteuid()
  try:
    return pwd.getpwuid(uid).pw_name, uid
  except KeyError:  # a uid without a passwd entry (containers)
    return None, uid


def location(path: str) -> str:
  """A local path made absolute; an object-store URI (`s3://`, `gs://`, any
  `scheme://` but `file://`) as it is."""
  if re.match(r'^[a-z][a-z0-9+.-]*://', path) and not path.startswith(
      'file://'):
    return path
  return os.path.abspath(path)


def package_fields(info: Any) -> Dict[str, Any]:
  """The audited facts of a PackageInfo (or anything with its attributes).

  Only what the header shows: its path, package id, fingerprint, recipient
  and signer key ids, and whether the signature was checked against a
  trusted key. Never the context, the file table or any key URI.
  """
  path = getattr(info, 'path', None)
  recipients = getattr(info, 'recipients', None)
  return {
      'package': location(path) if isinstance(path, str) else None,
      'package_id': getattr(info, 'package_id', None),
      'fingerprint': getattr(info, 'fingerprint', None),
      'recipients': None if recipients is None else [
          r.get('key_id') if isinstance(r, dict) else str(r)
          for r in recipients],
      'signer': getattr(info, 'signer', None),
      'signer_verified': bool(getattr(info, 'signature_verified', False)),
  }


def make_event(action: str, outcome: str = OK, error: Optional[str] = None,
               **fields) -> Dict[str, Any]:
  """A new event: who/where/when, then `fields` (names from FIELDS)."""
  unknown = set(fields) - FIELDS
  if unknown:
    raise ValueError(f'not audit event fields: {sorted(unknown)}')
  if outcome not in (OK, ERROR, INTERRUPTED):
    raise ValueError(f'unknown outcome {outcome!r}')
  actor, uid = _actor()
  event = {'v': SCHEMA_VERSION, 'time': _now(), 'actor': actor, 'uid': uid,
           'host': socket.gethostname(), 'pid': os.getpid(),
           'tool': f'tfx-encrypt/{__version__}', 'action': action,
           'outcome': outcome, 'error': error}
  event.update(fields)
  return event


# --- sinks --------------------------------------------------------------------


class Sink:
  """Where events go. `check` before the action; `write` after it."""

  #: How the sink is named in messages.
  name = '?'

  def check(self) -> None:
    """Raise (OSError, AuditLogError) if events cannot be written."""

  def write(self, event: Dict[str, Any]) -> Dict[str, Any]:
    """Write one event; return it as written."""
    raise NotImplementedError


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    n = os.write(fd, view)
    view = view[n:]


def _parse_line(line: bytes, where: str) -> Dict[str, Any]:
  """One log line (without LF) as an event, or AuditLogError."""
  try:
    event = json.loads(line.decode('ascii'))
    ok = isinstance(event, dict) and canonical(event) == line
  except (UnicodeDecodeError, ValueError, RecursionError):
    ok = False  # not JSON, NaN, nested beyond the parser's depth
  if not ok:
    raise AuditLogError(
        f'{where} is not an audit event (not canonical JSON): it was edited, '
        'or written by something else')
  if event.get('v') != SCHEMA_VERSION:
    raise errors.UnsupportedFormatError(
        f'{where} is an audit event of schema version '
        f'{_text.printable(event.get("v"))}; this tfx-encrypt reads version '
        f'{SCHEMA_VERSION}')
  seq, prev = event.get('seq'), event.get('prev')
  if (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1 or
      not isinstance(prev, str) or not _HASH_RE.fullmatch(prev)):
    raise AuditLogError(f'{where} has no valid seq and prev: it was edited, '
                        'or written by something else')
  return event


class FileSink(Sink):
  """JSON lines in a file, hash-chained (see the module docstring)."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    self.name = self.path

  def _open(self) -> int:
    return os.open(self.path,
                   os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

  def _tail(self, fd: int):
    """(seq, hash) of the last event, None for an empty log; under a lock."""
    size = os.fstat(fd).st_size
    if size == 0:
      return None
    if os.pread(fd, 1, size - 1) != b'\n':
      raise AuditLogError(
          f'audit log {_text.printable(self.path)} ends with a truncated '
          'line; nothing is appended to a broken chain: run tfx-encrypt '
          'audit verify on it')
    end = pos = size - 1  # the final LF
    parts: List[bytes] = []
    while pos > 0:
      n = min(1 << 16, pos)
      data = os.pread(fd, n, pos - n)
      i = data.rfind(b'\n')
      if i >= 0:
        parts.append(data[i + 1:])
        break
      parts.append(data)
      pos -= n
      if end - pos > MAX_LINE:
        break
    line = b''.join(reversed(parts))
    where = f'the last line of audit log {_text.printable(self.path)}'
    if len(line) > MAX_LINE:
      raise AuditLogError(f'{where} is longer than {MAX_LINE} bytes')
    event = _parse_line(line, where)
    return event['seq'], line_hash(line)

  def check(self) -> None:
    fd = self._open()
    try:
      fcntl.flock(fd, fcntl.LOCK_SH)
      self._tail(fd)
    finally:
      os.close(fd)  # releases the lock

  def write(self, event: Dict[str, Any]) -> Dict[str, Any]:
    fd = self._open()
    try:
      # Whole appends only, one at a time: the last line read here is the
      # one the new line chains to.
      fcntl.flock(fd, fcntl.LOCK_EX)
      tail = self._tail(fd)
      seq, prev = (1, GENESIS) if tail is None else (tail[0] + 1, tail[1])
      event = dict(event, seq=seq, prev=prev)
      _write_all(fd, canonical(event) + b'\n')  # one write (O_APPEND)
      os.fdatasync(fd)
      return event
    finally:
      os.close(fd)


class StreamSink(Sink):
  """One JSON line per event on a text stream (stderr by default)."""

  def __init__(self, stream=None):
    self._stream = stream
    self.name = 'stderr' if stream is None else getattr(stream, 'name', '?')

  def write(self, event: Dict[str, Any]) -> Dict[str, Any]:
    stream = self._stream if self._stream is not None else sys.stderr
    stream.write(canonical(event).decode('ascii') + '\n')
    stream.flush()
    return event


class _RaisingSysLogHandler(logging.handlers.SysLogHandler):
  """A failed send is the caller's error, not a traceback on stderr."""

  def handleError(self, record):  # pylint: disable=invalid-name
    raise  # pylint: disable=misplaced-bare-raise  (inside emit's except)


def _level(event: Dict[str, Any]) -> int:
  return logging.INFO if event.get('outcome') == OK else logging.WARNING


class SyslogSink(Sink):
  """`tfx-encrypt[PID]: {json}` to syslog (facility user), one per event.

  `address` is a Unix socket path (default /dev/log) or a (host, port) pair
  reached over UDP. Failures ('ok' events are INFO, the others WARNING).
  """

  def __init__(self, address=None):
    self.address = '/dev/log' if address is None else address
    self.name = ('syslog:' + self.address if isinstance(self.address, str)
                 else f'syslog:{self.address[0]}:{self.address[1]}')
    self._handler = None

  def _get(self) -> logging.handlers.SysLogHandler:
    if self._handler is None:
      handler = _RaisingSysLogHandler(
          address=self.address,
          facility=logging.handlers.SysLogHandler.LOG_USER,
          socktype=None if isinstance(self.address, str)
          else socket.SOCK_DGRAM)
      handler.ident = f'tfx-encrypt[{os.getpid()}]: '
      handler.setFormatter(logging.Formatter('%(message)s'))
      self._handler = handler
    return self._handler

  def check(self) -> None:
    if isinstance(self.address, str):
      # SysLogHandler ignores a socket it cannot connect to (as openlog(3)
      # does) and fails only at the first event: connect once here.
      for socktype in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, socktype) as probe:
          try:
            probe.connect(self.address)
            break
          except OSError as e:
            if socktype == socket.SOCK_STREAM or e.errno != errno.EPROTOTYPE:
              raise
    self._get()  # resolves a UDP address

  def write(self, event: Dict[str, Any]) -> Dict[str, Any]:
    record = logging.LogRecord(LOGGER_NAME, _level(event), __file__, 0,
                               canonical(event).decode('ascii'), None, None)
    self._get().emit(record)
    return event

  def close(self) -> None:
    if self._handler is not None:
      self._handler.close()


class LoggingSink(Sink):
  """The Python logger `tfx_encrypt.audit` (a host's logging config, absl).

  The message is the JSON line; the record also carries the event as
  `record.audit_event`.
  """
  name = 'logging'

  def write(self, event: Dict[str, Any]) -> Dict[str, Any]:
    logging.getLogger(LOGGER_NAME).log(
        _level(event), '%s', canonical(event).decode('ascii'),
        extra={'audit_event': dict(event)})
    return event


def _syslog_address(arg: str):
  """`/path` (a Unix socket) or `HOST[:PORT]` / `[V6]:PORT` (UDP, 514)."""
  if arg.startswith('/'):
    return arg
  host, port = arg, '514'
  m = re.fullmatch(r'\[([^\]]+)\](?::([0-9]+))?', arg)
  if m:
    host, port = m.group(1), m.group(2) or '514'
  elif arg.count(':') == 1:
    host, port = arg.split(':')
  if ':' in host:  # only an IPv6 address has colons
    try:
      ipaddress.IPv6Address(host)
    except ValueError:
      host = ''
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise errors.UsageError(
        f'--audit-log syslog:{_text.printable(arg)}: expected syslog:/PATH '
        '(a Unix socket) or syslog:HOST[:PORT] (UDP)')
  return host, int(port)


def open_sink(spec: str) -> Sink:
  """The sink `spec` names: PATH | stderr | syslog[:ADDR] | logging.

  `syslog` alone is /dev/log; `syslog:/PATH` another Unix socket;
  `syslog:HOST[:PORT]` UDP (port 514 by default). Anything else is a file
  path (`./stderr` for a file of that name). Nothing is opened yet: call
  the sink's `check` for that.
  """
  if not isinstance(spec, str) or not spec:
    raise errors.UsageError('--audit-log expects PATH, stderr, '
                            'syslog[:ADDR] or logging')
  if spec == 'stderr':
    return StreamSink()
  if spec == 'logging':
    return LoggingSink()
  if spec == 'syslog':
    return SyslogSink()
  if spec.startswith('syslog:'):
    return SyslogSink(_syslog_address(spec[len('syslog:'):]))
  return FileSink(spec)


class Auditor:
  """Builds events and writes them to one sink."""

  def __init__(self, sink: Sink):
    self.sink = sink

  def emit(self, action: str, outcome: str = OK,
           error: Optional[str] = None, **fields) -> Dict[str, Any]:
    return self.sink.write(make_event(action, outcome, error, **fields))


# --- one audited action -------------------------------------------------------


def _classify(exc: Optional[BaseException]):
  """(outcome, error class, exit code, signal name) of how a command ended."""
  if exc is None:
    return OK, None, 0, None
  code = getattr(exc, 'exit_code', None)
  if isinstance(exc, _signals.Interrupted):
    return INTERRUPTED, None, code, signal.Signals(exc.signum).name
  if isinstance(exc, click.exceptions.Exit):  # ctx.exit(N), --help
    return (OK if code == 0 else ERROR), None, code, None
  if isinstance(exc, OSError) and not isinstance(code, int):
    code = 9
  if not isinstance(code, int):
    code = 1
  return ERROR, type(exc).__name__, code, None


_CURRENT: contextvars.ContextVar = contextvars.ContextVar(
    'tfx_encrypt_audit_run', default=None)


class Run:
  """The event of one action (a CLI command, an EncryptPusher execution).

  What the action learns is recorded into it (:func:`record`, :func:`note`)
  as it goes; :meth:`finish` emits one event with the outcome. Actions that
  report per step (serve-sync) emit their own events (:func:`emit_now`) and
  only an error or a signal as a whole.
  """

  def __init__(self, auditor: Auditor, action: str, *,
               per_action: bool = False, with_exit_code: bool = True,
               warn: Optional[Callable[[str], None]] = None):
    self.auditor = auditor
    self.action = action
    self.per_action = per_action
    self.with_exit_code = with_exit_code  # a CLI command's, not a library's
    self.fields: Dict[str, Any] = {}
    self._outcome = None  # (exception or None,) once known
    self._warn = warn
    self._token = None

  def record(self, info: Any, *, as_source: bool = False) -> None:
    facts = package_fields(info)
    if as_source:
      self.fields['source'] = facts
    else:
      self.fields.update(facts)

  def note(self, **fields) -> None:
    unknown = set(fields) - FIELDS
    if unknown:
      raise ValueError(f'not audit event fields: {sorted(unknown)}')
    self.fields.update(fields)

  def done(self, exc: Optional[BaseException]) -> None:
    """How the action ended; the first call wins."""
    if self._outcome is None:
      self._outcome = (exc,)

  def _write(self, action, outcome, error, fields) -> None:
    try:
      self.auditor.emit(action, outcome, error, **fields)
    except (OSError, errors.TfxEncryptError) as e:
      message = (f'audit event of {action} not written to '
                 f'{_text.printable(self.auditor.sink.name)}: '
                 f'{type(e).__name__}: {_text.printable(str(e))}')
      if self._warn is not None:
        self._warn(message)
      else:
        logging.getLogger(__name__).error('%s', message)

  def emit_now(self, action: str, outcome: str = OK,
               error: Optional[str] = None, **fields) -> None:
    """One event of a step (serve-sync), written at once; a signal that
    arrives meanwhile stops the command after the line is written."""
    with _signals.deferred():
      self._write(action, outcome, error, fields)

  def finish(self) -> None:
    """Emit the action's event (once), with the outcome given to `done`."""
    if self._token is not None:
      _CURRENT.reset(self._token)
      self._token = None
    if self._outcome is None:
      return
    exc = self._outcome[0]
    self._outcome = ()  # finished: never twice
    outcome, error, code, signame = _classify(exc)
    if (isinstance(exc, click.exceptions.Exit) and code == 0 and
        not self.fields):
      return  # a subcommand's --help: nothing was done
    if self.per_action and outcome != INTERRUPTED and error is None:
      return  # every step has its event; only a failure of the whole is one
    fields = dict(self.fields)
    if self.with_exit_code:
      fields['exit_code'] = code
    if signame:
      fields['signal'] = signame
    self._write(self.action, outcome, error, fields)


def start(auditor: Auditor, action: str, **kwargs) -> Run:
  """Begin auditing `action` in this context (thread); see :class:`Run`."""
  run = Run(auditor, action, **kwargs)
  run._token = _CURRENT.set(run)  # pylint: disable=protected-access
  return run


def current() -> Optional[Run]:
  """The action being audited in this context, if any."""
  return _CURRENT.get()


def record(info: Any, *, as_source: bool = False) -> None:
  """Record a PackageInfo into the current action's event (if audited).

  `as_source`: the package an action started from (rewrap, rotate).
  """
  run = _CURRENT.get()
  if run is not None:
    run.record(info, as_source=as_source)


def note(**fields) -> None:
  """Record more fields (FIELDS) into the current action's event."""
  run = _CURRENT.get()
  if run is not None:
    run.note(**fields)


def emit_now(action: str, outcome: str = OK, error: Optional[str] = None,
             **fields) -> None:
  """Emit a step's event at once through the current action's sink."""
  run = _CURRENT.get()
  if run is not None:
    run.emit_now(action, outcome, error, **fields)


#: serve-sync actions (runtime.serving) and the events they become; `kept`
#: changes nothing and is not an event.
_SYNC_EVENTS = {'installed': 'serve-sync.install',
                'removed': 'serve-sync.remove',
                'failed': 'serve-sync.fail'}


def sync_action(action: Any) -> None:
  """Emit the event of one serve-sync SyncAction (installed, removed or
  failed) through the current action's sink; pass as `on_action`."""
  name = _SYNC_EVENTS.get(getattr(action, 'action', None))
  if name is None:
    return
  failed = name == 'serve-sync.fail'
  fields = {'version': getattr(action, 'version', None)}
  source = getattr(action, 'source', None)
  if isinstance(source, str):  # the package (or, failed, the path) used
    fields['package'] = location(source)
  for key in ('package_id', 'fingerprint'):
    if getattr(action, key, None) is not None:
      fields[key] = getattr(action, key)
  if name == 'serve-sync.install':  # serve-sync records a verified signer
    signer = getattr(action, 'signer', None)
    fields.update(signer=signer, signer_verified=signer is not None)
  emit_now(name, ERROR if failed else OK,
           getattr(action, 'error', None) if failed else None, **fields)


@contextlib.contextmanager
def execution(spec: Optional[str], action: str):
  """Audit one execution (EncryptPusher) to the sink `spec` (None: not).

  The sink is checked first, so an unusable one fails the execution before
  it does anything; then exactly one event is emitted, whatever happens.
  """
  if not spec:
    yield None
    return
  sink = open_sink(spec)
  sink.check()
  run = start(Auditor(sink), action, with_exit_code=False)
  try:
    yield run
  except BaseException as e:
    run.done(e)
    raise
  else:
    run.done(None)
  finally:
    run.finish()


# --- verification -------------------------------------------------------------


@dataclasses.dataclass
class Verified:
  """What `verify_log` found: an intact chain."""
  path: str
  events: int
  head: str  # line_hash of the last line (GENESIS for an empty log)
  anchor_seq: Optional[int] = None  # the event `expect_head` names


def verify_log(path: str, expect_head: Optional[str] = None) -> Verified:
  """Check the hash chain of the audit log at `path`.

  Every line must be a canonical event, the seqs must run 1, 2, 3, ...
  and every `prev` must be the hash of the line before it (the first one's
  GENESIS); the file must end with a newline. With `expect_head`, a head
  recorded earlier must be the hash of one of the lines (the log may have
  grown since): a log rewritten, or cut before that event, is refused.

  Raises:
    AuditLogError: naming the first bad line (exit 4).
    UnsupportedFormatError: an event of another schema version.
    OSError: the file cannot be read.
  """
  if expect_head is not None and not _HASH_RE.fullmatch(expect_head):
    raise errors.UsageError(
        f'--expect-head expects 64 lowercase hex digits (the head audit '
        f'verify printed), got {_text.quoted(expect_head, 80)}')
  shown = _text.printable(path, limit=None)
  prev, count, anchor = GENESIS, 0, None
  if expect_head == GENESIS:
    anchor = 0
  with open(path, 'rb') as f:
    while True:
      raw = f.readline(MAX_LINE + 2)
      if not raw:
        break
      n = count + 1
      where = f'audit log {shown}: line {n}'
      if not raw.endswith(b'\n'):
        if len(raw) > MAX_LINE:
          raise AuditLogError(f'{where} is longer than {MAX_LINE} bytes')
        raise AuditLogError(
            f'{where} is truncated (no newline at its end): an append was '
            'cut short, or the file was cut')
      line = raw[:-1]
      event = _parse_line(line, where)
      seq = event['seq']
      if seq != n:
        raise AuditLogError(
            f'{where} has seq {seq}, expected {n}: an event was deleted, '
            'inserted or moved before it')
      if event['prev'] != prev:
        if n == 1:
          raise AuditLogError(
              f'{where} does not start a chain (its prev is not the genesis '
              'value): the beginning of the log was removed or rewritten')
        raise AuditLogError(
            f'{where} (seq {seq}) does not chain to line {n - 1}: line '
            f'{n - 1} was edited, or events were deleted, inserted or '
            'reordered there')
      prev = line_hash(line)
      count = n
      if expect_head is not None and prev == expect_head:
        anchor = n
  if expect_head is not None and anchor is None:
    raise AuditLogError(
        f'audit log {shown}: the expected head {expect_head} is not in it: '
        'the log was rewritten, or cut before that event')
  return Verified(path, count, prev, anchor)
