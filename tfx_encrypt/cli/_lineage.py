"""`lineage`: which model, which run, which keys, pushed where (MLMD)."""

import functools
import os
import sys
from typing import Optional, Sequence

import click

from tfx_encrypt import _fsutil as fsutil
from tfx_encrypt import errors
from tfx_encrypt import package as pkg
from tfx_encrypt import storage
from tfx_encrypt.cli._options import _json, _native_stderr_quiet, _show
from tfx_encrypt.cli._group import main


def _mlmd_options(f):
  """The ML Metadata connection options, defined once (lineage, rewrap,
  rotate); the command gets `mlmd`: a dict for lineage.connect, or None.

  The MySQL password is never an argument: TFXE_MLMD_PASSWORD or one line
  on stdin (--mlmd-password-stdin).
  """

  @functools.wraps(f)
  def command(*args, mlmd_sqlite, mlmd_mysql, mlmd_user, mlmd_password_stdin,
              mlmd_config, mlmd_grpc, **kwargs):
    mlmd = None
    if mlmd_sqlite or mlmd_mysql or mlmd_config or mlmd_grpc or mlmd_user:
      password = os.environ.get('TFXE_MLMD_PASSWORD') or None
      if mlmd_password_stdin:
        password = sys.stdin.readline().rstrip('\r\n') or None
      mlmd = dict(sqlite=mlmd_sqlite, mysql=mlmd_mysql, user=mlmd_user,
                  password=password, config_file=mlmd_config, grpc=mlmd_grpc)
    elif mlmd_password_stdin:
      raise errors.UsageError('--mlmd-password-stdin goes with --mlmd-mysql '
                              'or --mlmd-config')
    return f(*args, mlmd=mlmd, **kwargs)

  for option in reversed((
      click.option('--mlmd-sqlite', metavar='PATH',
                   help='SQLite ML Metadata store of the pipeline (never '
                   'created).'),
      click.option('--mlmd-mysql', metavar='HOST:PORT/DB',
                   help='MySQL / MariaDB ML Metadata store (Kubeflow), with '
                   '--mlmd-user; password from TFXE_MLMD_PASSWORD or '
                   '--mlmd-password-stdin.'),
      click.option('--mlmd-user', metavar='NAME', help='MySQL user.'),
      click.option('--mlmd-password-stdin', is_flag=True,
                   help='Read the MySQL password from the first line of '
                   'stdin.'),
      click.option('--mlmd-config', metavar='FILE',
                   help="ml_metadata ConnectionConfig (or "
                   "MetadataStoreClientConfig) text proto."),
      click.option('--mlmd-grpc', metavar='HOST:PORT',
                   help='A metadata gRPC service (metadata_store_server).'))):
    command = option(command)
  return command


def _rotation_lineage(mlmd, package):
  """With --mlmd-*: (lineage module, writable store, old PackageInfo, the
  recorded EncryptedModel), checked before the package is touched."""
  if mlmd is None:
    return None
  lineage_lib = _import_lineage()
  store = _connect_mlmd(lineage_lib, mlmd, read_only=False)
  old_info = pkg.inspect_package(package)
  old = lineage_lib.find_recorded(store, package, old_info.package_id)
  return lineage_lib, store, old_info, old


def _record_rotation(recorder, operation, info, new_path):
  if recorder is None:
    return
  lineage_lib, store, old_info, old = recorder
  try:
    done = lineage_lib.record_rotation(store, old, operation=operation,
                                       old_info=old_info, new_info=info,
                                       new_path=new_path)
  except lineage_lib.LineageError as e:
    raise lineage_lib.LineageError(
        f'{operation} done ({new_path}), but not recorded: {e}') from e
  what = (f'supersedes EncryptedModel {done["superseded_id"]}'
          if done['superseded_id'] is not None
          else f'from EncryptedModel {old.id}')
  click.echo(f'recorded in ML Metadata: {lineage_lib.KEY_ROTATION_TYPE} '
             f'execution {done["execution_id"]}, EncryptedModel '
             f'{done["artifact_id"]} ({what})')


