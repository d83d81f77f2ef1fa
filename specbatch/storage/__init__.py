"""Parquet tables written atomically, a manifest of complete shards, DuckDB views."""

from .output import OutputDir
from .views import connect

__all__ = ["OutputDir", "connect"]
