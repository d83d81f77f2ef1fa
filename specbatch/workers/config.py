"""Settings a worker needs to build its engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..decoding.methods import METHODS

DRAFT_POLICIES = ("fixed", "adaptive")


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
    draft: str | None = None  # resolved draft model, for method "draft" (and "auto", where one is given)
    num_draft_tokens: int = 4  # K, or the largest K the adaptive policy may choose
    draft_policy: str = "adaptive"
    draft_confidence: float = 0.3  # adaptive policy: a row stops drafting below this draft probability

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if METHODS[self.method].needs_draft and not self.draft:
            raise ValueError(f"method {self.method!r} needs a draft model (--draft)")
        if self.draft_policy not in DRAFT_POLICIES:
            raise ValueError(f"unknown draft policy {self.draft_policy!r}; choose from {', '.join(DRAFT_POLICIES)}")
        if not 1 <= self.num_draft_tokens <= 16:
            raise ValueError(f"num_draft_tokens must be in 1..16, got {self.num_draft_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)
