"""Make untrusted strings safe to show on a terminal, in a log or an error.

A package carries strings nobody vouches for when they are shown: signer
and recipient key ids, context keys and values, file paths, and so on. Raw,
they could hold ANSI escape sequences or line breaks that rewrite what a
terminal shows (e.g. forge an "OK ... signed by trusted" line) or split one
log record into two. :func:`printable` escapes exactly the characters that
can do that and leaves all other text, including non-ASCII letters, alone:

* C0 controls U+0000-U+001F (among them ESC, CR, LF, TAB), DEL U+007F and
  C1 controls U+0080-U+009F (among them CSI U+009B and NEL U+0085) become
  `\\xNN`; with ESC escaped, no escape sequence can take effect;
* the line and paragraph separators U+2028 and U+2029, the bidirectional
  marks, embeddings, overrides and isolates (U+061C, U+200E, U+200F,
  U+202A-U+202E, U+2066-U+2069; "Trojan Source", CVE-2021-42574) and lone
  surrogates U+D800-U+DFFF (JSON can carry them; they cannot be encoded)
  become `\\uNNNN`.

Backslashes are kept as they are, so escaping twice changes nothing. The
result is also bounded in length (:data:`DEFAULT_LIMIT` characters of input
unless told otherwise). The same character set is refused in package file
paths (tfx_encrypt.format.paths, docs/FORMAT.md §9).

Standard library only.
"""

import re
from typing import Optional

#: Characters of the input shown before the rest is cut (see `limit`).
DEFAULT_LIMIT = 256

#: Every character :func:`printable` escapes, as a regex character class.
UNSAFE_CLASS = (
    '\x00-\x1f\x7f-\x9f'  # C0, DEL, C1
    '\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069'  # bidirectional controls
    '\u2028\u2029'  # line / paragraph separator
    '\ud800-\udfff')  # lone surrogates
UNSAFE = re.compile(f'[{UNSAFE_CLASS}]')


def _escape(m: 're.Match') -> str:
  c = ord(m.group())
  return f'\\x{c:02x}' if c < 0x100 else f'\\u{c:04x}'


def printable(s: object, limit: Optional[int] = DEFAULT_LIMIT) -> str:
  """`s` with terminal- and log-unsafe characters escaped, length bounded.

  Args:
    s: the untrusted value; anything but a str is shown as its repr().
    limit: at most this many characters of `s` are kept; the rest is
      replaced by `...(N more characters)`. None keeps everything (only for
      values the format already bounds).

  Returns:
    One line of text without any control, separator or bidi character.
  """
  if not isinstance(s, str):
    s = repr(s)
  more = ''
  if limit is not None and len(s) > limit:
    more = f'...({len(s) - limit} more characters)'
    s = s[:limit]
  return UNSAFE.sub(_escape, s) + more


def quoted(s: object, limit: Optional[int] = DEFAULT_LIMIT) -> str:
  """:func:`printable` between single quotes, for names inside a sentence."""
  return f"'{printable(s, limit)}'"
