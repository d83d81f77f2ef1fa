"""Settings a worker needs to build its engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("ar",)


@dataclass(frozen=True)
class WorkerConfig:
    model: str  # resolved local path or hub id
    method: str = "ar"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)
