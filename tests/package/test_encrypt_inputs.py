"""encrypt's input checks: the source must look like a model (or --any-dir),
and must never hold a tfx-encrypt package, bundle or temporary file."""

import os
import subprocess
import sys

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt import package as pkg_lib
from tfx_encrypt.package import layout as layout_lib
from tfx_encrypt.format import header as header_lib
from tests import _util

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = {'saved_model.pb': 300, 'variables/variables.index': 40,
         'variables/variables.data-00000-of-00001': 5000}


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', *map(str, args)],
                        capture_output=True, text=True, env=env, check=False)


def _refused(tmp_path, keys, src, match, **kw):
  """The API refuses `src` with a UsageError and writes nothing."""
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(errors.UsageError, match=match):
    te.encrypt_model(src, tmp_path / 'out', recipients=[keys.pub('x')], **kw)
  assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary


def _cli_refused(tmp_path, keys, src, match, *extra):
  r = _cli('encrypt', src, tmp_path / 'cli-out', '-r', keys.pub('x'), *extra)
  assert r.returncode == 2, r.stderr
  assert r.stdout == ''
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error: '), lines
  assert match in lines[0], lines[0]
  assert not os.path.lexists(tmp_path / 'cli-out')


# --- does it look like a model? ------------------------------------------------

def test_non_model_directory_refused(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'photos', {'a.jpg': 100, 'b/c.txt': b'x'})
  _refused(tmp_path, keys, src, 'does not look like a model directory')
  _refused(tmp_path, keys, src, 'any-dir')
  _cli_refused(tmp_path, keys, src, 'does not look like a model directory')
  r = _cli('encrypt', src, tmp_path / 'cli-out', '-r', keys.pub('x'))
  for marker in ('saved_model.pb', '*.keras', '*.tflite', '*.h5', '--any-dir'):
    assert marker in r.stderr  # says what it looked for and how to override


def test_any_dir_accepts_a_non_model_directory(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'data', {'a.jpg': 100, 'b/c.txt': b'x'})
  info = te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')],
                          any_dir=True)
  assert info.file_count == 2
  te.decrypt_model(tmp_path / 'p', tmp_path / 'o', identities=[keys.priv('x')],
                   allow_unsigned=True)
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(src)
  r = _cli('encrypt', src, tmp_path / 'q.tfxe', '--bundle', '-r',
           keys.pub('x'), '--any-dir')
  assert r.returncode == 0, r.stderr
  assert te.inspect_package(tmp_path / 'q.tfxe').file_count == 2


@pytest.mark.parametrize('marker', [
    'saved_model.pb', 'saved_model.pbtxt', 'fingerprint.pb', 'model.keras',
    'model.tflite', 'weights.h5', 'WEIGHTS.H5', '1/saved_model.pb',
    'export/deep/er/model.tflite'])
def test_each_model_marker_is_accepted(tmp_path, keys, marker):
  src = _util.make_tree(tmp_path / 'm', {marker: 64, 'other.bin': 10})
  info = te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  assert info.file_count == 2


def test_cli_accepts_a_model(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', MODEL)
  r = _cli('encrypt', src, tmp_path / 'p', '-r', keys.pub('x'))
  assert r.returncode == 0, r.stderr


def test_marker_must_be_a_file(tmp_path, keys):
  """A directory named like a model file does not make a model."""
  src = _util.make_tree(tmp_path / 'm', {'saved_model.pb/x': 10})
  _refused(tmp_path, keys, src, 'does not look like a model')


# --- never a package, bundle or temporary file inside ---------------------------

@pytest.mark.parametrize('any_dir', [False, True], ids=['plain', 'any-dir'])
def test_nested_package_directory_refused(tmp_path, keys, any_dir):
  src = _util.make_tree(tmp_path / 'm', MODEL)
  te.encrypt_model(src, tmp_path / 'inner', recipients=[keys.pub('x')])
  os.rename(tmp_path / 'inner', tmp_path / 'm' / 'assets.extra')
  _refused(tmp_path, keys, src, "tfx-encrypt package at 'assets.extra'",
           any_dir=any_dir)
  _cli_refused(tmp_path, keys, src, 'tfx-encrypt package',
               *(['--any-dir'] if any_dir else []))


def test_package_as_source_refused(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', MODEL)
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])
  before = _util.read_tree(tmp_path / 'p')
  _refused(tmp_path, keys, tmp_path / 'p', 'is a tfx-encrypt package',
           any_dir=True)
  _cli_refused(tmp_path, keys, tmp_path / 'p', 'is a tfx-encrypt package',
               '--any-dir')
  assert _util.read_tree(tmp_path / 'p') == before


def test_lone_header_file_refused(tmp_path, keys):
  """A `tfxe.header` marks a package even when it is short or garbage."""
  src = _util.make_tree(tmp_path / 'm', dict(MODEL, **{'x/tfxe.header': b''}))
  _refused(tmp_path, keys, src, "tfx-encrypt package at 'x'", any_dir=True)


