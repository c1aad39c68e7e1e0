"""Example pipelines that use tfx-encrypt components."""
