"""Packaging, environment and layering checks.

- The core (what `pip install tfx-encrypt` gives an edge device) imports with
  only the standard library, cryptography, click and blake3: never
  TensorFlow, TFX, Beam, ML Metadata or a cloud SDK.
- The installed distribution is this checkout, requires only cryptography,
  click and blake3, and declares the extras, console script and key-backend
  entry points.
- .venv matches constraints/tfx-1.16-py310.txt exactly, and the environment
  scripts find Python the way the README promises.
"""

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import textwrap


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DIST = 'tfx-encrypt'
CONSTRAINTS = REPO_ROOT / 'constraints' / 'tfx-1.16-py310.txt'
TINK_CONSTRAINTS = REPO_ROOT / 'constraints' / 'tink.txt'
SETUP_ENV = REPO_ROOT / 'scripts' / 'setup_env.sh'
SETUP_TINK_ENV = REPO_ROOT / 'scripts' / 'setup_tink_env.sh'

# Top-level modules the core must never import (also not "optionally", inside
# a try/except): they belong to the TFX layers or to one key backend, which
# imports its SDK lazily.
FORBIDDEN_IN_CORE = (
    'tensorflow', 'tfx', 'tfx_bsl', 'apache_beam', 'ml_metadata', 'keras',
    'kfp', 'numpy', 'boto3', 'botocore', 'google.cloud', 'google.api_core',
    'grpc', 'hvac', 'azure', 'pkcs11', 'oras', 'tink')

BUILTIN_BACKENDS = {
    'file': 'tfx_encrypt.keys.local:LocalKey',
    'aws-kms': 'tfx_encrypt.keys.aws_kms:AwsKmsKey',
    'gcp-kms': 'tfx_encrypt.keys.gcp_kms:GcpKmsKey',
    'hcvault': 'tfx_encrypt.keys.vault:VaultKey',
    'azure-kv': 'tfx_encrypt.keys.azure_kv:AzureKeyVaultKey',
    'pkcs11': 'tfx_encrypt.keys.pkcs11:Pkcs11Key',
}

FEATURE_EXTRAS = {
    'tfx': {'tfx', 'tensorflow', 'apache-beam', 'ml-metadata', 'dill'},
    'aws': {'boto3'},
    'gcp': {'google-cloud-kms', 'google-crc32c', 'google-cloud-storage'},
    'vault': {'hvac'},
    'azure': {'azure-keyvault-keys', 'azure-identity'},
    'pkcs11': {'python-pkcs11'},
    'oci': {'oras'},
    'kfp': {'kfp'},
    'fast': {'blake3'},
}


def _norm(name):
  return re.sub(r'[-_.]+', '-', name).lower()


def _req_name(req):
  return _norm(re.match(r'\s*([A-Za-z0-9][A-Za-z0-9._-]*)', req).group(1))


def _read_pins(path):
  pins = {}
  for line in path.read_text().splitlines():
    line = line.split('#', 1)[0].strip()
    if not line:
      continue
    name, sep, version = line.partition('==')
    assert sep and version, f'{path.name}: not an exact pin: {line!r}'
    assert _norm(name) not in pins, f'{path.name}: {name} pinned twice'
    pins[_norm(name)] = version
  return pins


def _run(args, env=None, **kwargs):
  return subprocess.run(
      args, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False, **kwargs)


def _core_modules():
  """The modules of the bottom layers (and the thin CLI) that exist so far:
  what an edge device runs to decrypt and verify a model."""
  pkg = REPO_ROOT / 'tfx_encrypt'

  def exists(dotted):
    rel = pkg.parent.joinpath(*dotted.split('.'))
    return rel.with_suffix('.py').is_file() or (rel / '__init__.py').is_file()

  mods = [m for m in (
      'tfx_encrypt', 'tfx_encrypt.__about__', 'tfx_encrypt.errors',
      'tfx_encrypt.package', 'tfx_encrypt.cli', 'tfx_encrypt.storage',
      # keys: the registry, the interface and the local backend; the cloud
      # backends import their SDKs and are loaded only when their scheme is
      # used.
      'tfx_encrypt.keys', 'tfx_encrypt.keys.base', 'tfx_encrypt.keys.local',
      'tfx_encrypt.format') if exists(m)]
  # Every module of format/ (and of package/, should it become a package).
  for tree in ('format', 'package'):
    for f in sorted((pkg / tree).rglob('*.py')):
      if f.name == '__init__.py' or f.name.endswith('_test.py') or (
          f.name.startswith('test_')):
        continue
      mods.append('.'.join(f.relative_to(pkg.parent).with_suffix('').parts))
  return mods


