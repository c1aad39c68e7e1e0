"""Whole-package test vectors (docs/FORMAT.md §2-§12), for make_vectors.py.

  vectors/package-keys/     fixed keys: X25519 recipients, the publisher's
                            Ed25519 and ECDSA P-256 signing keys, an
                            attacker's and a recipient's own signing keys.
  vectors/packages.json     valid packages: every input (data key, package
                            id, salts, nonce prefixes, HPKE ephemeral keys,
                            Shamir coefficients, creation time), the header
                            and payload bytes, derived keys, MAC, signature,
                            fingerprint and the decrypted files.
  vectors/packages/NAME/    each valid package in directory form, and
  vectors/packages/NAME.tfxe  in bundle form.
  vectors/negative.json     inputs a reader must refuse: header and payload
                            bytes (directory form; the bundle is the header
                            followed by the payloads unless `bundle_hex`
                            says otherwise), the keys to read them with,
                            the error class, its exit code (§12) and who
                            could build such a package.
  vectors/ecdsa-signatures.json  the ECDSA signatures used above.

Everything is deterministic except ECDSA signing: a signature, once made,
is kept in ecdsa-signatures.json (keyed by the SHA-256 of the signed
message) and reused while it still verifies, so the generator reproduces
its own output and `--check` verifies the stored signatures instead of
making new ones. Vectors that need a valid MAC or signature are built with
the keys below by the test-only writer tests/_forge.py, as the party named
in `built_by` could build them.
"""

import base64
import hashlib
import json
import pathlib
import re
import struct
from typing import Dict, List, Optional

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric import x25519

from tests import _forge
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.keys.base import WrapContext
from tfx_encrypt.keys.base import spki_key_id

VECTOR_DIR = pathlib.Path(__file__).resolve().parent / 'vectors'
KEY_DIR = VECTOR_DIR / 'package-keys'
PACKAGE_DIR = VECTOR_DIR / 'packages'
PACKAGES_FILE = VECTOR_DIR / 'packages.json'
NEGATIVE_FILE = VECTOR_DIR / 'negative.json'
ECDSA_FILE = VECTOR_DIR / 'ecdsa-signatures.json'

CREATED = '2026-02-03T04:05:06Z'

#: name -> kind of the fixed keys in package-keys/ (NAME.key.pem, NAME.pub.pem).
KEYS = {
    'recipient': 'x25519',
    'recipient-2': 'x25519',
    'recipient-3': 'x25519',
    'other-recipient': 'x25519',
    'publisher-ed25519': 'ed25519',
    'publisher-ecdsa': 'ecdsa-p256',
    'attacker-ed25519': 'ed25519',
    'recipient-signer-ed25519': 'ed25519',
}

#: docs/FORMAT.md §12: error class -> exit code (checked against the table
#: by tests/format/test_negative_vectors.py).
EXIT_CODES = {
    'UsageError': 2,
    'UnsupportedFormatError': 3,
    'TamperedPackageError': 4,
    'NoMatchingKeyError': 5,
    'UntrustedSignerError': 6,
    'UnsafePathError': 7,
}

UNSUPPORTED = 'UnsupportedFormatError'
TAMPERED = 'TamperedPackageError'
NO_KEY = 'NoMatchingKeyError'
UNTRUSTED = 'UntrustedSignerError'
UNSAFE = 'UnsafePathError'


def _fixed(label: str, n: int) -> bytes:
  return hashlib.shake_256(b'tfx-encrypt package vector\x00' +
                           label.encode()).digest(n)


def private_key(name: str):
  """The fixed private key `name` (a function of its name only)."""
  kind, seed = KEYS[name], _fixed(f'key/{name}', 32)
  if kind == 'x25519':
    return x25519.X25519PrivateKey.from_private_bytes(seed)
  if kind == 'ed25519':
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
  scalar = int.from_bytes(seed, 'big') % (_forge.P256_N - 1) + 1
  return ec.derive_private_key(scalar, ec.SECP256R1())


def priv(name: str) -> str:
  return str(KEY_DIR / f'{name}.key.pem')


def pub(name: str) -> str:
  return str(KEY_DIR / f'{name}.pub.pem')


def key_outputs() -> Dict[pathlib.Path, bytes]:
  out = {}
  for name in KEYS:
    p, q = _forge.pem_pair(private_key(name))
    out[KEY_DIR / f'{name}.key.pem'] = p
    out[KEY_DIR / f'{name}.pub.pem'] = q
  return out


def _key_id(name: str) -> str:
  return spki_key_id(private_key(name).public_key())


class _Store(dict):
  """ECDSA signatures by message digest; remembers which were used."""

  def __init__(self, *args):
    super().__init__(*args)
    self.used = set()

  def get(self, key, default=None):
    self.used.add(key)
    return super().get(key, default)

  def __setitem__(self, key, value):
    self.used.add(key)
    super().__setitem__(key, value)


