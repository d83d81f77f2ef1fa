"""Hand shards to a pool of GenerationWorker actors as they free up; retry a shard whose actor
died (or whose run raised) on a fresh actor, up to max_attempts, then record its requests as
errors so the rest of the job still lands."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from ..storage import OutputDir
from ..storage.schema import ERRORS
from .actor import FAULT_ENV, GenerationWorker
from .config import WorkerConfig
from .shard import Shard
from .shard_runner import ShardSummary

log = logging.getLogger("specbatch")


@dataclass
class DispatchReport:
    summaries: list[ShardSummary] = field(default_factory=list)
    failed_shards: list[str] = field(default_factory=list)
    retries: int = 0


class WorkerPool:
    def __init__(self, config: WorkerConfig, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"workers must be >= 1, got {num_workers}")
        self.config = config
        self.num_workers = num_workers
        self.crash_shard = os.environ.get(FAULT_ENV)
        self._spawned = 0
        if config.device.startswith("cuda"):
            self.options = {"num_gpus": 1, "num_cpus": 1}
            self.threads = 1
        else:
            cpus = int(ray.available_resources().get("CPU", 1))
            per_worker = max(1, cpus // num_workers)
            self.options = {"num_cpus": per_worker}
            self.threads = per_worker
        self.actors = [self._spawn() for _ in range(num_workers)]

    def _spawn(self):
        name = f"worker-{self._spawned}"
        self._spawned += 1
        return GenerationWorker.options(**self.options).remote(self.config, name, self.threads, self.crash_shard)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def run(
        self,
        shards: list[Shard],
        out: OutputDir,
        on_progress: Callable[[int, int], None] | None = None,
        max_attempts: int = 3,
    ) -> DispatchReport:
        """Run every shard; on_progress(requests_done, tokens_done) is called as work finishes."""
        report = DispatchReport()
        pending: deque[tuple[Shard, int]] = deque((s, 1) for s in shards)
        idle = list(self.actors)
        in_flight: dict = {}  # ref -> (actor, shard, attempt, actor progress when the shard began)
        last_seen: dict = {}  # actor -> (requests, tokens) last reported
        done_requests = done_tokens = 0

        while pending or in_flight:
            while pending and idle:
                shard, attempt = pending.popleft()
                actor = idle.pop()
                ref = actor.run_shard.remote(shard, str(out.root), attempt)
                in_flight[ref] = (actor, shard, attempt, last_seen.get(actor, (0, 0)))
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            for ref in ready:
                actor, shard, attempt, _ = in_flight.pop(ref)
                try:
                    summary: ShardSummary = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    log.warning("worker died running %s (attempt %d): %s", shard.shard_id, attempt, _brief(e))
                    self.actors.remove(actor)
                    last_seen.pop(actor, None)
                    replacement = self._spawn()
                    self.actors.append(replacement)
                    idle.append(replacement)
                    self._retry_or_fail(shard, attempt, max_attempts, _brief(e), pending, report, out)
                    continue
                except ray.exceptions.RayTaskError as e:
                    log.warning("%s failed (attempt %d): %s", shard.shard_id, attempt, _brief(e))
                    idle.append(actor)
                    self._retry_or_fail(shard, attempt, max_attempts, _brief(e), pending, report, out)
                    continue
                idle.append(actor)
                report.summaries.append(summary)
                done_requests += summary.num_requests
                done_tokens += summary.completion_tokens
            partial_requests = partial_tokens = 0
            for actor, _, _, (base_requests, base_tokens) in in_flight.values():
                try:
                    now = ray.get(actor.progress.remote(), timeout=5)
                except (ray.exceptions.RayError, TimeoutError):
                    continue
                last_seen[actor] = now
                partial_requests += now[0] - base_requests
                partial_tokens += now[1] - base_tokens
            if on_progress is not None:
                on_progress(done_requests + partial_requests, done_tokens + partial_tokens)
        return report

    def _retry_or_fail(self, shard, attempt, max_attempts, reason, pending, report, out: OutputDir) -> None:
        if attempt < max_attempts:
            report.retries += 1
            pending.appendleft((shard, attempt + 1))
            return
        report.failed_shards.append(shard.shard_id)
        message = f"{shard.shard_id} failed {attempt} times; last error: {reason}"
        errors = pa.Table.from_pylist(
            [
                {"request_id": r.request_id, "input_index": r.input_index, "stage": "generate", "reason": message}
                for r in shard.requests
            ],
            schema=ERRORS,
        )
        out.write_unit(shard.shard_id, {"errors": errors}, summary={"failed": True, "reason": message})


def _brief(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def wait_ready(pool: WorkerPool, timeout: float = 600) -> None:
    """Block until every actor has loaded its model (surfacing load errors early)."""
    t0 = time.time()
    ray.get([a.ready.remote() for a in pool.actors], timeout=timeout)
    log.info("%d workers ready in %.1fs", len(pool.actors), time.time() - t0)
