"""Every negative vector (tests/testdata/vectors/negative.json) is refused.

Each vector is written out in each of its forms (directory, bundle) and read
with the identities and trust it names: through `decrypt_model`, which must
raise the vector's error class and leave nothing behind (no output, no
temporary sibling, nothing a hostile path could have named); through the
CLI in-process for every vector (exit code of docs/FORMAT.md §12, one
stderr line); and through a real `python -m tfx_encrypt` for a sample. The
exit codes in the vectors are checked against the table in FORMAT.md §12.
"""

import hashlib
import json
import os
import re
import struct
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

import tfx_encrypt as te
from tfx_encrypt import cli
from tfx_encrypt import errors
from tests import _forge
from tests.testdata import package_vectors as pv

DATA = json.loads(pv.NEGATIVE_FILE.read_text())
VECTORS = DATA['vectors']
BY_NAME = {v['name']: v for v in VECTORS}
CASES = [(v, form) for v in VECTORS for form in v['forms']]
IDS = [f'{v["name"]}-{form}' for v, form in CASES]
ROOT = pv.VECTOR_DIR.parents[2]
FORMAT_MD = ROOT / 'docs' / 'FORMAT.md'
ESCAPES = ('/tmp/tfxe-vector-evil',)  # absolute paths some vectors name
# One vector per error class and form, and the signature and version cases:
# these also run through a real `python -m tfx_encrypt` (0.5 s each).
SUBPROCESS_SAMPLE = (
    ('magic-version-1', _forge.DIRECTORY),
    ('ecdsa-high-s', _forge.BUNDLE),
    ('signature-forged-claiming-trusted-key', _forge.DIRECTORY),
    ('payload-reencrypted', _forge.BUNDLE),
    ('wrong-recipient', _forge.DIRECTORY),
    ('signer-untrusted', _forge.BUNDLE),
    ('path-dotdot', _forge.DIRECTORY),
    ('bundle-trailing-bytes', _forge.BUNDLE),
)


def materialize(v, form, where):
  """Write vector `v` in `form` under the directory `where`; its path."""
  header = bytes.fromhex(v['header_hex'])
  payloads = [bytes.fromhex(p) for p in v['payloads_hex']]
  if form == _forge.DIRECTORY:
    extra = {k: bytes.fromhex(d) for k, d in v.get('extra_files', {}).items()}
    path = _forge.write_directory(os.path.join(where, v['name']), header,
                                  payloads, extra)
    for rel in v.get('missing_files', ()):
      os.unlink(os.path.join(path, *rel.split('/')))
    return path
  data = (bytes.fromhex(v['bundle_hex']) if 'bundle_hex' in v else
          header + b''.join(payloads))
  return _forge.write_bundle(os.path.join(where, v['name'] + '.tfxe'), data)


def reader_args(v):
  return dict(identities=[pv.priv(n) for n in v['identities']],
              trusted=[pv.pub(n) for n in v['trusted']],
              allow_unsigned=v['allow_unsigned'])


def cli_args(v, pkg, out):
  args = ['decrypt', str(pkg), str(out)]
  for n in v['identities']:
    args += ['--identity', pv.priv(n)]
  for n in v['trusted']:
    args += ['--trust', pv.pub(n)]
  if v['allow_unsigned']:
    args.append('--allow-unsigned')
  return args


def assert_nothing_written(where, pkg, out):
  assert not os.path.lexists(out), 'output must not exist after a failure'
  assert sorted(os.listdir(where)) == [os.path.basename(pkg)], (
      'a failed decrypt left something beside the package')
  for p in ESCAPES:
    assert not os.path.lexists(p)


def format_md_exit_codes():
  """{error class name: exit code} from the table of FORMAT.md §12."""
  text = FORMAT_MD.read_text(encoding='utf-8')
  section = text[text.index('## 12.'):]
  return {m.group(1): int(m.group(2)) for m in re.finditer(
      r'^\|[^\n]*\|\s*`(?:[\w.]+\.)?(\w+)`\s*\|\s*(\d+)\s*\|\s*$', section,
      re.MULTILINE)}


def test_exit_codes_match_format_md():
  table = format_md_exit_codes()
  assert DATA['exit_codes'].items() <= table.items()
  for v in VECTORS:
    assert table[v['error']] == v['exit_code'], v['name']
    assert getattr(errors, v['error']).exit_code == v['exit_code']