@pytest.mark.parametrize('any_dir', [False, True], ids=['plain', 'any-dir'])
@pytest.mark.parametrize('name', ['model.tfxe', 'variables/innocent.bin'])
def test_nested_bundle_refused(tmp_path, keys, any_dir, name):
  """Found by its magic, whatever its name."""
  src = _util.make_tree(tmp_path / 'm', MODEL)
  te.encrypt_model(src, tmp_path / 'b.tfxe', bundle=True,
                   recipients=[keys.pub('x')])
  os.rename(tmp_path / 'b.tfxe', tmp_path / 'm' / name)
  _refused(tmp_path, keys, src, f"tfx-encrypt bundle at '{name}'",
           any_dir=any_dir)
  _cli_refused(tmp_path, keys, src, 'tfx-encrypt bundle',
               *(['--any-dir'] if any_dir else []))


def test_bundle_of_another_format_version_refused(tmp_path, keys):
  magic = header_lib.MAGIC[:6] + b'\x00\x09'
  src = _util.make_tree(tmp_path / 'm', dict(MODEL, **{
      'future.tfxe': magic + b'\x00\x00\x00\x10' + bytes(100)}))
  _refused(tmp_path, keys, src, 'tfx-encrypt bundle', any_dir=True)


def test_short_files_are_not_bundles(tmp_path, keys):
  """Shorter than a header prefix: cannot be a package, never opened."""
  src = _util.make_tree(tmp_path / 'm', dict(MODEL, **{
      'tiny': header_lib.MAGIC[:header_lib.PREFIX_SIZE - 1]}))
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])


@pytest.mark.parametrize('any_dir', [False, True], ids=['plain', 'any-dir'])
@pytest.mark.parametrize('name,is_dir', [
    ('.saved_model.pb.tfxe-tmp-0123456789abcdef', False),
    ('.saved_model.pb.tfxe-tmp-0123456789abcdef.lock', False),
    ('.out.tfxe-tmp-fedcba9876543210', True),
    ('variables/.v.tfxe-old-00112233445566aa', True),
])
def test_temporary_sibling_refused(tmp_path, keys, any_dir, name, is_dir):
  src = _util.make_tree(tmp_path / 'm', MODEL)
  p = os.path.join(src, *name.split('/'))
  if is_dir:
    os.makedirs(os.path.join(p, 'payload'))
    with open(os.path.join(p, 'payload', '00000000'), 'wb') as f:
      f.write(b'partial')
  else:
    with open(p, 'wb') as f:
      f.write(b'12345 host\n')
  _refused(tmp_path, keys, src, f"temporary file '{name}'", any_dir=any_dir)
  _cli_refused(tmp_path, keys, src, 'temporary file',
               *(['--any-dir'] if any_dir else []))
  assert os.path.lexists(p)  # reported, never removed from the source


def test_names_that_only_resemble_temporaries_are_fine(tmp_path, keys):
  src = _util.make_tree(tmp_path / 'm', dict(MODEL, **{
      '.cache.tfxe-tmp-123': 3,          # token too short
      'x.tfxe-tmp-0123456789abcdef': 3,  # not hidden
  }))
  te.encrypt_model(src, tmp_path / 'p', recipients=[keys.pub('x')])


# --- cost ----------------------------------------------------------------------

def test_only_files_long_enough_for_a_header_are_opened(tmp_path, monkeypatch):
  files = {f'd{i % 10}/f{i:04d}': b'tiny' for i in range(1000)}
  files.update({f'big{i}': header_lib.PREFIX_SIZE + i for i in range(5)})
  files['saved_model.pb'] = 200
  src = _util.make_tree(tmp_path / 'm', files)
  opened = []
  real = layout_lib._starts_with_magic  # pylint: disable=protected-access

  def counting(path):
    opened.append(os.path.basename(path))
    return real(path)
  monkeypatch.setattr(layout_lib, '_starts_with_magic', counting)
  found, _ = pkg_lib.scan_model(src)
  assert len(found) == 1006
  assert sorted(opened) == sorted(['saved_model.pb'] +
                                  [f'big{i}' for i in range(5)])


def test_scan_of_a_thousand_file_model_stays_fast(tmp_path):
  import time
  files = {f'variables/d{i % 20}/f{i:04d}': 200 for i in range(1000)}
  files['saved_model.pb'] = 200
  src = _util.make_tree(tmp_path / 'm', files)
  pkg_lib.scan_model(src)  # warm the dentry cache
  t = time.perf_counter()
  pkg_lib.scan_model(src)
  # ~15 ms on a laptop (about 6 us per magic read); a generous bound that
  # catches reading whole files or a per-file subprocess.
  assert time.perf_counter() - t < 2.0
