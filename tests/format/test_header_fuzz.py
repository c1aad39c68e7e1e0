"""Mutation fuzzing of the strict parsers: any input either parses or raises
a typed TfxEncryptError -- never another exception, never a hang.

The hypothesis tests at the end fuzz the header reader, the file-table
decoder and the bundle reader with a few hundred examples each; set
TFXE_FUZZ_EXAMPLES (e.g. 100000) for a long run (docs/TESTING.md).
"""

import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import time

import hypothesis
from hypothesis import strategies as st
import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt.format import header as header_lib
from tests import _util
from tests.testdata import package_vectors as pv


@pytest.fixture(scope='module')
def header_bytes(tmp_path_factory):
  d = tmp_path_factory.mktemp('fz')
  (d / 'k').mkdir()
  keys = _util.Keys(d / 'k')
  src = _util.make_tree(d / 'm', {'saved_model.pb': 100, 'v/a': 5, 'v/b': 7})
  te.encrypt_model(src, d / 'p', recipients=[keys.pub('x'), keys.pub('rsa')],
                   signer=keys.priv('ed'), context={'k': 'v'})
  return (d / 'p' / 'tfxe.header').read_bytes()


def _mutate(rng, data):
  data = bytearray(data)
  for _ in range(rng.randint(1, 4)):
    op = rng.randrange(5)
    pos = rng.randrange(len(data)) if data else 0
    if op == 0 and data:
      data[pos] ^= 1 << rng.randrange(8)
    elif op == 1:
      data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == 2:
      del data[pos:pos + rng.randint(1, 16)]
    elif op == 3:
      data = data[:pos]
    elif data:
      data[pos] = rng.choice(b'{}[]",:0123456789-eE.\\ntfalsenull\x00\xff')
  return bytes(data)


def test_header_parser_mutations(header_bytes):
  rng = random.Random(1234)
  parsed = 0
  for _ in range(3000):
    data = _mutate(rng, header_bytes)
    try:
      header_lib.Header.read(io.BytesIO(data))
      parsed += 1
    except errors.TfxEncryptError:
      pass
  # Mutations that still parse are possible (e.g. in the MAC or signature
  # bytes); authentication, not parsing, rejects those (test_tamper.py).
  assert parsed < 3000


def _body(header_bytes):
  n = int.from_bytes(header_bytes[8:12], 'big')
  return header_bytes[12:12 + n]


def test_body_parser_mutations(header_bytes):
  rng = random.Random(99)
  body = _body(header_bytes)
  for _ in range(3000):
    try:
      header_lib.Header.parse_body(_mutate(rng, body))
    except errors.TfxEncryptError:
      pass


@pytest.mark.parametrize('value', [
    [], {}, None, 1, 'x', 1.5, [[1, 'a']], {'files': [], 'dirs': []},
    {'files': [{'path': 'a', 'size': -1, 'digest': '0' * 64}], 'dirs': []},
    {'files': [{'path': 'a', 'size': True, 'digest': '0' * 64}], 'dirs': []},
    {'files': [{'path': 'a', 'size': 1, 'digest': 'g' * 64}], 'dirs': []},
    {'files': [{'path': 'a' * 5000, 'size': 1, 'digest': '0' * 64}],
     'dirs': []},
    {'files': [{'path': 'a', 'size': 1, 'digest': '0' * 64, 'x': 1}],
     'dirs': []},
    {'files': [{'path': 'a', 'size': 10 ** 30, 'digest': '0' * 64}],
     'dirs': []},
])
def test_file_table_rejects_malformed(value):
  with pytest.raises((errors.TamperedPackageError, errors.UnsafePathError)):
    header_lib.decode_file_table(json.dumps(value).encode(), 1)


def test_deeply_nested_json_is_a_typed_error():
  with pytest.raises(errors.TamperedPackageError):
    header_lib.strict_json(b'[' * 100000 + b']' * 100000, 'x')


def test_duplicate_keys_nan_and_floats_rejected():
  for bad in (b'{"a":1,"a":2}', b'{"a":NaN}', b'{"a":1.0}', b'{"a":1e3}',
              b'\xff\xfe'):
    with pytest.raises(errors.TamperedPackageError):
      header_lib.strict_json(bad, 'x')


# --- hypothesis: a short run in CI, a long one on demand ----------------------