def test_vectors_cover_the_issue_list():
  names = set(BY_NAME)
  for must in (
      'magic-version-1', 'magic-version-3', 'body-whitespace',
      'body-escaped-solidus', 'body-keys-not-sorted', 'body-raw-utf8',
      'commitment-b64-padding-bits', 'file-table-b64-padding-bits',
      'stanza-ct-b64-padding-bits', 'sig-len-0-with-signer',
      'sig-len-64-signer-null', 'sig-len-63', 'sig-len-65', 'ecdsa-high-s',
      'ed25519-s-plus-l', 'signer-alg-unknown', 'context-reserved-key',
      'payload-reencrypted', 'file-table-not-canonical', 'path-dotdot',
      'path-absolute', 'path-backslash', 'path-control-esc',
      'path-case-collision', 'path-missing-parent', 'bundle-trailing-bytes',
      'bundle-truncated'):
    assert must in names
  assert {v['error'] for v in VECTORS} == {
      'UnsupportedFormatError', 'TamperedPackageError', 'NoMatchingKeyError',
      'UntrustedSignerError', 'UnsafePathError'}
  for v in VECTORS:
    assert v['description'] and '\n' not in v['description']
    assert v['built_by'] in ('anyone', 'recipient', 'attacker', 'publisher')


def test_high_s_signature_verifies_with_plain_ecdsa():
  """Why the format insists on low S: (r, n - s) is a valid ECDSA signature
  of the same message, so only the canonical-form check refuses it."""
  v = BY_NAME['ecdsa-high-s']
  data = bytes.fromhex(v['header_hex'])
  h = _forge.split_header(data)
  assert int.from_bytes(h['sig'][32:], 'big') > _forge.P256_N // 2
  message = _forge.SIGNATURE_LABEL + hashlib.sha256(
      data[:12 + h['body_len']]).digest()
  key = _forge.load_public(pv.pub('publisher-ecdsa'))
  key.verify(_forge.ecdsa_der(h['sig']), message, ec.ECDSA(hashes.SHA256()))
  key.verify(_forge.ecdsa_der(_forge.high_s(h['sig'])), message,
             ec.ECDSA(hashes.SHA256()))  # the low-S twin verifies too


def test_sig_len_field_is_what_the_vectors_say():
  for name, want in (('sig-len-63', 63), ('sig-len-65', 65),
                     ('sig-len-0-with-signer', 0),
                     ('sig-len-64-signer-null', 64)):
    data = bytes.fromhex(BY_NAME[name]['header_hex'])
    (blen,) = struct.unpack('>I', data[8:12])
    (slen,) = struct.unpack('>I', data[12 + blen + 32:12 + blen + 36])
    assert slen == want, name


@pytest.mark.parametrize('v,form', CASES, ids=IDS)
def test_reader_refuses_negative_vector(tmp_path, v, form):
  where = tmp_path / 'w'
  where.mkdir()
  pkg = materialize(v, form, where)
  out = where / 'out'
  with pytest.raises(errors.TfxEncryptError) as ei:
    te.decrypt_model(pkg, out, **reader_args(v))
  e = ei.value
  assert type(e).__name__ == v['error'], f'{type(e).__name__}: {e}'
  assert e.exit_code == v['exit_code']
  if 'message' in v:
    assert v['message'] in str(e)
  assert_nothing_written(where, pkg, out)


@pytest.mark.parametrize('v,form', CASES, ids=IDS)
def test_cli_refuses_negative_vector(tmp_path, capsys, v, form):
  where = tmp_path / 'w'
  where.mkdir()
  pkg = materialize(v, form, where)
  out = where / 'out'
  with pytest.raises(SystemExit) as ei:
    cli.main.main(cli_args(v, pkg, out), prog_name='tfx-encrypt')
  assert ei.value.code == v['exit_code']
  captured = capsys.readouterr()
  assert captured.out == ''
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error: '), (
      captured.err)
  assert_nothing_written(where, pkg, out)


@pytest.mark.parametrize('name,form', SUBPROCESS_SAMPLE,
                         ids=[f'{n}-{f}' for n, f in SUBPROCESS_SAMPLE])
def test_cli_process_refuses_negative_vector(tmp_path, name, form):
  v = BY_NAME[name]
  assert form in v['forms']
  pkg = materialize(v, form, tmp_path)
  out = tmp_path / 'out'
  r = subprocess.run([sys.executable, '-m', 'tfx_encrypt',
                      *cli_args(v, pkg, out)], capture_output=True, text=True,
                     timeout=120, check=False,
                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert r.returncode == v['exit_code'], r.stderr
  assert r.stdout == ''
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('tfx-encrypt: error: '), (
      r.stderr)
  assert_nothing_written(tmp_path, pkg, out)
