"""The Ray actor: loads its model once, then runs shards. A second concurrency slot lets the
driver ask for progress while a shard runs.

Fault injection for testing recovery: with SPECBATCH_FAULT_CRASH=shard-00001 in the driver's
environment, the first actor to run that shard kills its own process midway (after the first
finished request); the marker file it leaves in the output folder makes later attempts run
normally.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import ray

from ..storage import OutputDir
from .config import WorkerConfig
from .shard import Shard
from .shard_runner import ShardRunner, ShardSummary

FAULT_ENV = "SPECBATCH_FAULT_CRASH"


@ray.remote(max_concurrency=2)
class GenerationWorker:
    def __init__(self, config: WorkerConfig, worker: str, num_threads: int, crash_shard: str | None = None) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(max(1, num_threads))
        self.runner = ShardRunner(config, worker)
        self.lock = threading.Lock()
        self.crash_shard = crash_shard

    def ready(self) -> str:
        return self.runner.worker

    def progress(self) -> tuple[int, int]:
        """(requests finished, completion tokens) since the actor started."""
        return self.runner.requests_done, self.runner.tokens_done

    def run_shard(self, shard: Shard, out_dir: str, attempt: int) -> ShardSummary:
        with self.lock:
            out = OutputDir(out_dir)
            on_result = None
            if self.crash_shard == shard.shard_id:
                marker = Path(out_dir) / f".fault-injected-{shard.shard_id}"
                if not marker.exists():
                    marker.touch()

                    def on_result(_result) -> None:
                        os._exit(1)  # die mid-shard, as a lost node or an OOM kill would

            return self.runner.run(shard, out, attempt=attempt, on_result=on_result)
