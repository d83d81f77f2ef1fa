"""The decoding methods, one entry each: how to build its proposer, whether it needs or can use
a draft model, and whether it applies to a given model. The CLI's choices, the worker's config,
the draft resolution and auto's arms all read this registry; adding a method is one file with its
proposer plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .architecture import UnsupportedModel, decoder_layers
from .auto import ArmSet
from .draft_policy import make_policy
from .layerskip import LayerSkipProposer
from .lookahead import LookaheadProposer
from .ngram import NgramProposer
from .proposer import DraftModelProposer, Proposer


@dataclass(frozen=True)
class Options:
    policy: str = "adaptive"  # fixed | adaptive: the draft-length policy
    num_draft_tokens: int = 4  # K, or the largest K the adaptive policy may choose
    confidence: float = 0.3  # a draft row stops below this probability (adaptive policy only)

    @property
    def stop(self) -> float:
        return self.confidence if self.policy == "adaptive" else 0.0


def _always(model) -> str | None:
    return None


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    build: Callable[[object, object | None, Options], Proposer] | None  # (target, draft, options); None: plain
    needs_draft: bool = False  # refuses to run without a draft model
    uses_draft: bool = False  # takes a draft model where one is given
    applies: Callable[[object], str | None] = _always  # (target) -> why it cannot run on it, or None
    auto_arm: bool = True  # auto may choose it
    runs_model: bool = False  # drafts with a model forward (a draft, or the target's first layers)


def _layers_reason(model) -> str | None:
    try:
        decoder_layers(model)
    except UnsupportedModel as e:
        return str(e)
    return None


def _build_auto(target, draft, options: Options) -> ArmSet:
    """Every other method that applies to the target (draft ones only with a draft): the policy
    chooses among them per step, plain steps included. Model-free arms come first: the policy's
    opening probe goes to the first arm, and theirs costs no draft prefill of every row."""
    usable = [m for m in METHODS.values() if m.auto_arm and m.build is not None and applies(m, target, draft) is None]
    return ArmSet({m.name: m.build(target, draft, options) for m in sorted(usable, key=lambda m: m.runs_model)})


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("ar", "plain decoding", None, auto_arm=False),
        Method(
            "draft",
            "speculative decoding with a draft model of the same vocabulary",
            lambda target, draft, o: DraftModelProposer(draft, confidence_threshold=o.stop),
            needs_draft=True,
            uses_draft=True,
            runs_model=True,
        ),
        Method("ngram", "prompt lookup and a table learned from the outputs", lambda t, d, o: NgramProposer()),
        Method(
            "lookahead",
            "lookahead decoding: a Jacobi window and an n-gram pool",
            lambda t, d, o: LookaheadProposer(ngram=o.num_draft_tokens + 1),
        ),
        Method(
            "layerskip",
            "self-speculation: the target's first layers and its last draft",
            lambda target, d, o: LayerSkipProposer(target, confidence_threshold=o.stop),
            applies=_layers_reason,
            runs_model=True,
        ),
        Method(
            "auto",
            "chooses among the methods that apply, step by step, from measured speed",
            _build_auto,
            uses_draft=True,
            auto_arm=False,
        ),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def applies(method: Method, target, draft=None) -> str | None:
    """Why `method` cannot run on this target (and draft), or None when it can."""
    if method.needs_draft and draft is None:
        return f"method {method.name!r} needs a draft model (--draft)"
    return method.applies(target)


def make_speculation(
    method: str,
    target,
    draft_model=None,
    policy: str = "adaptive",
    num_draft_tokens: int = 4,
    confidence: float = 0.3,
) -> tuple[Proposer | None, object | None]:
    """(proposer, draft-length policy) for `method`: (None, None) for plain decoding ("ar")."""
    entry = get_method(method)
    if entry.build is None:
        return None, None
    if (reason := applies(entry, target, draft_model)) is not None:
        raise ValueError(f"method {method!r} does not apply: {reason}")
    options = Options(policy, num_draft_tokens, confidence)
    proposer = entry.build(target, draft_model, options)
    arms = proposer.names if isinstance(proposer, ArmSet) else None
    return proposer, make_policy(policy, num_draft_tokens, arms)
