"""Key roles, passphrase-protected keys and keys from stdin (keys layer + API).

Real keys from `local.keygen`, real packages; no mocks of the crypto. The
CLI side (exit codes, one-line messages, a real tty prompt) is in
tests/cli/test_cli_keys.py.
"""

import io
import os
import sys

import pytest

import tfx_encrypt as te
from tfx_encrypt import errors
from tfx_encrypt import keys
from tfx_encrypt.keys import local
from tests import _util

AWS_URI = 'aws-kms://arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab'
PKCS11_URI = 'pkcs11:token=t;object=k?module-path=/m.so&pin-value=1234'
PASS_ENVS = (local.PASSPHRASE_ENV, local.PASSPHRASE_ENV_ENV,
             local.PASSPHRASE_FILE_ENV)


@pytest.fixture(autouse=True)
def _no_passphrase_env(monkeypatch):
  for name in PASS_ENVS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(local, '_prompt_hook', None)


@pytest.fixture(scope='module')
def k(tmp_path_factory):
  return _util.Keys(tmp_path_factory.mktemp('keys'))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  return _util.make_tree(tmp_path_factory.mktemp('m'),
                         {'saved_model.pb': 3000, 'variables/v.index': 10})


@pytest.fixture(scope='module')
def signed_pkg(tmp_path_factory, k, model):
  pkg = tmp_path_factory.mktemp('p') / 'p.tfxe'
  te.encrypt_model(model, pkg, recipients=[k.pub('x')], signer=k.priv('ed'),
                   bundle=True)
  return pkg


def _role_error(uri, role):
  with pytest.raises(errors.KeyRoleError) as e:
    keys.resolve(uri, role)
  assert e.value.exit_code == 2 and isinstance(e.value, errors.UsageError)
  assert '\n' not in str(e.value)
  return str(e.value)


# --- roles: what each kind and half of a local key may be ----------------------

@pytest.mark.parametrize('name', ['x', 'rsa'])
def test_private_encryption_key_is_not_a_recipient(k, name):
  msg = _role_error(k.priv(name), 'recipient')
  kind = {'x': 'X25519', 'rsa': 'RSA'}[name]
  assert msg.startswith(f'--recipient {k.priv(name)} is an {kind} private key')
  assert f'pass {k.pub(name)} (tfx-encrypt keygen writes both)' in msg


@pytest.mark.parametrize('name', ['ed', 'ec'])
def test_private_signing_key_is_not_a_trust_anchor(k, name):
  msg = _role_error(k.priv(name), 'trust')
  assert msg.startswith(f'--trust {k.priv(name)} is an ')
  assert 'private key; a trust anchor must be a public key' in msg
  assert f'pass {k.pub(name)}' in msg


@pytest.mark.parametrize('name', ['x', 'rsa'])
def test_public_key_is_not_an_identity(k, name):
  msg = _role_error(k.pub(name), 'identity')
  assert msg.startswith(f'--identity {k.pub(name)} is an ')
  assert 'an identity must be a private key' in msg
  assert f'pass {k.priv(name)}' in msg


@pytest.mark.parametrize('name', ['ed', 'ec'])
def test_public_key_is_not_a_signer(k, name):
  msg = _role_error(k.pub(name), 'signer')
  assert msg.startswith(f'--sign-with {k.pub(name)} is an ')
  assert f'a signer must be a private key: pass {k.priv(name)}' in msg


@pytest.mark.parametrize('uri_of,name,role,why', [
    ('pub', 'ed', 'recipient', 'a signing key'),
    ('priv', 'ed', 'identity', 'a signing key, which cannot decrypt'),
    ('pub', 'x', 'trust', 'cannot verify signatures'),
    ('priv', 'rsa', 'signer', 'cannot sign'),
])
def test_wrong_kind_for_the_role(k, uri_of, name, role, why):
  assert why in _role_error(getattr(k, uri_of)(name), role)