def _import_lineage():
  """tfx_encrypt.lineage, or a UsageError when ML Metadata is missing."""
  try:
    from tfx_encrypt import lineage  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if (e.name or '').split('.')[0] not in ('ml_metadata', 'google'):
      raise
    raise errors.UsageError(
        'tfx-encrypt lineage needs ML Metadata, which is not installed: '
        "pip install 'tfx-encrypt[tfx]'") from e
  return lineage


def _connect_mlmd(lineage_lib, mlmd, read_only=True):
  with _native_stderr_quiet():
    return lineage_lib.connect(read_only=read_only, **(mlmd or {}))


_FORMATS = ('table', 'json', 'dot', 'svg', 'png')
_PICTURES = ('dot', 'svg', 'png')
# What a picture file written by `lineage` starts with: only such a file is
# replaced by --output ... --force.
_PICTURE_MAGIC = (b'\x89PNG\r\n\x1a\n', b'<?xml', b'<svg',
                  b'digraph tfx_encrypt_lineage')


def _output_format(fmt: Optional[str], as_json: bool,
                   output: Optional[str]) -> str:
  if as_json:
    if fmt not in (None, 'json'):
      raise errors.UsageError(f'--json and --format {fmt} do not go together')
    fmt = 'json'
  fmt = fmt or 'table'
  if fmt == 'png' and output is None:
    raise errors.UsageError('--format png needs --output FILE')
  if fmt == 'table' and output is not None:
    raise errors.UsageError('--output goes with --format json, dot, svg or '
                            'png')
  return fmt


def _package_id(package: str) -> str:
  """The package id in PKG's header: a local path, or an s3:// / gs://
  package read through tfx_encrypt.storage (header only, no key)."""
  try:
    return pkg.inspect_package(package).package_id
  except errors.UnsupportedFormatError as e:
    if storage.is_remote(package) and 'incomplete' in str(e):
      # Payload objects but no header (a push still running, or one that
      # failed): no package id to look up.
      raise errors.UnsupportedFormatError(
          f'--package {e}; there is no package id to look up in ML '
          'Metadata') from e
    raise


def _check_picture_output(output: str, force: bool) -> None:
  if output == '-':
    return
  if os.path.islink(output) or (os.path.lexists(output) and
                                not os.path.isfile(output)):
    raise errors.UnsafeOverwriteError(
        f'refusing to write to {_show(output)}: not a regular file')
  if os.path.lexists(output):
    if not force:
      raise fsutil.exists_error(output)
    with open(output, 'rb') as f:
      head = f.read(64).lstrip()
    if not head.startswith(_PICTURE_MAGIC):
      raise errors.UnsafeOverwriteError(
          f'refusing to replace {_show(output)} with --force: it is not a '
          'lineage picture (dot, svg or png)')


def _write_output(data: bytes, output: Optional[str], force: bool) -> None:
  """stdout, or FILE published atomically (owned temporary sibling, then
  rename; never replaces unless --force and the file is a picture)."""
  if output is None or output == '-':
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return
  _check_picture_output(output, force)
  tmp = fsutil.temp_sibling(output)
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
      fsutil.write_all(fd, data)
      os.fsync(fd)
    finally:
      os.close(fd)
    if force and os.path.lexists(output):
      fsutil.replace_checked(tmp, output)
    else:
      fsutil.publish(tmp, output)
  except BaseException:
    fsutil.remove_tree(tmp)
    raise


