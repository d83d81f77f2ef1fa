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
