"""`push` and `pull`: OCI registries (oras, imported lazily)."""

import functools
import os
import sys

import click

from tfx_encrypt import audit as audit_lib
from tfx_encrypt import errors
from tfx_encrypt.cli._options import (
    _audit_input, _force_option, _policy_options, _require_trust, _show,
    _trust_options)
from tfx_encrypt.cli._group import main


def _audit_ref(ref: str) -> None:
  """Record a registry reference as parsed (no user info can be in it)."""
  if audit_lib.current() is None:
    return
  try:
    audit_lib.note(ref=str(_import_oci().parse_reference(ref)))
  except errors.TfxEncryptError:
    pass  # push/pull report it


def _import_oci():
  """tfx_encrypt.distribution.oci (oras itself is imported only when used)."""
  from tfx_encrypt.distribution import oci  # pylint: disable=g-import-not-at-top
  return oci


#: Where `--username` finds its password when not on stdin.
REGISTRY_PASSWORD_ENV = 'TFXE_REGISTRY_PASSWORD'


def _registry_password(password_stdin: bool) -> str:
  """The registry password: stdin, the environment, or a hidden prompt."""
  if password_stdin:
    password = sys.stdin.readline().rstrip('\r\n')
    if not password:
      raise errors.UsageError('--password-stdin: standard input is empty')
    return password
  password = os.environ.get(REGISTRY_PASSWORD_ENV)
  if password:
    return password
  if sys.stdin.isatty() and sys.stderr.isatty():
    return click.prompt('Registry password', hide_input=True, err=True)
  raise errors.UsageError(
      f'--username needs a password: pipe it with --password-stdin or set '
      f'{REGISTRY_PASSWORD_ENV} (never on the command line)')


def _registry_options(f):
  """Registry credentials and TLS (oras / docker names); gets `registry_auth`.

  Used by push and pull. Without --username, credentials come from the
  docker config (docs/DISTRIBUTION.md).
  """

  @functools.wraps(f)
  def command(*args, username, password_stdin, password_argv, ca_file,
              cert_file, key_file, **kwargs):
    if password_argv is not None:
      raise errors.UsageError(
          'a password on the command line is visible to every user (ps, '
          'shell history): pass --password-stdin or set '
          f'{REGISTRY_PASSWORD_ENV}')
    if password_stdin and username is None:
      raise errors.UsageError('--password-stdin needs --username')
    password = None if username is None else _registry_password(
        password_stdin)
    auth = _import_oci().RegistryAuth(
        username=username, password=password, ca_file=ca_file,
        cert_file=cert_file, key_file=key_file)
    return f(*args, registry_auth=auth, **kwargs)

  options = (
      click.option('--username', '-u', metavar='USER',
                   help='Registry user name (HTTP basic auth); the password '
                   f'comes from --password-stdin or ${REGISTRY_PASSWORD_ENV}. '
                   'Default: the docker config\'s credentials.'),
      click.option('--password-stdin', is_flag=True,
                   help='Read the registry password from standard input.'),
      click.option('--password', '-p', 'password_argv', hidden=True),
      click.option('--ca-file', '--ca-cert', 'ca_file', metavar='PEM',
                   help='CA certificate(s) that issued the registry\'s TLS '
                   'certificate (instead of the system CAs).'),
      click.option('--cert-file', '--cert', 'cert_file', metavar='PEM',
                   help='TLS client certificate (mutual TLS), with '
                   '--key-file.'),
      click.option('--key-file', '--key', 'key_file', metavar='PEM',
                   help='Private key of --cert-file (unencrypted PEM).'),
  )
  for option in reversed(options):
    command = option(command)
  return command


@main.command()
@click.argument('package')
@click.argument('ref')
@click.option('--insecure', is_flag=True,
              help='Plain HTTP, for a loopback registry only (tests).')
@_registry_options
def push(package, ref, insecure, registry_auth):
  """Push PACKAGE to an OCI registry as REF (REGISTRY/REPOSITORY:TAG).

  One layer: the package's bundle bytes. PACKAGE may be a gs:// or s3://
  URI (streamed from the store, each payload's digest checked). Credentials come from --username
  (with --password-stdin), else the docker config (~/.docker/config.json,
  $DOCKER_CONFIG, credential helpers); --cert-file/--key-file for mutual TLS.
  """
  _audit_input(package)
  _audit_ref(ref)
  digest = _import_oci().push_package(package, ref, insecure=insecure,
                                      auth=registry_auth)
  audit_lib.note(manifest_digest=digest)
  click.echo(f'pushed {package} to {ref}; manifest digest {digest}')


@main.command()
@click.argument('ref')
@click.argument('out')
@_trust_options()
@click.option('--insecure', is_flag=True,
              help='Plain HTTP, for a loopback registry only (tests).')
@_force_option('OUT')
@_policy_options
@_registry_options
def pull(ref, out, trusted, allow_unsigned, insecure, force, policy,
         registry_auth):
  """Pull REF into the bundle file OUT, verified before it appears.

  Checks the manifest's shape and the layer's digest, then the signature
  and every ciphertext digest (no key needed); on any failure nothing is
  written at OUT. OUT may be a gs:// or s3:// URI (a directory package
  there, or one bundle object if it ends in .tfxe; header last,
  create-only, never replacing anything).
  """
  _audit_ref(ref)
  _require_trust(trusted, allow_unsigned)
  res = _import_oci().pull_package(ref, out, trusted=list(trusted),
                                   allow_unsigned=allow_unsigned,
                                   insecure=insecure, force=force,
                                   policy=policy, auth=registry_auth)
  info = res.info
  audit_lib.record(info)
  audit_lib.note(manifest_digest=res.manifest_digest)
  who = (f'signed by trusted {_show(info.signer)}' if info.signature_verified
         else 'UNSIGNED (accepted by --allow-unsigned)')
  click.echo(f'pulled {_show(ref)} ({_show(res.manifest_digest)}) into '
             f'{_show(out)}: {info.file_count} payloads verified; {who}; '
             f'fingerprint {_show(info.fingerprint)}')
