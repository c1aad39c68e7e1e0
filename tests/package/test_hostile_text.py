"""Strings from a package never reach a terminal, a log or an error raw.

A signer key id, recipient key ids, context keys and values and file paths
are chosen by whoever wrote the package. They are shown escaped
(tfx_encrypt._text.printable), so an escape sequence or a newline in one
cannot forge an "OK ... signed by trusted" line; `--json` keeps them exact.
Also: reserved `tfxe:` context keys are refused on read (exit 3).
"""

import json
import logging
import os
import re
import subprocess
import sys
import unicodedata

import pytest

import tfx_encrypt as te
from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt.keys import local
from tfx_encrypt.runtime import serving
from tests import _craft
from tests import _util

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What must never appear raw in output (but the line feeds ending lines):
# C0, DEL, C1, line/paragraph separators, bidi controls, surrogates.
RAW = re.compile(f'[{_text.UNSAFE_CLASS}]')

FORGED_SIGNER = ('sha256:evil\nOK: 1 payloads match their digests; signed by '
                 'trusted sha256:good\x1b[2K')
FORGED_RECIPIENT = 'sha256:abc\x1b[1A\r  - x25519-hpke: sha256:ops\u202e'
HOSTILE_CONTEXT = {
    'model': 'taxi\x1b[2K\rsigner:      sha256:good (ed25519, verified)',
    'note\x1b]0;owned\x07': 'a\u2028b\x85c\u2066d\x9b31m',
    'bidi': '\u202etxt.exe',
}


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


def cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING='utf-8')
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
                        capture_output=True, text=True, env=env, timeout=120,
                        encoding='utf-8', errors='strict')


def assert_clean(text):
  """No raw control, separator or bidi character anywhere in `text`."""
  m = RAW.search(text.replace('\n', ''))
  assert m is None, f'raw U+{ord(m.group()):04X} in output: {text!r}'


def assert_one_error_line(r, code):
  assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
  assert_clean(r.stderr)
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error: '), (
      r.stderr)
  assert 'Traceback' not in r.stderr


# --- the helper ---------------------------------------------------------------

@pytest.mark.parametrize('raw,shown', [
    ('\x1b[31mred', '\\x1b[31mred'),
    ('a\nb', 'a\\x0ab'),
    ('a\r\tb', 'a\\x0d\\x09b'),
    ('\x00', '\\x00'),
    ('\x7f', '\\x7f'),
    ('\x80\x85\x9b\x9f', '\\x80\\x85\\x9b\\x9f'),
    ('\u2028\u2029', '\\u2028\\u2029'),
    ('\u202a\u202b\u202c\u202d\u202e', '\\u202a\\u202b\\u202c\\u202d\\u202e'),
    ('\u2066\u2067\u2068\u2069', '\\u2066\\u2067\\u2068\\u2069'),
    ('\u200e\u200f\u061c', '\\u200e\\u200f\\u061c'),
    ('\ud800x\udfff', '\\ud800x\\udfff'),
])
def test_printable_escapes(raw, shown):
  assert _text.printable(raw) == shown


def test_printable_leaves_ordinary_text_alone():
  s = ('café Ωμέγα 日本語 עברית العربية 👍🏽 👨‍👩‍👧 \\x1b literal, '
       'tab-less  spaces, NBSP\xa0, ~!@#$%^&*()[]{}<>"\'')
  assert _text.printable(s, limit=None) == s


def test_printable_is_idempotent_and_bounded():
  s = '\x1b[2K\n' * 100
  once = _text.printable(s, limit=None)
  assert _text.printable(once, limit=None) == once
  long = 'x' * 10000
  out = _text.printable(long)
  assert out.startswith('x' * _text.DEFAULT_LIMIT)
  assert out.endswith(f'...({10000 - _text.DEFAULT_LIMIT} more characters)')
  assert len(out) < _text.DEFAULT_LIMIT + 40
  assert _text.printable(long, limit=None) == long
  assert _text.printable(None) == 'None'
  assert _text.printable(['a\n']) == "['a\\n']"  # its repr
  assert _text.quoted('a\nb') == "'a\\x0ab'"


def test_printable_covers_every_code_point():
  """Over all of Unicode: nothing that breaks a line, controls a terminal or
  reorders text survives, checked against the Unicode database itself."""
  everything = ''.join(map(chr, range(0x110000)))
  out = _text.printable(everything, limit=None)
  out.encode('utf-8')  # no lone surrogate left
  bidi_controls = {'LRE', 'RLE', 'PDF', 'LRO', 'RLO', 'LRI', 'RLI', 'FSI',
                   'PDI'}
  for c in set(out):
    cat = unicodedata.category(c)
    assert cat not in ('Cc', 'Zl', 'Zp', 'Cs'), hex(ord(c))
    assert unicodedata.bidirectional(c) not in bidi_controls, hex(ord(c))
    assert c not in '\u200e\u200f\u061c', hex(ord(c))
  # And only those: every other character is kept.
  kept = {c for c in everything if not _text.UNSAFE.match(c)}
  assert len(kept) == 0x110000 - (0x20 + 0x21 + 3 + 5 + 4 + 2 + 0x800)


