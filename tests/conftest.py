"""Shared pytest configuration and generic fixtures for the whole suite.

Keep this file to suite-wide plumbing; fixtures for one area belong in that
area's test modules (or append small, generic ones here).

TFXE_NO_SKIP=1 (set by `make test`, and so by CI) turns every skip into a
failure: a test that cannot run because a dependency is missing must fail the
run, not vanish from it. Expected failures (xfail) are left alone.
"""

import os
import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

NO_SKIP_ENV = 'TFXE_NO_SKIP'


def _skip_reason(report):
  longrepr = report.longrepr
  if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, reason)
    longrepr = longrepr[2]
  return str(longrepr).removeprefix('Skipped: ')


class _SkippedModule(pytest.Item):
  """Stands for a test module that skipped itself while being collected
  (e.g. a module-level pytest.importorskip), so that it fails as a test and the
  rest of the suite still runs."""

  def __init__(self, *, reason, **kwargs):
    super().__init__(**kwargs)
    self.reason = reason

  def runtest(self):
    pytest.fail(
        f'{NO_SKIP_ENV}=1: this module skipped itself at import: {self.reason}',
        pytrace=False)

  def reportinfo(self):
    return self.path, None, f'{self.name} (module skipped at import)'


class _NoSkipPlugin:
  """Registered globally (not as a conftest hook), so that it also covers the
  tests in every folder of tests/."""

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_makereport(self, item, call):
    del item, call  # unused
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, 'wasxfail'):
      report.outcome = 'failed'
      report.longrepr = (f'{NO_SKIP_ENV}=1: a skipped test fails the run. '
                         f'Skip reason: {_skip_reason(report)}')

  @pytest.hookimpl(hookwrapper=True)
  def pytest_make_collect_report(self, collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(collector, pytest.Module):
      item = _SkippedModule.from_parent(
          collector, name='<module>', reason=_skip_reason(report))
      report.outcome = 'passed'
      report.longrepr = None
      report.result = [item]


def pytest_configure(config):
  if os.environ.get(NO_SKIP_ENV) == '1':
    config.pluginmanager.register(_NoSkipPlugin(), 'tfxe-no-skip')


def pytest_report_header(config):
  del config  # unused
  no_skip = os.environ.get(NO_SKIP_ENV) == '1'
  return [f'tfx-encrypt: python {sys.executable}; '
          f'{NO_SKIP_ENV}={"1 (skips fail)" if no_skip else "unset (skips allowed)"}']


@pytest.fixture(scope='session')
def repo_root():
  """The checkout's top folder (where setup.py is)."""
  return REPO_ROOT


@pytest.fixture(scope='session')
def tink_python():
  """Path of the Python in .venv-tink (tink + protobuf>=5.29, kept apart from
  TFX's protobuf 3.20). TFXE_TINK_PYTHON overrides it. Fails, never skips,
  when it is missing: `make setup` builds it."""
  path = pathlib.Path(
      os.environ.get('TFXE_TINK_PYTHON') or REPO_ROOT / '.venv-tink/bin/python')
  if not path.exists():
    pytest.fail(
        f'{path} is missing: run scripts/setup_tink_env.sh (or make setup)',
        pytrace=False)
  return path


@pytest.fixture(scope='session')
def oms_cli():
  """The `model_signing` CLI in .venv-oms (OpenSSF model_signing 1.1.1, kept
  apart from TFX's urllib3 < 2). TFXE_OMS_CLI overrides it. Fails, never
  skips, when it is missing: `make setup` builds it."""
  path = pathlib.Path(
      os.environ.get('TFXE_OMS_CLI') or REPO_ROOT / '.venv-oms/bin/model_signing')
  if not path.exists():
    pytest.fail(
        f'{path} is missing: run scripts/setup_oms_env.sh (or make setup)',
        pytrace=False)
  return path


# --- AWS KMS: moto's standalone server behind a counting proxy ---------------
# Shared by tests/keys/ and tests/keys/test_backends_integration.py. tests.fakes is
# imported lazily so that collecting the rest of the suite does not need it.

@pytest.fixture
def fast_retry(monkeypatch):
  """Short backoffs so retry tests take milliseconds, not seconds."""
  from tests.fakes import backends as fx  # pylint: disable=g-import-not-at-top
  for k, v in fx.FAST_RETRY_ENV.items():
    monkeypatch.setenv(k, v)


@pytest.fixture(scope='session')
def moto():
  """moto's standalone KMS server (`moto_server`) on a free loopback port."""
  from tests.fakes import backends as fx  # pylint: disable=g-import-not-at-top
  server = fx.start_moto()
  yield server
  server.close()


@pytest.fixture
def aws(moto, monkeypatch):
  """An AWS KMS test environment; its proxy counts requests per operation."""
  from tests.fakes import backends as fx  # pylint: disable=g-import-not-at-top
  env = fx.AwsEnv(moto)
  env.apply(monkeypatch)
  yield env
  env.close()


# --- Object stores: s3:// on moto, gs:// on gcp-storage-emulator --------------
# tests/fakes/stores.py; the servers live for the session, each test gets the
# SDK environment applied and fresh buckets (env.new_base()).

@pytest.fixture(scope='session')
def _s3_server():
  from tests.fakes import stores  # pylint: disable=g-import-not-at-top
  env = stores.S3Store()
  yield env
  env.close()


@pytest.fixture
def s3_store(_s3_server):
  with _s3_server.applied():
    yield _s3_server


@pytest.fixture(scope='session')
def _gs_server():
  from tests.fakes import stores  # pylint: disable=g-import-not-at-top
  env = stores.GcsStore(enforce_preconditions=True)
  yield env
  env.close()


@pytest.fixture
def gs_store(_gs_server):
  with _gs_server.applied():
    yield _gs_server
