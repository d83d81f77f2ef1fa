"""Plan prefix sharing over a whole job: which prompts form a group and how long a prefix each
group computes once (BatchLLM, Zheng et al. 2024: plan globally rather than rely on an LRU cache).

Sorted prompts make the prefix tree implicit: the longest common prefixes of neighbours (the LCP
array) define its internal nodes, the LCP intervals. A node v with n_v prompts of L_v tokens in
all, at depth d_v, can share p_v = min(d_v, shortest prompt under v - 1) tokens (every member keeps
at least one token of its own, whose logits start its generation). Sharing at v costs

    share(v) = p_v + (L_v - n_v * p_v) + group_overhead      tokens prefilled

against best(children) for leaving it to the subtrees (an unshared prompt costs its length).
Bottom-up, each node takes the cheaper: a system prompt shared by all rows wins over many
few-shot groups only when it saves more tokens. Plain Python, O(total tokens) after the sort.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

GROUP_OVERHEAD_TOKENS = 8  # a group costs an extra forward and per-step attention work: only
# share where it saves more tokens than this


@dataclass
class _Node:
    depth: int  # tokens every prompt under the node has in common
    lb: int  # first and last index (in sorted order) of its prompts
    rb: int = -1
    children: list[_Node] = field(default_factory=list)
    shared: int = 0  # p_v if sharing at this node is chosen, else 0
    shortest: int = 0
    best_cost: int = 0


def token_key(ids: Sequence[int]) -> bytes:
    """Bytes that sort as the token ids do (big-endian, so a prefix sorts first), 4 per token."""
    return np.asarray(ids, dtype=">u4").tobytes()


def shared_prefix_lengths(prompts: Sequence[Sequence[int]], group_overhead: int = GROUP_OVERHEAD_TOKENS) -> list[int]:
    """-> for each prompt (in the given order), how many of its leading tokens it shares with its
    group, 0 for none. A group is every prompt with the same shared length and the same tokens
    up to it; its prefix is computed once."""
    keys = [token_key(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (keys[i], i))
    shared_sorted = shared_prefix_lengths_sorted([keys[i] for i in order], group_overhead)
    result = [0] * len(prompts)
    for position, i in enumerate(order):
        result[i] = shared_sorted[position]
    return result


def shared_prefix_lengths_sorted(keys: Sequence[bytes], group_overhead: int = GROUP_OVERHEAD_TOKENS) -> list[int]:
    """shared_prefix_lengths over prompts given as sorted token_key()s (C-speed compares)."""
    n = len(keys)
    if n < 2:
        return [0] * n
    lengths = [len(k) // 4 for k in keys]
    cumulative = [0]
    for length in lengths:
        cumulative.append(cumulative[-1] + length)

    def lcp(i: int) -> int:  # between sorted prompts i - 1 and i, by binary search on equal slices
        a, b = keys[i - 1], keys[i]
        lo, hi = 0, min(len(a), len(b)) // 4
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if a[: 4 * mid] == b[: 4 * mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def finish(v: _Node) -> None:
        own_cost, shortest, at = 0, min((c.shortest for c in v.children), default=1 << 62), v.lb
        for c in v.children + [None]:  # prompts directly under v, between its children's ranges
            end = c.lb if c is not None else v.rb + 1
            for i in range(at, end):
                own_cost += lengths[i]
                shortest = min(shortest, lengths[i])
            if c is not None:
                own_cost += c.best_cost
                at = c.rb + 1
        v.shortest = shortest
        members, tokens = v.rb - v.lb + 1, cumulative[v.rb + 1] - cumulative[v.lb]
        p = min(v.depth, shortest - 1)
        share_cost = p + tokens - members * p + group_overhead
        if members >= 2 and p > 0 and share_cost < own_cost:
            v.shared, v.best_cost = p, share_cost
        else:
            v.best_cost = own_cost

    # The LCP-interval tree (Abouelhoda et al., 2004), built with a stack; children close first.
    stack = [_Node(depth=0, lb=0)]
    for i in range(1, n + 1):
        depth = lcp(i) if i < n else 0
        lb, last = i - 1, None
        while depth < stack[-1].depth:
            last = stack.pop()
            last.rb = i - 1
            finish(last)
            lb = last.lb
            if depth <= stack[-1].depth:
                stack[-1].children.append(last)
                last = None
        if depth > stack[-1].depth:
            stack.append(_Node(depth=depth, lb=lb, children=[last] if last is not None else []))
    root = stack[0]
    root.rb = n - 1
    finish(root)

    shared_sorted = [0] * n
    todo = [root]
    while todo:
        v = todo.pop()
        if v.shared:
            shared_sorted[v.lb : v.rb + 1] = [v.shared] * (v.rb - v.lb + 1)
        else:
            todo.extend(v.children)
    return shared_sorted
