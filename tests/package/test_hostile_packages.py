"""Hostile packages, table-driven: what each party could build is refused.

Each row builds a package from parts with the test-only writer
(tests/_forge.py) as one party could: `anyone` edits bytes only (no data
key, no trusted signing key); a `recipient` holds the data key, so it can
recompute the MAC and re-encrypt payloads, and may sign with a key of its
own; the `attacker` signs with its own key (and can encrypt for any public
key). Every MAC and signature such a party can make is valid, so only the
reader's own rules refuse the package. Each row runs in directory and in
bundle form through `decrypt_model` (error class per row, nothing at the
output path) and through the CLI in-process (exit code, one stderr line);
a few rows also through a real `python -m tfx_encrypt`.

The consumer trusts the publisher's Ed25519 key (`--trust`) and decrypts
with the recipient's X25519 key unless a row says otherwise. Related
suites: tests/package/test_tamper.py (bit flips, truncation, header swaps and
re-encryption checked by rotate/verify too, on packages from the real
writer), tests/format/test_negative_vectors.py (one defect per committed vector),
tests/format/test_bit_flips.py (every header bit).

A recipient can always strip the publisher's signature: it recomputes the
MAC over a body that says `"signer": null` and so makes a valid UNSIGNED
package (anyone holding the public keys can build one). With `--trust` and
no `--allow-unsigned` it is refused (UntrustedSignerError, row
`recipient-strips-signature`); with `--allow-unsigned` it is accepted, as
unsigned (test_recipient_stripped_signature_is_a_valid_unsigned_package).
A consumer that requires the publisher must not pass --allow-unsigned.
"""

import dataclasses
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

import pytest

import tfx_encrypt as te
from tfx_encrypt import cli
from tfx_encrypt import errors
from tfx_encrypt.keys.base import WrapContext
from tests import _forge
from tests import _util
from tests.testdata import package_vectors as pv

TAMPERED = errors.TamperedPackageError
UNTRUSTED = errors.UntrustedSignerError
UNSAFE = errors.UnsafePathError
ROOT = pv.VECTOR_DIR.parents[2]
PUBLISHER = 'publisher-ed25519'


class World:
  """The publisher's packages A and B (same recipient, same file sizes),
  their unsigned twins, and everyone's keys."""

  def __init__(self):
    self.publisher = _forge.Signer(pv.priv(PUBLISHER))
    self.attacker = _forge.Signer(pv.priv('attacker-ed25519'))
    self.own = _forge.Signer(pv.priv('recipient-signer-ed25519'))
    self.publisher_id = self.publisher.key_id
    self.parts = _forge.Parts(
        files=[('saved_model.pb', b'model A: good weights'),
               ('variables/variables.index', b'index A')],
        dirs=['variables'], recipients=[pv.pub('recipient')],
        context={'model': 'm', 'version': '1'}, signer=self.publisher)
    self.a = _forge.build(self.parts)
    self.b = _forge.build(self.parts.replace(
        files=[('saved_model.pb', b'model B: good weights'),
               ('variables/variables.index', b'index B')],
        context={'model': 'm', 'version': '2'}))
    self.ua = _forge.build(self.parts.replace(signer=None))
    self.ub = _forge.build(self.parts.replace(signer=None))
    self.twins = _forge.build(self.parts.replace(
        files=[('a', b'same size 1'), ('b', b'same size 2')], dirs=[]))
    self.groups = _forge.build(self.parts.replace(
        signer=None, recipients=(), key_groups=(3, [
            [pv.pub('recipient')], [pv.pub('recipient-2')],
            [pv.pub('recipient-3')]])))

  def evil_parts(self, **changes) -> _forge.Parts:
    """What the attacker encrypts for the victim: its own model."""
    return self.parts.replace(
        files=[('saved_model.pb', b'model E: evil weights')], **changes)

  def replaced(self, built, index, plaintext):
    """A recipient's edit of `built`: file `index` holds `plaintext` now,
    the file table and fingerprint say so, the MAC is recomputed."""
    files = list(built.parts.files)
    files[index] = (files[index][0], plaintext)
    return _forge.build(built.parts.replace(
        files=files, dek=built.dek, package_id=built.package_id,
        signer=None))


@dataclasses.dataclass
class Case:
  header: bytes
  payloads: List[bytes]
  dir_extra: Optional[Dict[str, bytes]] = None
  bundle_tail: bytes = b''


@dataclasses.dataclass
class Row:
  name: str
  error: type
  built_by: str
  make: Callable[[World], Case]
  trusted: Tuple[str, ...] = (PUBLISHER,)
  identities: Tuple[str, ...] = ('recipient',)
  allow_unsigned: bool = False
  message: Optional[str] = None
  cli_process: bool = False


