"""The built-in backends through the registry, lazy imports, and a
third-party backend registered through the entry-point group."""

import os
import subprocess
import sys
import textwrap

from tfx_encrypt import keys

BACKENDS = {
    'aws-kms': ('tfx_encrypt.keys.aws_kms', 'AwsKmsKey', 'boto3'),
    'gcp-kms': ('tfx_encrypt.keys.gcp_kms', 'GcpKmsKey', 'google.cloud.kms_v1'),
    'hcvault': ('tfx_encrypt.keys.vault', 'VaultKey', 'hvac'),
    'azure-kv': ('tfx_encrypt.keys.azure_kv', 'AzureKeyVaultKey',
                 'azure.keyvault.keys'),
    'pkcs11': ('tfx_encrypt.keys.pkcs11', 'Pkcs11Key', 'pkcs11'),
}


def test_builtin_classes_are_registered():
  for scheme, (module, cls, _) in BACKENDS.items():
    backend = keys.backend_class(scheme)
    assert (backend.__module__, backend.__name__) == (module, cls)
    assert backend.scheme == scheme
    assert backend.stanza_types


def test_backend_modules_import_no_sdk():
  """Importing a backend module (as resolve() does) loads no cloud SDK."""
  code = textwrap.dedent("""
      import sys
      import tfx_encrypt.keys
      mods = %r
      for module, _, sdk in mods.values():
        __import__(module)
      loaded = [sdk for _, _, sdk in mods.values() if sdk in sys.modules]
      assert not loaded, loaded
      print('ok')
  """) % (BACKENDS,)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=False,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__)))))
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == 'ok'


def test_third_party_backend_via_entry_point(tmp_path, monkeypatch):
  """What docs/BACKENDS.md tells a third party to do, end to end."""
  pkg = tmp_path / 'my_kms_backend'
  pkg.mkdir()
  (pkg / '__init__.py').write_text(textwrap.dedent('''
      from tfx_encrypt.keys.base import KeyBackend, Stanza

      class MyKmsKey(KeyBackend):
        scheme = 'mykms'
        stanza_types = ('mykms',)

        @property
        def key_id(self):
          return self.uri

        def wrap(self, dek, context):
          return Stanza('mykms', self.key_id, {'ct': dek[::-1].hex()})

        def unwrap(self, stanza, context):
          return bytes.fromhex(stanza.body['ct'])[::-1]
  '''))
  dist = tmp_path / 'my_kms_backend-1.0.dist-info'
  dist.mkdir()
  (dist / 'METADATA').write_text(
      'Metadata-Version: 2.1\nName: my-kms-backend\nVersion: 1.0\n')
  (dist / 'entry_points.txt').write_text(
      '[tfx_encrypt.key_backends]\nmykms = my_kms_backend:MyKmsKey\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  assert 'mykms' in keys.available_schemes()
  key = keys.resolve('mykms://prod/key-1')
  assert type(key).__name__ == 'MyKmsKey'
  ctx = keys.WrapContext(b'\0' * 16, {})
  stanza = key.wrap(b'k' * 32, ctx)
  assert key.matches(stanza) and key.unwrap(stanza, ctx) == b'k' * 32


def test_third_party_cannot_override_a_builtin_scheme(tmp_path, monkeypatch):
  """A package declaring 'file' or 'aws-kms' does not hijack existing URIs."""
  pkg = tmp_path / 'hijack_backend'
  pkg.mkdir()
  (pkg / '__init__.py').write_text(textwrap.dedent('''
      from tfx_encrypt.keys.base import KeyBackend

      class Hijack(KeyBackend):
        scheme = 'file'

        @property
        def key_id(self):
          return 'hijacked'
  '''))
  dist = tmp_path / 'hijack_backend-1.0.dist-info'
  dist.mkdir()
  (dist / 'METADATA').write_text(
      'Metadata-Version: 2.1\nName: hijack-backend\nVersion: 1.0\n')
  (dist / 'entry_points.txt').write_text(
      '[tfx_encrypt.key_backends]\nfile = hijack_backend:Hijack\n'
      'aws-kms = hijack_backend:Hijack\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  assert keys.backend_class('file').__name__ == 'LocalKey'
  assert keys.backend_class('aws-kms').__name__ == 'AwsKmsKey'
