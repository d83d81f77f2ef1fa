"""Inputs and outputs on an object store, and a job across a Ray cluster of two nodes.

The object store is moto's server: a real S3 API over HTTP on 127.0.0.1, spoken to by pyarrow's
S3 filesystem exactly as AWS would be. The cluster is two Ray nodes on this machine
(ray.cluster_utils.Cluster: a head and a second raylet, one CPU each); the job is the `specbatch`
command in its own process, joining it with --ray-address, as a user's would.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from specbatch.cli import main
from specbatch.storage import OutputDir, connect
from specbatch.storage.schema import ERRORS
from specbatch.workers.actor import FAULT_ENV

pytestmark = pytest.mark.slow

BUCKET = "specbatch-test"
ROWS = [{"id": f"r{i:02d}", "prompt": f"def f{i}(x):\n    return x * {i}\n"} for i in range(12)]


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint; credentials and endpoint in the environment, as a cluster's nodes would have them."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def put(uri: str, data: bytes) -> None:
    out = OutputDir(uri.rsplit("/", 1)[0])
    with out.fs.open_output_stream(out.path(uri.rsplit("/", 1)[1]), compression=None) as f:
        f.write(data)


def test_outputs_round_trip_through_the_object_store(s3):
    out = OutputDir(f"s3://{BUCKET}/unit")
    assert not out.local and out.read_run() is None
    errors = pa.Table.from_pylist([{"request_id": "x", "input_index": 3, "stage": "input", "reason": "bad"}], schema=ERRORS)
    out.write_unit("shard-00000", {"errors": errors}, summary={"n": 1})
    out.write_table(errors, "errors/orphan.parquet")  # written, never committed by an entry
    assert out.is_complete("shard-00000") and not out.is_complete("shard-00001")
    con = connect(out.uri)
    assert con.execute("select request_id, reason from errors").fetchall() == [("x", "bad")]
    assert con.execute("select count(*) from generations").fetchone() == (0,)


@pytest.fixture(scope="module")
def two_nodes(s3):
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": 100 * 1024**2},
    )
    cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def specbatch(*args: str, env: dict | None = None, wait: bool = True):
    command = [sys.executable, "-m", "specbatch.cli", *args]
    proc = subprocess.Popen(
        command, env=os.environ | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # its own process group: killing it kills Prefect's temporary server with it
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def job(out: str, *extra: str) -> list[str]:
    return ["run", f"s3://{BUCKET}/input/prompts.jsonl.gz", "--out", out, "--max-new-tokens", "6", "--shard-size", "2",
            "--batch-size", "2", "--workers", "2", *extra]  # fmt: skip


def test_a_job_across_two_nodes_reads_and_writes_the_object_store(two_nodes, capsys):
    lines = [json.dumps(r) for r in ROWS] + ["not json"]
    put(f"s3://{BUCKET}/input/prompts.jsonl.gz", gzip.compress(("\n".join(lines) + "\n").encode()))
    out = f"s3://{BUCKET}/jobs/two-nodes"
    _, err = specbatch(*job(out, "--ray-address", two_nodes.address))
    con = connect(out)
    assert con.execute("select count(*), count(distinct request_id) from generations").fetchone() == (12, 12), err
    assert con.execute("select input_index, stage from errors").fetchall() == [(13, "input")]
    nodes = {e["summary"]["node"] for e in OutputDir(out).manifest() if e["unit"].startswith("shard-")}
    assert len(nodes) == 2, "the two workers should have run on the two nodes"
    assert con.execute("select num_generations, num_errors from runs").fetchone() == (12, 1)
    assert main(["query", out, "select count(*) as n from requests", "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n12\n"


def test_a_killed_worker_and_a_killed_driver_resume_on_the_object_store(two_nodes):
    out = f"s3://{BUCKET}/jobs/resume"
    store = OutputDir(out)
    # A worker dies in shard-00002 (before that shard can land); the driver is killed right then.
    proc = specbatch(*job(out, "--ray-address", two_nodes.address), env={FAULT_ENV: "shard-00002"}, wait=False)
    deadline = time.time() + 300
    while not store.exists(".fault-injected-shard-00002"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started on this machine
    proc.communicate()
    # The workers are the cluster's processes: one busy with another shard may land it before
    # Ray sees the driver gone and ends them. What landed is read once nothing has for 5 s.
    landed, since = set(), time.time()
    while time.time() - since < 5:
        assert time.time() < deadline + 60
        now = {e["unit"] for e in store.manifest() if e["unit"].startswith("shard-")}
        landed, since = now, since if now == landed else time.time()
        time.sleep(0.5)
    assert "shard-00002" not in landed
    _, err = specbatch(*job(out, "--ray-address", two_nodes.address))
    summary = json.loads(err[err.rindex("\n{") : err.rindex("\n}") + 2])
    assert summary["shards"] == 6 and summary["shards_run_now"] == 6 - len(landed)
    con = connect(out)
    assert con.execute("select count(*), count(distinct request_id) from generations").fetchone() == (12, 12)
    assert con.execute("select count(*) from errors").fetchone() == (1,)
    reference = connect(f"s3://{BUCKET}/jobs/two-nodes")
    query = "select request_id, completion_token_ids from generations order by 1"
    assert con.execute(query).fetchall() == reference.execute(query).fetchall()
