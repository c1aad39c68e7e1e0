"""inspect, verify, decrypt, iter_decrypted_files on s3:// and gs:// packages.

Against moto's standalone server (s3://, real boto3) and gcp-storage-emulator
(gs://, real google-cloud-storage), both on loopback (tests/fakes/stores.py).
The same checks as on disk (FORMAT.md §2, §10); a version with payload
objects but no header is incomplete and never read.
"""

import os

import click.testing
import pytest

import tfx_encrypt as te
from tfx_encrypt import cli
from tfx_encrypt import errors
from tfx_encrypt import storage
from tests import _util

MiB = 1 << 20

FILES = {'saved_model.pb': b'\x08\x01', 'variables/variables.data-00000-of-00001':
         9 * MiB + 17, 'variables/variables.index': 300, 'assets/vocab.txt': b'',
         'caf\u00e9.txt': b'nfc'}


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(params=['s3', 'gs'])
def store(request):
  return request.getfixturevalue(f'{request.param}_store')


def _package(tmp_path, keys, bundle):
  src = _util.make_tree(tmp_path / 'm', FILES)
  pkg = tmp_path / ('p.tfxe' if bundle else 'p')
  info = te.encrypt_model(src, pkg, recipients=[keys.pub('x')],
                          signer=keys.priv('ed'), bundle=bundle,
                          context={'model': 'm', 'version': '3'})
  return src, str(pkg), info


@pytest.mark.parametrize('bundle', [False, True], ids=['dir', 'bundle'])
def test_inspect_verify_decrypt_remote(tmp_path, keys, store, bundle):
  src, pkg, info = _package(tmp_path, keys, bundle)
  uri = storage.join(store.new_base(), '7' + ('.tfxe' if bundle else ''))
  _util.upload_package(pkg, uri)

  ins = te.inspect_package(uri)
  assert (ins.bundle, ins.fingerprint, ins.path) == (bundle, info.fingerprint,
                                                     uri)
  assert ins.ciphertext_bytes == te.inspect_package(pkg).ciphertext_bytes
  assert te.verify_package(uri, trusted=[keys.pub('ed')]).signature_verified
  out = tmp_path / 'out'
  d = te.decrypt_model(uri, out, identities=[keys.priv('x')],
                       trusted=[keys.pub('ed')])
  assert d.signature_verified and d.fingerprint == info.fingerprint
  assert _util.read_tree(out) == _util.read_tree(src)
  got = dict(te.iter_decrypted_files(uri, identities=[keys.priv('x')],
                                     trusted=[keys.pub('ed')]))
  assert got == {k: v for k, v in _util.read_tree(src).items()
                 if v is not None}
  # The same checks: an untrusted signer is refused before any key call.
  with pytest.raises(errors.UntrustedSignerError):
    te.decrypt_model(uri, tmp_path / 'out2', identities=[keys.priv('x')],
                     trusted=[keys.pub('evil')])
  assert not (tmp_path / 'out2').exists()


def test_cli_reads_remote_packages(tmp_path, keys, store):
  src, pkg, _ = _package(tmp_path, keys, False)
  uri = storage.join(store.new_base(), '1')
  _util.upload_package(pkg, uri)
  runner = click.testing.CliRunner()
  r = runner.invoke(cli.main, ['inspect', uri])
  assert r.exit_code == 0, r.output
  assert 'directory' in r.output
  r = runner.invoke(cli.main, ['verify', uri, '--trust', keys.pub('ed')])
  assert r.exit_code == 0, r.output
  r = runner.invoke(cli.main, ['decrypt', uri, str(tmp_path / 'o'),
                               '-i', keys.priv('x'), '--trust', keys.pub('ed')])
  assert r.exit_code == 0, r.output
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(src)


def test_payloads_without_header_are_an_incomplete_package(tmp_path, keys,
                                                           store):
  _, pkg, _ = _package(tmp_path, keys, False)
  uri = storage.join(store.new_base(), '5')
  for name in sorted(os.listdir(os.path.join(pkg, 'payload'))):
    with open(os.path.join(pkg, 'payload', name), 'rb') as f:
      storage.put(storage.join(uri, 'payload', name), f)
  for call in (te.inspect_package, lambda u: te.verify_package(
      u, trusted=[keys.pub('ed')])):
    with pytest.raises(errors.UnsupportedFormatError, match='incomplete'):
      call(uri)
  with pytest.raises(errors.UnsupportedFormatError, match='incomplete'):
    te.decrypt_model(uri, tmp_path / 'o', identities=[keys.priv('x')],
                     trusted=[keys.pub('ed')])
  assert not (tmp_path / 'o').exists()
  with pytest.raises(errors.UsageError, match='does not exist'):
    te.inspect_package(storage.join(uri, 'nothing'))


