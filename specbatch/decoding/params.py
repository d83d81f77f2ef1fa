"""The engine's boundary: requests in (token ids and sampling settings), results out."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. temperature == 0 means greedy (argmax); top_k == 0 and
    top_p == 1.0 mean no truncation. The seed makes a request's samples reproducible
    whatever batch or worker it lands in."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    sample_index: int = 0
    # Leading prompt tokens shared with other requests of the same engine run (prefix_tree.py
    # plans it): the requests with the same first prefix_len tokens compute and store them once.
    prefix_len: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")
        if not 0 <= self.prefix_len < len(self.prompt_ids):
            raise ValueError(
                f"request {self.request_id!r}: prefix_len must be in [0, {len(self.prompt_ids)}) "
                f"(the prompt's length), got {self.prefix_len}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.request_id!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class StepRecord:
    """One target forward that this request took part in."""

    step: int
    num_draft: int  # K chosen for this request in this step (0 for plain decoding; rows of one step may differ)
    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens accepted
    emitted: int  # tokens appended to the output (accepted + 1, fewer at a stop)
    method: str = ""  # what proposed (auto chooses per step); "ar" for a plain step (nothing drafted, no lookahead window rode)
    # A shadow draft for this step (engine.py, "Shadow drafts"): what shadow_method would have
    # drafted here had it run, and how much of it the tokens emitted accept (greedy: exactly what
    # a verification would; sampled: a draw of the accepted length). None where none was scored.
    shadow_method: str | None = None
    shadow_drafted: int | None = None
    shadow_accepted: int | None = None


@dataclass
class GenerationResult:
    request_id: str
    sample_index: int
    prompt_tokens: int
    completion_ids: list[int]
    finish_reason: str  # "stop" (an EOS token) or "length" (token limit or context end)
    target_steps: int = 0  # target forwards this request took part in, its prefill included
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    cached_prefix_tokens: int = 0  # prompt tokens read from a prefix another request computed
    queue_seconds: float = 0.0  # from the engine's start to this request's admission
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    target_seconds: float = 0.0  # wall time of the target forwards this request took part in
    draft_seconds: float = 0.0  # wall time of the draft forwards of its steps
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.completion_ids)