#: Examples per fuzz test; TFXE_FUZZ_EXAMPLES=100000 for a long run.
FUZZ_EXAMPLES = int(os.environ.get('TFXE_FUZZ_EXAMPLES', '300'))
#: One input may take at most this long: a parser that loops or blows up
#: on some input fails the run instead of hanging it.
HANG_SECONDS = 10
FUZZ = hypothesis.settings(
    max_examples=FUZZ_EXAMPLES, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.data_too_large])


BODY_KEYS = header_lib._BODY_KEYS  # pylint: disable=protected-access


class Hang(Exception):
  """An input took longer than HANG_SECONDS (not a TfxEncryptError)."""


@contextlib.contextmanager
def no_hang(seconds=HANG_SECONDS):
  """Raise Hang if the block runs longer than `seconds` (SIGALRM), keeping
  any alarm already set (pytest-timeout's) running."""
  old_handler = signal.getsignal(signal.SIGALRM)
  old_left, _ = signal.getitimer(signal.ITIMER_REAL)
  start = time.monotonic()

  def alarm(signum, frame):
    del signum, frame
    raise Hang(f'no result after {seconds} s')

  signal.signal(signal.SIGALRM, alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old_handler)
    if old_left:
      left = old_left - (time.monotonic() - start)
      signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))


def parses_or_typed_error(fn, *args, **kwargs):
  """fn(...) or None if it raised a TfxEncryptError; anything else fails."""
  with no_hang():
    try:
      return fn(*args, **kwargs)
    except errors.TfxEncryptError:
      return None


# Byte-level edits of a valid input, drawn by hypothesis.
_EDITS = st.lists(st.tuples(
    st.sampled_from(['flip', 'set', 'insert', 'delete', 'truncate', 'append']),
    st.integers(min_value=0, max_value=1 << 16),
    st.binary(min_size=1, max_size=8)), min_size=1, max_size=4)


def apply_edits(data: bytes, edits) -> bytes:
  data = bytearray(data)
  for op, pos, blob in edits:
    pos = pos % (len(data) + 1)
    if op == 'flip' and pos < len(data):
      data[pos] ^= blob[0] or 1
    elif op == 'set' and pos < len(data):
      data[pos:pos + len(blob)] = blob
    elif op == 'insert':
      data[pos:pos] = blob
    elif op == 'delete':
      del data[pos:pos + blob[0] % 64 + 1]
    elif op == 'truncate':
      del data[pos:]
    elif op == 'append':
      data += blob
  return bytes(data)


