"""mutmut 2.x hooks for `make mutate` (see docs/TESTING.md).

scripts/mutate.sh copies this file to the top of its scratch copy of the
tree as `mutmut_config.py`, where mutmut imports it. For every mutant,
`pre_mutation`:

* skips it when it lies outside the scope: in tfx_encrypt/package/ only
  the top-level functions and classes named in TFXE_MUTATE_FUNCS
  (comma-separated; empty or unset: every module whole) are mutated;
* skips it when it only changes the text of an error or log message (a
  string inside `raise ...`, an `...Error(...)`, `_bad(...)`,
  `_unsafe(...)`, `attempts.fail(...)` or a logger call), unless
  TFXE_MUTATE_MESSAGES=1: a message is not a check, and such mutants would
  double the run time;
* otherwise sets the test command to the fast core tests that exercise the
  mutated file (or, in tfx_encrypt/package/, the mutated function),
  fastest first,
  with `-x` so that a killed mutant costs one failing test.

TFXE_MUTATE_PYTEST is the pytest command line without the marker filter
(scripts/mutate.sh sets it to .venv's python with `-x -q`); the filter
leaves out slow, TFX and interop tests, and integration tests except for
the functions in WITH_INTEGRATION.
"""

import ast
import functools
import os

# Test modules, fastest and most targeted first (-x stops at the first
# failure, so a mutant the first module kills costs a few seconds).
_CHECKS = 'tests/package/test_security_checks.py'
_PKG = 'tests/package/'
_FMT = 'tests/format/'
TESTS_BY_FILE = {
    'tfx_encrypt/format/paths.py': [_FMT + 'test_path_rules.py', _CHECKS],
    'tfx_encrypt/format/digest.py': [_FMT + 'test_vectors.py', _CHECKS,
                                     _PKG + 'test_package.py'],
    'tfx_encrypt/format/streaming.py': [_FMT + 'test_vectors.py', _CHECKS,
                                        _PKG + 'test_tamper.py',
                                        _PKG + 'test_package.py'],
    'tfx_encrypt/format/header.py': [_FMT + 'test_vectors.py', _CHECKS,
                                     _PKG + 'test_tamper.py',
                                     _FMT + 'test_header_fuzz.py',
                                     _FMT + 'test_path_rules.py',
                                     _PKG + 'test_key_groups.py',
                                     _PKG + 'test_package.py'],
    'tfx_encrypt/format/stanza.py': [_FMT + 'test_vectors.py', _CHECKS,
                                     _PKG + 'test_tamper.py',
                                     _PKG + 'test_package.py',
                                     _PKG + 'test_key_groups.py'],
    'tfx_encrypt/runtime/serving.py': [_CHECKS,
                                       'tests/runtime/test_serve_sync.py'],
}
# Any other module of tfx_encrypt/format/ or tfx_encrypt/package/.
DEFAULT_TESTS = [_CHECKS, _PKG + 'test_tamper.py', _PKG + 'test_package.py',
                 _PKG + 'test_key_groups.py', _PKG + 'test_rewrap_trust.py',
                 _PKG + 'test_nonregular_files.py', _FMT + 'test_vectors.py']
# tfx_encrypt/package/: the tests of each security check.
TESTS_BY_FUNCTION = {
    '_verify_signature': [_CHECKS, _PKG + 'test_tamper.py',
                          _PKG + 'test_package.py',
                          _PKG + 'test_rewrap_trust.py'],
    'unwrap_data_key': [_CHECKS, _PKG + 'test_tamper.py',
                        _PKG + 'test_package.py', _PKG + 'test_key_groups.py'],
    '_UnwrapAttempts': [_CHECKS, _PKG + 'test_tamper.py',
                        _PKG + 'test_package.py', _PKG + 'test_key_groups.py'],
    'open_key_groups': [_CHECKS, _PKG + 'test_key_groups.py'],
    '_decrypt_file_table': [_CHECKS, _PKG + 'test_tamper.py',
                            _PKG + 'test_package.py'],
    '_decrypt_payload': [_CHECKS, _PKG + 'test_tamper.py',
                         _PKG + 'test_package.py'],
    '_check_ciphertext': [_CHECKS, _PKG + 'test_tamper.py',
                          _PKG + 'test_package.py'],
    '_Source': [_CHECKS, _PKG + 'test_tamper.py',
                _PKG + 'test_nonregular_files.py', _PKG + 'test_package.py'],
}