def load_store() -> _Store:
  if not ECDSA_FILE.exists():
    return _Store()
  data = json.loads(ECDSA_FILE.read_text())
  return _Store({k: bytes.fromhex(v) for k, v in data['signatures'].items()})


def _signer(name: str, store: _Store, **kwargs) -> _forge.Signer:
  return _forge.Signer(private_key(name), store=store, **kwargs)


def _recipient(name: str):
  return private_key(name).public_key()


def counter(size: int) -> bytes:
  block = bytes(range(251))
  return (block * (size // 251 + 1))[:size]


# --- valid packages -----------------------------------------------------------

def _model_files() -> List:
  return sorted([
      ('saved_model.pb', counter(300)),
      ('variables/variables.index', b'tfx-encrypt test vector index\n'),
      ('variables/variables.data-00000-of-00001', counter(2000)[::-1]),
      ('assets/Zo\u00eb.txt', 'vocabulary: caf\u00e9\n'.encode('utf-8')),
      ('assets/empty', b''),
  ])


_MODEL_DIRS = ['assets', 'logs', 'variables']  # logs/ is empty


def positive_cases(store: _Store):
  """(name, description, parts, identities, trusted, allow_unsigned)."""
  files = _model_files()
  return [
      ('signed-ed25519',
       'AES-256-GCM, SHA-256, one X25519 recipient, signed with Ed25519; '
       'an empty file, an empty directory, a non-ASCII path and context '
       'value.',
       _forge.Parts(files=files, dirs=_MODEL_DIRS,
                    recipients=[_recipient('recipient')],
                    context={'model': 'resnet', 'owner': 'Zo\u00eb',
                             'version': '7'},
                    signer=_signer('publisher-ed25519', store),
                    created=CREATED, rand=_forge.Rand('signed-ed25519')),
       ['recipient'], ['publisher-ed25519'], False),
      ('signed-ecdsa',
       'ChaCha20-Poly1305, two X25519 recipients, signed with ECDSA P-256 '
       '(raw r || s, low s).',
       _forge.Parts(files=files, dirs=_MODEL_DIRS,
                    recipients=[_recipient('recipient'),
                                _recipient('recipient-2')],
                    context={'model': 'resnet', 'stage': 'prod'},
                    signer=_signer('publisher-ecdsa', store),
                    suite=_forge.CHACHA, created=CREATED,
                    rand=_forge.Rand('signed-ecdsa')),
       ['recipient-2'], ['publisher-ecdsa'], False),
      ('unsigned',
       'Unsigned (read with --allow-unsigned), empty context, one file.',
       _forge.Parts(files=[('saved_model.pb', b'unsigned model\n')],
                    recipients=[_recipient('recipient')], created=CREATED,
                    rand=_forge.Rand('unsigned')),
       ['recipient'], [], True),
      ('key-groups',
       'Key groups, 2 of 3 (one X25519 recipient per group, Shamir shares '
       'at x = 1, 2, 3), signed with Ed25519; read with groups 0 and 2.',
       _forge.Parts(files=files[:2], dirs=['assets'],
                    key_groups=(2, [[_recipient('recipient')],
                                    [_recipient('recipient-2')],
                                    [_recipient('recipient-3')]]),
                    context={'model': 'resnet'},
                    signer=_signer('publisher-ed25519', store),
                    created=CREATED, rand=_forge.Rand('key-groups')),
       ['recipient', 'recipient-3'], ['publisher-ed25519'], False),
  ]


def _positive(name, description, parts, identities, trusted, allow_unsigned,
              signer_name):
  b = _forge.build(parts)
  split = _forge.split_header(b.header)
  fp = b.body['fingerprint']
  v = {
      'name': name,
      'description': description,
      'directory': f'packages/{name}',
      'bundle': f'packages/{name}.tfxe',
      'identities': identities,
      'trusted': trusted,
      'allow_unsigned': allow_unsigned,
      'dek': b.dek.hex(),
      'package_id': b.package_id.hex(),
      'suite': parts.suite,
      'hash': parts.hash_alg,
      'created': parts.created,
      'context': parts.context,
      'commitment': b.keys.commitment.hex(),
      'mac_key': b.keys.mac_key.hex(),
      'stream_key': b.keys.stream_key.hex(),
      'recipients': [_key_name_of(s['key_id']) for s in b.body['recipients']],
      'threshold': b.body['threshold'],
      'signer': (None if parts.signer is None else
                 dict(parts.signer.ref(), key=signer_name)),
      'header_hex': b.header.hex(),
      'header_size': len(b.header),
      'header_sha256': hashlib.sha256(b.header).hexdigest(),
      'body_len': split['body_len'],
      'mac': b.mac.hex(),
      'signature': b.sig.hex() if b.sig else None,
      'signature_message': b.message.hex() if b.sig else None,
      'fingerprint': fp,
      'ciphertext_digest': 'sha256:' + hashlib.sha256(b''.join(
          bytes.fromhex(d) for _, d in b.body['payloads'])).hexdigest(),
      'payloads': [{'size': len(c), 'sha256': hashlib.sha256(c).hexdigest(),
                    'hex': c.hex()} for c in b.payloads],
      'bundle_size': len(b.bundle()),
      'bundle_sha256': hashlib.sha256(b.bundle()).hexdigest(),
      'file_table': b.table.decode('ascii'),
      'files': [{'path': p, 'size': len(d),
                 'sha256': hashlib.sha256(d).hexdigest(), 'hex': d.hex()}
                for p, d in parts.files],
      'dirs': list(parts.dirs),
  }
  files = {PACKAGE_DIR / name / 'tfxe.header': b.header,
           PACKAGE_DIR / f'{name}.tfxe': b.bundle()}
  for i, c in enumerate(b.payloads):
    files[PACKAGE_DIR / name / 'payload' / f'{i:08d}'] = c
  return v, files


def _key_name_of(kid: str) -> str:
  for name in KEYS:
    if _key_id(name) == kid:
      return name
  raise ValueError(kid)


def build_packages(store: _Store):
  vectors, files = [], {}
  signer_names = {'signed-ed25519': 'publisher-ed25519',
                  'signed-ecdsa': 'publisher-ecdsa',
                  'key-groups': 'publisher-ed25519'}
  for case in positive_cases(store):
    v, f = _positive(*case, signer_names.get(case[0]))
    vectors.append(v)
    files.update(f)
  doc = {
      'description': (
          'Valid packages, docs/FORMAT.md. Every random input is derived '
          'from the vector name (tests/_forge.py Rand); keys are in '
          'package-keys/ (identities: private keys to decrypt with; '
          'trusted: public keys to trust). header_hex is tfxe.header, '
          'payloads are payload/NNNNNNNN in order, the bundle is their '
          'concatenation; files are the decrypted model. Generated by '
          'tests/testdata/make_vectors.py.'),
      'vectors': vectors,
  }
  return doc, files


# --- inputs a reader must refuse ----------------------------------------------

_B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'


def noncanonical_b64(text: str) -> str:
  """The same bytes with a non-zero padding bit (RFC 4648 §3.5)."""
  body = text.rstrip('=')
  if len(body) == len(text):
    raise ValueError('no padding, so no padding bits')
  out = body[:-1] + _B64[_B64.index(body[-1]) | 1] + text[len(body):]
  assert out != text and base64.b64decode(out) == base64.b64decode(text)
  return out


def _sub(old: bytes, new: bytes):
  def f(raw: bytes) -> bytes:
    assert old in raw, (old, raw[:200])
    return raw.replace(old, new, 1)
  return f


def _resub(pattern: bytes, repl: bytes):
  def f(raw: bytes) -> bytes:
    out, n = re.subn(pattern, repl, raw, count=1)
    assert n == 1, pattern
    return out
  return f


def _set(path, value):
  """edit_body: o[path[0]][path[1]]... = value."""
  def f(o):
    for k in path[:-1]:
      o = o[k]
    o[path[-1]] = value
  return f


class _Neg:
  """Collects negative vectors."""

  def __init__(self, store: _Store):
    self.store = store
    self.vectors = []
    self.ed = _signer('publisher-ed25519', store)
    self.base = _forge.Parts(
        files=[('saved_model.pb', b'tfx-encrypt negative vector: model\n'),
               ('variables/variables.index', b'index\n')],
        dirs=['variables'], recipients=[_recipient('recipient')],
        context={'model': 'vectors', 'owner': 'Zo\u00eb'}, signer=self.ed,
        created=CREATED, rand=_forge.Rand('negative'))
    self.built = _forge.build(self.base)
    ft = base64.b64decode(self.built.body['file_table'])
    assert len(ft) % 3, 'the base file table must have padding bits'

  def add(self, name: str, error: str, description: str, *, built_by: str,
          built: Optional[_forge.Built] = None, header: Optional[bytes] = None,
          payloads: Optional[List[bytes]] = None,
          forms=_forge.FORMS, bundle: Optional[bytes] = None,
          extra: Optional[Dict[str, bytes]] = None,
          missing: Optional[List[str]] = None,
          identities=('recipient',), trusted=('publisher-ed25519',),
          allow_unsigned: bool = False, message: Optional[str] = None):
    built = built or self.built
    v = {
        'name': name,
        'description': description,
        'error': error,
        'exit_code': EXIT_CODES[error],
        'built_by': built_by,
        'forms': list(forms),
        'identities': list(identities),
        'trusted': list(trusted),
        'allow_unsigned': allow_unsigned,
        'header_hex': (built.header if header is None else header).hex(),
        'payloads_hex': [p.hex() for p in (built.payloads if payloads is None
                                           else payloads)],
    }
    if bundle is not None:
      v['bundle_hex'] = bundle.hex()
    if extra:
      v['extra_files'] = {k: d.hex() for k, d in extra.items()}
    if missing:
      v['missing_files'] = list(missing)
    if message:
      v['message'] = message
    assert name not in {x['name'] for x in self.vectors}, name
    self.vectors.append(v)

  def build(self, parts=None, **hooks) -> _forge.Built:
    return _forge.build(parts or self.base, **hooks)


def negative_vectors(store: _Store) -> List[dict]:
  n = _Neg(store)
  base, good = n.base, n.built
  pub_kid = _key_id('publisher-ed25519')

  # --- §3 framing and versions ------------------------------------------------
  n.add('magic-version-1', UNSUPPORTED,
        'Version 1 magic "TFXENC" 00 01 (MAC and signature valid over it).',
        built_by='publisher', built=n.build(magic=b'TFXENC\x00\x01'),
        message='version 1 is not supported')
  n.add('magic-version-3', UNSUPPORTED, 'Unknown version byte 0x03.',
        built_by='publisher', built=n.build(magic=b'TFXENC\x00\x03'),
        message='version 3')
  n.add('magic-version-0', UNSUPPORTED, 'Unknown version byte 0x00.',
        built_by='anyone', header=b'TFXENC\x00\x00' + good.header[8:])
  n.add('magic-reserved-byte', UNSUPPORTED,
        'Byte 6 of the magic (0x00) changed to 0x01.',
        built_by='anyone', header=b'TFXENC\x01\x02' + good.header[8:])
  n.add('magic-not-tfxenc', UNSUPPORTED, 'Magic "TFXENX" 00 02.',
        built_by='anyone', header=b'TFXENX' + good.header[6:],
        message='not a tfx-encrypt package')
  n.add('body-len-zero', TAMPERED, 'body_len 0.', built_by='anyone',
        header=good.header[:8] + struct.pack('>I', 0) + good.header[12:])
  n.add('body-len-over-limit', TAMPERED, 'body_len 16 MiB + 1.',
        built_by='anyone', header=good.header[:8] +
        struct.pack('>I', (16 << 20) + 1) + good.header[12:])
  n.add('body-len-one-too-many', TAMPERED,
        'body_len one more than the body (MAC and signature valid over it).',
        built_by='publisher', built=n.build(body_len=len(good.body_bytes) + 1))
  n.add('header-truncated', TAMPERED,
        'tfxe.header cut in the middle of the body.', built_by='anyone',
        header=good.header[:len(good.header) // 2], forms=[_forge.DIRECTORY])
  n.add('header-trailing-byte', TAMPERED,
        'One byte after the signature (in a bundle: before the payloads).',
        built_by='anyone', header=good.header + b'\x00')
  n.add('bundle-trailing-bytes', TAMPERED,
        'A bundle with bytes after its last payload.', built_by='anyone',
        forms=[_forge.BUNDLE], bundle=good.bundle() + b'\x00' * 16)
  n.add('bundle-truncated', TAMPERED,
        'A bundle missing its last byte.', built_by='anyone',
        forms=[_forge.BUNDLE], bundle=good.bundle()[:-1])
  n.add('bundle-header-only', TAMPERED,
        'A bundle holding the header only.', built_by='anyone',
        forms=[_forge.BUNDLE], bundle=good.header)
  n.add('bundle-empty', TAMPERED, 'An empty bundle.', built_by='anyone',
        forms=[_forge.BUNDLE], bundle=b'')
  n.add('dir-extra-payload', TAMPERED,
        'payload/00000002 beyond the header\'s payload list.',
        built_by='anyone', forms=[_forge.DIRECTORY],
        extra={'payload/00000002': good.payloads[1]})
  n.add('dir-extra-entry', TAMPERED, 'An extra file beside tfxe.header.',
        built_by='anyone', forms=[_forge.DIRECTORY],
        extra={'evil.sh': b'#!/bin/sh\n'})
  n.add('dir-missing-payload', TAMPERED, 'payload/00000001 missing.',
        built_by='anyone', forms=[_forge.DIRECTORY],
        missing=['payload/00000001'])
  n.add('payload-truncated', TAMPERED, 'Payload 1 one byte short.',
        built_by='anyone',
        payloads=[good.payloads[0], good.payloads[1][:-1]])
  n.add('payloads-swapped', TAMPERED, 'Payloads 0 and 1 in each other\'s '
        'place.', built_by='anyone', payloads=good.payloads[::-1])

  # --- §4 canonical JSON ------------------------------------------------------
  def dumps(**kw):
    return lambda raw: json.dumps(json.loads(raw), **kw).encode('utf-8')
  canon = [
      ('body-whitespace', 'Whitespace after "," and ":".',
       dumps(sort_keys=True, separators=(', ', ': '))),
      ('body-keys-not-sorted', 'Top-level keys in reverse order.',
       lambda raw: json.dumps(dict(reversed(list(json.loads(raw).items()))),
                              separators=(',', ':')).encode()),
      ('body-raw-utf8', '"Zo\u00eb" as raw UTF-8 instead of \\u00eb.',
       dumps(sort_keys=True, separators=(',', ':'), ensure_ascii=False)),
      ('body-uppercase-escape', '\\u00EB instead of \\u00eb.',
       _sub(b'\\u00eb', b'\\u00EB')),
      ('body-needless-escape', '"\\u0076ectors" for "vectors".',
       _sub(b'"vectors"', b'"\\u0076ectors"')),
      ('body-escaped-solidus', '"tfx-encrypt\\/2": "/" escaped.',
       _sub(b'"tfx-encrypt/2"', b'"tfx-encrypt\\/2"')),
      ('body-trailing-newline', 'A newline after the closing brace.',
       lambda raw: raw + b'\n'),
      ('body-duplicate-key', '"hash" twice.',
       _sub(b'{"commitment"', b'{"hash":"sha256","commitment"')),
      ('body-float', 'A payload size written 123.0.',
       _resub(rb'("payloads":\[\[)(\d+)', rb'\g<1>\g<2>.0')),
      ('body-exponent', 'A payload size written with an exponent (7e2).',
       _resub(rb'("payloads":\[\[)(\d)(\d+)', rb'\g<1>\g<2>e2')),
      ('body-leading-zero', 'A payload size with a leading zero.',
       _resub(rb'("payloads":\[\[)(\d+)', rb'\g<1>0\g<2>')),
      ('body-nan', '"threshold": NaN.',
       _sub(b'"threshold":null', b'"threshold":NaN')),
      ('body-not-utf8', 'A byte 0xFF inside a string.',
       _sub(b'"vectors"', b'"vect\xffrs"')),
  ]
  for name, desc, fn in canon:
    n.add(name, TAMPERED, 'Non-canonical body JSON: ' + desc +
          ' MAC and signature are valid over it.', built_by='publisher',
          built=n.build(body_bytes=fn))

  # --- §4 fields --------------------------------------------------------------
  fields = [
      ('body-unknown-field', TAMPERED, 'An extra top-level field.',
       _set(['comment'], 'x')),
      ('body-missing-field', TAMPERED, 'No "threshold" field.',
       lambda o: o.pop('threshold')),
      ('package-id-uppercase', TAMPERED, 'package_id in upper-case hex.',
       lambda o: o.update(package_id=o['package_id'].upper())),
      ('created-trailing-newline', TAMPERED, 'created ends with "\\n".',
       lambda o: o.update(created=o['created'] + '\n')),
      ('payload-digest-uppercase', TAMPERED,
       'A payload digest in upper-case hex.',
       lambda o: o['payloads'][0].__setitem__(1, o['payloads'][0][1].upper())),
      ('payload-size-too-large', TAMPERED, 'A payload size of 10^30.',
       lambda o: o['payloads'][0].__setitem__(0, 10**30)),
      ('fingerprint-other-hash', TAMPERED,
       'Fingerprint prefixed "blake3:" in a SHA-256 package.',
       lambda o: o.update(fingerprint='blake3:' + o['fingerprint'][7:])),
      ('format-unknown', UNSUPPORTED, 'format "tfx-encrypt/3".',
       _set(['format'], 'tfx-encrypt/3')),
      ('suite-unknown', UNSUPPORTED, 'suite "AES128_GCM_HKDF_1MB".',
       _set(['suite'], 'AES128_GCM_HKDF_1MB')),
      ('hash-unknown', UNSUPPORTED, 'hash "sha512".', _set(['hash'], 'sha512')),
      ('signer-alg-unknown', UNSUPPORTED,
       'signer.alg "ed448" (the signature is 64 bytes).',
       _set(['signer', 'alg'], 'ed448')),
      ('signer-key-id-too-long', TAMPERED, 'signer.key_id of 1025 characters.',
       _set(['signer', 'key_id'], 'k' * 1025)),
      ('signer-fields', TAMPERED, 'signer with an extra field.',
       _set(['signer', 'sig'], '')),
      ('threshold-k-over-n', TAMPERED,
       'threshold k = 3 with 2 key groups.',
       lambda o: o.update(recipients=o['recipients'] * 2,
                          threshold={'k': 3, 'groups': [[0], [1]]})),
      ('commitment-b64-padding-bits', TAMPERED,
       'commitment in base64 with a non-zero padding bit (same bytes).',
       lambda o: o.update(commitment=noncanonical_b64(o['commitment']))),
      ('commitment-b64-unpadded', TAMPERED, 'commitment without its "=".',
       lambda o: o.update(commitment=o['commitment'].rstrip('='))),
      ('file-table-b64-padding-bits', TAMPERED,
       'file_table in base64 with a non-zero padding bit (same bytes).',
       lambda o: o.update(file_table=noncanonical_b64(o['file_table']))),
      ('stanza-ct-b64-padding-bits', TAMPERED,
       'The recipient stanza\'s ct in base64 with a non-zero padding bit '
       '(same bytes).',
       lambda o: o['recipients'][0]['body'].update(
           ct=noncanonical_b64(o['recipients'][0]['body']['ct']))),
  ]
  for name, error, desc, edit in fields:
    n.add(name, error, desc + ' MAC and signature are valid over it.',
          built_by='publisher', built=n.build(edit_body=edit))
  n.add('context-reserved-key', UNSUPPORTED,
        'Context key "tfxe:stage" (reserved prefix, unknown to version 2).',
        built_by='publisher',
        built=n.build(base.replace(context={'tfxe:stage': 'prod'})))
  n.add('context-wrap-key-in-header', UNSUPPORTED,
        'Context key "tfxe:package-id", which exists only in wrap contexts.',
        built_by='publisher',
        built=n.build(base.replace(
            context={'tfxe:package-id': good.package_id.hex()})))
  n.add('context-too-many-entries', TAMPERED, 'A context of 65 entries.',
        built_by='publisher', built=n.build(base.replace(
            context={f'k{i:02d}': 'v' for i in range(65)})))
  n.add('recipients-too-many', TAMPERED, '65 recipient stanzas.',
        built_by='publisher', built=n.build(base.replace(
            recipients=[_recipient('recipient')] * 65)))

  # --- §3, §8 signature -------------------------------------------------------
  unsigned = n.build(base.replace(signer=None))
  ecdsa_parts = base.replace(signer=_signer('publisher-ecdsa', store))
  ecdsa = n.build(ecdsa_parts)
  attacker = _signer('attacker-ed25519', store)
  n.add('sig-len-0-with-signer', TAMPERED,
        'The body names a signer; sig_len is 0 and no signature follows.',
        built_by='anyone', built=n.build(edit_sig=lambda s: b''))
  n.add('sig-len-64-signer-null', TAMPERED,
        'The body says signer null (MAC valid); a 64-byte Ed25519 signature '
        'by the publisher follows anyway.', built_by='publisher',
        built=n.build(base.replace(signer=None),
                      edit_sig=lambda s: n.ed.sign(unsigned.message)))
  n.add('sig-len-63', TAMPERED, 'A 63-byte signature (sig_len 63).',
        built_by='anyone', built=n.build(edit_sig=lambda s: s[:63]))
  n.add('sig-len-65', TAMPERED, 'A 65-byte signature (sig_len 65).',
        built_by='anyone', built=n.build(edit_sig=lambda s: s + b'\x00'))
  n.add('sig-len-64-short', TAMPERED,
        'sig_len 64 with 63 signature bytes (a bundle reads on into the '
        'payloads).', built_by='anyone',
        built=n.build(edit_sig=lambda s: s[:63], sig_len=64))
  n.add('ed25519-s-plus-l', TAMPERED,
        'Ed25519 signature R || S+L (non-canonical S >= L).',
        built_by='publisher', built=n.build(edit_sig=_forge.s_plus_l))
  n.add('ecdsa-high-s', TAMPERED,
        'ECDSA P-256 (r, n - s) of a valid signature: plain ECDSA accepts it; '
        'the format requires low s.', built_by='anyone',
        built=n.build(ecdsa_parts, edit_sig=_forge.high_s),
        trusted=['publisher-ecdsa'])
  n.add('ecdsa-r-zero', TAMPERED, 'ECDSA r = 0.', built_by='anyone',
        built=n.build(ecdsa_parts, edit_sig=lambda s: bytes(32) + s[32:]),
        trusted=['publisher-ecdsa'])
  n.add('ecdsa-s-zero', TAMPERED, 'ECDSA s = 0.', built_by='anyone',
        built=n.build(ecdsa_parts, edit_sig=lambda s: s[:32] + bytes(32)),
        trusted=['publisher-ecdsa'])
  n.add('ecdsa-r-equals-n', TAMPERED, 'ECDSA r = n.', built_by='anyone',
        built=n.build(ecdsa_parts, edit_sig=lambda s: _forge.P256_N.to_bytes(
            32, 'big') + s[32:]), trusted=['publisher-ecdsa'])
  n.add('ecdsa-signature-by-other-key', TAMPERED,
        'The body names the publisher\'s ECDSA key; the signature is the '
        'publisher\'s Ed25519 one of another header.', built_by='anyone',
        built=n.build(ecdsa_parts, edit_sig=lambda s: good.sig),
        trusted=['publisher-ecdsa'])
  del ecdsa
  n.add('signature-forged-claiming-trusted-key', TAMPERED,
        'Signed with the attacker\'s key; the body names the publisher\'s '
        'key id.', built_by='attacker', message='INVALID',
        built=n.build(base.replace(signer=_signer(
            'attacker-ed25519', store, key_id=pub_kid))))
  n.add('signer-untrusted', UNTRUSTED,
        'Validly signed by the attacker, who names their own key.',
        built_by='attacker', built=n.build(base.replace(signer=attacker)))
  n.add('unsigned-trust-only', UNTRUSTED,
        'A valid unsigned package, read with --trust and without '
        '--allow-unsigned.', built_by='anyone', built=unsigned)
  n.add('signed-no-trust-allow-unsigned', UNTRUSTED,
        'A validly signed package read with --allow-unsigned and no --trust: '
        'a signer is named, so it must be verified.', built_by='publisher',
        trusted=[], allow_unsigned=True)
  n.add('signer-nulled-without-dek', TAMPERED,
        'The signed body\'s signer set to null, the signature dropped, the '
        'old MAC kept; read with --trust and --allow-unsigned.',
        built_by='anyone', allow_unsigned=True,
        built=n.build(base.replace(signer=None),
                      edit_mac=lambda m: good.mac))
  n.add('mac-flipped', TAMPERED,
        'The MAC\'s first bit flipped (the signature does not cover the '
        'MAC).', built_by='anyone',
        built=n.build(edit_mac=lambda m: bytes([m[0] ^ 1]) + m[1:]))

  # --- §5, §7 keys ------------------------------------------------------------
  n.add('wrong-recipient', NO_KEY, 'Encrypted for another recipient only.',
        built_by='publisher', built=n.build(base.replace(
            recipients=[_recipient('other-recipient')])))
  other_dek = _forge.wrap(_recipient('recipient'), _fixed('other dek', 32),
                          WrapContext(good.package_id, base.context),
                          _forge.Rand('negative/other-dek'), 's')
  n.add('stanza-wraps-another-key', TAMPERED,
        'The stanza wraps another data key (key commitment mismatch).',
        built_by='publisher', message='commitment',
        built=n.build(edit_body=lambda o: o['recipients'].__setitem__(
            0, other_dek)))
  wrong_ctx = _forge.wrap(_recipient('recipient'), good.dek,
                          WrapContext(good.package_id, {}),
                          _forge.Rand('negative/wrong-ctx'), 's')
  n.add('stanza-wrong-context', TAMPERED,
        'The stanza wraps the data key under another wrap context.',
        built_by='publisher',
        built=n.build(edit_body=lambda o: o['recipients'].__setitem__(
            0, wrong_ctx)))

  # --- §6, §9, §10 payloads and file table ------------------------------------
  n.add('payload-reencrypted', TAMPERED,
        'Payload 0 sealed again by a recipient: same plaintext, fresh stream '
        'header, under the package\'s own stream key.', built_by='recipient',
        payloads=[_forge.reencrypt(good, 0, rand=_forge.Rand('neg/reenc')),
                  good.payloads[1]], message='ciphertext digest')
  table = json.loads(good.table)
  n.add('file-table-not-canonical', TAMPERED,
        'The file table JSON indented.', built_by='publisher',
        built=n.build(table=json.dumps(table, indent=1).encode()))
  bigger = json.loads(good.table)
  bigger['files'][0]['size'] += 1
  n.add('file-table-size-mismatch', TAMPERED,
        'The file table says file 0 is one byte longer.',
        built_by='publisher',
        built=n.build(table=header_lib.canonical_json(bigger)))
  n.add('fingerprint-mismatch', TAMPERED, 'A fingerprint of zeros.',
        built_by='publisher',
        built=n.build(edit_body=_set(['fingerprint'], 'sha256:' + '0' * 64)))
  wrong = json.loads(good.table)
  wrong['files'][0]['digest'] = hashlib.sha256(b'another model').hexdigest()
  root = hashlib.sha256(b''.join(bytes.fromhex(f['digest'])
                                 for f in wrong['files'])).hexdigest()
  n.add('plaintext-digest-mismatch', TAMPERED,
        'The file table (and fingerprint) list another digest for file 0.',
        built_by='publisher', message='digest',
        built=n.build(table=header_lib.canonical_json(wrong),
                      edit_body=_set(['fingerprint'], 'sha256:' + root)))

  # --- §9 paths (signed by the trusted publisher: still refused) --------------
  def tree(files, dirs=()):
    return n.build(base.replace(files=[(p, b'x') for p in files],
                                dirs=list(dirs)))
  paths = [
      ('path-dotdot', UNSAFE, '"../evil".', ['../evil'], []),
      ('path-dotdot-inside', UNSAFE, '"a/../../evil".', ['a/../../evil'],
       ['a']),
      ('path-dot', UNSAFE, '"./evil".', ['./evil'], []),
      ('path-absolute', UNSAFE, '"/tmp/tfxe-vector-evil".',
       ['/tmp/tfxe-vector-evil'], []),
      ('path-backslash', UNSAFE, '"..\\\\evil".', ['..\\evil'], []),
      ('path-empty-component', UNSAFE, '"a//evil".', ['a//evil'], ['a']),
      ('path-control-esc', UNSAFE, 'An ESC (terminal escape) in a name.',
       ['evil\x1b[2J.txt'], []),
      ('path-newline', UNSAFE, 'A line feed in a name.', ['evil\n.txt'], []),
      ('path-nul', UNSAFE, 'A NUL in a name.', ['evil\x00.txt'], []),
      ('path-bidi', UNSAFE, 'U+202E (right-to-left override) in a name.',
       ['evil\u202etxt.exe'], []),
      ('path-not-nfc', UNSAFE, '"e" + U+0301 (NFD) in a name.',
       ['e\u0301vil'], []),
      ('path-component-too-long', UNSAFE, 'A 256-byte name.', ['a' * 256],
       []),
      ('path-over-4096-characters', TAMPERED,
       'A path of 4097 characters (a length outside §11: '
       'TamperedPackageError).', ['a' * 4097], []),
      ('path-case-collision', UNSAFE, '"Model.pb" and "model.pb".',
       ['Model.pb', 'model.pb'], []),
      ('path-casefold-collision', UNSAFE, '"STRASSE" and "stra\u00dfe".',
       ['STRASSE', 'stra\u00dfe'], []),
      ('path-missing-parent', UNSAFE, '"d/x" without "d" in dirs.', ['d/x'],
       []),
      ('path-file-under-file', UNSAFE, '"a" and "a/b", both files.',
       ['a', 'a/b'], []),
      ('path-file-and-dir', UNSAFE, '"a" both a file and a directory.',
       ['a'], ['a']),
      ('path-listed-twice', UNSAFE, '"a" twice.', ['a', 'a'], []),
      ('files-not-sorted', UNSAFE, 'Files "b", "a".', ['b', 'a'], []),
      ('dirs-not-sorted', TAMPERED, 'Dirs "b", "a".', ['a/x', 'b/y'],
       ['b', 'a']),
  ]
  for name, error, desc, files, dirs in paths:
    n.add(name, error, 'File table: ' + desc + ' Signed by the trusted '
          'publisher.', built_by='publisher', built=tree(files, dirs))
  return n.vectors


def build_negative(store: _Store) -> dict:
  return {
      'description': (
          'Inputs a reader must refuse, docs/FORMAT.md. Directory form: '
          'tfxe.header = header_hex, payload/NNNNNNNN = payloads_hex, plus '
          'extra_files, minus missing_files. Bundle form: bundle_hex if '
          'present, else header_hex followed by the payloads. `forms` says '
          'which forms apply. Read with identities (private keys), trusted '
          '(public keys) and allow_unsigned as given (keys in '
          'package-keys/); the reader must fail with `error` (exit code '
          '`exit_code` from the CLI, one line on stderr) and write nothing. '
          '`built_by` says who could build it: anyone (bytes only), a '
          'recipient (holds the data key), the attacker (own signing key), '
          'or the publisher (data key and signing key). Generated by '
          'tests/testdata/make_vectors.py.'),
      'exit_codes': EXIT_CODES,
      'vectors': negative_vectors(store),
  }


def render(obj) -> str:
  return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True) + '\n'


def outputs() -> Dict[pathlib.Path, bytes]:
  """Every file under vectors/ this module writes, with its contents."""
  store = load_store()
  out = dict(key_outputs())
  packages, files = build_packages(store)
  out.update(files)
  out[PACKAGES_FILE] = render(packages).encode()
  out[NEGATIVE_FILE] = render(build_negative(store)).encode()
  used = {k: store[k].hex() for k in sorted(store.used) if k in store}
  out[ECDSA_FILE] = render({
      'description': (
          'ECDSA P-256 signatures (raw r || s, low s) used by the package '
          'vectors, by SHA-256 of the signed message. ECDSA is randomized: '
          'make_vectors.py reuses a stored signature while it verifies.'),
      'signatures': used}).encode()
  return out


def owned_files() -> List[pathlib.Path]:
  """Files now under the directories this module owns (to find stale ones)."""
  found = []
  for d in (KEY_DIR, PACKAGE_DIR):
    if d.exists():
      found.extend(p for p in d.rglob('*') if p.is_file())
  return found
