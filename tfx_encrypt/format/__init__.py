"""The tfx-encrypt byte format (docs/FORMAT.md): pure bytes in, bytes out."""
