"""Compact export for serving: checkpoint -> compact tables + manifest -> (quantised) EBC + serving module."""

from sharded_mde.export.export import export_compact
from sharded_mde.train.checkpoint import resolve_checkpoint
from sharded_mde.export.load import load_export, load_tables, served_dtypes, serving_bytes
from sharded_mde.export.quantize import fake_quantize_table
from sharded_mde.export.manifest import FORMAT_VERSION, Manifest, read_manifest, verify_files
from sharded_mde.export.serve import ServingModel, script

__all__ = [
    "FORMAT_VERSION",
    "Manifest",
    "ServingModel",
    "export_compact",
    "fake_quantize_table",
    "load_export",
    "load_tables",
    "read_manifest",
    "resolve_checkpoint",
    "script",
    "served_dtypes",
    "serving_bytes",
    "verify_files",
]
