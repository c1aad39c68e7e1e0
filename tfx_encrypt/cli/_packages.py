"""The package verbs: encrypt, decrypt, inspect, verify, rewrap, rotate,
clean."""

import os

import click

from tfx_encrypt import _fsutil
from tfx_encrypt import _text
from tfx_encrypt import audit as audit_lib
from tfx_encrypt import errors
from tfx_encrypt import package as pkg
from tfx_encrypt import storage
from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.cli._options import (
    _api_warnings, _audit_input, _audit_location, _cipher_option, _force_option,
    _identity_option, _json, _key_groups, _parse_context, _policy_options,
    _progress, _require_trust, _show, _summary, _trust_options)
from tfx_encrypt.cli._group import main
from tfx_encrypt.cli._lineage import (
    _mlmd_options, _record_rotation, _rotation_lineage)


@main.command()
@click.argument('src_dir', type=click.Path(file_okay=False))
@click.argument('package')
@click.option('--recipient', '-r', 'recipients', multiple=True,
              metavar='KEY_URI',
              help='Who can decrypt, any one alone (repeatable).')
@click.option('--key-group', 'key_groups', multiple=True,
              metavar='KEY_URI[,KEY_URI...]',
              help='A key group (repeatable; groups are numbered 0, 1, ... in '
              'order). Instead of --recipient: recipients from --threshold '
              'distinct groups are needed to decrypt.')
@click.option('--threshold', type=int, metavar='K',
              help='With --key-group: how many groups must take part.')
@click.option('--sign-with', metavar='KEY_URI',
              help='Ed25519/ECDSA P-256 private key to sign the header.')
@click.option('--context', 'context', multiple=True, metavar='K=V',
              help='Encryption context entry bound to the package.')
@_cipher_option(default='aes-256-gcm', show_default=True)
@click.option('--hash', 'hash_alg',
              type=click.Choice(sorted(digest_lib.HASHES)),
              default='blake3', show_default=True,
              help='Digest of every file and payload (the fingerprint '
              'root is SHA-256 either way); sha256 for FIPS-bound users.')
@click.option('--bundle', is_flag=True, help='Write a single .tfxe file.')
@_force_option('PACKAGE')
@click.option('--fsync', is_flag=True, help='fsync before publishing.')
@click.option('--any-dir', is_flag=True,
              help='Encrypt SRC_DIR even if it holds no model file '
              '(saved_model.pb, *.keras, *.tflite, *.h5, ...).')
def encrypt(src_dir, package, recipients, key_groups, threshold, sign_with,
            context, cipher, hash_alg, bundle, force, fsync, any_dir):
  """Encrypt SRC_DIR (a SavedModel) into PACKAGE.

  Either may be a `s3://` or `gs://` URI: the model is streamed from the
  store (no plaintext on local disk), the package written there
  create-only, header last (docs/OBJECT_STORES.md).
  """
  audit_lib.note(package=_audit_location(package))
  ctx = _parse_context(context)
  groups, k = _key_groups(key_groups, threshold)
  if groups and recipients:
    raise errors.UsageError(
        'pass either --recipient (any one decrypts) or --key-group with '
        '--threshold (k of n groups decrypt), not both')
  if not groups and not recipients:
    raise errors.UsageError(
        'say who can decrypt: --recipient KEY_URI, or --key-group URI[,URI] '
        '(at least two) with --threshold K')
  if storage.is_remote(src_dir):
    total = sum(storage.list_sizes(src_dir).values())
  else:
    total = _fsutil.tree_size(src_dir)
  with _progress('encrypting', total) as progress:
    info = pkg.encrypt_model(src_dir, package, recipients=list(recipients),
                             key_groups=groups, threshold=k,
                             signer=sign_with, context=ctx, cipher=cipher,
                             hash_alg=hash_alg, bundle=bundle, force=force,
                             progress=progress, fsync=fsync, any_dir=any_dir)
  audit_lib.record(info)
  click.echo(f'encrypted {_summary(info)}')


@main.command()
@click.argument('package')
@click.argument('out_dir')
@_identity_option
@_trust_options()
@_force_option('OUT_DIR')
@click.option('--fsync', is_flag=True, help='fsync before publishing.')
@_policy_options
def decrypt(package, out_dir, identities, trusted, allow_unsigned, force,
            fsync, policy):
  """Verify and decrypt PACKAGE into OUT_DIR."""
  _audit_input(package)
  _require_trust(trusted, allow_unsigned)
  total = pkg.inspect_package(package).ciphertext_bytes
  with _progress('decrypting', total) as progress:
    info = pkg.decrypt_model(package, out_dir, identities=list(identities),
                             trusted=list(trusted),
                             allow_unsigned=allow_unsigned, force=force,
                             progress=progress, fsync=fsync, policy=policy)
  audit_lib.record(info)
  who = (f'signed by trusted {_show(info.signer)}' if info.signature_verified
         else 'UNSIGNED (accepted by --allow-unsigned)')
  click.echo(f'decrypted {info.file_count} files into {_show(out_dir)}; {who}; '
             f'fingerprint {_show(info.fingerprint)}')