def _case(built, header=None, payloads=None, **kw) -> Case:
  return Case(built.header if header is None else header,
              list(built.payloads if payloads is None else payloads), **kw)


def _signed_by(signer):
  return lambda o: o.update(signer=signer.ref())


def _wrap_other_key(w):
  stanza = _forge.wrap(pv.pub('recipient'), os.urandom(32),
                       WrapContext(w.ua.package_id, w.parts.context),
                       _forge.Rand(), 's')
  return lambda o: o['recipients'].__setitem__(0, stanza)


def _recipient_replaces_file(w, signer, claimed_id=None):
  """The recipient swaps in its own model file and signs with `signer`."""
  r = w.replaced(w.a, 0, b'model R: bad weights!')
  ref = dict(signer.ref(), key_id=claimed_id or signer.key_id)
  return _case(r, _forge.reseal(r, lambda o: o.update(signer=ref),
                                mac_key=r.keys.mac_key, signer=signer))


ROWS = [
    # --- the signature --------------------------------------------------------
    Row('attacker-package-claims-publisher-id', TAMPERED, 'attacker',
        lambda w: _case(_forge.build(w.evil_parts(signer=_forge.Signer(
            pv.priv('attacker-ed25519'), key_id=w.publisher_id)))),
        message='INVALID', cli_process=True),
    Row('attacker-package-signed-as-itself', UNTRUSTED, 'attacker',
        lambda w: _case(_forge.build(w.evil_parts(signer=w.attacker)))),
    Row('attacker-resigns-publisher-header', TAMPERED, 'attacker',
        lambda w: _case(w.a, _forge.reseal(w.a, signer=_forge.Signer(
            pv.priv('attacker-ed25519'), key_id=w.publisher_id))),
        message='INVALID'),
    Row('attacker-renames-signer-to-itself', UNTRUSTED, 'attacker',
        lambda w: _case(w.a, _forge.reseal(
            w.a, _signed_by(w.attacker), signer=w.attacker))),
    Row('recipient-resigns-with-own-key', UNTRUSTED, 'recipient',
        lambda w: _recipient_replaces_file(w, w.own)),
    Row('recipient-resigns-claiming-publisher', TAMPERED, 'recipient',
        lambda w: _recipient_replaces_file(w, w.own, w.publisher_id),
        message='INVALID'),
    Row('recipient-strips-signature', UNTRUSTED, 'recipient',
        lambda w: _case(w.a, _forge.reseal(
            w.a, lambda o: o.update(signer=None), mac_key=w.a.keys.mac_key,
            signer=None)), cli_process=True),
    Row('attacker-strips-signature-keeps-mac', TAMPERED, 'anyone',
        lambda w: _case(w.a, _forge.reseal(
            w.a, lambda o: o.update(signer=None), signer=None)),
        allow_unsigned=True, message='MAC'),
    Row('attacker-drops-signature-bytes', TAMPERED, 'anyone',
        lambda w: _case(w.a, _forge.reseal(w.a, signer=None)),
        allow_unsigned=True),
    Row('signed-package-without-trust', UNTRUSTED, 'anyone',
        lambda w: _case(w.a), trusted=(), allow_unsigned=True),
    # --- payloads -------------------------------------------------------------
    Row('payload-swapped-from-same-publisher', TAMPERED, 'anyone',
        lambda w: _case(w.a, payloads=[w.b.payloads[0], w.a.payloads[1]])),
    Row('payload-reencrypted-by-recipient', TAMPERED, 'recipient',
        lambda w: _case(w.a, payloads=[_forge.reencrypt(w.a, 0),
                                       w.a.payloads[1]]),
        message='ciphertext digest', cli_process=True),
    Row('payload-replaced-by-recipient', TAMPERED, 'recipient',
        lambda w: _case(w.a, payloads=[_forge.reencrypt(
            w.a, 0, b'model R: bad weights!'), w.a.payloads[1]]),
        message='digest'),
    Row('payload-replaced-in-unsigned-package', TAMPERED, 'recipient',
        lambda w: _case(w.ua, payloads=[_forge.reencrypt(
            w.ua, 0, b'model R: bad weights!'), w.ua.payloads[1]]),
        allow_unsigned=True, message='digest'),
    Row('payloads-reordered', TAMPERED, 'anyone',
        lambda w: _case(w.twins, payloads=w.twins.payloads[::-1])),
    Row('extra-payload', TAMPERED, 'anyone',
        lambda w: _case(w.a, dir_extra={'payload/00000002': w.a.payloads[1]},
                        bundle_tail=w.a.payloads[1])),
    # --- the file table -------------------------------------------------------
    Row('file-table-from-another-package', TAMPERED, 'recipient',
        lambda w: _case(w.ua, _forge.reseal(
            w.ua, lambda o: o.update(file_table=w.ub.body['file_table']),
            mac_key=w.ua.keys.mac_key, signer=None)),
        allow_unsigned=True),
    Row('file-table-from-another-package-signed', TAMPERED, 'recipient',
        lambda w: _case(w.a, _forge.reseal(
            w.a, lambda o: o.update(file_table=w.b.body['file_table']),
            mac_key=w.a.keys.mac_key)), message='INVALID'),
    # --- context and recipients -----------------------------------------------
    Row('context-changed-by-recipient', TAMPERED, 'recipient',
        lambda w: _case(w.a, _forge.reseal(
            w.a, lambda o: o['context'].update(version='9'),
            mac_key=w.a.keys.mac_key)), message='INVALID'),
    Row('context-changed-in-unsigned-package', TAMPERED, 'recipient',
        lambda w: _case(w.ua, _forge.reseal(
            w.ua, lambda o: o['context'].update(version='9'),
            mac_key=w.ua.keys.mac_key, signer=None)),
        allow_unsigned=True),
    Row('duplicate-recipients', TAMPERED, 'recipient',
        lambda w: _case(w.a, _forge.reseal(
            w.a, lambda o: o['recipients'].append(o['recipients'][0]),
            mac_key=w.a.keys.mac_key))),
    Row('stanza-from-another-package', TAMPERED, 'recipient',
        lambda w: _case(w.ua, _forge.reseal(
            w.ua, lambda o: o.update(recipients=w.ub.body['recipients']),
            mac_key=w.ua.keys.mac_key, signer=None)),
        allow_unsigned=True),
    Row('stanza-wraps-another-key', TAMPERED, 'anyone',
        lambda w: _case(w.ua, _forge.reseal(w.ua, _wrap_other_key(w),
                                            signer=None)),
        allow_unsigned=True, message='commitment'),
    Row('key-group-threshold-lowered', TAMPERED, 'recipient',
        lambda w: _case(w.groups, _forge.reseal(
            w.groups, lambda o: o['threshold'].update(k=2),
            mac_key=w.groups.keys.mac_key, signer=None)),
        identities=('recipient', 'recipient-2', 'recipient-3'),
        allow_unsigned=True, message='commitment'),
    Row('key-groups-regrouped', TAMPERED, 'recipient',
        lambda w: _case(w.groups, _forge.reseal(
            w.groups, lambda o: o['threshold'].update(
                groups=[[1], [0], [2]]),
            mac_key=w.groups.keys.mac_key, signer=None)),
        identities=('recipient', 'recipient-2', 'recipient-3'),
        allow_unsigned=True),
    # --- counts beyond the limits (§11) ---------------------------------------
    Row('too-many-payloads', TAMPERED, 'attacker',
        lambda w: _case(w.a, _forge.reseal(
            w.a, lambda o: o.update(payloads=o['payloads'] * 50_001),
            signer=w.attacker))),
    Row('too-many-key-groups', TAMPERED, 'attacker',
        lambda w: _case(w.a, _forge.reseal(w.a, lambda o: o.update(
            recipients=o['recipients'] * 17,
            threshold={'k': 2, 'groups': [[i] for i in range(17)]}),
            signer=w.attacker))),
    Row('too-many-directories', TAMPERED, 'publisher',
        lambda w: _case(_forge.build(w.parts.replace(
            files=[('saved_model.pb', b'm')],
            dirs=[f'd{i:06d}' for i in range(100_001)])))),
    Row('too-many-context-entries', TAMPERED, 'attacker',
        lambda w: _case(w.a, _forge.reseal(w.a, lambda o: o.update(
            context={f'k{i}': 'v' for i in range(65)}), signer=w.attacker))),
    # --- paths, in an unsigned package read with --allow-unsigned -------------
    Row('unsigned-path-escapes', UNSAFE, 'anyone',
        lambda w: _case(_forge.build(w.parts.replace(
            signer=None, files=[('../evil', b'x')], dirs=[]))),
        allow_unsigned=True),
    Row('unsigned-absolute-path', UNSAFE, 'anyone',
        lambda w: _case(_forge.build(w.parts.replace(
            signer=None, files=[('/tmp/tfxe-hostile-evil', b'x')], dirs=[]))),
        allow_unsigned=True),
]
ESCAPES = ('/tmp/tfxe-hostile-evil',)