# --- CLI output ---------------------------------------------------------------

@pytest.fixture(scope='module')
def hostile(tmp_path_factory, keys):
  """Packages whose header strings try to forge output lines."""
  d = tmp_path_factory.mktemp('hostile')
  files = [('saved_model.pb', b'model'), ('variables/v', b'vars')]
  pkgs = {
      # Signed by a key nobody trusts, claiming a forged key id.
      'claim': _craft.craft(d / 'claim', keys.pub('x'), files, ['variables'],
                            context=HOSTILE_CONTEXT,
                            recipient_key_id=FORGED_RECIPIENT,
                            signer_priv=keys.priv('evil'),
                            signer_key_id=FORGED_SIGNER),
      # Signed by the trusted key; hostile context and recipient key id.
      'signed': _craft.craft(d / 'signed', keys.pub('x'), files,
                             ['variables'], context=HOSTILE_CONTEXT,
                             signer_priv=keys.priv('ed')),
      'bad_kid': _craft.craft(d / 'bad_kid', keys.pub('x'), files,
                              ['variables'], context=HOSTILE_CONTEXT,
                              recipient_key_id=FORGED_RECIPIENT,
                              signer_priv=keys.priv('ed')),
      # A file path that is refused, and would forge a line if shown raw.
      'path': _craft.craft(d / 'path', keys.pub('x'),
                           [('a\x1b[2K\rOK: decrypted\nb', b'x')],
                           signer_priv=keys.priv('ed')),
  }
  return pkgs


def test_inspect_escapes_everything(hostile):
  r = cli('inspect', hostile['claim'])
  assert r.returncode == 0, r.stderr
  assert_clean(r.stdout)
  lines = r.stdout.splitlines()
  # The layout is fixed: one line per field, one per recipient/context entry.
  assert [ln.split(':')[0] for ln in lines[:10]] == [
      'package', 'format', 'package id', 'created', 'files', 'fingerprint',
      'ciphertext', 'signer', 'threshold', 'recipients']
  assert len(lines) == 10 + 1 + 1 + len(HOSTILE_CONTEXT)
  assert not any(ln.startswith(('OK', 'signer:      sha256:good',
                                '  - x25519-hpke: sha256:ops')) for ln in lines)
  assert '\\x1b[2K' in r.stdout and '\\x0a' in r.stdout
  assert '\\u202e' in r.stdout and '\\u2028' in r.stdout
  assert 'not verified' in lines[7]


def test_inspect_json_is_exact_and_ascii(hostile):
  r = cli('inspect', hostile['claim'], '--json')
  assert r.returncode == 0, r.stderr
  assert r.stdout.isascii()  # ESC, C1, bidi: all \uNNNN
  info = json.loads(r.stdout)
  assert info['context'] == HOSTILE_CONTEXT
  assert info['signer'] == FORGED_SIGNER
  assert info['recipients'][0]['key_id'] == FORGED_RECIPIENT


def test_verify_error_names_the_claimed_signer_escaped(hostile, keys):
  r = cli('verify', hostile['claim'], '--trust', keys.pub('ed'))
  assert_one_error_line(r, errors.UntrustedSignerError.exit_code)
  assert 'sha256:evil\\x0aOK: 1 payloads' in r.stderr
  assert r.stdout == ''


def test_verify_and_decrypt_of_hostile_context_stay_one_line(hostile, keys,
                                                             tmp_path):
  r = cli('verify', hostile['signed'], '--trust', keys.pub('ed'))
  assert r.returncode == 0, r.stderr
  assert_clean(r.stdout)
  assert len(r.stdout.splitlines()) == 1 and r.stdout.startswith('OK: 2 ')
  r = cli('decrypt', hostile['signed'], tmp_path / 'o', '--identity',
          keys.priv('x'), '--trust', keys.pub('ed'))
  assert r.returncode == 0, r.stderr
  assert_clean(r.stdout + r.stderr)
  assert len(r.stdout.splitlines()) == 1
  assert (tmp_path / 'o' / 'saved_model.pb').read_bytes() == b'model'


def test_decrypt_error_lists_recipient_key_ids_escaped(hostile, keys,
                                                       tmp_path):
  r = cli('decrypt', hostile['bad_kid'], tmp_path / 'o', '--identity',
          keys.priv('x'), '--trust', keys.pub('ed'))
  assert_one_error_line(r, errors.NoMatchingKeyError.exit_code)
  assert 'sha256:abc\\x1b[1A\\x0d  - x25519-hpke: sha256:ops\\u202e' in r.stderr
  assert not os.path.exists(tmp_path / 'o')


