"""Lineage of encrypted models, read from ML Metadata.

Answers "which model, which run, which keys, pushed where" for the
`tfx_encrypt.EncryptedModel` artifacts that `EncryptPusher` records:

* `encrypted_models(store, key_id=..., fingerprint=..., package_id=...,
  pipeline_name=..., pushed_only=...)` lists the matching artifacts, newest
  first;
* `trace(store, artifact_id)` follows the MLMD events of one of them: the
  producing execution and its pipeline / run contexts, the input `Model` and
  blessings, and the sibling `PushedModel`;
* `open_sqlite(path)` opens an existing SQLite store read-only.

A short public face over `_store` (opening a store, decoding artifacts and
properties, the errors) and `_query` (the two queries). Only `ml_metadata`
is imported: no TFX, no TensorFlow; the property names are those the
executor writes (`tfx_encrypt.mlmd_names`). Nothing secret is returned:
fields are picked one by one from artifact and execution properties, which
hold key ids and key URIs only, and execution parameters are never copied
wholesale.
"""

from tfx_encrypt.lineage._query import encrypted_models
from tfx_encrypt.lineage._query import trace
from tfx_encrypt.lineage._store import LineageError
from tfx_encrypt.lineage._store import MetadataStoreError
from tfx_encrypt.lineage._store import MetadataStoreNotFoundError
from tfx_encrypt.lineage._store import NoMatchError
from tfx_encrypt.lineage._store import decode_properties
from tfx_encrypt.lineage._store import decode_value
from tfx_encrypt.lineage._store import open_sqlite
from tfx_encrypt.mlmd_names import ENCRYPTED_MODEL_TYPE

__all__ = [
    'ENCRYPTED_MODEL_TYPE', 'LineageError', 'MetadataStoreError',
    'MetadataStoreNotFoundError', 'NoMatchError', 'decode_value',
    'decode_properties', 'encrypted_models', 'open_sqlite', 'trace',
]