@pytest.mark.parametrize('uri_of,name,role', [
    ('pub', 'x', 'recipient'), ('pub', 'rsa', 'recipient'),
    ('priv', 'x', 'identity'), ('priv', 'rsa', 'identity'),
    ('pub', 'ed', 'trust'), ('pub', 'ec', 'trust'),
    ('priv', 'ed', 'signer'), ('priv', 'ec', 'signer'),
])
def test_right_roles_are_accepted(k, uri_of, name, role):
  uri = getattr(k, uri_of)(name)
  assert keys.resolve(uri, role).uri == uri
  assert keys.resolve('file://' + uri, role).display == 'file://' + uri


def test_other_half_is_named_only_when_it_exists(tmp_path):
  priv, pub = local.keygen('x25519', str(tmp_path / 'lonely'))
  os.unlink(pub)
  msg = _role_error(priv, 'recipient')
  assert 'pass its public key' in msg and 'lonely.pub.pem' not in msg


def test_no_role_means_no_check(k):
  assert keys.resolve(k.priv('x')).is_private  # e.g. --remove-recipient
  with pytest.raises(ValueError):
    keys.resolve(k.pub('x'), 'owner')


def test_kms_and_hsm_keys_serve_the_roles_they_can():
  pytest.importorskip('boto3')
  # A KMS key plays every role: whether it wraps (symmetric) or signs
  # (SIGN_VERIFY) is known only to KMS (tests/keys/test_kms_signing.py).
  for role in ('recipient', 'identity', 'trust', 'signer'):
    assert keys.resolve(AWS_URI, role).key_id == AWS_URI


def test_hsm_key_display_hides_the_pin():
  pytest.importorskip('pkcs11')
  key = keys.resolve(PKCS11_URI, 'identity')
  assert '1234' not in key.display and '1234' not in key.describe()
  assert key.display == 'pkcs11:token=t;object=k?module-path=/m.so'
  # An EC key pair in a token can sign; a public object cannot (issue 13).
  msg = _role_error(PKCS11_URI.replace('object=k', 'object=k;type=public'),
                    'signer')
  assert 'pin-value' not in msg and '1234' not in msg


def test_redact_uri_drops_every_secret_parameter():
  from tfx_encrypt.keys.base import redact_uri  # pylint: disable=g-import-not-at-top
  assert redact_uri('x:y?a=1&pin-value=2&token=3&PASSWORD=4&b=5') == 'x:y?a=1&b=5'
  assert redact_uri('x:y?pin-value=2') == 'x:y'
  assert redact_uri('/plain/path.pem') == '/plain/path.pem'


def test_describe_shows_the_typed_path_next_to_the_key_id(k):
  key = keys.resolve(k.pub('x'), 'recipient')
  assert key.describe() == f'{k.pub("x")} ({key.key_id})'


def test_backend_objects_are_checked_too(k, model, tmp_path):
  with pytest.raises(errors.KeyRoleError, match='--recipient'):
    te.encrypt_model(model, tmp_path / 'p',
                     recipients=[local.LocalKey(k.priv('x'))])
  assert not os.path.lexists(tmp_path / 'p')


# --- the API refuses wrong roles before touching anything -----------------------

def test_encrypt_model_refuses_wrong_roles(k, model, tmp_path):
  cases = [
      dict(recipients=[k.priv('x')]),
      dict(recipients=[k.pub('ed')]),
      dict(recipients=[k.pub('x')], signer=k.pub('ed')),
      dict(recipients=[k.pub('x')], signer=k.priv('x')),
      dict(key_groups=[[k.pub('x')], [k.priv('x2')]], threshold=2),
  ]
  for kwargs in cases:
    with pytest.raises(errors.KeyRoleError):
      te.encrypt_model(model, tmp_path / 'p', **kwargs)
    assert not os.listdir(tmp_path)
  with pytest.raises(errors.KeyRoleError, match=r'^--key-group '):
    te.encrypt_model(model, tmp_path / 'p', key_groups=[[k.pub('x')],
                                                        [k.priv('x2')]],
                     threshold=2)