def test_core_imports_without_tensorflow_or_cloud_sdks():
  modules = _core_modules()
  assert 'tfx_encrypt.errors' in modules and 'tfx_encrypt.keys' in modules
  script = textwrap.dedent('''
      import importlib, json, sys
      FORBIDDEN = %r
      def forbidden(name):
        return any(name == f or name.startswith(f + '.') for f in FORBIDDEN)
      attempted = []
      class Blocker:
        """Makes the forbidden modules absent, as on an edge device."""
        def find_spec(self, name, path=None, target=None):
          if forbidden(name):
            attempted.append(name)
            raise ModuleNotFoundError('blocked: %%s' %% name, name=name)
          return None
      # Some namespace packages (google.cloud) are made by .pth files at
      # start-up, before any of our code runs.
      preloaded = set(sys.modules)
      sys.meta_path.insert(0, Blocker())
      errors = {}
      for module in %r:
        try:
          importlib.import_module(module)
        except BaseException as e:
          errors[module] = '%%s: %%s' %% (type(e).__name__, e)
      print(json.dumps({
          'attempted': sorted(set(attempted)),
          'loaded': sorted(n for n in set(sys.modules) - preloaded
                           if forbidden(n)),
          'errors': errors}))
  ''') % (FORBIDDEN_IN_CORE, modules)
  proc = _run([sys.executable, '-c', script])
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['errors'] == {}, (
      f'core modules must import without {FORBIDDEN_IN_CORE}: '
      f'{result["errors"]}')
  assert result['attempted'] == [], (
      f'core modules tried to import {result["attempted"]} '
      f'(checked: {modules})')
  assert result['loaded'] == []


def test_installed_distribution_is_this_checkout():
  # The build also leaves tfx_encrypt.egg-info in the checkout; the installed
  # one is the distribution that has a direct_url.json.
  installed = [
      d for d in importlib.metadata.distributions()
      if _norm(d.metadata['Name']) == DIST and d.read_text('direct_url.json')]
  assert len(installed) == 1, installed
  dist = installed[0]
  direct_url = json.loads(dist.read_text('direct_url.json'))
  assert direct_url.get('dir_info', {}).get('editable'), direct_url
  assert direct_url['url'] == REPO_ROOT.as_uri(), direct_url

  about = {}
  exec((REPO_ROOT / 'tfx_encrypt' / '__about__.py').read_text(), about)  # pylint: disable=exec-used
  assert dist.version == about['__version__']
  assert dist.metadata['Requires-Python'] == '>=3.9'


def test_install_requires_is_only_cryptography_click_and_blake3():
  requires = importlib.metadata.requires(DIST) or []
  core = sorted(r for r in requires if 'extra ==' not in r)
  assert {_req_name(r) for r in core} == {'cryptography', 'click',
                                          'blake3'}, core
  assert sorted(r.replace(' ', '') for r in core) == [
      'blake3>=1', 'click>=8', 'cryptography>=47'], core


def _extra_requirements():
  by_extra = {}
  for req in importlib.metadata.requires(DIST) or []:
    match = re.search(r'extra\s*==\s*["\']([^"\']+)["\']', req)
    if match:
      by_extra.setdefault(match.group(1), set()).add(_req_name(req))
  return by_extra


def test_extras():
  metadata = importlib.metadata.metadata(DIST)
  declared = set(metadata.get_all('Provides-Extra') or [])
  assert declared == set(FEATURE_EXTRAS) | {'all', 'dev'}

  by_extra = _extra_requirements()
  for extra, names in FEATURE_EXTRAS.items():
    assert by_extra[extra] == names, extra
  everything = set().union(*FEATURE_EXTRAS.values())
  assert by_extra['all'] == everything
  assert by_extra['dev'] >= everything | {
      'pytest', 'pytest-timeout', 'nbmake', 'moto', 'grpcio',
      'gcp-storage-emulator'}

  tfx_reqs = [r.replace(' ', '') for r in importlib.metadata.requires(DIST)
              if 'extra == "tfx"' in r or "extra == 'tfx'" in r]
  assert any(r.startswith('tfx==1.16.*') for r in tfx_reqs), tfx_reqs


def test_console_script_and_key_backend_entry_points():
  eps = importlib.metadata.entry_points()
  scripts = {ep.name: ep.value for ep in eps.select(group='console_scripts')}
  assert scripts.get('tfx-encrypt') == 'tfx_encrypt._entry:main'

  backends = {ep.name: ep.value
              for ep in eps.select(group='tfx_encrypt.key_backends')}
  assert {k: v for k, v in backends.items() if k in BUILTIN_BACKENDS} == (
      BUILTIN_BACKENDS)

  # The registry's own table of built-ins, if it keeps one, must agree.
  import tfx_encrypt.keys  # pylint: disable=import-outside-toplevel
  builtin = getattr(tfx_encrypt.keys, '_BUILTIN', None)
  if builtin is not None:
    assert dict(builtin) == BUILTIN_BACKENDS


