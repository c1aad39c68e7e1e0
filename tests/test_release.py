"""Releasable (issue 14): the sdist and the wheel build and pass twine check,
the version comes from tfx_encrypt/__about__.py, and the core wheel installs
into a clean Python 3.11 venv and decrypts a package made by .venv, with
nothing but its own (core) requirements installed.

The build runs scripts/build_dist.sh (python -m build and twine from
.venv-release, scripts/setup_release_env.sh); the clean venvs are made with
`python3.11 -m venv` and pip resolves the core requirements from the index.
Built and installed once per session.
"""

import email
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import tarfile
import zipfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = {'cryptography', 'click', 'blake3'}
# Must never come with the core: the TFX stack and the cloud SDKs.
FORBIDDEN = {'tensorflow', 'tensorflow-cpu', 'tfx', 'ml-pipelines-sdk',
             'apache-beam', 'ml-metadata', 'tfx-bsl', 'numpy', 'protobuf',
             'grpcio', 'kfp', 'boto3', 'botocore', 'google-cloud-kms',
             'google-api-core', 'hvac', 'azure-keyvault-keys',
             'azure-identity', 'python-pkcs11', 'oras', 'keras'}


def _norm(name):
  return re.sub(r'[-_.]+', '-', name).lower()


def _about():
  about = {}
  exec((REPO_ROOT / 'tfx_encrypt' / '__about__.py').read_text(), about)  # pylint: disable=exec-used
  return about


def _run(argv, **kwargs):
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'PYTHONHOME')}
  return subprocess.run(argv, capture_output=True, text=True, timeout=300,
                        check=False, env=env, **kwargs)


@pytest.fixture(scope='session')
def dist(tmp_path_factory):
  """(sdist, wheel) built by scripts/build_dist.sh, once per session."""
  if not (REPO_ROOT / '.venv-release' / 'bin' / 'python').exists():
    pytest.fail('.venv-release is missing: run scripts/setup_release_env.sh '
                '(or make setup)', pytrace=False)
  out = tmp_path_factory.mktemp('dist')
  proc = _run(['bash', str(REPO_ROOT / 'scripts' / 'build_dist.sh'),
               str(out)])
  assert proc.returncode == 0, proc.stderr[-4000:]
  paths = [pathlib.Path(p) for p in proc.stdout.split()]
  assert len(paths) == 2, proc.stdout
  # twine check --strict ran in the script; say so in the log.
  assert proc.stderr.count('PASSED') == 2, proc.stderr[-2000:]
  return tuple(paths)


def test_versions_come_from_about():
  version = _about()['__version__']
  assert re.fullmatch(r'0\.\d+\.\d+(\.dev\d+|rc\d+)?', version), version
  assert importlib.metadata.version('tfx-encrypt') == version
  import tfx_encrypt  # pylint: disable=g-import-not-at-top
  assert tfx_encrypt.__version__ == version
  # setup.py reads it; nothing else in the packaging files writes one.
  setup = (REPO_ROOT / 'setup.py').read_text()
  assert 'version=_version()' in setup
  assert not re.search(r"version\s*=\s*['\"]", setup)
  assert 'version' not in (REPO_ROOT / 'pyproject.toml').read_text().replace(
      'build-system', '')
  # The changelog has the version, as unreleased until it is published.
  changelog = (REPO_ROOT / 'CHANGELOG.md').read_text()
  assert re.search(rf'^## \[Unreleased\] - {re.escape(version)}\b', changelog,
                   re.MULTILINE), 'CHANGELOG.md: no entry for ' + version