def test_decrypt_and_verify_refuse_wrong_roles(k, signed_pkg, tmp_path):
  with pytest.raises(errors.KeyRoleError, match='^--identity '):
    te.decrypt_model(signed_pkg, tmp_path / 'o', identities=[k.pub('x')],
                     trusted=[k.pub('ed')])
  with pytest.raises(errors.KeyRoleError, match='^--trust '):
    te.decrypt_model(signed_pkg, tmp_path / 'o', identities=[k.priv('x')],
                     trusted=[k.priv('ed')])
  with pytest.raises(errors.KeyRoleError, match='^--trust '):
    te.verify_package(signed_pkg, trusted=[k.priv('ed')])
  with pytest.raises(errors.KeyRoleError, match='^--trust '):
    te.verify_package(signed_pkg, trusted=[k.pub('x')])
  assert not os.listdir(tmp_path)
  assert te.verify_package(signed_pkg, trusted=[k.pub('ed')]).signature_verified


def test_rewrap_and_rotate_refuse_wrong_roles(k, signed_pkg, tmp_path):
  before = signed_pkg.read_bytes()
  base = dict(identities=[k.priv('x')], trusted=[k.pub('ed')],
              signer=k.priv('ed'))
  for change in (dict(add_recipients=[k.priv('x2')]),
                 dict(identities=[k.pub('x')], add_recipients=[k.pub('x2')]),
                 dict(signer=k.pub('ed'), add_recipients=[k.pub('x2')])):
    with pytest.raises(errors.KeyRoleError):
      te.rewrap_package(signed_pkg, **{**base, **change})
  assert signed_pkg.read_bytes() == before
  with pytest.raises(errors.KeyRoleError, match='^--add-recipient '):
    te.rewrap_package(signed_pkg, add_recipients=[k.priv('x2')], **base)
  with pytest.raises(errors.KeyRoleError, match='^--recipient '):
    te.rotate_package(signed_pkg, tmp_path / 'r', recipients=[k.priv('x2')],
                      **base)
  assert not os.path.lexists(tmp_path / 'r')


def test_remove_recipient_takes_any_key_or_an_id(k, model, tmp_path):
  pkg = tmp_path / 'p'
  te.encrypt_model(model, pkg, recipients=[k.pub('x'), k.pub('x2'),
                                           k.pub('rsa')])
  key_id = local.LocalKey(k.pub('rsa')).key_id
  info = te.rewrap_package(pkg, identities=[k.priv('x')], allow_unsigned=True,
                           remove_recipients=[k.priv('x2'), key_id])
  assert [r['key_id'] for r in info.recipients] == [
      local.LocalKey(k.pub('x')).key_id]
  with pytest.raises(errors.UsageError, match=f'cannot remove {k.pub("x2")} '):
    te.rewrap_package(pkg, identities=[k.priv('x')], allow_unsigned=True,
                      remove_recipients=[k.pub('x2')])


# --- messages name keys as typed, next to their ids ---------------------------

def test_no_matching_identity_names_the_typed_paths(k, signed_pkg, tmp_path):
  key_id = local.LocalKey(k.pub('x2')).key_id
  with pytest.raises(errors.NoMatchingKeyError) as e:
    te.decrypt_model(signed_pkg, tmp_path / 'o', identities=[k.priv('x2')],
                     trusted=[k.pub('ed')])
  assert f'none of the identities ({k.priv("x2")} ({key_id}))' in str(e.value)


def test_untrusted_signer_lists_the_trusted_keys_as_typed(k, signed_pkg):
  evil_id = local.LocalKey(k.pub('evil')).key_id
  ec_id = local.LocalKey(k.pub('ec')).key_id
  with pytest.raises(errors.UntrustedSignerError) as e:
    te.verify_package(signed_pkg, trusted=[k.pub('evil'), k.pub('ec')])
  assert (f'not among the trusted keys ({k.pub("evil")} ({evil_id}), '
          f'{k.pub("ec")} ({ec_id}))') in str(e.value)


# --- passphrase-protected keys ------------------------------------------------------

@pytest.fixture(scope='module')
def enc(tmp_path_factory, model):
  """An encrypted X25519 key pair (passphrase 'pa55 phrase') and a package."""
  d = tmp_path_factory.mktemp('enc')
  priv, pub = local.keygen('x25519', str(d / 'enc'),
                           passphrase=b'pa55 phrase')
  pkg = d / 'p.tfxe'
  te.encrypt_model(model, pkg, recipients=[pub], bundle=True)
  return priv, pub, pkg


