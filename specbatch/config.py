"""One run's settings, from the command line through the flow to every worker.

`RunConfig` is the only place an option is declared: its fields are the flow's one parameter,
what the workers build their engine from, and (with their descriptions) the CLI's options.
It validates itself on construction, so a bad value is one clear error before anything starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .decoding.methods import METHODS
from .errors import SpecbatchError


class RunConfig(BaseModel):
    """Every option of `specbatch run`. `input` and `out` are local paths or URIs (s3://, gs://, ...)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: str = Field(description="prompt file, folder or glob (JSONL, .jsonl.gz, .jsonl.zst, Parquet); path or URI")
    out: str = Field(description="output folder or URI (rerun over it to resume)")
    input_files: tuple[str, ...] | None = Field(
        None,
        description="only these files of the input, by name (what an incremental run takes)",
        json_schema_extra={"cli": False},  # set by flows/incremental.py, not by users
    )
    model: str = Field("demo", description="local folder or hub id (default: the bundled demo target)")
    method: str = Field("ar", description="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()))
    draft: str | None = Field(None, description="draft model for --method draft (with the demo target: the demo draft)")
    num_draft_tokens: int = Field(4, ge=1, le=16, description="K: tokens drafted per step (the adaptive policy's maximum)")
    draft_policy: Literal["fixed", "adaptive"] = Field(
        "adaptive",
        description="fixed: always K (auto: K for whichever method it picks); adaptive: K (and auto's method) "
        "from measured acceptance and cost, down to plain steps",
    )
    draft_confidence: float = Field(
        0.3, ge=0, le=1, description="adaptive policy: a row stops drafting below this draft probability"
    )
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per request at most (a row may set its own)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: 1 = off")
    top_k: int = Field(0, ge=0, description="0 = off")
    seed: int = Field(0, description="run seed; each request's seed derives from it and the request")
    n: int = Field(1, ge=1, description="samples per prompt (sample_index 0..N-1); they share the prompt's KV")
    prefix_sharing: bool = Field(
        True, description="--no-prefix-sharing: compute every prompt in full, not shared prefixes once (outputs are the same)"
    )
    prompt_column: str | None = Field(
        None,
        description="column with the prompt text or the messages list (default: 'prompt', else 'messages')",
    )
    id_column: str = Field("id", description="column with the request id (default: id; rows without one are numbered)")
    workers: int = Field(1, ge=1, description="Ray actors, each holding the model")
    shard_size: int = Field(64, ge=1, description="requests per shard")
    batch_size: int = Field(8, ge=1, description="rows decoded together in a worker")
    device: str = Field("cpu", description="cpu or cuda")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights' dtype")
    ray_address: str | None = Field(None, description="join this Ray cluster (default: a local one)")
    trust_remote_code: bool = Field(
        False, description="run the Python code a model folder or hub repo ships (off: only transformers' own code)"
    )
    allow_pickle_weights: bool = Field(
        False, description="also load .bin/.pt weights, pickles that can run code when read (off: safetensors only)"
    )
    verify: int = Field(
        0,
        ge=0,
        description="re-decode N requests (chosen deterministically) with transformers' greedy generate and "
        "record whether each output matched, in the verification table",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose from {', '.join(METHODS)}")
        return value

    @classmethod
    def parse(cls, **values) -> RunConfig:
        """Build from user input; a bad value is a SpecbatchError naming the option."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise SpecbatchError("; ".join(_describe(err) for err in e.errors())) from None

    def resolved(self) -> RunConfig:
        """The same run with the model and draft as the paths or hub ids workers load."""
        from .workers.models import default_draft, resolve_model

        model = resolve_model(self.model)
        draft = None
        if METHODS[self.method].uses_draft:
            draft = resolve_model(self.draft) if self.draft else default_draft(model)
        if METHODS[self.method].needs_draft and draft is None:
            raise SpecbatchError(f"--method {self.method} needs a draft model (--draft)")
        return self.model_copy(update={"model": model, "draft": draft})


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if not where:  # a check across fields
        return message
    return f"{option(where)}: {message[0].lower() + message[1:]}, got {error.get('input')!r}"
