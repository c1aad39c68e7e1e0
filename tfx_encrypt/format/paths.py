"""Path rules for files inside a package (docs/FORMAT.md §9).

Applied by the writer to what it walks and by the reader to what it is told,
so a hostile file table can never name anything outside the destination.
Checking a whole tree is O(n log n) in the number of entries (one pass with
sets, one sort), without recursion, however deep the tree.
"""

import re
import unicodedata
from typing import Iterable, List, Sequence

from tfx_encrypt import _text
from tfx_encrypt import errors

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
#: Refused anywhere in a path: backslash, and every character
#: tfx_encrypt._text escapes (C0 incl. NUL, DEL, C1, U+2028/U+2029, bidi
#: controls, lone surrogates).
_BAD_CHAR = re.compile(f'[\\\\{_text.UNSAFE_CLASS}]')


def _unsafe(path, why: str) -> errors.UnsafePathError:
  return errors.UnsafePathError(
      f'unsafe path {_text.quoted(path, 200)} in model: {why}. Only plain '
      'relative paths of regular files and directories are allowed; remove '
      'or rename it.')


def fold(path: str) -> str:
  """The key two paths collide under when they are equal ignoring case.

  Unicode canonical caseless matching (Unicode §3.13, D145):
  NFD(casefold(NFD(path))). It folds more than any one filesystem (NTFS,
  APFS, HFS+, ext4 casefold), so a package never holds two paths that one of
  them would merge.
  """
  return unicodedata.normalize(
      'NFD', unicodedata.normalize('NFD', path).casefold())


def check_relpath(path: str) -> str:
  """Validate one relative POSIX path; return it unchanged."""
  if not isinstance(path, str) or not path:
    raise _unsafe(path, 'empty or not a string')
  bad = _BAD_CHAR.search(path)
  if bad is not None:
    c = bad.group()
    if c == '\\':
      raise _unsafe(path, 'backslash in name')
    if c == '\x00':
      raise _unsafe(path, 'NUL in name')
    raise _unsafe(path, f'control, line-separator or bidirectional character '
                  f'U+{ord(c):04X} in name')
  raw = path.encode('utf-8')  # no surrogates left: cannot fail
  if len(raw) > MAX_PATH_BYTES:
    raise _unsafe(path, f'longer than {MAX_PATH_BYTES} bytes')
  if path.startswith('/'):
    raise _unsafe(path, 'absolute path')
  if not unicodedata.is_normalized('NFC', path):
    raise _unsafe(path, 'not NFC-normalised Unicode')
  for comp in path.split('/'):
    if not comp:
      raise _unsafe(path, 'empty component (leading, trailing or double "/")')
    if comp in ('.', '..'):
      raise _unsafe(path, '"." or ".." component')
    if len(comp.encode('utf-8')) > MAX_COMPONENT_BYTES:
      raise _unsafe(path, f'component longer than {MAX_COMPONENT_BYTES} bytes')
  return path


def check_tree(files: Sequence[str], dirs: Iterable[str]) -> List[str]:
  """Validate a whole tree and return the sorted directory list.

  Every path is safe (:func:`check_relpath`); no two entries are equal or
  equal ignoring case (:func:`fold`), so no path is both a file and a
  directory; every entry's parent is a listed directory (hence, by
  induction, every ancestor is, and none is a file); `files` is sorted.
  """
  files = list(files)
  dirs = list(dirs)
  seen = {}  # fold(path) -> (path, is_dir)
  for is_dir, group in ((False, files), (True, dirs)):
    for p in group:
      check_relpath(p)
      key = fold(p)
      other = seen.get(key)
      if other is not None:
        if other[0] != p:
          raise _unsafe(p, f'collides with {_text.quoted(other[0], 200)} '
                        '(same name ignoring case)')
        if other[1] == is_dir:
          raise _unsafe(p, 'listed twice')
        raise _unsafe(p, 'both a file and a directory')
      seen[key] = (p, is_dir)
  dirset = set(dirs)
  fileset = set(files)
  for group in (files, dirs):
    for p in group:
      parent = p.rpartition('/')[0]
      if parent and parent not in dirset:
        if parent in fileset:
          raise _unsafe(p, f'its parent {_text.quoted(parent, 200)} is a file')
        raise _unsafe(p, f'its parent directory {_text.quoted(parent, 200)} '
                      'is not listed')
  if files != sorted(files):
    raise _unsafe(next(b for a, b in zip(files, files[1:]) if a > b),
                  'file list is not sorted')
  return sorted(dirset)
