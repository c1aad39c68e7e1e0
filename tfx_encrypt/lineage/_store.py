"""Reading ML Metadata: opening a store, decoding artifacts and properties.

Also the lineage errors. Only `ml_metadata` is imported here: no TFX, no
TensorFlow. Property names come from `tfx_encrypt.mlmd_names`, which the
EncryptPusher executor writes with. Nothing secret is decoded: the
properties an EncryptedModel carries hold key ids and key URIs only.
"""

import datetime
import json
import os
import re
from typing import Any, Dict, Iterable, Optional, Union

from google.protobuf import json_format
from google.protobuf import text_format
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from tfx_encrypt import errors
from tfx_encrypt import mlmd_names

# The properties reported for an EncryptedModel / PushedModel, in this order.
PACKAGE_PROPERTIES = (
    mlmd_names.FORMAT_VERSION_PROPERTY,
    mlmd_names.CIPHER_PROPERTY,
    mlmd_names.HASH_ALG_PROPERTY,
    mlmd_names.PACKAGE_ID_PROPERTY,
    mlmd_names.RECIPIENT_KEY_IDS_PROPERTY,
    mlmd_names.RECIPIENT_URIS_PROPERTY,
    mlmd_names.SIGNER_ID_PROPERTY,
    mlmd_names.SIGNATURE_ALG_PROPERTY,
    mlmd_names.MODEL_FINGERPRINT_PROPERTY,
    mlmd_names.CIPHERTEXT_DIGEST_PROPERTY,
    mlmd_names.FILE_COUNT_PROPERTY,
    mlmd_names.PLAINTEXT_BYTES_PROPERTY,
    mlmd_names.CIPHERTEXT_BYTES_PROPERTY,
    mlmd_names.BUNDLE_PROPERTY,
    mlmd_names.ENCRYPTION_CONTEXT_PROPERTY,
    mlmd_names.PUSHED_PROPERTY,
    mlmd_names.PUSHED_DESTINATION_PROPERTY,
    mlmd_names.PUSHED_VERSION_PROPERTY,
    mlmd_names.ENCRYPTED_PROPERTY,
    mlmd_names.SUPERSEDED_PROPERTY,
    mlmd_names.SUPERSEDED_BY_PROPERTY,
    'tfx_version',  # written by TFX itself
)
# Recorded as JSON strings; decoded into lists and dicts.
_JSON_PROPERTIES = frozenset({mlmd_names.RECIPIENT_KEY_IDS_PROPERTY,
                              mlmd_names.RECIPIENT_URIS_PROPERTY,
                              mlmd_names.ENCRYPTION_CONTEXT_PROPERTY})


class LineageError(errors.TfxEncryptError):
  """A lineage query could not be answered."""
  exit_code = 1


class NoMatchError(LineageError):
  """No EncryptedModel artifact matches the query (CLI exit code 1)."""
  exit_code = 1


class MetadataStoreNotFoundError(LineageError, errors.UsageError):
  """The ML Metadata store named by the caller does not exist."""
  exit_code = 2


class MetadataStoreError(LineageError):
  """The path exists but is not an ML Metadata store that can be read."""
  exit_code = 3