@pytest.fixture(scope='module')
def world():
  return World()


def _write(case: Case, form: str, where) -> str:
  if form == _forge.DIRECTORY:
    return _forge.write_directory(os.path.join(where, 'pkg'), case.header,
                                  case.payloads, case.dir_extra)
  return _forge.write_bundle(os.path.join(where, 'pkg.tfxe'), case.header +
                             b''.join(case.payloads) + case.bundle_tail)


def _read_kwargs(row: Row):
  return dict(identities=[pv.priv(n) for n in row.identities],
              trusted=[pv.pub(n) for n in row.trusted],
              allow_unsigned=row.allow_unsigned)


def _cli_args(row: Row, pkg, out):
  args = ['decrypt', str(pkg), str(out)]
  for n in row.identities:
    args += ['--identity', pv.priv(n)]
  for n in row.trusted:
    args += ['--trust', pv.pub(n)]
  return args + (['--allow-unsigned'] if row.allow_unsigned else [])


def _assert_nothing_written(where, pkg, out):
  assert not os.path.lexists(out)
  assert sorted(os.listdir(where)) == [os.path.basename(pkg)]
  for p in ESCAPES:
    assert not os.path.lexists(p)


@pytest.mark.parametrize('form', _forge.FORMS)
def test_the_packages_rows_start_from_are_valid(tmp_path, world, form):
  """Control: without the hostile edit, every base package decrypts."""
  for name, built, kwargs in (
      ('a', world.a, {'trusted': [pv.pub(PUBLISHER)]}),
      ('b', world.b, {'trusted': [pv.pub(PUBLISHER)]}),
      ('ua', world.ua, {'allow_unsigned': True}),
      ('twins', world.twins, {'trusted': [pv.pub(PUBLISHER)]}),
      ('groups', world.groups, {'allow_unsigned': True})):
    (tmp_path / name).mkdir()
    pkg = _write(_case(built), form, tmp_path / name)
    ids = ([pv.priv('recipient'), pv.priv('recipient-2'),
            pv.priv('recipient-3')] if name == 'groups' else
           [pv.priv('recipient')])
    te.decrypt_model(pkg, tmp_path / name / 'out', identities=ids, **kwargs)
    assert _util.read_tree(tmp_path / name / 'out') == {
        p: d for p, d in built.parts.files}


