"""DuckDB views over an output folder: one view per table, named after it.

    con = connect("out/")
    con.execute("select method, avg(completion_tokens) from requests group by 1").fetchall()

Views read only complete files (those named by the manifest). A table with no files yet is an
empty view with the right columns, so queries never fail on a fresh or partial run.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from .output import OutputDir
from .schema import TABLES


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def connect(out_dir: Path | str, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    out = OutputDir(out_dir)
    if not out.root.is_dir():
        raise FileNotFoundError(f"output folder {str(out.root)!r} does not exist")
    con = duckdb.connect(database)
    for name, schema in TABLES.items():
        files = [f for f in out.files_of(name) if f.exists()]
        if files:
            con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({_sql_list(files)})")
        else:
            con.register(f"_{name}_empty", schema.empty_table())
            con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _{name}_empty")
    return con