@pytest.mark.slow
def test_sdist_and_wheel(dist):
  sdist, wheel = dist
  version = _about()['__version__']
  assert sdist.name == f'tfx_encrypt-{version}.tar.gz'
  assert wheel.name == f'tfx_encrypt-{version}-py3-none-any.whl'

  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    meta = email.message_from_bytes(
        z.read(f'tfx_encrypt-{version}.dist-info/METADATA'))
    entry_points = z.read(
        f'tfx_encrypt-{version}.dist-info/entry_points.txt').decode()
  assert meta['Name'] == 'tfx-encrypt' and meta['Version'] == version
  assert meta['Requires-Python'] == '>=3.9'
  assert meta['Description-Content-Type'] == 'text/markdown'
  core = {_norm(re.match(r'[A-Za-z0-9._-]+', r).group(0))
          for r in meta.get_all('Requires-Dist') if 'extra ==' not in r}
  assert core == CORE
  assert 'tfx-encrypt = tfx_encrypt._entry:main' in entry_points
  assert 'tfx_encrypt/components/kubeflow_v2.py' in names
  assert all(n.startswith(('tfx_encrypt/', f'tfx_encrypt-{version}.dist-info/'))
             for n in names), names
  assert not [n for n in names if n.endswith(('.pem', '.key', '.pyc'))]

  with tarfile.open(sdist) as t:
    members = {m.name.split('/', 1)[1] for m in t.getmembers() if '/' in m.name}
  for must in ('setup.py', 'pyproject.toml', 'README.md', 'CHANGELOG.md',
               'MANIFEST.in', 'constraints/tfx-1.16-py310.txt',
               'docs/FORMAT.md', 'tfx_encrypt/__about__.py', 'PKG-INFO'):
    assert must in members, must
  assert not [m for m in members if m.startswith('tests/')]
  assert not [m for m in members if m.endswith(('.pem', '.key', '.pyc'))]


# --- the core wheel in a clean Python 3.11 -------------------------------------


def _python311():
  for cand in ('python3.11', 'python3'):
    path = shutil.which(cand)
    if path and _run([path, '-c', 'import sys; assert sys.version_info[:2] '
                      '== (3, 11)']).returncode == 0:
      return path
  pytest.fail('no Python 3.11 on PATH (python3.11 or python3)', pytrace=False)


def _installed(venv):
  proc = _run([str(venv / 'bin' / 'python'), '-m', 'pip', 'list',
               '--format=json'])
  assert proc.returncode == 0, proc.stderr
  return {_norm(d['name']): d['version'] for d in json.loads(proc.stdout)}


# What a distribution needs, all the way down, as the venv's own metadata and
# markers say (pip's vendored `packaging` evaluates them).
_CLOSURE = r'''
import importlib.metadata as m, json, re, sys
from pip._vendor.packaging.requirements import Requirement
def norm(n): return re.sub(r'[-_.]+', '-', n).lower()
todo, seen = [sys.argv[1]], set()
while todo:
  name = norm(todo.pop())
  if name in seen: continue
  seen.add(name)
  for r in m.requires(name) or []:
    req = Requirement(r)
    if req.marker is None or req.marker.evaluate({'extra': ''}):
      todo.append(req.name)
print(json.dumps(sorted(seen)))
'''


def _make_venv(path, *pip_steps):
  proc = _run([_python311(), '-m', 'venv', str(path)])
  assert proc.returncode == 0, proc.stderr
  before = _installed(path)
  for step in pip_steps:
    proc = _run([str(path / 'bin' / 'python'), '-m', 'pip', 'install',
                 '--disable-pip-version-check', '--progress-bar', 'off', '-q',
                 *step])
    assert proc.returncode == 0, proc.stdout + proc.stderr
  return before


@pytest.fixture(scope='session')
def core_venv(dist, tmp_path_factory):
  """A clean Python 3.11 venv with `pip install <the wheel>` (the core)."""
  venv = tmp_path_factory.mktemp('core-venv') / 'venv'
  before = _make_venv(venv, [str(dist[1])])
  return venv, before


@pytest.fixture(scope='session')
def package(tmp_path_factory):
  """Packages made by .venv, and the keys they need."""
  from tfx_encrypt import encrypt_model  # pylint: disable=g-import-not-at-top
  from tfx_encrypt.keys import local  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('release-package')
  ops_key, ops_pub = local.keygen('x25519', str(d / 'ops'))
  sign_key, sign_pub = local.keygen('ed25519', str(d / 'release'))
  model = d / 'model'
  (model / 'variables').mkdir(parents=True)
  (model / 'saved_model.pb').write_bytes(os.urandom(3000))
  (model / 'variables' / 'variables.data-00000-of-00001').write_bytes(
      os.urandom(2 * 1024 * 1024 + 17))  # more than one segment
  made = {}
  for name, kwargs in (('default', {}), ('sha256', {'hash_alg': 'sha256'}),
                       ('bundle', {'bundle': True})):
    out = d / (name + ('.tfxe' if name == 'bundle' else '.pkg'))
    encrypt_model(model, out, recipients=[ops_pub], signer=sign_key,
                  context={'model': 'taxi', 'version': '7'}, **kwargs)
    made[name] = out
  return {'model': model, 'identity': ops_key, 'trust': sign_pub, **made}


