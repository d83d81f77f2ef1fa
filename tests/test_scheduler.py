"""The engine's scheduler without a model: slots, the prefill budget, prefix-group reference counts."""

from __future__ import annotations

import pytest

from specbatch.decoding import GenerationRequest
from specbatch.decoding.scheduler import Scheduler


def requests(lengths: list[int]) -> list[GenerationRequest]:
    return [GenerationRequest(str(i), list(range(1, n + 1)), 4) for i, n in enumerate(lengths)]


def test_first_come_first_served_and_a_finished_slot_goes_to_the_next():
    s = Scheduler(requests([3] * 5), [None] * 5, num_slots=2, max_prefill_tokens=100)
    first = s.admit()
    assert [(a.index, a.slot) for a in first] == [(0, 0), (1, 1)]
    assert s.admit() == []  # no free slot
    assert s.finish(1) is None
    assert [(a.index, a.slot) for a in s.admit()] == [(2, 1)]
    for slot in (0, 1):
        s.finish(slot)
    assert [a.index for a in s.admit()] == [3, 4]
    s.finish(0), s.finish(1)
    assert not s.has_work
    with pytest.raises(KeyError):
        s.finish(0)  # not held


def test_the_prefill_budget_counts_padding_to_the_longest_suffix():
    # 4 + 4 fit in 10; a third row would pad to 3 x 4 = 12
    s = Scheduler(requests([4, 4, 4, 2]), [None] * 4, num_slots=8, max_prefill_tokens=10)
    assert [a.index for a in s.admit()] == [0, 1]
    assert [a.index for a in s.admit()] == [2, 3]  # 2 x 4 = 8
    # one row longer than the budget is still admitted, alone
    s = Scheduler(requests([20, 1]), [None] * 2, num_slots=8, max_prefill_tokens=10)
    assert [a.index for a in s.admit()] == [0]
    assert [a.index for a in s.admit()] == [1]
    # a shared prefix is not part of a row's suffix
    reqs = requests([12, 12])
    key = tuple(reqs[0].prompt_ids[:10])
    s = Scheduler(reqs, [key, key], num_slots=8, max_prefill_tokens=10)
    assert len(s.admit()) == 2  # suffixes of 2 tokens each


def test_a_prefix_is_computed_by_its_first_member_and_freed_after_its_last():
    reqs = requests([6] * 4)
    key = tuple(reqs[0].prompt_ids[:4])
    s = Scheduler(reqs, [key, key, None, key], num_slots=2, max_prefill_tokens=100)
    a, b = s.admit()
    assert (a.new_prefix, b.new_prefix) == (True, False) and a.prefix_key == key and b.prefix_key == key
    assert s.finish(a.slot) is None  # two members still hold it
    (c,) = s.admit()
    assert c.prefix_key is None and not c.new_prefix
    assert s.finish(b.slot) is None  # the fourth member has not run yet: the prefix stays
    (d,) = s.admit()
    assert d.prefix_key == key and not d.new_prefix  # still held: not computed again
    assert s.finish(c.slot) is None
    assert s.finish(d.slot) == key  # the last member: free it
    assert not s.has_work and not s.live


def test_freed_slots_wait_for_company_before_a_prefill():
    """Rows that finish apart would take a prefill forward each; freed slots wait until they have
    stood empty admit_wait x num_slots slot-steps, then go together. Never while nothing decodes,
    and not when every waiting request can go at once."""
    s = Scheduler(requests([3] * 12), [None] * 12, num_slots=4, max_prefill_tokens=100, admit_wait=1.0)
    assert len(s.admit()) == 4  # nothing decodes yet: no waiting
    s.finish(0)
    assert [s.admit() for _ in range(4)] == [[]] * 4  # one free slot: 4 slot-steps of patience
    s.finish(1)
    (a, b) = s.admit()  # two free slots: 4 + 2 > 4, they go together
    assert (a.index, b.index) == (4, 5)
    for slot in range(4):
        s.finish(slot)
    assert len(s.admit()) == 4  # nothing decodes: at once
    s.finish(0), s.finish(1)
    assert len(s.admit()) == 2  # the last two waiting requests: nothing to wait for
    assert not s.waiting

    # Waiting wastes time, not steps: a slot-step of a step that costs three plain ones counts three.
    costly = Scheduler(requests([3] * 8), [None] * 8, num_slots=4, max_prefill_tokens=100, admit_wait=1.0)
    costly.admit(), costly.finish(0)
    assert costly.admit(step_cost=3.0) == []  # 3 <= 4
    assert [a.index for a in costly.admit(step_cost=3.0)] == [4]  # 3 + 3 > 4: after one step, not four

    at_once = Scheduler(requests([3] * 6), [None] * 6, num_slots=4, max_prefill_tokens=100)
    at_once.admit(), at_once.finish(2)
    assert [a.index for a in at_once.admit()] == [4]  # the default: no waiting
    with pytest.raises(ValueError, match="admit_wait"):
        Scheduler(requests([3]), [None], num_slots=1, max_prefill_tokens=100, admit_wait=-1)


def test_the_cost_of_rows_finishing_apart_while_they_still_finish_together():
    """One cohort (rows admitted in one prefill) of one token limit, with requests waiting: plain
    steps end it in one step and refill it in one prefill; made to finish apart, the job pays
    about (1 + a) / sqrt(2 a L) of its time from then on (a: admit_wait, L: the token limit), at
    most a prefill per row (B / L). Nothing to lose once the rows are apart, nothing waits, or the
    limits differ."""
    def job(n: int, limit: int, admit_wait: float = 1.0, slots: int = 8) -> Scheduler:
        reqs = [GenerationRequest(str(i), [1, 2, 3], limit) for i in range(n)]
        return Scheduler(reqs, [None] * n, num_slots=slots, max_prefill_tokens=1000, admit_wait=admit_wait)

    s = job(24, 32)
    assert s.desync_cost() == 0.0  # nothing decodes yet
    s.admit()
    assert s.desync_cost() == pytest.approx(7 / 32)  # 7 more prefills a wave, under (1 + 1) / sqrt(2 * 32)
    long = job(96, 128, slots=32)
    long.admit()
    assert long.desync_cost() == pytest.approx(2 / 16)  # long rows: refills are rarer
    few = job(24, 128)
    few.admit()
    assert few.desync_cost() == pytest.approx(7 / 128)  # 8 rows: at most 7 more prefills a wave
    alone = job(24, 32, slots=1)
    alone.admit()
    assert alone.desync_cost() == 0.0  # a batch of one takes a prefill a row anyway
    eager = job(24, 32, admit_wait=0.0)
    eager.admit()
    assert eager.desync_cost() == pytest.approx(7 / 32)  # a prefill for every row
    s.finish(3)
    assert s.desync_cost() == pytest.approx(6 / 32)  # asked again once a row has gone: one row fewer to split
    waited = 0
    while not s.admit():  # one free slot waits 8 slot-steps, then goes alone
        waited += 1
    assert waited == 8
    assert len(set(s.cohort.values())) == 2 and s.desync_cost() == 0.0  # already apart
    last = job(8, 32)
    last.admit()
    assert last.desync_cost() == 0.0  # nothing waits: the job's end, no refill to split
    mixed = Scheduler(
        [GenerationRequest(str(i), [1, 2, 3], 16 + 16 * (i % 2)) for i in range(12)], [None] * 12, 4, 1000, 1.0
    )
    mixed.admit()
    assert mixed.desync_cost() == 0.0  # limits differ: they finish apart anyway