_MESSAGE_CALLS = {'_bad', '_unsafe', '_refuse_in_model', '_segment_error',
                  'fail', 'warning', 'info', 'debug', 'error', 'exception'}


def _norm(filename):
  return os.path.relpath(os.path.abspath(filename)).replace(os.sep, '/')


@functools.lru_cache(maxsize=None)
def _top_level(filename):
  """{name: (first line, last line)} of the module's functions and classes."""
  with open(filename, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  return {n.name: (n.lineno, n.end_lineno) for n in tree.body
          if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def _enclosing(filename, line):
  for name, (first, last) in _top_level(filename).items():
    if first <= line <= last:
      return name
  return None


def _is_message_call(node):
  f = node.func
  name = f.attr if isinstance(f, ast.Attribute) else getattr(f, 'id', '')
  return name in _MESSAGE_CALLS or name.endswith('Error')


class _BlankMessages(ast.NodeTransformer):
  """Replaces the text of every error and log message with ''."""

  def __init__(self):
    self.inside = 0

  def _blank(self, node):
    self.inside += 1
    try:
      return self.generic_visit(node)
    finally:
      self.inside -= 1

  def visit_Raise(self, node):  # pylint: disable=invalid-name
    return self._blank(node)

  def visit_Call(self, node):  # pylint: disable=invalid-name
    return self._blank(node) if _is_message_call(node) else (
        self.generic_visit(node))

  def visit_JoinedStr(self, node):  # pylint: disable=invalid-name
    return ast.Constant('') if self.inside else self.generic_visit(node)

  def visit_Constant(self, node):  # pylint: disable=invalid-name
    if self.inside and isinstance(node.value, str):
      return ast.Constant('')
    return node


def _only_message_changed(context):
  """True if this mutant changes nothing but the text of a message."""
  import mutmut  # pylint: disable=g-import-not-at-top
  source = context.source
  probe = mutmut.Context(source=source, mutation_id=context.mutation_id,
                         filename=context.filename,
                         dict_synonyms=context.dict_synonyms,
                         config=context.config)
  mutated, count = mutmut.mutate(probe)
  if count != 1:
    return False
  try:
    before, after = ast.parse(source), ast.parse(mutated)
  except SyntaxError:
    return False
  if ast.dump(before) == ast.dump(after):
    return False  # a change the AST does not see; let the tests decide
  return (ast.dump(_BlankMessages().visit(before)) ==
          ast.dump(_BlankMessages().visit(after)))


# The functions whose tests include integration tests that matter (a KMS
# that is down: moto's server, stopped). Elsewhere integration tests are
# left out: they start servers (seconds) without adding kills.
WITH_INTEGRATION = {'unwrap_data_key', '_UnwrapAttempts', 'open_key_groups'}


def pre_mutation(context):
  filename = _norm(context.filename)
  line = context.current_line_index + 1
  tests = TESTS_BY_FILE.get(filename, DEFAULT_TESTS)
  where = None
  if filename.startswith('tfx_encrypt/package/'):
    wanted = [f.strip() for f in
              os.environ.get('TFXE_MUTATE_FUNCS', '').split(',') if f.strip()]
    where = _enclosing(context.filename, line)
    if wanted and where not in wanted:
      context.skip = True
      return
    tests = TESTS_BY_FUNCTION.get(where, tests)
  if (os.environ.get('TFXE_MUTATE_MESSAGES') != '1' and
      _only_message_changed(context)):
    context.skip = True
    return
  markers = 'not slow and not tfx and not interop'
  if where not in WITH_INTEGRATION:
    markers += ' and not integration'
  context.config.test_command = (
      f"{os.environ['TFXE_MUTATE_PYTEST']} -m '{markers}' {' '.join(tests)}")
