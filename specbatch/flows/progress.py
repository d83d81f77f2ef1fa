"""Progress of a run: a rich bar on stderr and a Prefect progress artifact, both fed by one
callback (requests done, completion tokens so far)."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RunProgress:
    def __init__(self, total_requests: int, already_done: int, description: str, artifact_every: float = 10.0) -> None:
        self.total = max(total_requests, 1)
        self.already_done = already_done
        self.start = time.perf_counter()
        self.artifact_every = artifact_every
        self._last_artifact = 0.0
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("requests"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
            refresh_per_second=1,  # the driver shares the machine with a worker: redraw seldom
        )
        self.task = self.bar.add_task(description, total=total_requests, completed=already_done, rate="")
        self.artifact_id = create_progress_artifact(
            progress=100.0 * already_done / self.total, key="specbatch-progress", description=description
        )

    def __enter__(self) -> RunProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()
        self._push_artifact(force=True)

    def update(self, requests_done: int, tokens_done: int) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(
            self.task, completed=self.already_done + requests_done, rate=f"{tokens_done / elapsed:,.0f} tok/s"
        )
        self._push_artifact()

    def _push_artifact(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last_artifact >= self.artifact_every:
            self._last_artifact = now
            done = self.bar.tasks[0].completed
            update_progress_artifact(self.artifact_id, progress=min(100.0, 100.0 * done / self.total))