def _decrypt(venv, package, pkg, out):
  return _run([str(venv / 'bin' / 'tfx-encrypt'), 'decrypt', str(pkg),
               str(out), '--identity', package['identity'], '--trust',
               package['trust'], '--require-context', 'model=taxi',
               '--min-version', '7'])


def _same_tree(a, b):
  files = lambda root: {p.relative_to(root): p.read_bytes()  # noqa: E731
                        for p in root.rglob('*') if p.is_file()}
  return files(a) == files(b)


@pytest.mark.slow
def test_core_wheel_in_a_clean_python311_decrypts(core_venv, package,
                                                  tmp_path):
  venv, before = core_venv
  python = str(venv / 'bin' / 'python')
  version = _about()['__version__']

  # Installed: the wheel and what its core requirements need, nothing else.
  added = set(_installed(venv)) - set(before)
  proc = _run([python, '-c', _CLOSURE, 'tfx-encrypt'])
  assert proc.returncode == 0, proc.stderr
  closure = set(json.loads(proc.stdout))
  assert added == closure, (added, closure)
  assert CORE | {'tfx-encrypt'} <= added
  assert not added & FORBIDDEN, added & FORBIDDEN
  assert _run([python, '-m', 'pip', 'check']).returncode == 0
  # ... and it is the wheel, not the checkout.
  proc = _run([python, '-c', 'import tfx_encrypt, sys; '
               'print(tfx_encrypt.__version__, tfx_encrypt.__file__)'],
              cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  got_version, where = proc.stdout.split()
  assert got_version == version and where.startswith(str(venv)), proc.stdout

  proc = _run([str(venv / 'bin' / 'tfx-encrypt'), 'verify',
               str(package['default']), '--trust', package['trust']])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for name in ('default', 'bundle'):
    out = tmp_path / name
    proc = _decrypt(venv, package, package[name], out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _same_tree(package['model'], out), name
  # The consumer policy holds there too (exit 11, nothing written).
  proc = _run([str(venv / 'bin' / 'tfx-encrypt'), 'decrypt',
               str(package['default']), str(tmp_path / 'refused'),
               '--identity', package['identity'], '--trust', package['trust'],
               '--require-context', 'model=fraud'])
  assert proc.returncode == 11, proc.stdout + proc.stderr
  assert not (tmp_path / 'refused').exists()


@pytest.mark.slow
def test_core_wheel_with_only_cryptography_and_click(dist, package,
                                                     tmp_path_factory):
  """An edge device that installs the wheel without its dependencies, with
  cryptography and click only: SHA-256 packages (`--hash sha256`) decrypt;
  a BLAKE3 one (the default digest) is exit 3 with one line saying what to
  install."""
  venv = tmp_path_factory.mktemp('minimal-venv') / 'venv'
  before = _make_venv(venv, ['cryptography', 'click'],
                      ['--no-deps', str(dist[1])])
  added = set(_installed(venv)) - set(before)
  assert 'blake3' not in added and not added & FORBIDDEN, added
  tmp = tmp_path_factory.mktemp('minimal-out')
  proc = _decrypt(venv, package, package['sha256'], tmp / 'sha256')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert _same_tree(package['model'], tmp / 'sha256')
  proc = _decrypt(venv, package, package['default'], tmp / 'blake3')
  assert proc.returncode == 3, proc.stderr  # unsupported format
  assert proc.stderr.count('\n') == 1 and 'BLAKE3' in proc.stderr, proc.stderr
  assert not (tmp / 'blake3').exists()