# JSON values of every type (and a few hostile numbers and strings).
_JSON = st.recursive(
    st.none() | st.booleans() |
    st.integers(min_value=-(2**70), max_value=2**70) |
    st.sampled_from([0, -1, 2**50, 2**53 + 1, 10**30]) |
    st.floats(allow_nan=False, allow_infinity=False) |
    st.text(max_size=40) |
    st.sampled_from(['', 'sha256', 'ed25519', 'tfxe:x', '0' * 64, 'A==',
                     'AA==', 'AB==', '\u0000', '\ud800']),
    lambda inner: st.lists(inner, max_size=4) |
    st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


@pytest.fixture(scope='module')
def valid_body(header_bytes):
  return json.loads(_body(header_bytes))


def _serialise(obj, style):
  if style == 0:
    return header_lib.canonical_json(obj)
  if style == 1:
    return json.dumps(obj, sort_keys=True, indent=1).encode()
  return json.dumps(obj, ensure_ascii=False).encode('utf-8', 'surrogatepass')


def _frame(body: bytes, mac: bytes, sig_len: int, sig: bytes) -> bytes:
  return (header_lib.MAGIC + struct.pack('>I', len(body)) + body + mac +
          struct.pack('>I', sig_len) + sig)


@FUZZ
@hypothesis.given(data=st.binary(max_size=2048))
def test_fuzz_header_reader_random_bytes(data):
  parses_or_typed_error(header_lib.Header.read, io.BytesIO(data))
  parses_or_typed_error(header_lib.Header.read,
                        io.BytesIO(header_lib.MAGIC + data))


@FUZZ
@hypothesis.given(edits=_EDITS)
def test_fuzz_header_reader_edits(header_bytes, edits):
  parses_or_typed_error(header_lib.Header.read,
                        io.BytesIO(apply_edits(header_bytes, edits)))


@FUZZ
@hypothesis.given(
    field=st.sampled_from(sorted(BODY_KEYS) + ['extra']),
    action=st.sampled_from(['replace', 'delete', 'nest']),
    value=_JSON, style=st.integers(0, 2),
    sig_len=st.sampled_from([0, 1, 63, 64, 65, 1 << 31]),
    sig=st.binary(max_size=80), mac=st.binary(min_size=32, max_size=32))
def test_fuzz_header_body_fields(valid_body, field, action, value, style,
                                 sig_len, sig, mac):
  """Structured: a valid body with one field replaced by any JSON value,
  deleted, or (for objects and lists) given one more member; framed with
  any signature length."""
  obj = json.loads(json.dumps(valid_body))
  if action == 'delete':
    obj.pop(field, None)
  elif action == 'nest' and isinstance(obj.get(field), dict):
    obj[field]['x'] = value
  elif action == 'nest' and isinstance(obj.get(field), list):
    obj[field].append(value)
  else:
    obj[field] = value
  body = _serialise(obj, style)
  parses_or_typed_error(header_lib.Header.parse_body, body)
  parses_or_typed_error(header_lib.Header.read,
                        io.BytesIO(_frame(body, mac, sig_len, sig)))


# Path-like text: separators, dots, controls, bidi, case and normalisation
# twins, and any other character.
_PATH_TEXT = st.lists(
    st.sampled_from(['a', 'A', '/', '.', '..', '\\', '\x00', '\n', '\x1b',
                     '\u202e', '\u2028', '\x85', 'e\u0301', '\u00e9', 'SS',
                     '\u00df', '\ufb01', ' ', '~']) |
    st.characters(), max_size=12).map(''.join)
_DIGEST = st.sampled_from(['0' * 64, 'f' * 64, 'F' * 64, '0' * 63, '']) | \
    st.text(max_size=70)
_FILE = st.fixed_dictionaries({
    'path': _PATH_TEXT,
    'size': st.integers(min_value=-2, max_value=2**51) | _JSON,
    'digest': _DIGEST})


@FUZZ
@hypothesis.given(
    files=st.lists(_FILE, max_size=6),
    dirs=st.lists(_PATH_TEXT, max_size=6) | _JSON,
    canonical=st.booleans(), count_delta=st.sampled_from([0, 0, 0, 1, -1]))
def test_fuzz_file_table_decoder(files, dirs, canonical, count_delta):
  table = {'dirs': dirs, 'files': files}
  if canonical:
    data = header_lib.canonical_json(table)
  else:
    data = json.dumps(table).encode('utf-8', 'surrogatepass')
  parses_or_typed_error(header_lib.decode_file_table, data,
                        len(files) + count_delta)


@FUZZ
@hypothesis.given(data=st.binary(max_size=1024),
                  count=st.integers(min_value=0, max_value=3))
def test_fuzz_file_table_decoder_bytes(data, count):
  parses_or_typed_error(header_lib.decode_file_table, data, count)


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
  """A small signed bundle (the vector keys), and a scratch directory."""
  d = tmp_path_factory.mktemp('fuzz-bundle')
  src = _util.make_tree(d / 'm', {'saved_model.pb': b'model',
                                  'variables/variables.index': b'ix'})
  te.encrypt_model(src, d / 'p.tfxe', recipients=[pv.pub('recipient')],
                   signer=pv.priv('publisher-ed25519'), bundle=True,
                   context={'k': 'v'})
  (d / 'scratch').mkdir()
  return (d / 'p.tfxe').read_bytes(), d / 'scratch'


@FUZZ
@hypothesis.given(edits=_EDITS)
def test_fuzz_bundle_reader(bundle, edits):
  """An edited bundle: inspect, verify (trust given) and decrypt either
  succeed (an edit that changed nothing) or raise a typed error."""
  data, scratch = bundle
  path = scratch / 'b.tfxe'
  path.write_bytes(apply_edits(data, edits))
  out = scratch / 'out'
  parses_or_typed_error(te.inspect_package, path)
  parses_or_typed_error(te.verify_package, path,
                        trusted=[pv.pub('publisher-ed25519')])
  if parses_or_typed_error(te.decrypt_model, path, out,
                           identities=[pv.priv('recipient')],
                           trusted=[pv.pub('publisher-ed25519')]) is not None:
    shutil.rmtree(out)
  assert sorted(os.listdir(scratch)) == ['b.tfxe']
