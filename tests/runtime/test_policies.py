"""Hand-worked request sequences: exact victims for LRU and LFU; pinned experts never evicted."""

from __future__ import annotations

import pytest

from fmoe.runtime.policies import LFUPolicy, LRUPolicy, make_policy
from fmoe.runtime.slots import SlotTable


def run(table: SlotTable, keys):
    """Acquire each key alone (unpinned after use); return the evicted key of each step."""
    out = []
    for k in keys:
        got = table.acquire(k)
        table.unpin([k])
        out.append(got.evicted)
    return out


def test_lru_victims():
    t = SlotTable(3, LRUPolicy(1, 10, 3))
    # 1 2 3 fill; 1 hit; 4 evicts 2 (oldest); 2 evicts 3; 5 evicts 1 (used at step 4)
    assert run(t, [1, 2, 3, 1, 4, 2, 5]) == [None, None, None, None, 2, 3, 1]
    assert t.stats.hits == 1 and t.stats.misses == 6
    assert sorted(t.slot_of) == [2, 4, 5]


def test_lfu_victims_keep_history():
    t = SlotTable(2, LFUPolicy(1, 10, 2))
    # 1 x3, then 2; 3 evicts 2 (freq 1 < 3); 2 evicts 3 (freq 1 vs 3; 2 remembers 1 use -> 2)
    # 3 evicts 2 (freq 2 vs 1's 3); ties never reached
    assert run(t, [1, 1, 1, 2, 3, 2, 3]) == [None, None, None, None, 2, 3, 2]
    assert sorted(t.slot_of) == [1, 3]


def test_lfu_ties_go_to_least_recent():
    t = SlotTable(2, LFUPolicy(1, 10, 2))
    assert run(t, [1, 2, 3]) == [None, None, 1]
    assert run(t, [2, 4]) == [None, 3]     # 2 has freq 2, 3 has freq 1


@pytest.mark.parametrize("name", ["lru", "lfu"])
def test_pinned_never_evicted(name):
    t = SlotTable(2, make_policy(name, 1, 10, 2))
    t.acquire(1)                  # pinned (the running layer uses it)
    t.acquire(2, pin=False)
    for _ in range(5):
        t.acquire(1)              # 1 is the most frequent and least recent in turn
    got = t.acquire(3)
    assert got.evicted == 2
    t.unpin([3])
    got = t.acquire(4)
    assert got.evicted == 3       # 1 stays: pinned
    with pytest.raises(RuntimeError, match="pinned"):
        t.acquire(5)              # 1 and 4 pinned, no free slot


def test_slots_reused_and_bounded():
    t = SlotTable(3, LRUPolicy(2, 4, 3))
    slots = set()
    for k in [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]:
        slots.add(t.acquire(k).slot)
        t.unpin()
        assert len(t) <= 3
    assert slots == {0, 1, 2}
    assert t.stats.resident_peak == 3


def test_prefetch_counts_used():
    t = SlotTable(3, LRUPolicy(1, 10, 3))
    assert t.prefetch(7) is not None
    assert t.prefetch(7) is None                 # already resident
    t.acquire(7)
    t.unpin()
    assert t.stats.prefetched == 1 and t.stats.prefetch_used == 1 and t.stats.hits == 1


@pytest.mark.parametrize("name,options,expected", [
    ("fmoe", {"max_orders": "abc"}, "max_orders must be an integer or null"),
    ("fmoe", {"max_orders": 1.5}, "max_orders must be an integer or null"),
    ("fmoe", {"max_orders": True}, "max_orders must be an integer or null"),
    ("fmoe", {"lead": 3}, "lead must be a boolean"),
    ("fmoe", {"min_similarity": "high"}, "min_similarity must be a number"),
    ("fmoe", {"eviction": 1}, "eviction must be a string"),
    ("moe-infinity", {"max_orders": "abc"}, "max_orders must be an integer, got 'abc' (str)"),
])
def test_option_types_checked(name, options, expected):
    """Regression (issue 18): an option of the wrong type reached the constructor and failed
    there with a raw TypeError; `make_options` checks each value against its dataclass field's
    type and names the policy, the option and the expected type."""
    from fmoe.runtime.policies import make_options, policy_class

    with pytest.raises(ValueError, match=f"policy {name!r} option {expected}".replace(
            "(", r"\(").replace(")", r"\)")):
        make_options(policy_class(name), options)
    with pytest.raises(ValueError, match=expected.split(",")[0]):
        make_policy(name, 2, 8, 4, **options)


def test_option_types_accept_what_the_fields_say():
    from fmoe.runtime.policies import make_options, policy_class

    opts = make_options(policy_class("fmoe"), {"max_orders": None, "min_similarity": 1,
                                               "lead": False, "prefetch": True,
                                               "prompt_encoder": object(), "decay": 0.5})
    assert opts.max_orders is None and opts.min_similarity == 1 and opts.lead is False
    import numpy as np

    assert make_options(policy_class("fmoe"), {"max_orders": np.int64(2)}).max_orders == 2
