"""Hand shards to a pool of GenerationWorker actors as they free up, a few per call so a worker's
batch stays full across shard boundaries; retry the unfinished shards of a call whose actor died
(or whose run raised), one shard per call, on a fresh actor, up to max_attempts, then record a
shard's requests as errors so the rest of the job still lands."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from ..config import RunConfig
from ..storage import OutputDir
from ..storage.schema import ERRORS
from .actor import FAULT_ENV, GenerationWorker
from .shard import ShardRef
from .shard_runner import ShardSummary

log = logging.getLogger("specbatch")
REQUESTS_PER_CALL = 256  # times the batch size, at most: a call's batch drains once, at its end
POLL_SECONDS = 2.0  # how often the driver asks workers for progress


@dataclass
class DispatchReport:
    summaries: list[ShardSummary] = field(default_factory=list)
    failed_shards: list[str] = field(default_factory=list)
    retries: int = 0


class WorkerPool:
    def __init__(self, config: RunConfig, num_workers: int) -> None:
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

    def shrink(self, num_workers: int) -> None:
        """Keep at most num_workers actors (a job with fewer shards than workers)."""
        for actor in self.actors[max(1, num_workers) :]:
            ray.kill(actor)
        self.actors = self.actors[: max(1, num_workers)]
        self.num_workers = len(self.actors)

    def call_size(self, pending: int, shard_requests: int) -> int:
        """Shards per call: enough requests to keep a batch full for a while, no more than a fair
        share of what is left, so every worker stays busy to the end."""
        wanted = math.ceil(REQUESTS_PER_CALL * self.config.batch_size / max(1, shard_requests))
        return max(1, min(wanted, math.ceil(pending / self.num_workers)))

    def run(
        self,
        shards: list[ShardRef],
        out: OutputDir,
        on_progress: Callable[[int, int], None] | None = None,
        max_attempts: int = 3,
    ) -> DispatchReport:
        """Run every shard; on_progress(requests_done, tokens_done) is called as work finishes."""
        report = DispatchReport()
        fresh: deque[ShardRef] = deque(shards)
        retry: deque[tuple[ShardRef, int]] = deque()  # one shard per call, after a failure
        idle = list(self.actors)
        in_flight: dict = {}  # ref -> (actor, shards, attempt, actor progress when the call began)
        last_seen: dict = {}  # actor -> (requests, tokens) last reported
        done_requests = done_tokens = 0
        typical = max(1, max((s.num_requests for s in shards), default=1))

        while fresh or retry or in_flight:
            while (fresh or retry) and idle:
                if retry:
                    shard, attempt = retry.popleft()
                    call = [shard]
                else:
                    call, attempt = [fresh.popleft() for _ in range(min(len(fresh), self.call_size(len(fresh), typical)))], 1
                actor = idle.pop()
                ref = actor.run_shards.remote(call, out.uri, attempt)
                in_flight[ref] = (actor, call, attempt, last_seen.get(actor, (0, 0)))
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                actor, call, attempt, _ = in_flight.pop(ref)
                try:
                    summaries: list[ShardSummary] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    log.warning("worker died running %s (attempt %d): %s", _names(call), attempt, _brief(e))
                    self.actors.remove(actor)
                    last_seen.pop(actor, None)
                    replacement = self._spawn()
                    self.actors.append(replacement)
                    idle.append(replacement)
                    self._retry_or_fail(call, attempt, max_attempts, _brief(e), retry, report, out)
                    continue
                except ray.exceptions.RayTaskError as e:
                    log.warning("%s failed (attempt %d): %s", _names(call), attempt, _brief(e))
                    idle.append(actor)
                    self._retry_or_fail(call, attempt, max_attempts, _brief(e), retry, report, out)
                    continue
                idle.append(actor)
                report.summaries += summaries
                done_requests += sum(s.num_requests for s in summaries)
                done_tokens += sum(s.completion_tokens for s in summaries)
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

    def _retry_or_fail(self, call, attempt, max_attempts, reason, retry, report, out: OutputDir) -> None:
        """The call's shards that did not finish go again, each on its own (so one bad shard does
        not sink the others), or become error rows after max_attempts."""
        unfinished = [s for s in call if not out.is_complete(s.shard_id)]
        for shard in unfinished if attempt < max_attempts else []:
            report.retries += 1
            retry.append((shard, attempt + 1))
        if attempt < max_attempts:
            return
        for shard in unfinished:
            report.failed_shards.append(shard.shard_id)
            message = f"{shard.shard_id} failed {attempt} times; last error: {reason}"
            requests = shard.load(out).requests
            errors = pa.Table.from_pylist(
                [
                    {"request_id": r.request_id, "input_index": r.input_index, "stage": "generate", "reason": message}
                    for r in requests
                ],
                schema=ERRORS,
            )
            out.write_unit(shard.shard_id, {"errors": errors}, summary={"failed": True, "reason": message})


def _names(call: list[ShardRef]) -> str:
    return call[0].shard_id if len(call) == 1 else f"{call[0].shard_id}..{call[-1].shard_id}"


def _brief(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def wait_ready(pool: WorkerPool, timeout: float = 600) -> None:
    """Block until every actor has loaded its model (surfacing load errors early)."""
    t0 = time.time()
    ray.get([a.ready.remote() for a in pool.actors], timeout=timeout)
    log.info("%d workers ready in %.1fs", len(pool.actors), time.time() - t0)
