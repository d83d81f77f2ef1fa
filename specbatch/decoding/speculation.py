"""Build what a speculative method needs: its proposer and its draft-length policy."""

from __future__ import annotations

from .draft_policy import make_policy
from .ngram import NgramProposer
from .proposer import DraftModelProposer, Proposer


def make_speculation(
    method: str, draft_model=None, policy: str = "adaptive", num_draft_tokens: int = 4, confidence: float = 0.3
) -> tuple[Proposer | None, object | None]:
    """(proposer, policy) for `method`: (None, None) for plain decoding ("ar"). The draft's
    confidence stop applies under the adaptive policy only; a fixed K drafts K every step."""
    if method == "ar":
        return None, None
    if method == "draft":
        proposer = DraftModelProposer(draft_model, confidence_threshold=confidence if policy == "adaptive" else 0.0)
    elif method == "ngram":
        proposer = NgramProposer()
    else:
        raise ValueError(f"unknown method {method!r}; use ar, draft or ngram")
    return proposer, make_policy(policy, num_draft_tokens)
