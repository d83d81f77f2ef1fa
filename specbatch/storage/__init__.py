"""Parquet tables written atomically, a manifest of complete shards, DuckDB views.

DuckDB is imported on first use of `connect`, so writing Parquet (the workers, `specbatch bench`
on a GPU box with the engine only) does not need it."""

from .output import OutputDir

__all__ = ["OutputDir", "connect"]


def __getattr__(name: str):
    if name == "connect":
        from .views import connect

        return connect
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
