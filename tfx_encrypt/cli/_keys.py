"""`keygen` and `pubkey`: local key pairs and exported public keys."""

from typing import Optional

import click

from tfx_encrypt import _text
from tfx_encrypt import audit as audit_lib
from tfx_encrypt import errors
from tfx_encrypt.keys import local as local_keys
from tfx_encrypt.cli._options import _can_prompt, _force_option
from tfx_encrypt.cli._group import main


def _new_key_passphrase(passphrase_file: Optional[str]) -> bytes:
  """The passphrase of a new key: the file, the environment, or asked twice.

  Called by local_keys.keygen only after it checked that the outputs can be
  written, so nobody types a passphrase twice to learn the prefix is taken.
  """
  if passphrase_file:
    return local_keys.read_passphrase_file(passphrase_file,
                                           '--passphrase-file')
  found = local_keys.passphrase_from_environment()
  if found is not None:
    return found[0]
  if not _can_prompt():
    raise errors.UsageError(
        'keygen --passphrase needs a passphrase and there is no terminal to '
        'ask on: pass --passphrase-file FILE (its first line), or set '
        f'{local_keys.PASSPHRASE_ENV}')
  value = click.prompt('Passphrase for the new private key', hide_input=True,
                       confirmation_prompt=True, err=True)
  return value.encode('utf-8')


@main.command()
@click.argument('kind', type=click.Choice(local_keys.KEY_KINDS))
@click.argument('out_prefix')
@_force_option(help_text='Overwrite existing key files.')
@click.option('--passphrase', 'protect', is_flag=True,
              help='Encrypt the private key with a passphrase: asked twice on '
              'a terminal, or from --passphrase-file, $TFXE_KEY_PASSPHRASE or '
              '$TFXE_KEY_PASSPHRASE_FILE.')
@click.option('--passphrase-file', type=click.Path(dir_okay=False),
              metavar='FILE',
              help='Read the passphrase from the first line of FILE '
              '(implies --passphrase).')
def keygen(kind, out_prefix, force, protect, passphrase_file):
  """Write OUT_PREFIX.key.pem (mode 0600) and OUT_PREFIX.pub.pem."""
  passphrase = None
  if protect or passphrase_file:
    passphrase = lambda: _new_key_passphrase(passphrase_file)  # pylint: disable=unnecessary-lambda-assignment
  priv, pub = local_keys.keygen(kind, out_prefix, force=force,
                                passphrase=passphrase)
  key_id = local_keys.LocalKey(pub).key_id
  audit_lib.note(key_id=key_id, key_kind=kind)
  how = ', passphrase-protected' if passphrase else ''
  click.echo(f'wrote {priv} (private, 0600{how}) and {pub} (public); '
             f'key id {key_id}')


@main.command()
@click.argument('key')
def pubkey(key):
  """Print the public key of KEY as PEM on stdout, its key id on stderr.

  KEY is a local key file (private or public) or the URI of a KMS signing
  key (aws-kms://, gcp-kms://.../cryptoKeyVersions/N, hcvault://,
  azure-kv://), whose public key is fetched from the service, or a pkcs11:
  key pair in a token (HSM, TPM; read from its public key object): e.g.
  `tfx-encrypt pubkey aws-kms://arn:... > release.pub.pem` gives consumers
  a --trust key with the same key id as the KMS key.
  """
  from tfx_encrypt import keys as keys_lib  # pylint: disable=g-import-not-at-top
  backend = keys_lib.resolve(key)
  pem = backend.public_key_pem()
  key_id = backend.signer_id
  audit_lib.note(key_id=key_id)
  click.echo(pem.decode('ascii'), nl=False)
  click.echo(f'key id {_text.printable(key_id)}', err=True)
