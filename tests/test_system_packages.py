"""scripts/ensure_system_packages.sh: `make test` / `make demo` install the
Debian packages they need, or say how, before anything else runs.

Run for real on this machine (which `make test` has just completed); the
"missing" path uses TFXE_SYSTEM_PACKAGES_EXTRA with a package that does not
exist, as an unprivileged user, so that nothing is ever installed.
"""

import os
import pathlib
import shutil
import subprocess
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'scripts' / 'ensure_system_packages.sh'
NO_SUCH_PACKAGE = 'tfxe-no-such-package-0d1b'


def _ensure(*targets, env=None, as_nobody=False):
  # The script's text goes on the command line, so an unprivileged user
  # needs no access to the checkout.
  cmd = ['bash', '-c', SCRIPT.read_text(), SCRIPT.name, *targets]
  if as_nobody and os.geteuid() == 0:
    cmd = [shutil.which('setpriv'), '--reuid=65534', '--regid=65534',
           '--clear-groups', *cmd]
  return subprocess.run(cmd, cwd='/', env=env, capture_output=True,
                        text=True, timeout=60, check=False)


def test_complete_machine_is_a_fast_noop():
  # What `make test` has made complete before the suite runs: its own
  # packages and the demo's (none). `bench` (age) is not installed by it,
  # so on a fresh machine checking it here would install age.
  start = time.monotonic()
  proc = _ensure('test', 'demo')
  elapsed = time.monotonic() - start
  assert (proc.returncode, proc.stdout, proc.stderr) == (0, '', '')
  assert elapsed < 2, f'took {elapsed:.2f}s'


def test_missing_package_prints_the_command_and_fails():
  env = dict(os.environ, TFXE_SYSTEM_PACKAGES_EXTRA=f'{NO_SUCH_PACKAGE} make')
  proc = _ensure('test', env=env, as_nobody=True)
  assert proc.returncode == 1
  assert proc.stdout == ''
  # Installed packages (make, softhsm2, ...) are not in the command.
  assert proc.stderr.splitlines() == [
      'make test needs Debian packages that are not installed; run: sudo '
      f'apt-get install -y --no-install-recommends {NO_SUCH_PACKAGE}']


def test_unknown_target_is_a_usage_error():
  proc = _ensure('tset')
  assert proc.returncode == 2
  assert len(proc.stderr.splitlines()) == 1


def test_make_targets_check_packages_first():
  for target in ('test', 'demo'):
    # Under `make test` this runs as a sub-make: without MAKELEVEL and
    # MAKEFLAGS, and with --no-print-directory, it prints only the recipe.
    env = {k: v for k, v in os.environ.items()
           if k not in ('MAKELEVEL', 'MAKEFLAGS', 'MFLAGS', 'MAKEOVERRIDES')}
    proc = subprocess.run(['make', '--no-print-directory', '-n', target],
                          cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True, env=env)
    first = proc.stdout.splitlines()[0]
    assert first == f'bash scripts/ensure_system_packages.sh {target}'


def test_test_target_lists_what_the_tests_use(tmp_path):
  """With nothing installed (a dpkg-query that knows no package), the
  command printed for `make test` names every Debian package the tests
  need: the lineage tests' mariadb-server and graphviz among them."""
  import tempfile  # pylint: disable=g-import-not-at-top
  fake_bin = tempfile.mkdtemp(prefix='tfxe-fake-dpkg-')
  try:
    os.chmod(fake_bin, 0o755)
    fake = pathlib.Path(fake_bin) / 'dpkg-query'
    fake.write_text('#!/bin/sh\nexit 1\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f'{fake_bin}:{os.environ["PATH"]}')
    env.pop('TFXE_SYSTEM_PACKAGES_EXTRA', None)
    proc = _ensure('test', env=env, as_nobody=True)
  finally:
    shutil.rmtree(fake_bin)
  assert proc.returncode == 1, proc.stderr
  [line] = proc.stderr.splitlines()
  listed = line.split('--no-install-recommends ', 1)[1].split()
  for pkg in ('mariadb-server', 'graphviz', 'softhsm2', 'docker-registry'):
    assert pkg in listed, (pkg, listed)
  assert shutil.which('dot'), 'graphviz is listed but dot is not installed'
