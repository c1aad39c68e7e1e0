#!/usr/bin/env python3
"""Per-package cost of unwrapping the data key in a TPM 2.0 (issue 13).

Starts the same software TPM the tests use (swtpm + tpm2-abrmd +
tpm2-pkcs11, tests/fakes/tpm.py; Debian packages swtpm, tpm2-abrmd,
libtss2-tcti-tabrmd0, libtpm2-pkcs11-1, opensc), generates an RSA-3072 key
inside it, and measures in the same run, rounds interleaved, medians
reported:

* `unwrap`: one `Pkcs11Key.unwrap` (open a session, log in, find the key,
  C_Decrypt with RSA-OAEP) against one local X25519 `LocalKey.unwrap`
  (HPKE), on a stanza made for the same package context;
* `decrypt`: `decrypt_model` of a small package (3 files, 1 MiB) made for
  both keys, with the TPM identity alone and with the X25519 key alone.

Usage:

    .venv/bin/python benchmarks/tpm_unwrap.py            # 15 rounds
    .venv/bin/python benchmarks/tpm_unwrap.py --rounds 31

A software TPM is not a hardware one: a discrete TPM's RSA-3072 decryption
takes hundreds of milliseconds (docs/BENCHMARKS.md).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.fakes import tpm as tpm_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from tfx_encrypt import package as pkg  # noqa: E402
from tfx_encrypt.keys import local  # noqa: E402
from tfx_encrypt.keys import pkcs11 as p11  # noqa: E402
from tfx_encrypt.keys.base import WrapContext  # noqa: E402

PIN = '2468-bench-pin'


def _ms(samples):
  return statistics.median(samples) * 1000


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  ap.add_argument('--rounds', type=int, default=15)
  args = ap.parse_args(argv)
  tpm = tpm_lib.Tpm()
  work = tempfile.mkdtemp(prefix='tfxe-bench-tpm-')
  try:
    token = tpm.new_token(PIN)
    tpm.generate(token, PIN, 'kek', 'rsa:3072', key_id='01')
    identity = p11.Pkcs11Key(tpm.uri(token, 'kek', key_id='01'), pin=PIN)
    der = tpm.export_public(token, 'kek', os.path.join(work, 'kek.der'))
    recipient = p11.Pkcs11Key(
        f'pkcs11:token={token};object=kek;id=%01'
        f'?x-public-key=file:{der}&x-oaep=sha256')
    prefix = os.path.join(work, 'ops')
    local.keygen('x25519', prefix)
    x_priv = local.LocalKey(prefix + '.key.pem')
    x_pub = local.LocalKey(prefix + '.pub.pem')

    ctx = WrapContext(os.urandom(16), {'model': 'bench'})
    dek = os.urandom(32)
    tpm_stanza = recipient.wrap(dek, ctx)
    x_stanza = x_pub.wrap(dek, ctx)

    model = os.path.join(work, 'model')
    os.makedirs(os.path.join(model, 'variables'))
    for name, size in (('saved_model.pb', 64 << 10),
                       ('variables/variables.index', 4 << 10),
                       ('variables/variables.data-00000-of-00001', 1 << 20)):
      with open(os.path.join(model, name), 'wb') as f:
        f.write(os.urandom(size))
    package = os.path.join(work, 'm.tfxe')
    pkg.encrypt_model(model, package, recipients=[recipient, x_pub],
                      bundle=True)

    times = {k: [] for k in ('tpm_unwrap', 'x_unwrap', 'tpm_decrypt',
                             'x_decrypt')}
    identity.unwrap(tpm_stanza, ctx)  # warm: module loaded, store opened
    for n in range(args.rounds):
      t = time.perf_counter()
      assert identity.unwrap(tpm_stanza, ctx) == dek
      times['tpm_unwrap'].append(time.perf_counter() - t)
      t = time.perf_counter()
      assert x_priv.unwrap(x_stanza, ctx) == dek
      times['x_unwrap'].append(time.perf_counter() - t)
      for key, ident in (('tpm_decrypt', identity), ('x_decrypt', x_priv)):
        out = os.path.join(work, f'out-{key}-{n}')
        t = time.perf_counter()
        pkg.decrypt_model(package, out, identities=[ident],
                          allow_unsigned=True)
        times[key].append(time.perf_counter() - t)
        shutil.rmtree(out)
    print(f'rounds: {args.rounds} (medians); swtpm + tpm2-abrmd + '
          'tpm2-pkcs11, RSA-3072, RSA-OAEP SHA-256')
    print('| operation | TPM (pkcs11:) | local X25519 | difference |')
    print('|---|---|---|---|')
    for what, a, b in (('unwrap the data key', 'tpm_unwrap', 'x_unwrap'),
                       ('decrypt a 1 MiB package', 'tpm_decrypt',
                        'x_decrypt')):
      print(f'| {what} | {_ms(times[a]):.1f} ms | {_ms(times[b]):.2f} ms | '
            f'+{_ms(times[a]) - _ms(times[b]):.1f} ms |')
    return 0
  finally:
    tpm.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  sys.exit(main())
