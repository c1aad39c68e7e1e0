"""Our model fingerprint equals OpenSSF model_signing's root digest.

The real OpenSSF model_signing 1.1.1 (in .venv-oms) signs a model directory
with a local ECDSA P-256 key; the DSSE payload's in-toto subject digest is
its manifest root. tfx-encrypt's `fingerprint` for the same directory must
be the same value, and its per-file digests the same resources, for both of
our hashes: SHA-256 through the `model_signing` CLI, BLAKE3 through its
Python API (`hashing.Config().use_file_serialization(hashing_algorithm=
'blake3')`), because the 1.1.1 CLI has no hash option. model_signing's root
is SHA-256 over the raw file digests whatever the file hash is; so is ours.
"""

import base64
import hashlib
import json
import os
import subprocess

import blake3
import pytest

import tfx_encrypt as te
from tfx_encrypt.keys import local
from tests import _util

pytestmark = pytest.mark.interop


# model_signing's own Python API, run by .venv-oms's interpreter: what its
# CLI's `sign key` does, with the file hash chosen.
_SIGN_WITH_HASH = r'''
import sys
from model_signing import hashing, signing
model, key, sig, alg = sys.argv[1:5]
signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(
    hashing.Config().use_file_serialization(hashing_algorithm=alg)
).sign(model, sig)
'''

_FILE_HASH = {'sha256': lambda b: hashlib.sha256(b).hexdigest(),
              'blake3': lambda b: blake3.blake3(b).hexdigest()}


def _sign_with_model_signing(oms_cli, model_dir, key, sig, hash_alg):
  if hash_alg == 'sha256':  # the CLI, as users run it
    args = [str(oms_cli), 'sign', 'key', str(model_dir), '--private_key',
            str(key), '--signature', str(sig)]
  else:
    args = [str(oms_cli.parent / 'python'), '-c', _SIGN_WITH_HASH,
            str(model_dir), str(key), str(sig), hash_alg]
  r = subprocess.run(args, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  bundle = json.loads(sig.read_text())
  payload = json.loads(base64.b64decode(bundle['dsseEnvelope']['payload']))
  return payload


@pytest.mark.parametrize('files', [
    {'saved_model.pb': 1000, 'fingerprint.pb': 60,
     'variables/variables.index': 300,
     'variables/variables.data-00000-of-00001': 3 * (1 << 20) + 5,
     'assets/vocab.txt': b'a\nb\n'},
    {'only.bin': b''},
    {f'd{i % 3}/f{i:03d}': i * 7 for i in range(40)},
], ids=['savedmodel', 'one-empty-file', 'many-files'])
@pytest.mark.parametrize('hash_alg', ['blake3', 'sha256'])
def test_fingerprint_equals_model_signing_root(tmp_path, oms_cli, files,
                                               hash_alg):
  model = _util.make_tree(tmp_path / 'model', files)
  priv, _ = local.keygen('ecdsa-p256', str(tmp_path / 'oms'))
  payload = _sign_with_model_signing(oms_cli, model, priv,
                                     tmp_path / 'model.sig', hash_alg)
  # The signature file must not sit inside the model we encrypt.
  assert not os.path.exists(os.path.join(model, 'model.sig'))
  root = payload['subject'][0]['digest']['sha256']
  resources = {r['name']: r['digest']
               for r in payload['predicate']['resources']}
  assert {r['algorithm'] for r in payload['predicate']['resources']} == {
      hash_alg}

  keys = _util.Keys(tmp_path)
  # Two of the trees are not models: this is about the digest rule only.
  kwargs = {} if hash_alg == 'blake3' else {'hash_alg': hash_alg}  # default
  info = te.encrypt_model(model, tmp_path / 'p', recipients=[keys.pub('x')],
                          any_dir=True, **kwargs)
  assert info.hash_alg == hash_alg
  assert info.fingerprint == 'sha256:' + root
  # Same per-file digests (model_signing names files by relative path).
  for rel, content in _util.read_tree(model).items():
    if content is None:
      continue
    assert resources[rel] == _FILE_HASH[hash_alg](content)
  assert len(resources) == info.file_count