@main.command()
@click.argument('package')
@click.option('--json', 'as_json', is_flag=True, help='Machine-readable output.')
def inspect(package, as_json):
  """Show what PACKAGE says about itself (no key needed, signer NOT verified)."""
  audit_lib.note(package=_audit_location(package))
  info = pkg.inspect_package(package)
  audit_lib.record(info)
  if as_json:
    click.echo(_json(info.to_dict(), indent=2))
    return
  # Every string below but the numbers comes from the (unverified) header:
  # each goes through _show.
  click.echo(f'package:     {_show(info.path)} '
             f'({"bundle" if info.bundle else "directory"})')
  click.echo(f'format:      tfx-encrypt/{info.format_version}, '
             f'{_show(info.suite)}, hash {_show(info.hash_alg)}')
  click.echo(f'package id:  {_show(info.package_id)}')
  click.echo(f'created:     {_show(info.created)}')
  click.echo(f'files:       {info.file_count} ({info.ciphertext_bytes} bytes '
             'encrypted)')
  click.echo(f'fingerprint: {_show(info.fingerprint)}')
  click.echo(f'ciphertext:  {_show(info.payload_digest)}')
  click.echo(f'signer:      {_show(info.signer or "unsigned")}'
             + (f' ({_show(info.signature_alg)}, not verified)'
                if info.signer else ''))
  if info.threshold:
    groups = info.threshold['groups']
    click.echo(f'threshold:   {info.threshold["k"]} of {len(groups)} key '
               'groups needed to decrypt')
    types = {r['key_id']: r['type'] for r in info.recipients}
    click.echo('key groups:')
    for gi, g in enumerate(groups):
      click.echo(f'  group {gi}:')
      for key_id in g:
        click.echo(f'    - {_show(types.get(key_id, "?"))}: {_show(key_id)}')
  else:
    click.echo('threshold:   none (any one recipient decrypts)')
    click.echo('recipients:')
    for r in info.recipients:
      click.echo(f'  - {_show(r["type"])}: {_show(r["key_id"])}')
  click.echo('context:')
  for k, v in sorted(info.context.items()):
    click.echo(f'  {_show(k)} = {_show(v)}')


@main.command()
@click.argument('package')
@_trust_options()
@_policy_options
def verify(package, trusted, allow_unsigned, policy):
  """Check the signature and every ciphertext digest, without any key."""
  _audit_input(package)
  info = pkg.verify_package(package, trusted=list(trusted),
                            allow_unsigned=allow_unsigned, policy=policy)
  audit_lib.record(info)
  who = (f'signed by trusted {_show(info.signer)}' if info.signature_verified
         else 'UNSIGNED')
  click.echo(f'OK: {info.file_count} payloads match their digests; {who}')


@main.command()
@click.argument('package')
@_identity_option
@click.option('--add-recipient', 'adds', multiple=True, metavar='KEY_URI')
@click.option('--remove-recipient', 'removes', multiple=True,
              metavar='KEY_URI_OR_ID')
@click.option('--add-to-group', type=int, metavar='N',
              help='Key group (0, 1, ...) the added recipients join; '
              'required for a package with key groups.')
@click.option('--sign-with', metavar='KEY_URI',
              help='Re-sign the new header (required if PACKAGE is signed).')
@_trust_options(
    trust_help='Public key of a trusted publisher (repeatable); the current '
    'signature is verified before any key is used.',
    allow_unsigned_help='Accept an unsigned PACKAGE (a signed one must still '
    'be signed by a --trust key).')
@click.option('--resign-unsigned', is_flag=True,
              help='With --allow-unsigned and --sign-with: sign an UNSIGNED '
              'package, vouching for it yourself.')
@_mlmd_options
def rewrap(package, identities, adds, removes, add_to_group, sign_with,
           trusted, allow_unsigned, resign_unsigned, mlmd):
  """Change PACKAGE's recipients without re-encrypting the payload."""
  _audit_input(package, as_source=True)
  _require_trust(trusted, allow_unsigned)
  if not adds and not removes:
    raise errors.UsageError('nothing to do: pass --add-recipient and/or '
                            '--remove-recipient')
  recorder = _rotation_lineage(mlmd, package)
  with _api_warnings():
    info = pkg.rewrap_package(package, identities=list(identities),
                              add_recipients=list(adds),
                              remove_recipients=list(removes),
                              add_to_group=add_to_group, signer=sign_with,
                              trusted=list(trusted),
                              allow_unsigned=allow_unsigned,
                              resign_unsigned=resign_unsigned)
  audit_lib.record(info)
  click.echo(f'rewrapped {_summary(info)}')
  _record_rotation(recorder, 'rewrap', info, package)


