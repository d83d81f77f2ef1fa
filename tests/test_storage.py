"""Storage: a writer killed mid-file leaves nothing a reader picks up; views answer SQL and
show only complete shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa

from specbatch.storage import OutputDir, connect
from specbatch.storage.schema import ERRORS, GENERATIONS, REQUESTS, STEPS, TABLES


def generations(n: int, prefix: str = "r") -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "request_id": f"{prefix}{i}",
                "sample_index": 0,
                "input_index": i + 1,
                "prompt": "p",
                "prompt_token_ids": [1, 2],
                "completion": "c",
                "completion_token_ids": [3],
                "finish_reason": "length",
            }
            for i in range(n)
        ],
        schema=GENERATIONS,
    )


def test_views_answer_sql_over_complete_units(tmp_path):
    out = OutputDir(tmp_path)
    out.write_unit("shard-00000", {"generations": generations(3), "requests": REQUESTS.empty_table()})
    out.write_unit("shard-00001", {"generations": generations(2, "s")})
    out.write_unit(
        "plan",
        {
            "errors": pa.Table.from_pylist(
                [{"request_id": None, "input_index": 4, "stage": "input", "reason": "bad"}], schema=ERRORS
            )
        },
    )
    con = connect(tmp_path)
    assert con.execute("select count(*) from generations").fetchone() == (5,)
    assert con.execute("select reason from errors").fetchall() == [("bad",)]
    assert con.execute("select count(*) from steps").fetchone() == (0,)  # empty view, right columns
    assert con.execute("select count(*) from runs").fetchone() == (0,)
    assert [c[0] for c in con.execute("select * from steps").description][:3] == ["request_id", "sample_index", "step"]


def test_every_step_record_field_is_a_steps_column_and_files_without_the_newer_ones_still_read(tmp_path, monkeypatch):
    """The worker writes each StepRecord's fields as a steps row (a field the schema lacks would be
    dropped without a word). Files an older version wrote, before the shadow columns, read beside
    new ones (a resumed or incremental job): their shadow columns are null."""
    from dataclasses import fields

    from specbatch.decoding import StepRecord

    assert {f.name for f in fields(StepRecord)} | {"request_id", "sample_index"} == set(STEPS.names)
    step = {"request_id": "r0", "sample_index": 0, "step": 0, "num_draft": 0, "drafted": 0, "accepted": 0, "emitted": 1, "method": "ar"}
    older = pa.schema([f for f in STEPS if not f.name.startswith("shadow_")])
    out = OutputDir(tmp_path)
    with monkeypatch.context() as m:  # as the version before the shadow columns wrote it
        m.setitem(TABLES, "steps", older)
        out.write_unit("shard-00000", {"steps": pa.Table.from_pylist([step], schema=older)})
    shadowed = step | {"request_id": "r1", "shadow_method": "ngram", "shadow_drafted": 4, "shadow_accepted": 3}
    out.write_unit("shard-00001", {"steps": pa.Table.from_pylist([shadowed], schema=STEPS)})
    rows = connect(tmp_path).execute("select request_id, shadow_method, shadow_drafted, shadow_accepted from steps order by 1").fetchall()
    assert rows == [("r0", None, None, None), ("r1", "ngram", 4, 3)]


def test_a_shard_without_its_manifest_entry_is_invisible_and_redone(tmp_path):
    out = OutputDir(tmp_path)
    out.write_unit("shard-00000", {"generations": generations(3)})
    # A worker that died after its data file but before the manifest entry:
    (tmp_path / "manifest" / "shard-00000.json").unlink()
    assert not out.is_complete("shard-00000")
    assert connect(tmp_path).execute("select count(*) from generations").fetchone() == (0,)
    out.write_unit("shard-00000", {"generations": generations(3)})  # the redo replaces, never duplicates
    assert connect(tmp_path).execute("select count(*) from generations").fetchone() == (3,)


def test_writer_killed_mid_file_leaves_nothing_a_reader_picks_up(tmp_path):
    """Kill a process while it writes a large shard; no reader sees a partial file, and the
    leftover temporary is matched by no *.parquet glob and is cleaned on the next start."""
    script = textwrap.dedent(
        f"""
        import pyarrow as pa, pyarrow.parquet as pq
        from specbatch.storage import atomic
        def slow_write(table, where, **kw):
            with pq.ParquetWriter(where, table.schema, compression="zstd") as w:
                for batch in table.to_batches(max_chunksize=1000):
                    w.write_batch(batch)
                    print("wrote", flush=True)
                    import time; time.sleep(0.05)
        atomic.pq.write_table = slow_write
        from specbatch.storage import OutputDir
        n = 200_000
        zeros = [0] * n
        t = pa.table({{"request_id": [str(i) for i in range(n)], "sample_index": zeros, "step": zeros,
                      "num_draft": zeros, "drafted": zeros, "accepted": zeros, "emitted": zeros,
                      "method": ["ar"] * n, "shadow_method": [None] * n, "shadow_drafted": [None] * n,
                      "shadow_accepted": [None] * n}})
        OutputDir({str(tmp_path)!r}).write_unit("shard-00007", {{"steps": t}})
        print("finished", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(5):  # let it write a few row groups
        assert proc.stdout.readline().strip() == "wrote"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = list(tmp_path.rglob("*.partial"))
    assert leftovers, "the writer should have been caught mid-file"
    assert not list(tmp_path.rglob("*.parquet")), "a partial file is visible under a *.parquet name"
    out = OutputDir(tmp_path)
    assert not out.is_complete("shard-00007")
    assert connect(tmp_path).execute("select count(*) from steps").fetchone() == (0,)
    assert out.clean() == len(leftovers)
    assert not list(tmp_path.rglob("*.partial"))
