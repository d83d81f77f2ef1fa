"""Scheduled incremental jobs, for real: a Prefect server of its own (`prefect server start` on
loopback, its scheduler running), `specbatch deploy` serving an interval schedule, and a growing
input folder. The deployment runs on its own; a later run takes only the file added after the
first; runs never overlap (one run at a time per deployment; a run due meanwhile is cancelled)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from specbatch.storage import OutputDir, connect

pytestmark = pytest.mark.slow
NAME = "every-10s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        time.sleep(1)
    else:
        pytest.fail("the Prefect server did not start in 120 s")
    yield api
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def _finished_runs(root: Path) -> dict[str, list[str]]:
    """Dated run folder -> the files it took, for the runs that finished."""
    out = OutputDir(root)
    if not out.exists():
        return {}
    return {
        name: [f["name"] for f in out.read_json(f"{name}/inputs.json")["files"]]
        for name in out.dated_runs()
        if out.exists(f"{name}/runs/run.parquet")
    }


def _with_file(runs: dict[str, list[str]], name: str) -> dict[str, list[str]] | None:
    return runs if any(name in files for files in runs.values()) else None


def _wait(what, deploy: subprocess.Popen, log: Path, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (value := what()):
            return value
        assert deploy.poll() is None, "specbatch deploy exited:\n" + log.read_text()[-4000:]
        time.sleep(1)
    pytest.fail(f"timed out after {timeout} s; specbatch deploy's log:\n" + log.read_text()[-4000:])


def test_scheduled_deployment_runs_on_its_own_and_takes_only_new_files(server, tmp_path):
    inputs, root, log = tmp_path / "incoming", tmp_path / "job", tmp_path / "deploy.log"
    inputs.mkdir()
    _write(inputs / "a.jsonl", ["def add(a, b):\n", "import os\n"])
    env = os.environ | {"PREFECT_API_URL": server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    command = [sys.executable, "-m", "specbatch.cli", "deploy", NAME, str(inputs), "--out", str(root),
               "--interval", "10", "--max-new-tokens", "4", "--shard-size", "2"]  # fmt: skip
    deploy = subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first = _wait(lambda: _finished_runs(root), deploy, log)
        assert list(first.values()) == [["a.jsonl"]]
        _write(inputs / "b.jsonl", ["class Point:\n", "def main():\n", "x = 1\n"])
        runs = _wait(lambda: _with_file(_finished_runs(root), "b.jsonl"), deploy, log)
        flow_runs = _wait(lambda: _completed_at_least(server, 2), deploy, log, timeout=120)  # its last steps
    finally:
        os.killpg(deploy.pid, signal.SIGTERM)
        try:
            deploy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(deploy.pid, signal.SIGKILL)
    # each file was taken by exactly one run: the second run took only the new file
    assert sorted(runs.values()) == [["a.jsonl"], ["b.jsonl"]]
    con = connect(root)  # the root reads as one table set across its dated runs
    assert con.execute("select count(*) from runs").fetchone() == (2,)
    ids = sorted(r for (r,) in con.execute("select request_id from generations").fetchall())
    assert ids == ["a.jsonl:line-1", "a.jsonl:line-2", "b.jsonl:line-1", "b.jsonl:line-2", "b.jsonl:line-3"]
    assert con.execute("select count(*) from errors").fetchone() == (0,)

    # the server's record: it scheduled and ran the runs itself, one at a time
    deployment = httpx.get(f"{server}/deployments/name/specbatch-incremental/{NAME}").json()
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    completed = sorted((r for r in flow_runs if r["state_type"] == "COMPLETED"), key=lambda r: r["start_time"])
    assert len(completed) >= 2 and all(r["auto_scheduled"] for r in completed)
    for earlier, later in zip(completed, completed[1:]):
        assert later["start_time"] >= earlier["end_time"], (earlier, later)


def _completed_at_least(server: str, count: int) -> list[dict] | None:
    """The deployment's flow runs once `count` of them completed."""
    deployment = httpx.get(f"{server}/deployments/name/specbatch-incremental/{NAME}").json()
    flow_runs = httpx.post(
        f"{server}/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}, "limit": 200}
    ).json()
    return flow_runs if sum(r["state_type"] == "COMPLETED" for r in flow_runs) >= count else None


def test_prefect_yaml_deploys_with_prefects_own_cli(server, tmp_path):
    """infra/prefect.yaml is accepted by `prefect deploy` itself: the deployment lands on the server
    with its cron schedule and its concurrency limit of one."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_API_URL": server, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }  # fmt: skip
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    for command in (["work-pool", "create", "specbatch", "--type", "process"], ["deploy", "--all", "--prefect-file", "infra/prefect.yaml"]):
        done = subprocess.run(prefect + command, cwd=repo, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deployment = httpx.get(f"{server}/deployments/name/specbatch-incremental/nightly").json()
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert deployment["entrypoint"] == "specbatch.flows.incremental.incremental"
    assert deployment["parameters"]["config"]["input"] == "s3://your-bucket/incoming/"