@pytest.mark.parametrize('form', _forge.FORMS)
@pytest.mark.parametrize('row', ROWS, ids=[r.name for r in ROWS])
def test_hostile_package_refused(tmp_path, world, row, form):
  case = row.make(world)
  pkg = _write(case, form, tmp_path)
  out = tmp_path / 'out'
  with pytest.raises(errors.TfxEncryptError) as ei:
    te.decrypt_model(pkg, out, **_read_kwargs(row))
  assert type(ei.value) is row.error, f'{type(ei.value).__name__}: {ei.value}'
  if row.message:
    assert row.message in str(ei.value)
  _assert_nothing_written(tmp_path, pkg, out)


@pytest.mark.parametrize('form', _forge.FORMS)
@pytest.mark.parametrize('row', ROWS, ids=[r.name for r in ROWS])
def test_hostile_package_refused_by_cli(tmp_path, capsys, world, row, form):
  pkg = _write(row.make(world), form, tmp_path)
  out = tmp_path / 'out'
  with pytest.raises(SystemExit) as ei:
    cli.main.main(_cli_args(row, pkg, out), prog_name='tfx-encrypt')
  assert ei.value.code == row.error.exit_code
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert captured.out == '' and len(lines) == 1, captured.err
  assert lines[0].startswith('tfx-encrypt: error: ')
  _assert_nothing_written(tmp_path, pkg, out)


PROCESS_ROWS = [r for r in ROWS if r.cli_process]


@pytest.mark.parametrize('row', PROCESS_ROWS,
                         ids=[r.name for r in PROCESS_ROWS])
def test_hostile_package_refused_by_cli_process(tmp_path, world, row):
  pkg = _write(row.make(world), _forge.BUNDLE, tmp_path)
  out = tmp_path / 'out'
  r = subprocess.run([sys.executable, '-m', 'tfx_encrypt',
                      *_cli_args(row, pkg, out)],
                     capture_output=True, text=True, timeout=120, check=False,
                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert r.returncode == row.error.exit_code, r.stderr
  assert r.stdout == '' and len(r.stderr.splitlines()) == 1, r.stderr
  _assert_nothing_written(tmp_path, pkg, out)


def test_recipient_stripped_signature_is_a_valid_unsigned_package(tmp_path,
                                                                  world):
  """Row `recipient-strips-signature` with --allow-unsigned: accepted, and
  reported as UNSIGNED (the CLI says so). This is the documented limit:
  the MAC binds the signer only for those without the data key."""
  header = _forge.reseal(world.a, lambda o: o.update(signer=None),
                         mac_key=world.a.keys.mac_key, signer=None)
  pkg = _forge.write_directory(tmp_path / 'pkg', header, world.a.payloads)
  info = te.decrypt_model(pkg, tmp_path / 'out',
                          identities=[pv.priv('recipient')],
                          trusted=[pv.pub(PUBLISHER)], allow_unsigned=True)
  assert info.signature_verified is False and info.signer is None
