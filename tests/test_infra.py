"""infra/: the manifests parse and carry the fields KubeRay and Prefect require, the Prefect file
names a real flow whose parameters validate, and the Dockerfile installs what the cluster runs.
(The image itself is not built here: the CI machine has no docker daemon; infra/README.md says so.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import ray
import yaml

from specbatch.cli import build_parser, run_config

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers and all(c["name"] and c["image"] for c in containers)
    return containers


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__  # the image's Ray is the cluster's
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    _containers(head["template"])
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in _containers(group["template"]):
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1  # one model replica per GPU


def test_raycluster_manifest():
    doc = _load("kuberay/raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_rayjob_runs_a_valid_specbatch_command_on_gpu_workers():
    doc = _load("kuberay/rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["specbatch", "run"]
    config = run_config(build_parser().parse_args(argv[1:]))  # the options exist and validate
    assert config.device == "cuda" and config.ray_address == "auto"
    assert config.input.startswith("s3://") and config.out.startswith("s3://")  # every node sees them


def test_prefect_yaml_names_a_real_flow_with_valid_parameters_and_schedule():
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    from specbatch.config import RunConfig

    project = PrefectYamlModel.model_validate(_load("prefect.yaml"))
    assert project.deployments
    for deployment in project.deployments:
        flow = load_flow_from_entrypoint(deployment.entrypoint)
        assert flow.name == "specbatch-incremental"
        params = flow.validate_parameters(deployment.parameters)
        assert isinstance(params["config"], RunConfig)
        assert deployment.schedules
        for schedule in deployment.schedules:
            raw = RawScheduleConfig.model_validate(schedule)
            CronSchedule(cron=raw.cron, timezone=raw.timezone)  # raises on a bad expression
        limit = deployment.concurrency_limit
        assert limit.limit == 1 and limit.collision_strategy == "CANCEL_NEW"
        assert deployment.work_pool.name


def test_dockerfile_installs_specbatch_with_a_chosen_torch_build():
    text = (INFRA / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert re.match(r"ARG PYTHON=3\.11$", lines[0]) and lines[1].startswith("FROM python:${PYTHON}")
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in lines  # CPU by default, CUDA by build arg
    assert any(line.startswith("RUN pip install --index-url") and "torch==" in line for line in lines)
    assert any(line.startswith("COPY specbatch") for line in lines) and "RUN pip install . && specbatch --help > /dev/null" in lines
    assert lines.index("USER ray") > max(i for i, line in enumerate(lines) if line.startswith("RUN"))  # not root at run time
    # what it copies exists, and the torch it pins is one pyproject allows
    assert (INFRA.parent / "pyproject.toml").exists() and (INFRA.parent / "specbatch" / "cli.py").exists()
    pinned = re.search(r"ARG TORCH_VERSION=([\d.]+)", text).group(1)
    assert tuple(map(int, pinned.split("."))) >= (2, 4)