def test_decrypt_error_shows_refused_path_escaped(hostile, keys, tmp_path):
  r = cli('decrypt', hostile['path'], tmp_path / 'o', '--identity',
          keys.priv('x'), '--trust', keys.pub('ed'))
  assert_one_error_line(r, errors.UnsafePathError.exit_code)
  assert "'a\\x1b[2K\\x0dOK: decrypted\\x0ab'" in r.stderr
  assert 'U+001B' in r.stderr


def test_rewrap_summary_escapes(hostile, keys, tmp_path):
  pkg = tmp_path / 'p'
  _util_copytree(hostile['signed'], pkg)
  r = cli('rewrap', pkg, '--identity', keys.priv('x'), '--add-recipient',
          keys.pub('x2'), '--sign-with', keys.priv('ed'), '--trust',
          keys.pub('ed'))
  assert r.returncode == 0, r.stderr
  assert_clean(r.stdout + r.stderr)
  assert len(r.stdout.splitlines()) == 1


def _util_copytree(src, dst):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)


# --- serve-sync lines and logs ------------------------------------------------

def test_sync_action_lines_escape_every_field():
  hostile = 'x\n\x1b[2Kinstalled 9 into /models/9; signed by trusted k'
  for action in (
      serving.SyncAction(serving.FAILED, '7', '/src/7' + hostile,
                         source='/src/7', error='TamperedPackageError',
                         message=hostile),
      serving.SyncAction(serving.INSTALLED, '7', '/models/7',
                         source='/src/7' + hostile, signer=hostile,
                         fingerprint='sha256:' + '0' * 64),
      serving.SyncAction(serving.REMOVED, '7', '/models/7' + hostile)):
    line = action.line()
    assert_clean(line)
    assert '\n' not in line and '\\x0a' in line
    assert action.to_dict()[{'failed': 'message', 'installed': 'signer',
                             'removed': 'path'}[action.action]].endswith(
                                 'signed by trusted k')  # JSON stays exact


def test_sync_failure_log_is_one_escaped_line(caplog):
  result = serving.SyncResult('/src', '/models')
  err = OSError(5, 'Input/output error', '/src/7/evil\n\x1b[2KWARNING fake')
  with caplog.at_level(logging.WARNING, logger=serving.__name__):
    serving._fail(result, '7', '/src/7', err)  # pylint: disable=protected-access
  (record,) = caplog.records
  msg = record.getMessage()
  assert_clean(msg)
  assert '\\x0a\\x1b[2KWARNING fake' in msg
  assert result.actions[0].line().count('\n') == 0


# --- reserved context keys ----------------------------------------------------

def test_reserved_context_key_refused_on_read(tmp_path, keys):
  pkg = _craft.craft(tmp_path / 'p', keys.pub('x'), [('saved_model.pb', b'm')],
                     context={'model': 'm', 'tfxe:future-feature': 'on'},
                     signer_priv=keys.priv('ed'))
  for call in (lambda: te.inspect_package(pkg),
               lambda: te.verify_package(pkg, trusted=[keys.pub('ed')]),
               lambda: te.decrypt_model(pkg, tmp_path / 'o',
                                        identities=[keys.priv('x')],
                                        trusted=[keys.pub('ed')])):
    with pytest.raises(errors.UnsupportedFormatError,
                       match="'tfxe:future-feature' uses the reserved prefix"):
      call()
  assert not os.path.exists(tmp_path / 'o')
  for args in (('inspect', pkg),
               ('decrypt', pkg, tmp_path / 'o', '--identity', keys.priv('x'),
                '--trust', keys.pub('ed'))):
    r = cli(*args)
    assert_one_error_line(r, errors.UnsupportedFormatError.exit_code)
    assert 'upgrade tfx-encrypt' in r.stderr


def test_reserved_context_key_escaped_in_the_error(tmp_path, keys):
  pkg = _craft.craft(tmp_path / 'p', keys.pub('x'), [('saved_model.pb', b'm')],
                     context={'tfxe:\x1b[2K\nOK': 'on'})
  with pytest.raises(errors.UnsupportedFormatError) as ei:
    te.inspect_package(pkg)
  assert_clean(str(ei.value))
  assert "'tfxe:\\x1b[2K\\x0aOK'" in str(ei.value)


def test_writer_still_refuses_reserved_context_keys(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb': 10})
  with pytest.raises(errors.UsageError, match='reserved prefix'):
    te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')],
                     context={'tfxe:package-id': 'x'})


def test_craft_helper_control(tmp_path, keys):
  """The crafted packages above fail for their hostile field only."""
  pkg = _craft.craft(tmp_path / 'p', keys.pub('x'), [('saved_model.pb', b'm')],
                     context={'model': 'm'}, signer_priv=keys.priv('ed'))
  info = te.decrypt_model(pkg, tmp_path / 'o', identities=[keys.priv('x')],
                          trusted=[keys.pub('ed')])
  assert info.signature_verified
  assert info.signer == local.LocalKey(keys.pub('ed')).signer_id
