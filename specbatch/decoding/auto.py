"""Several proposers behind one ("arms"): what --method auto runs, and how the engine holds any
proposer. The draft policy (draft_policy.py) says which arm drafts each step, from one cost model
shared by all of them; "ar" (a plain step) is always an option.

All arms see every admission and release; only the arm that proposed is told what was accepted.
The draft-model arms catch up lazily on steps they sat out, so switching costs one wider draft
forward, never correctness: the verifier checks whatever is proposed. Each step's arm goes to the
Draft's `source` and from there to the `steps` table.
"""

from __future__ import annotations

from .proposer import Proposer
from .sampling import RowSampling
from .verifier import Draft


class ArmSet:
    name = "auto"

    def __init__(self, arms: dict[str, Proposer]) -> None:
        if not arms:
            raise ValueError("an ArmSet needs at least one proposer")
        self.arms = dict(arms)
        self.names = list(self.arms)
        self.chosen: str | None = None  # the arm that proposed this step, until it is told what was accepted
        self.last_forwards: list[tuple[int, int, float]] = []  # of the last proposal, whichever arm made it
        self.tried: dict[str, int] = {n: 0 for n in self.names}  # steps each arm drafted
        self.scratch_positions = max(p.scratch_positions for p in self.arms.values())
        # Arms that can say what they would draft without drafting (a lookup, no model): the
        # engine scores that against what rows emit (engine.py, "Shadow drafts").
        self.shadowable = [n for n, p in self.arms.items() if hasattr(p, "shadow")]

    @classmethod
    def of(cls, proposer) -> ArmSet:
        """proposer as an ArmSet: itself, or a set of one."""
        return proposer if isinstance(proposer, ArmSet) else cls({proposer.name: proposer})

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.arms.values())

    def cost_share(self, target_parameters: int, target_layers: int):
        """arm -> a draft forward's prior cost as a share of a target forward over the same rows:
        the larger of its share of the parameters (what a forward bound by arithmetic or memory
        pays) and of the layers (what one bound by per-layer calls pays, as small models and small
        batches are); 0 for a model-free arm."""

        def share(arm: str) -> float:
            p = self.arms[arm]
            return max(getattr(p, "parameters", 0) / max(target_parameters, 1), getattr(p, "layers", 0) / max(target_layers, 1))

        return share

    def chunk_tokens(self, arm: str, k: int) -> int:
        """Tokens per row the arm's step writes besides the last token (a plain draft: k)."""
        declared = getattr(self.arms[arm], "chunk_tokens", None)
        return declared(k) if declared else k

    def start(self, num_slots: int, capacity: int) -> None:
        for p in self.arms.values():
            p.start(num_slots, capacity)

    def admit(self, slot: int, prefix) -> None:
        for p in self.arms.values():
            p.admit(slot, prefix)

    def release(self, slot: int) -> None:
        for p in self.arms.values():
            p.release(slot)

    def propose(self, arm: str, slots: list[int], seqs: list[list[int]], num_draft: list[int], sampling: RowSampling) -> Draft:
        self.chosen = arm
        draft = self.arms[arm].propose(slots, seqs, num_draft, sampling)
        draft.source = arm
        self.last_forwards = self.arms[arm].last_forwards
        self.tried[arm] += 1
        return draft

    def would_verify(self, arm: str, slots: list[int], seqs: list[list[int]]) -> bool:
        """Whether the arm's step would verify a draft in some row (see Proposer); an arm that
        cannot tell would."""
        check = getattr(self.arms[arm], "would_verify", None)
        return check is None or any(check(slot, seq) for slot, seq in zip(slots, seqs))

    def shadow(self, arm: str, slot: int, seq: list[int], k: int) -> list[int]:
        return self.arms[arm].shadow(slot, seq, k)

    def accepted(self, slots: list[int], seq_lens: list[int], num_accepted: list[int], logits=None) -> None:
        if self.chosen is not None:
            self.arms[self.chosen].accepted(slots, seq_lens, num_accepted, logits)
        self.chosen = None
