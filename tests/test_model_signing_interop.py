"""Our model fingerprint equals OpenSSF model_signing's root digest.

The real `model_signing` 1.1.1 CLI (in .venv-oms) signs a model directory
with a local ECDSA P-256 key; the DSSE payload's in-toto subject digest is
its manifest root. tfx-encrypt's `fingerprint` for the same directory must
be the same value, and its per-file digests the same resources.
"""

import base64
import hashlib
import json
import os
import subprocess

import pytest

import tfx_encrypt as te
from tfx_encrypt.keys import local
from tests import _util

pytestmark = pytest.mark.interop


def _sign_with_model_signing(oms_cli, model_dir, key, sig):
  r = subprocess.run(
      [str(oms_cli), 'sign', 'key', str(model_dir), '--private_key', str(key),
       '--signature', str(sig)],
      capture_output=True, text=True, timeout=300)
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
def test_fingerprint_equals_model_signing_root(tmp_path, oms_cli, files):
  model = _util.make_tree(tmp_path / 'model', files)
  priv, _ = local.keygen('ecdsa-p256', str(tmp_path / 'oms'))
  payload = _sign_with_model_signing(oms_cli, model, priv,
                                     tmp_path / 'model.sig')
  # The signature file must not sit inside the model we encrypt.
  assert not os.path.exists(os.path.join(model, 'model.sig'))
  root = payload['subject'][0]['digest']['sha256']
  resources = {r['name']: r['digest']
               for r in payload['predicate']['resources']}

  keys = _util.Keys(tmp_path)
  # Two of the trees are not models: this is about the digest rule only.
  info = te.encrypt_model(model, tmp_path / 'p', recipients=[keys.pub('x')],
                          any_dir=True)
  assert info.fingerprint == 'sha256:' + root
  # Same per-file digests (model_signing names files by relative path).
  for rel, content in _util.read_tree(model).items():
    if content is None:
      continue
    assert resources[rel] == hashlib.sha256(content).hexdigest()
  assert len(resources) == info.file_count
