"""Path rules for files inside a package (docs/FORMAT.md §9).

Applied by the writer to what it walks and by the reader to what it is told,
so a hostile file table can never name anything outside the destination.
"""

import unicodedata
from typing import Iterable, List, Sequence

from tfx_encrypt import errors

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
_FORBIDDEN_CHARS = ('/', '\\', '\x00')


def _unsafe(path, why: str) -> errors.UnsafePathError:
  return errors.UnsafePathError(
      f'unsafe path {path!r} in model: {why}. Only plain relative paths of '
      'regular files and directories are allowed; remove or rename it.')


def check_relpath(path: str) -> str:
  """Validate one relative POSIX path; return it unchanged."""
  if not isinstance(path, str) or not path:
    raise _unsafe(path, 'empty or not a string')
  try:
    raw = path.encode('utf-8')
  except UnicodeEncodeError:
    raise _unsafe(path, 'not valid UTF-8') from None
  if len(raw) > MAX_PATH_BYTES:
    raise _unsafe(path[:64] + '...', f'longer than {MAX_PATH_BYTES} bytes')
  if path.startswith('/'):
    raise _unsafe(path, 'absolute path')
  if unicodedata.normalize('NFC', path) != path:
    raise _unsafe(path, 'not NFC-normalised Unicode')
  for comp in path.split('/'):
    if comp in ('', '.', '..'):
      raise _unsafe(path, 'empty, "." or ".." component')
    if len(comp.encode('utf-8')) > MAX_COMPONENT_BYTES:
      raise _unsafe(path, f'component longer than {MAX_COMPONENT_BYTES} bytes')
    if any(c in comp for c in _FORBIDDEN_CHARS[1:]):
      raise _unsafe(path, 'backslash or NUL in name')
    if any(ord(c) < 0x20 for c in comp):
      raise _unsafe(path, 'control character in name')
  return path


def check_tree(files: Sequence[str], dirs: Iterable[str]) -> List[str]:
  """Validate a whole tree: every path safe, no duplicate or case collision,

  no file that is also (a parent of) another entry, every parent listed.
  Returns the sorted directory list.
  """
  dirs = list(dirs)
  seen = {}
  for p in list(files) + dirs:
    check_relpath(p)
    key = p.casefold()
    if key in seen:
      raise _unsafe(p, f'collides with {seen[key]!r} (same name ignoring case)')
    seen[key] = p
  dirset = set(dirs)
  fileset = set(files)
  for p in list(files) + dirs:
    parts = p.split('/')
    for k in range(1, len(parts)):
      parent = '/'.join(parts[:k])
      if parent in fileset:
        raise _unsafe(p, f'its parent {parent!r} is a file')
      if parent not in dirset:
        raise _unsafe(p, f'its parent directory {parent!r} is not listed')
  if list(files) != sorted(files):
    raise _unsafe(files[0] if files else '', 'file list is not sorted')
  return sorted(dirset)