def test_keygen_writes_encrypted_pkcs8(enc):
  priv, pub, _ = enc
  with open(priv, 'rb') as f:
    data = f.read()
  assert data.startswith(b'-----BEGIN ENCRYPTED PRIVATE KEY-----')
  assert oct(os.stat(priv).st_mode & 0o777) == '0o600'
  assert keys.resolve(pub, 'recipient')  # the public half is plain


def test_passphrase_callable_is_asked_after_the_output_check(tmp_path):
  asked = []
  local.keygen('x25519', str(tmp_path / 'a'))
  with pytest.raises(errors.OutputExistsError):
    local.keygen('x25519', str(tmp_path / 'a'),
                 passphrase=lambda: asked.append(1) or b'x')
  assert not asked
  with pytest.raises(errors.UsageError, match='empty'):
    local.keygen('x25519', str(tmp_path / 'b'), passphrase=b'')


def test_encrypted_key_without_passphrase_is_one_line_error(enc, monkeypatch):
  monkeypatch.setattr(sys, 'stdin', io.StringIO(''))
  with pytest.raises(errors.InvalidKeyUriError) as e:
    keys.resolve(enc[0], 'identity')
  msg = str(e.value)
  assert 'is encrypted and no passphrase is available' in msg
  assert all(name in msg for name in (local.PASSPHRASE_ENV,
                                      local.PASSPHRASE_FILE_ENV))
  assert e.value.exit_code == 2 and '\n' not in msg


def test_passphrase_from_env_indirection_and_file(enc, tmp_path, monkeypatch):
  priv, _, pkg = enc
  monkeypatch.setenv(local.PASSPHRASE_ENV, 'pa55 phrase')
  te.decrypt_model(pkg, tmp_path / 'o1', identities=[priv],
                   allow_unsigned=True)
  monkeypatch.delenv(local.PASSPHRASE_ENV)
  monkeypatch.setenv(local.PASSPHRASE_ENV_ENV, 'MY_SECRET_STORE_VAR')
  monkeypatch.setenv('MY_SECRET_STORE_VAR', 'pa55 phrase')
  assert keys.resolve(priv, 'identity').is_private
  monkeypatch.delenv(local.PASSPHRASE_ENV_ENV)
  pw = tmp_path / 'pw'
  pw.write_bytes(b'pa55 phrase\r\nsecond line ignored\n')
  monkeypatch.setenv(local.PASSPHRASE_FILE_ENV, str(pw))
  te.decrypt_model(pkg, tmp_path / 'o2', identities=[priv],
                   allow_unsigned=True)
  assert _util.read_tree(tmp_path / 'o1') == _util.read_tree(tmp_path / 'o2')


def test_wrong_passphrase_names_its_source_not_its_value(enc, monkeypatch):
  monkeypatch.setenv(local.PASSPHRASE_ENV, 'not-the-Passphrase')
  with pytest.raises(errors.InvalidKeyUriError) as e:
    keys.resolve(enc[0], 'identity')
  msg = str(e.value)
  assert 'wrong passphrase' in msg and local.PASSPHRASE_ENV in msg
  assert 'not-the-Passphrase' not in msg


def test_passphrase_file_problems(enc, tmp_path, monkeypatch):
  monkeypatch.setenv(local.PASSPHRASE_FILE_ENV, str(tmp_path / 'missing'))
  with pytest.raises(errors.UsageError, match='does not exist'):
    keys.resolve(enc[0], 'identity')
  (tmp_path / 'empty').write_text('\n')
  monkeypatch.setenv(local.PASSPHRASE_FILE_ENV, str(tmp_path / 'empty'))
  with pytest.raises(errors.UsageError, match='is empty'):
    keys.resolve(enc[0], 'identity')


def test_plain_key_ignores_a_set_passphrase(k, monkeypatch):
  monkeypatch.setenv(local.PASSPHRASE_ENV, 'irrelevant')
  assert keys.resolve(k.priv('x'), 'identity').is_private


class _FakeTty(io.StringIO):

  def isatty(self):
    return True