def _lineage_row(t: dict) -> Sequence[str]:
  em, ex = t['encrypted_model'], t['execution'] or {}
  props = em['properties']
  pipeline = ex.get('pipeline_name') or em.get('pipeline_name') or '?'
  run = ex.get('pipeline_run_id') or em.get('pipeline_run_id') or '?'
  model = ', '.join(m['uri'] for m in t['models']) or (
      (props.get('encryption_context') or {}).get('tfx.model_uri', '?'))
  pushed = (t['pushed_model'] if not t.get('rotated_from') else None) or props
  if pushed.get('pushed'):
    where = (f'{pushed.get("pushed_destination")} '
             f'(version {pushed.get("pushed_version")})')
  else:
    where = 'not pushed'
  return [_show(str(em['id'])), f'{_show(pipeline)} / {_show(run)}',
          _show(model), _show(where)]


def _exec_label(ex: Optional[dict]) -> str:
  if not ex:
    return '?'
  kind = (ex.get('type') or '?').rsplit('.', 1)[-1]
  return f'{_show(kind)} execution {ex["id"]}'


def _lineage_details(t: dict) -> Sequence[str]:
  """The indented lines under a row: keys, status, rotations, upstream."""
  em = t['encrypted_model']
  props = em['properties']
  out = [f'recipient {_show(rid)}'
         for rid in props.get('recipient_key_ids') or []]
  out.append(f'signer    {_show(props.get("signer_id") or "unsigned")}')
  if em.get('status') != 'live':
    by = em.get('superseded_by')
    out.append(f'status    {_show(em.get("status"))}' +
               (f' (replaced by EncryptedModel {by})' if by else ''))
  for r in t.get('rotations') or []:
    p = r.get('properties') or {}
    out.append(f'rotated   {_show(p.get("operation"))} -> EncryptedModel '
               f'{r.get("new_artifact_id")} ({_exec_label(r)}; added '
               f'{_show(", ".join(p.get("added_key_ids") or []) or "none")}; '
               'removed '
               f'{_show(", ".join(p.get("removed_key_ids") or []) or "none")})')
  for r in t.get('rotated_from') or []:
    out.append(f'rotated from EncryptedModel {r["id"]} '
               f'({_exec_label(r.get("rotation"))})')
  for m in t.get('models') or []:
    producer = m.get('produced_by')
    if producer:
      inputs = ', '.join(f'{_show(i["type"])} {i["id"]}'
                         for i in producer.get('inputs') or [])
      out.append(f'model     {_show(m["type"])} {m["id"]} from '
                 f'{_exec_label(producer)}' +
                 (f' <- {inputs}' if inputs else ''))
  for e in t.get('examples') or []:
    source = (e.get('produced_by') or {}).get('input_base')
    out.append(f'examples  {_show(e["uri"])} (Examples {e["id"]}, from '
               f'{_exec_label(e.get("produced_by"))}'
               + (f' <- {_show(source)})' if source else ')'))
  pushes = t.get('pushes') or []
  for push in pushes[1:] if not t.get('rotated_from') else pushes:
    if push.get('pushed'):
      out.append(f'pushed    {_show(push.get("pushed_destination"))} '
                 f'(version {_show(push.get("pushed_version"))})')
  return out


@main.command()
@_mlmd_options
@click.option('--key-id', metavar='ID',
              help='Only packages with this recipient or signer key id (or '
              'recipient key URI): the live ones still wrapped for it (the '
              'rotation worklist), then those a rotation replaced, marked '
              'as such.')
@click.option('--fingerprint', metavar='FP',
              help='Only this model fingerprint (sha256:<hex> or the hex).')
@click.option('--package', 'package', metavar='PKG',
              help="Only the artifact of this package (its header's package "
              'id; no key needed): a local path, s3:// or gs://.')
@click.option('--pipeline', 'pipeline_name', metavar='NAME',
              help='Only artifacts produced by this TFX pipeline.')
@click.option('--version', 'version', metavar='V',
              help='Only the package pushed as version V (the '
              '<push_destination>/V directory).')
@click.option('--pushed-only', is_flag=True,
              help='Only packages that were pushed.')
@click.option('--all', 'show_all', is_flag=True,
              help='Also artifacts a key rotation replaced and those of '
              'unblessed runs (encrypted=0, no package).')
