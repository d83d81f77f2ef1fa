"""The Ray actor: loads its model once, then runs shards, reading their requests from the output
folder (local or an object store) where planning wrote them. A second concurrency slot lets the
driver ask for progress while shards run.

Fault injection for testing recovery: with SPECBATCH_FAULT_CRASH=shard-00001 in the driver's
environment, the first actor to run that shard kills its own process midway (after the first
finished request); the marker file it leaves in the output folder makes later attempts run
normally.
"""

from __future__ import annotations

import os
import threading

import ray

from ..config import RunConfig
from ..storage import OutputDir
from .shard import ShardRef
from .shard_runner import ShardRunner, ShardSummary

FAULT_ENV = "SPECBATCH_FAULT_CRASH"


@ray.remote(max_concurrency=2)
class GenerationWorker:
    def __init__(self, config: RunConfig, worker: str, num_threads: int, crash_shard: str | None = None) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(max(1, num_threads))
        self.runner = ShardRunner(config, worker, ray.get_runtime_context().get_node_id())
        self.lock = threading.Lock()
        self.crash_shard = crash_shard

    def ready(self) -> str:
        return self.runner.worker

    def progress(self) -> tuple[int, int]:
        """(requests finished, completion tokens) since the actor started."""
        return self.runner.requests_done, self.runner.tokens_done

    def run_shards(self, refs: list[ShardRef], out_uri: str, attempt: int) -> list[ShardSummary]:
        with self.lock:
            out = OutputDir(out_uri)
            shards = [ref.load(out) for ref in refs]
            on_result = None
            if self.crash_shard in {ref.shard_id for ref in refs}:
                marker = f".fault-injected-{self.crash_shard}"
                if not out.exists(marker):
                    out.write_json({}, marker)
                    crash_ids = {(r.request_id, r.sample_index) for s in shards if s.shard_id == self.crash_shard for r in s.requests}

                    def on_result(result) -> None:
                        if (result.request_id, result.sample_index) in crash_ids:
                            os._exit(1)  # die mid-shard, as a lost node or an OOM kill would

            return self.runner.run(shards, out, attempt=attempt, on_result=on_result)