@main.command()
@click.argument('package')
@click.argument('out')
@_identity_option
@click.option('--recipient', '-r', 'recipients', multiple=True,
              metavar='KEY_URI')
@click.option('--key-group', 'key_groups', multiple=True,
              metavar='KEY_URI[,KEY_URI...]',
              help='As for encrypt: new key groups instead of --recipient.')
@click.option('--threshold', type=int, metavar='K')
@_trust_options()
@click.option('--sign-with', metavar='KEY_URI')
@click.option('--resign-unsigned', is_flag=True,
              help='With --allow-unsigned and --sign-with: sign the output of '
              'an UNSIGNED package, vouching for it yourself.')
@_cipher_option()
@click.option('--bundle/--directory', 'bundle', default=None,
              help='Output form (default: same as PACKAGE).')
@_force_option('OUT')
@_policy_options
@_mlmd_options
def rotate(package, out, identities, recipients, key_groups, threshold,
           trusted, allow_unsigned, sign_with, resign_unsigned, cipher, bundle,
           force, policy, mlmd):
  """Re-encrypt PACKAGE under a fresh data key into OUT (no plaintext on disk)."""
  _audit_input(package, as_source=True)
  _require_trust(trusted, allow_unsigned)
  groups, k = _key_groups(key_groups, threshold)
  if bool(groups) == bool(recipients):
    raise errors.UsageError(
        'say who can decrypt the new package: --recipient KEY_URI, or '
        '--key-group URI[,URI] (at least two) with --threshold K, not both')
  total = pkg.inspect_package(package).ciphertext_bytes
  recorder = _rotation_lineage(mlmd, package)
  with _progress('rotating', total) as p, _api_warnings():
    info = pkg.rotate_package(package, out, identities=list(identities),
                              recipients=list(recipients),
                              key_groups=groups, threshold=k,
                              trusted=list(trusted),
                              allow_unsigned=allow_unsigned, signer=sign_with,
                              resign_unsigned=resign_unsigned,
                              cipher=cipher, bundle=bundle, force=force,
                              progress=p, policy=policy)
  audit_lib.record(info)
  click.echo(f'rotated into {_summary(info)}')
  _record_rotation(recorder, 'rotate', info, out)


@main.command()
@click.argument('directory')
@click.option('--older-than', 'older_than', type=click.IntRange(min=0),
              default=3600, show_default=True, metavar='SECONDS',
              help='s3:// and gs:// only: remove an incomplete version only '
              'if none of its objects was written in the last SECONDS (a '
              'store has no lock to tell a running push from a dead one).')
def clean(directory, older_than):
  """Remove stale temporary files of interrupted tfx-encrypt commands.

  Only hidden `.NAME.tfxe-KIND-TOKEN` siblings whose owning command is gone
  (its lock is free) are removed; those of running commands, and anything
  else, are left alone. Commands that write into a directory do this too.

  DIRECTORY may be a `s3://` or `gs://` push base (or package URI): then
  the incomplete versions that SIGKILLed pushes or encrypts left (payload
  objects without a header, under an integer version name), and the
  `.NAME.tfxe-beam-TOKEN/` prefixes of SIGKILLed BeamEncryptPusher runs
  (holding their marker and nothing but what such a run writes), and the
  `.NAME.tfxe-bundle-TOKEN` headers of bundle uploads to gs:// killed
  before their compose, are removed, and nothing else
  (docs/OBJECT_STORES.md). A running Beam run rewrites its marker every
  600 s: with --older-than below 1200 a live run's staging can look dead;
  use a small value only for a run you know was killed.
  """
  if storage.is_remote(directory):
    from tfx_encrypt.package import layout  # pylint: disable=g-import-not-at-top
    found = layout.clean_remote(directory, older_than_s=older_than)
    for f in found:
      what, short, who = {
          'beam-staging': (f"a Beam run's temporary objects: {f.objects} "
                           'objects', 'a Beam run', 'the run'),
          'bundle-header': ("a bundle upload's temporary header",
                            "a bundle upload's header", 'the upload'),
      }.get(f.kind, (f'incomplete: {f.objects} payload objects, no header',
                     'incomplete', 'a push'))
      if f.removed:
        click.echo(f'removed {_text.printable(f.uri)} ({what})')
      else:
        click.echo(f'left {_text.printable(f.uri)}: {short}, but written '
                   f'{int(f.age_s)} s ago (--older-than {older_than}); '
                   f'{who} may still be running')
    if not any(f.removed for f in found):
      click.echo(f'nothing to clean in {_text.printable(directory)}')
    return
  if not os.path.isdir(directory):
    raise errors.UsageError(f'{_text.printable(directory)} is not a '
                            'directory')
  removed = _fsutil.sweep(directory)
  for name in removed:
    click.echo(f'removed {_text.printable(os.path.join(directory, name))}')
  if not removed:
    click.echo(f'nothing to clean in {_text.printable(directory)}')
