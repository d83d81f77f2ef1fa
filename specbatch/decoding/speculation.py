"""Build what a speculative method needs: its proposer and its draft-length policy."""

from __future__ import annotations

from .auto import AutoProposer
from .draft_policy import FixedPolicy, make_policy
from .layerskip import LayerSkipProposer
from .lookahead import LookaheadProposer
from .ngram import NgramProposer
from .proposer import DraftModelProposer, Proposer


def make_proposer(
    method: str, target, draft_model=None, policy: str = "adaptive", num_draft_tokens: int = 4, confidence: float = 0.3
) -> Proposer:
    """The proposer of one speculative method. The draft's confidence stop applies under the
    adaptive policy only; a fixed K drafts K every step."""
    stop = confidence if policy == "adaptive" else 0.0
    if method == "draft":
        if draft_model is None:
            raise ValueError("method 'draft' needs a draft model")
        return DraftModelProposer(draft_model, confidence_threshold=stop)
    if method == "ngram":
        return NgramProposer()
    if method == "lookahead":
        return LookaheadProposer(ngram=num_draft_tokens + 1)
    if method == "layerskip":
        return LayerSkipProposer(target, confidence_threshold=stop)
    if method == "auto":  # every method the job can use, chosen step by step; each arm drafts K
        arms = ["ngram", "lookahead", "layerskip"] + (["draft"] if draft_model is not None else [])
        return AutoProposer({m: make_proposer(m, target, draft_model, "fixed", num_draft_tokens) for m in arms})
    raise ValueError(f"unknown method {method!r}; use ar, draft, ngram, lookahead, layerskip or auto")


def make_speculation(
    method: str,
    target,
    draft_model=None,
    policy: str = "adaptive",
    num_draft_tokens: int = 4,
    confidence: float = 0.3,
) -> tuple[Proposer | None, object | None]:
    """(proposer, draft-length policy) for `method`: (None, None) for plain decoding ("ar").
    auto decides per step itself (plain steps included), so it drafts a fixed K when it drafts."""
    if method == "ar":
        return None, None
    proposer = make_proposer(method, target, draft_model, policy, num_draft_tokens, confidence)
    return proposer, FixedPolicy(num_draft_tokens) if method == "auto" else make_policy(policy, num_draft_tokens)