def test_remote_tampering_is_caught(tmp_path, keys, store):
  _, pkg, _ = _package(tmp_path, keys, False)
  base = store.new_base()
  # An extra object in the package.
  uri = storage.join(base, '1')
  _util.upload_package(pkg, uri)
  storage.put(storage.join(uri, 'payload', 'extra'), b'x')
  with pytest.raises(errors.TamperedPackageError, match='unexpected'):
    te.verify_package(uri, trusted=[keys.pub('ed')])
  # A flipped byte, same size.
  uri = storage.join(base, '2')
  _util.upload_package(pkg, uri)
  p = os.path.join(pkg, 'payload', '00000000')
  data = bytearray(open(p, 'rb').read())
  data[len(data) // 2] ^= 1
  storage.put(storage.join(uri, 'payload', '00000000'), bytes(data))
  with pytest.raises(errors.TamperedPackageError, match='digest'):
    te.verify_package(uri, trusted=[keys.pub('ed')])
  with pytest.raises(errors.TamperedPackageError):
    te.decrypt_model(uri, tmp_path / 'o', identities=[keys.priv('x')],
                     trusted=[keys.pub('ed')])
  assert not (tmp_path / 'o').exists()
  # A truncated payload.
  uri = storage.join(base, '3')
  _util.upload_package(pkg, uri)
  storage.put(storage.join(uri, 'payload', '00000000'), bytes(data[:-1]))
  with pytest.raises(errors.TamperedPackageError, match='wrong size'):
    te.inspect_package(uri)


def test_rewrap_of_a_remote_bundle_works_in_place(tmp_path, keys, store):
  # Formerly refused; the cases (sizes, races, failures) are in
  # tests/package/test_remote_rewrap.py.
  src, pkg, _ = _package(tmp_path, keys, True)
  uri = storage.join(store.new_base(), '1.tfxe')
  _util.upload_package(pkg, uri)
  info = te.rewrap_package(uri, identities=[keys.priv('x')],
                           add_recipients=[keys.pub('x2')],
                           trusted=[keys.pub('ed')], signer=keys.priv('ed'))
  assert info.bundle and info.path == uri and len(info.recipients) == 2
  te.decrypt_model(uri, tmp_path / 'o', identities=[keys.priv('x2')],
                   trusted=[keys.pub('ed')])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(src)


def test_rotate_reads_a_remote_package(tmp_path, keys, s3_store):
  src, pkg, _ = _package(tmp_path, keys, False)
  uri = storage.join(s3_store.new_base(), '1')
  _util.upload_package(pkg, uri)
  te.rotate_package(uri, tmp_path / 'new', identities=[keys.priv('x')],
                    recipients=[keys.pub('x2')], trusted=[keys.pub('ed')],
                    signer=keys.priv('ed'))
  te.decrypt_model(tmp_path / 'new', tmp_path / 'o',
                   identities=[keys.priv('x2')], trusted=[keys.pub('ed')])
  assert _util.read_tree(tmp_path / 'o') == _util.read_tree(src)


_MEMORY_SCRIPT = r'''
import json, sys
import tfx_encrypt as te

small, big, priv, work = sys.argv[1:5]

def status(key):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(key + ':'):
        return int(line.split()[1])

# Warm up (imports, SDK client, thread pool, buffers) on a small package.
te.decrypt_model(small, work + '/w', identities=[priv], allow_unsigned=True)
base = status('VmRSS')
te.decrypt_model(big, work + '/o', identities=[priv], allow_unsigned=True)
print(json.dumps({'base_kib': base, 'peak_kib': status('VmHWM')}))
'''


@pytest.mark.slow
def test_remote_decrypt_memory_does_not_grow_with_the_model(tmp_path, keys,
                                                            s3_store):
  """Peak RSS of decrypting from s3:// stays far below the model's size:
  ranged reads, one 4 MiB chunk per open payload (docs/OBJECT_STORES.md)."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  base = s3_store.new_base()
  m = tmp_path / 'm'
  (m / 'variables').mkdir(parents=True)
  (m / 'saved_model.pb').write_bytes(b'\x08\x01')
  for i in range(2):  # 2 x 96 MiB, sparse: the test measures the reader
    with open(m / 'variables' / f'data-{i}', 'wb') as f:
      f.truncate(96 * MiB)
  te.encrypt_model(m, tmp_path / 'big', recipients=[keys.pub('x')])
  small = _util.make_tree(tmp_path / 's', {'saved_model.pb': 3 * MiB})
  te.encrypt_model(small, tmp_path / 'small', recipients=[keys.pub('x')])
  _util.upload_package(str(tmp_path / 'big'), storage.join(base, 'big'))
  _util.upload_package(str(tmp_path / 'small'), storage.join(base, 'small'))
  out = subprocess.run(
      [sys.executable, '-c', _MEMORY_SCRIPT, storage.join(base, 'small'),
       storage.join(base, 'big'), keys.priv('x'), str(tmp_path)],
      capture_output=True, text=True, timeout=600, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  grown_mib = (r['peak_kib'] - r['base_kib']) / 1024
  print(f'remote decrypt: peak RSS {grown_mib:.1f} MiB over baseline')
  assert grown_mib < 64, r  # the model is 192 MiB