def test_constraints_are_exact_and_match_the_venv():
  pins = _read_pins(CONSTRAINTS)
  # TFX 1.16.0's own CI set, and dill (apache-beam 2.59 / tfx-bsl need it).
  for name, version in {
      'tfx': '1.16.0', 'tensorflow': '2.16.2', 'apache-beam': '2.59.0',
      'protobuf': '3.20.3', 'numpy': '1.26.4', 'kfp': '2.5.0',
      'kfp-pipeline-spec': '0.2.2'}.items():
    assert pins.get(name) == version, name
  assert 'dill' in pins
  assert 'tink' not in pins  # needs protobuf>=5.29: it has its own venv

  # Only site-packages: once setuptools is imported, its vendored
  # dist-infos (packaging, wheel, ...) are on sys.path too.
  site = sorted({sysconfig.get_paths()['purelib'],
                 sysconfig.get_paths()['platlib']})
  installed = {
      _norm(d.metadata['Name']): d.version
      for d in importlib.metadata.distributions(path=site)}
  # Only meaningful in .venv, which setup_env.sh builds from these pins.
  assert pathlib.Path(sys.prefix).resolve() == (REPO_ROOT / '.venv').resolve(), (
      f'run the tests with .venv/bin/python (make test), not {sys.prefix}')
  wrong = {name: (version, installed.get(name))
           for name, version in pins.items()
           if installed.get(name) != version}
  assert wrong == {}, 'pinned vs installed'
  unpinned = sorted(set(installed) - set(pins) - {_norm(DIST)})
  assert unpinned == [], 'installed in .venv but not pinned in constraints'


def test_setup_env_is_up_to_date():
  proc = _run(['bash', str(SETUP_ENV), '--check'])
  assert proc.returncode == 0, proc.stderr
  assert 'up to date' in proc.stderr


def _fake_python(path, script):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(script)
  path.chmod(0o755)


def _finder_env(tmp_path, **extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHON', 'PYENV_ROOT', 'PYENV_VERSION')}
  env.update(HOME=str(tmp_path / 'home'),
             PATH=f'{tmp_path / "bin"}:/usr/bin:/bin', **extra)
  return env


def test_python_finder_skips_broken_shim_and_takes_newest_pyenv(tmp_path):
  real = os.path.realpath(getattr(sys, '_base_executable', sys.executable))
  # A pyenv shim that is on PATH but does not work.
  _fake_python(tmp_path / 'bin' / 'python3.10',
               '#!/bin/sh\necho "pyenv: python3.10: command not found" >&2\n'
               'exit 127\n')
  root = tmp_path / 'pyenv'
  for version in ('3.10.9', '3.10.13'):
    link = root / 'versions' / version / 'bin' / 'python3.10'
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
  proc = _run(['bash', str(SETUP_ENV), '--print-python'],
              env=_finder_env(tmp_path, PYENV_ROOT=str(root)))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str(root / 'versions/3.10.13/bin/python3.10')


def _runs(python):
  try:
    return subprocess.run([python, '-c', ''], check=False,
                          capture_output=True).returncode == 0
  except OSError:
    return False


def test_python_finder_explains_what_to_install(tmp_path):
  env = _finder_env(tmp_path, PYENV_ROOT=str(tmp_path / 'no-pyenv'))
  proc = _run(['bash', str(SETUP_ENV), '--print-python'], env=env)
  if _runs('/usr/bin/python3.10'):  # the last place the finder looks
    assert proc.stdout.strip() == '/usr/bin/python3.10'
    return
  assert proc.returncode != 0
  assert 'No working Python 3.10 found' in proc.stderr
  assert 'pyenv install 3.10' in proc.stderr
  assert 'PYTHON=' in proc.stderr


def test_python_override_must_be_3_10(tmp_path):
  _fake_python(tmp_path / 'py', '#!/bin/sh\nexit 1\n')
  proc = _run(['bash', str(SETUP_ENV), '--print-python'],
              env=_finder_env(tmp_path, PYTHON=str(tmp_path / 'py')))
  assert proc.returncode != 0
  assert 'does not run as Python 3.10' in proc.stderr


def test_tink_venv_is_built_and_pinned(tink_python):
  proc = _run(['bash', str(SETUP_TINK_ENV), '--check'])
  assert proc.returncode == 0, proc.stderr
  proc = _run([str(tink_python), '-c',
               'import importlib.metadata as m, tink, google.protobuf; '
               'print(m.version("tink"), m.version("protobuf"))'])
  assert proc.returncode == 0, proc.stderr
  pins = _read_pins(TINK_CONSTRAINTS)
  assert proc.stdout.split() == [pins['tink'], pins['protobuf']]