@click.option('--json', 'as_json', is_flag=True,
              help='The full trace of each match, as JSON (= --format '
              'json).')
@click.option('--format', 'fmt', type=click.Choice(_FORMATS),
              default=None,
              help='table (default), json, or the lineage as a picture: '
              'Graphviz dot text, or svg / png drawn by Graphviz (the '
              'graphviz package).')
@click.option('--output', '-o', 'output', metavar='FILE',
              help='Write the output to FILE (needed for png; default '
              'stdout). Never replaces a file unless --force.')
@click.option('--force', is_flag=True,
              help='Replace --output if it is a lineage picture (dot, svg or '
              'png).')
def lineage(mlmd, key_id, fingerprint, package, pipeline_name, version,
            pushed_only, show_all, as_json, fmt, output, force):
  """Which model, which run, which keys, pushed where (needs ML Metadata).

  Lists the EncryptedModel artifacts recorded by EncryptPusher (and by
  rewrap / rotate), newest first; exits 1 when none matches. Name the store
  with one of --mlmd-sqlite, --mlmd-mysql (+ --mlmd-user), --mlmd-config or
  --mlmd-grpc. PKG may be a local path or an s3:// / gs:// package.
  --format dot|svg|png draws the lineage of the matches (ExampleGen input
  -> ... -> Trainer -> Evaluator -> EncryptPusher -> pushed versions).
  """
  fmt = _output_format(fmt, as_json, output)
  lineage_lib = _import_lineage()
  if mlmd is None:
    mlmd = {}
  if output is not None:
    _check_picture_output(output, force)
  if fmt in ('svg', 'png'):
    lineage_lib.find_dot()  # before any MLMD work: say what to install
  package_id = _package_id(package) if package else None
  store = _connect_mlmd(lineage_lib, mlmd)
  filters = dict(key_id=key_id, fingerprint=fingerprint,
                 package_id=package_id, pipeline_name=pipeline_name,
                 pushed_only=pushed_only, version=version)
  matches = lineage_lib.encrypted_models(store, include_superseded=show_all,
                                         include_unpackaged=show_all,
                                         **filters)
  if key_id is not None and not show_all:
    # The worklist first, then what a rotation already took off it.
    matches += [m for m in lineage_lib.encrypted_models(
        store, include_superseded=True, **filters)
                if m['status'] == 'superseded']
  if not matches:
    described = [f'{name} {value}' for name, value in (
        ('key id', key_id), ('fingerprint', fingerprint),
        ('package id', package_id), ('pipeline', pipeline_name),
        ('version', version)) if value]
    if pushed_only:
      described.append('pushed')
    where = (mlmd.get('sqlite') or mlmd.get('mysql') or mlmd.get('grpc') or
             mlmd.get('config_file'))
    raise lineage_lib.NoMatchError(
        f'no EncryptedModel matches in {where}'
        + (f' ({", ".join(described)})' if described else ''))
  if fmt in _PICTURES:
    dot_text = lineage_lib.lineage_dot(store, [m['id'] for m in matches])
    data = (dot_text.encode('utf-8') if fmt == 'dot'
            else lineage_lib.render(dot_text, fmt))
    _write_output(data, output, force)
    return
  traces = [lineage_lib.trace(store, m['id']) for m in matches]
  if fmt == 'json':
    _write_output((_json(traces, indent=2) + '\n').encode('utf-8'), output,
                  force)
    return
  rows = [['ID', 'PIPELINE / RUN', 'MODEL', 'PUSHED TO']]
  rows += [_lineage_row(t) for t in traces]
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  for i, row in enumerate(rows):
    click.echo('  '.join(c.ljust(w) for c, w in zip(row, widths)) +
               '  ' + row[3])
    if i:
      pad = ' ' * (widths[0] + 2)
      for line in _lineage_details(traces[i - 1]):
        click.echo(pad + line)