def test_prompt_hook_is_used_only_on_a_terminal(enc, monkeypatch):
  asked = []

  def hook(text):
    asked.append(text)
    return 'pa55 phrase'

  local.set_passphrase_prompt(hook)
  monkeypatch.setattr(sys, 'stdin', _FakeTty())
  monkeypatch.setattr(sys, 'stderr', _FakeTty())
  assert keys.resolve(enc[0], 'identity').is_private
  assert asked == [f"Passphrase for '{enc[0]}': "]
  monkeypatch.setattr(sys, 'stderr', io.StringIO())  # not a terminal
  with pytest.raises(errors.InvalidKeyUriError, match='no passphrase'):
    keys.resolve(enc[0], 'identity')
  assert len(asked) == 1
  local.set_passphrase_prompt(lambda text: 'wrong')
  monkeypatch.setattr(sys, 'stderr', _FakeTty())
  with pytest.raises(errors.InvalidKeyUriError,
                     match='passphrase from the prompt: wrong passphrase'):
    keys.resolve(enc[0], 'identity')


# --- keys from standard input -----------------------------------------------------------

class _Stdin(io.TextIOWrapper):
  """A piped stdin that counts how often it is read."""

  def __init__(self, data: bytes):
    self.raw_reads = 0
    buf = io.BytesIO(data)
    outer = self

    class Counting(io.BufferedReader):

      def read(self, *a):
        outer.raw_reads += 1
        return super().read(*a)

    super().__init__(Counting(buf))


def test_identity_from_stdin_is_read_once(k, signed_pkg, tmp_path, monkeypatch):
  with open(k.priv('x'), 'rb') as f:
    stdin = _Stdin(f.read())
  monkeypatch.setattr(sys, 'stdin', stdin)
  key = keys.resolve('-', 'identity')
  assert key.display == '- (stdin)'
  assert key.describe() == f'- (stdin, {key.key_id})'
  assert key.key_id == local.LocalKey(k.pub('x')).key_id
  for n in range(2):
    te.decrypt_model(signed_pkg, tmp_path / f'o{n}', identities=['-'],
                     trusted=[k.pub('ed')])
  assert stdin.raw_reads == 1


def test_stdin_only_for_identities(k, monkeypatch):
  monkeypatch.setattr(sys, 'stdin', _Stdin(b'unused'))
  for role in ('recipient', 'trust', 'signer', None):
    with pytest.raises(errors.KeyRoleError, match='only an identity'):
      keys.resolve('-', role)
  assert sys.stdin.raw_reads == 0


def test_stdin_refusals(k, monkeypatch):
  monkeypatch.setattr(sys, 'stdin', _FakeTty())
  with pytest.raises(errors.UsageError, match='is a terminal; pipe the key'):
    keys.resolve('-', 'identity')
  monkeypatch.setattr(sys, 'stdin', _Stdin(b''))
  with pytest.raises(errors.InvalidKeyUriError, match='is empty'):
    keys.resolve('-', 'identity')
  with open(k.pub('x'), 'rb') as f:
    monkeypatch.setattr(sys, 'stdin', _Stdin(f.read()))
  with pytest.raises(errors.KeyRoleError, match='not a PEM private key'):
    keys.resolve('-', 'identity')
  with open(k.priv('ed'), 'rb') as f:
    monkeypatch.setattr(sys, 'stdin', _Stdin(f.read()))
  with pytest.raises(errors.KeyRoleError,
                     match=r'^--identity - \(stdin\) is an Ed25519 private'):
    keys.resolve('-', 'identity')


def test_encrypted_identity_on_stdin(enc, tmp_path, monkeypatch):
  priv, _, pkg = enc
  with open(priv, 'rb') as f:
    monkeypatch.setattr(sys, 'stdin', _Stdin(f.read()))
  with pytest.raises(errors.InvalidKeyUriError, match=r'- \(stdin\) is '
                     'encrypted and no passphrase'):
    keys.resolve('-', 'identity')
  monkeypatch.setenv(local.PASSPHRASE_ENV, 'pa55 phrase')
  # The bytes read the first time are kept: stdin is not read again.
  te.decrypt_model(pkg, tmp_path / 'o', identities=['-'], allow_unsigned=True)
  assert sys.stdin.raw_reads == 1
