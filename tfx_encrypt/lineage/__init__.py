"""Lineage of encrypted models, read from ML Metadata.

Answers "which model, which run, which keys, pushed where" for the
`tfx_encrypt.EncryptedModel` artifacts that `EncryptPusher` records:

* `encrypted_models(store, key_id=..., fingerprint=..., package_id=...,
  pipeline_name=..., pushed_only=...)` lists the matching artifacts, newest
  first;
* `trace(store, artifact_id)` follows the MLMD events of one of them: the
  producing execution and its pipeline / run contexts, the input `Model` and
  blessings, and the sibling `PushedModel`;
* `open_sqlite(path)` opens an existing SQLite store read-only;
  `open_mysql(host, port, database, user, password)` a MySQL / MariaDB one
  (Kubeflow's), `open_grpc(host, port)` a metadata gRPC service,
  `open_store(config)` any ConnectionConfig / MetadataStoreClientConfig,
  `load_connection_config(path)` reads one from a text proto, and
  `connect(...)` picks one from the CLI's `--mlmd-*` options;
* `lineage_graph(store, artifact_ids)` builds the graph of their lineage
  (ExampleGen input -> ... -> Trainer -> Model -> Evaluator -> EncryptPusher
  -> EncryptedModel -> pushed versions), `to_dot(graph)` / `lineage_dot`
  write it as Graphviz DOT and `render(dot_text, 'svg' | 'png')` draws it
  with Graphviz's `dot`;
* `find_recorded(store, path, package_id)` and `record_rotation(store, old,
  ...)` record a `rewrap` / `rotate` as a `tfx_encrypt.KeyRotation`
  execution (old EncryptedModel in, new one out; the old one marked
  `superseded` when the new package replaces it where it is read).

Unblessed runs record an EncryptedModel with `encrypted=0` (TFX publishes
every declared output) and rotated ones `superseded=1`: `encrypted_models`
leaves both out unless asked (`include_unpackaged`, `include_superseded`).

A short public face over `_store` (opening a store, decoding artifacts and
properties, the errors) and `_query` (the two queries). Only `ml_metadata`
is imported: no TFX, no TensorFlow; the property names are those the
executor writes (`tfx_encrypt.mlmd_names`). Nothing secret is returned:
fields are picked one by one from artifact and execution properties, which
hold key ids and key URIs only, and execution parameters are never copied
wholesale.
"""

from tfx_encrypt.lineage._graph import GraphvizError
from tfx_encrypt.lineage._graph import GraphvizNotFoundError
from tfx_encrypt.lineage._graph import find_dot
from tfx_encrypt.lineage._graph import lineage_dot
from tfx_encrypt.lineage._graph import lineage_graph
from tfx_encrypt.lineage._graph import render
from tfx_encrypt.lineage._graph import to_dot
from tfx_encrypt.lineage._query import encrypted_models
from tfx_encrypt.lineage._query import has_package
from tfx_encrypt.lineage._query import trace
from tfx_encrypt.lineage._rotation import find_recorded
from tfx_encrypt.lineage._rotation import record_rotation
from tfx_encrypt.lineage._store import LineageError
from tfx_encrypt.lineage._store import MetadataStoreError
from tfx_encrypt.lineage._store import MetadataStoreNotFoundError
from tfx_encrypt.lineage._store import NoMatchError
from tfx_encrypt.lineage._store import connect
from tfx_encrypt.lineage._store import decode_properties
from tfx_encrypt.lineage._store import decode_value
from tfx_encrypt.lineage._store import describe_config
from tfx_encrypt.lineage._store import load_connection_config
from tfx_encrypt.lineage._store import mysql_config
from tfx_encrypt.lineage._store import open_grpc
from tfx_encrypt.lineage._store import open_mysql
from tfx_encrypt.lineage._store import open_sqlite
from tfx_encrypt.lineage._store import open_store
from tfx_encrypt.mlmd_names import ENCRYPTED_MODEL_TYPE
from tfx_encrypt.mlmd_names import KEY_ROTATION_TYPE

__all__ = [
    'ENCRYPTED_MODEL_TYPE', 'GraphvizError', 'GraphvizNotFoundError',
    'KEY_ROTATION_TYPE', 'LineageError',
    'MetadataStoreError', 'MetadataStoreNotFoundError', 'NoMatchError',
    'connect', 'decode_value', 'decode_properties', 'describe_config',
    'encrypted_models', 'find_dot', 'find_recorded', 'has_package',
    'lineage_dot',
    'lineage_graph', 'load_connection_config', 'mysql_config', 'open_grpc',
    'open_mysql', 'open_sqlite', 'open_store', 'record_rotation', 'render',
    'to_dot', 'trace',
]
