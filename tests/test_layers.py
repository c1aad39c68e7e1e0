"""The import direction between tfx-encrypt's own layers (docs/ARCHITECTURE.md).

Read from the source (every import statement, module-level or inside a
function), so the picture in ARCHITECTURE.md cannot drift from the code:
a module imports only its own layer or layers below it. The CLI and the
package's `__init__` sit on top of the core and reach the upper layers
only lazily, inside a function, so that `import tfx_encrypt` and the core
commands never load TFX, TensorFlow, Beam, MLMD, oras or a cloud SDK
(tests/test_packaging.py checks those third-party imports).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'tfx_encrypt'

# (layer rank, module prefixes), lowest first.
LAYERS = [
    (0, ['tfx_encrypt.errors', 'tfx_encrypt._text', 'tfx_encrypt.__about__',
         'tfx_encrypt._signals', 'tfx_encrypt.mlmd_names']),
    (1, ['tfx_encrypt.format']),
    (2, ['tfx_encrypt._fsutil', 'tfx_encrypt.policy', 'tfx_encrypt.audit',
         'tfx_encrypt.storage']),
    (3, ['tfx_encrypt.keys']),
    (4, ['tfx_encrypt.package']),
    (5, ['tfx_encrypt.cli', 'tfx_encrypt._entry', 'tfx_encrypt.__main__',
         'tfx_encrypt']),  # the package's __init__
    (6, ['tfx_encrypt.types', 'tfx_encrypt.runtime', 'tfx_encrypt.lineage',
         'tfx_encrypt.distribution', 'tfx_encrypt.components']),
]
# Top-of-core modules that may reach the upper layers lazily.
LAZY_UP = {'tfx_encrypt.cli', 'tfx_encrypt'}


def _rank(module: str) -> int:
  best = None
  for rank, prefixes in LAYERS:
    for p in prefixes:
      if module == p or module.startswith(p + '.'):
        if best is None or len(p) > best[1]:
          best = (rank, len(p))
  assert best is not None, f'{module} is in no layer: add it to LAYERS'
  return best[0]


def _modules():
  for path in sorted(ROOT.rglob('*.py')):
    if path.name.endswith('_test.py'):
      continue
    rel = path.relative_to(ROOT.parent).with_suffix('')
    parts = list(rel.parts)
    if parts[-1] == '__init__':
      parts.pop()
    yield '.'.join(parts), path


def _imports(module: str, path: pathlib.Path):
  """(imported module, lazy?) for every tfx_encrypt import in `path`."""
  tree = ast.parse(path.read_text(), str(path))
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  top_level = {id(n) for n in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        pkg = package.split('.')
        base = '.'.join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
      # `from P import x`: x is a module of P, or a name defined in P.
      names = [base + '.' + a.name for a in node.names]
    else:
      continue
    for name in names:
      if name == 'tfx_encrypt' or name.startswith('tfx_encrypt.'):
        yield name, id(node) not in top_level


def _resolve(name: str) -> str:
  """The longest prefix of `name` that is a module of the project."""
  parts = name.split('.')
  while parts:
    candidate = ROOT.parent.joinpath(*parts)
    if candidate.with_suffix('.py').exists() or (
        candidate / '__init__.py').exists():
      return '.'.join(parts)
    parts.pop()
  return name


def test_every_module_imports_only_its_layer_or_below():
  problems = []
  for module, path in _modules():
    mine = _rank(module)
    for imported, lazy in _imports(module, path):
      target = _resolve(imported)
      theirs = _rank(target)
      if theirs <= mine:
        continue
      if lazy and any(module == m or module.startswith(m + '.')
                      for m in LAZY_UP):
        continue
      problems.append(f'{module} (layer {mine}) imports {target} '
                      f'(layer {theirs}){" lazily" if lazy else ""}')
  assert problems == [], '\n'.join(sorted(set(problems)))


def test_the_byte_format_knows_nothing_about_keys_or_files():
  for module, path in _modules():
    if module.startswith('tfx_encrypt.format'):
      for imported, _ in _imports(module, path):
        target = _resolve(imported)
        assert _rank(target) <= 1, f'{module} imports {target}'


@pytest.mark.parametrize('module,expected', [
    ('tfx_encrypt.format.header', 1), ('tfx_encrypt.keys.aws_kms', 3),
    ('tfx_encrypt.package.operations', 4), ('tfx_encrypt', 5),
    ('tfx_encrypt.runtime.serving', 6)])
def test_layer_table_is_what_it_says(module, expected):
  assert _rank(module) == expected