def open_sqlite(path: str,
                read_only: bool = True) -> metadata_store.MetadataStore:
  """Opens an existing SQLite ML Metadata store (read-only by default).

  Unlike `sqlite_metadata_connection_config`, never creates a new, empty
  store: a lineage query against a mistyped path must fail, not answer
  "nothing found".

  Args:
    path: the SQLite file written by the pipeline's metadata connection.
    read_only: False to open it READWRITE (still never created), as a key
      rotation does to record itself.

  Returns:
    A MetadataStore over a READONLY (or READWRITE) SQLite connection.

  Raises:
    MetadataStoreNotFoundError: `path` does not exist or is not a file.
    MetadataStoreError: the file is not an ML Metadata store.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    what = 'is not a file' if os.path.exists(path) else 'does not exist'
    raise MetadataStoreNotFoundError(
        f'ML Metadata store {path} {what}; pass the SQLite file of the '
        "pipeline's metadata connection (e.g. <workdir>/metadata.sqlite)")
  config = metadata_store_pb2.ConnectionConfig()
  config.sqlite.filename_uri = path
  config.sqlite.connection_mode = (
      metadata_store_pb2.SqliteMetadataSourceConfig.READONLY if read_only
      else metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE)
  return open_store(config, describe=path)


def _reason(e: BaseException) -> str:
  reason = ' '.join(str(e).split()) or type(e).__name__
  # MLMD says "Error when executing query: <reason> query: <SQL>".
  reason = reason.replace('Error when executing query: ', '', 1)
  return reason.split(' query:', 1)[0][:200]


Config = Union[metadata_store_pb2.ConnectionConfig,
               metadata_store_pb2.MetadataStoreClientConfig]


def describe_config(config: Config) -> str:
  """Where a connection goes, for messages: never its password."""
  if isinstance(config, metadata_store_pb2.MetadataStoreClientConfig):
    return f'grpc://{config.host}:{config.port}'
  kind = config.WhichOneof('config')
  if kind == 'sqlite':
    return config.sqlite.filename_uri
  if kind == 'mysql':
    m = config.mysql
    where = (f'{m.host}:{m.port}' if m.host else (m.socket or 'localhost'))
    user = f'{m.user}@' if m.user else ''
    return f'mysql://{user}{where}/{m.database}'
  return kind or 'an empty ML Metadata connection config'


def open_store(config: Config,
               describe: Optional[str] = None) -> metadata_store.MetadataStore:
  """Opens an ML Metadata store from any connection config.

  Args:
    config: a `ConnectionConfig` (SQLite, MySQL / MariaDB, ...) or a
      `MetadataStoreClientConfig` (a metadata gRPC service).
    describe: how to name the store in messages (default: from `config`,
      without the password).

  Returns:
    A MetadataStore that answered one query.

  Raises:
    MetadataStoreError: the store cannot be reached or read.
  """
  describe = describe or describe_config(config)
  try:
    store = metadata_store.MetadataStore(config)
    store.get_artifact_types()
  except Exception as e:  # MLMD raises RuntimeError or its own error types.
    reason = _reason(e)
    if 'mysql_real_connect' in reason:
      reason = ('cannot connect or log in: check the host, port, database, '
                'user and password (TFXE_MLMD_PASSWORD)')
    raise MetadataStoreError(
        f'{describe} is not a readable ML Metadata store ({reason})') from e
  return store


def mysql_config(host: str, port: int, database: str, user: str,
                 password: Optional[str] = None
                 ) -> metadata_store_pb2.ConnectionConfig:
  """The ConnectionConfig of a MySQL / MariaDB store (as TFX's
  `metadata.mysql_metadata_connection_config` builds it)."""
  config = metadata_store_pb2.ConnectionConfig()
  config.mysql.host = host
  config.mysql.port = int(port)
  config.mysql.database = database
  config.mysql.user = user
  if password:
    config.mysql.password = password
  return config


def open_mysql(host: str, port: int, database: str, user: str,
               password: Optional[str] = None) -> metadata_store.MetadataStore:
  """Opens a MySQL / MariaDB ML Metadata store (the one Kubeflow uses).

  ML Metadata itself creates the database and its tables when they do not
  exist; a lineage query against such a new database answers "no match".
  """
  return open_store(mysql_config(host, port, database, user, password))


def open_grpc(host: str, port: int) -> metadata_store.MetadataStore:
  """Opens the ML Metadata of a metadata gRPC service (`metadata_store_server`,
  as Kubeflow Pipelines runs it)."""
  config = metadata_store_pb2.MetadataStoreClientConfig()
  config.host = host
  config.port = int(port)
  config.client_timeout_sec = _GRPC_TIMEOUT_SEC
  return open_store(config)


# Per call: an unreachable service fails instead of waiting for ever.
_GRPC_TIMEOUT_SEC = 30


_HOST_PORT_RE = re.compile(r'^(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):([0-9]{1,5})$')


def parse_host_port(text: str, what: str):
  """'HOST:PORT' (IPv6 in brackets) as (host, port)."""
  m = _HOST_PORT_RE.match(text or '')
  if not m or not 0 < int(m.group(2)) < 65536:
    raise errors.UsageError(f'{what} expects HOST:PORT, got {text!r}')
  return m.group(1).strip('[]'), int(m.group(2))


def parse_mysql_target(text: str):
  """'HOST:PORT/DATABASE' as (host, port, database)."""
  where, sep, database = (text or '').partition('/')
  if not sep or not database or '/' in database:
    raise errors.UsageError(
        f'--mlmd-mysql expects HOST:PORT/DATABASE, got {text!r}')
  host, port = parse_host_port(where, '--mlmd-mysql')
  return host, port, database


def load_connection_config(path: str) -> Config:
  """A connection-config file: ml_metadata's `ConnectionConfig` text proto
  (`mysql { host: ... }`, `sqlite { filename_uri: ... }`) or a
  `MetadataStoreClientConfig` one (`host: ... port: ...`).

  Raises:
    MetadataStoreNotFoundError: the file does not exist.
    UsageError: it is neither form.
  """
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise MetadataStoreNotFoundError(
        f'ML Metadata connection config {path} does not exist')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  problems = []
  for cls in (metadata_store_pb2.ConnectionConfig,
              metadata_store_pb2.MetadataStoreClientConfig):
    try:
      config = text_format.Parse(text, cls())
    except text_format.ParseError as e:
      problems.append(str(e).splitlines()[0][:120])
      continue
    if isinstance(config, metadata_store_pb2.ConnectionConfig):
      if config.WhichOneof('config') is None:
        problems.append('no connection (sqlite, mysql, ...) set')
        continue
    elif not config.host or not config.port:
      problems.append('a client config needs host and port')
      continue
    return config
  raise errors.UsageError(
      f'{path} is not an ML Metadata ConnectionConfig or '
      f'MetadataStoreClientConfig text proto ({"; ".join(problems)})')


def connect(*, sqlite: Optional[str] = None, mysql: Optional[str] = None,
            user: Optional[str] = None, password: Optional[str] = None,
            config_file: Optional[str] = None, grpc: Optional[str] = None,
            read_only: bool = True) -> metadata_store.MetadataStore:
  """Opens the one store named by the CLI's `--mlmd-*` options.

  Args:
    sqlite: an existing SQLite file (never created).
    mysql: 'HOST:PORT/DATABASE' of a MySQL / MariaDB store; needs `user`.
    user: the MySQL user.
    password: the MySQL password (never from a command-line argument).
    config_file: a connection-config text proto (`load_connection_config`);
      a MySQL config without a password gets `password`.
    grpc: 'HOST:PORT' of a metadata gRPC service.
    read_only: open SQLite read-only (the other backends have no such mode).

  Raises:
    UsageError: none or more than one store given, or a malformed value.
    MetadataStoreNotFoundError / MetadataStoreError: as `open_sqlite`,
      `open_store`.
  """
  given = [name for name, v in (('--mlmd-sqlite', sqlite),
                                ('--mlmd-mysql', mysql),
                                ('--mlmd-config', config_file),
                                ('--mlmd-grpc', grpc)) if v]
  if len(given) != 1:
    raise errors.UsageError(
        'name one ML Metadata store: --mlmd-sqlite PATH, --mlmd-mysql '
        'HOST:PORT/DB (with --mlmd-user), --mlmd-config FILE or --mlmd-grpc '
        'HOST:PORT' + (f' (got {" and ".join(given)})' if given else ''))
  if user and not (mysql or config_file):
    raise errors.UsageError('--mlmd-user goes with --mlmd-mysql')
  if sqlite:
    return open_sqlite(sqlite, read_only=read_only)
  if mysql:
    if not user:
      raise errors.UsageError('--mlmd-mysql needs --mlmd-user NAME (the '
                              'password comes from TFXE_MLMD_PASSWORD or '
                              '--mlmd-password-stdin)')
    host, port, database = parse_mysql_target(mysql)
    return open_mysql(host, port, database, user, password)
  if grpc:
    host, port = parse_host_port(grpc, '--mlmd-grpc')
    return open_grpc(host, port)
  config = load_connection_config(config_file)
  if isinstance(config, metadata_store_pb2.ConnectionConfig):
    kind = config.WhichOneof('config')
    if kind == 'mysql':
      if user:
        config.mysql.user = user
      if password and not config.mysql.password:
        config.mysql.password = password
    elif kind == 'sqlite':
      return open_sqlite(config.sqlite.filename_uri, read_only=read_only)
  return open_store(config)


def decode_value(value: metadata_store_pb2.Value) -> Any:
  """An MLMD property value as plain Python.

  Args:
    value: a `metadata_store_pb2.Value` (a property or custom property).

  Returns:
    int, float, str or bool for scalar values; a dict (or list) for a struct;
    for an opaque proto, `{'@type': type_url}` (its bytes are not decoded);
    None when unset.
  """
  kind = value.WhichOneof('value')
  if kind is None:
    return None
  if kind == 'struct_value':
    return json_format.MessageToDict(value.struct_value)
  if kind == 'proto_value':
    return {'@type': value.proto_value.type_url}
  return getattr(value, kind)


def decode_properties(node: Any,
                      names: Optional[Iterable[str]] = None) -> Dict[str, Any]:
  """Decoded properties and custom properties of an artifact or execution.

  Args:
    node: an MLMD Artifact, Execution or Context.
    names: if given, only these names (in this order); others are skipped.

  Returns:
    {name: plain Python value}; custom properties win over properties of
    the same name.
  """
  merged = {}
  for k, v in node.properties.items():
    merged[k] = v
  for k, v in node.custom_properties.items():
    merged[k] = v
  keys = list(names) if names is not None else sorted(merged)
  return {k: decode_value(merged[k]) for k in keys if k in merged}


def package_properties(artifact: metadata_store_pb2.Artifact
                       ) -> Dict[str, Any]:
  """The package facts recorded on an EncryptedModel or PushedModel.

  The properties of PACKAGE_PROPERTIES that are present, JSON values
  decoded (a malformed one is left as recorded).
  """
  props = decode_properties(artifact, PACKAGE_PROPERTIES)
  for k in _JSON_PROPERTIES & props.keys():
    if isinstance(props[k], str):
      try:
        props[k] = json.loads(props[k])
      except ValueError:
        pass  # leave a malformed value as recorded
  return props


def iso_time(ms: int) -> Optional[str]:
  """MLMD milliseconds since the epoch as ISO 8601 UTC, or None if unset."""
  if not ms:
    return None
  return datetime.datetime.fromtimestamp(
      ms / 1000.0, tz=datetime.timezone.utc).isoformat(timespec='seconds')
