"""The simulator's host and hybrid execution on hand-worked cases, and the placement rule."""

from __future__ import annotations

import pytest

from fmoe.runtime.policies import LRUPolicy, MissCost, make_policy, place
from fmoe.runtime.slots import SlotTable
from fmoe.sim.replay import SimError, simulate
from fmoe.sim.timing import TimingModel
from sim_helpers import make_trace, trace_from_lists


# one MoE layer, one expert per token: attention 1 s, an expert 0.5 s on the device, 3 s on the
# host plus 0.25 s of round trip, a copy `copy` seconds
def _tm(copy):
    return TimingModel(attn=1.0, expert=0.5, copy=copy, host=3.0, host_latency=0.25)


TRACE = [[[0], [1], [1], [0]]]


def _run(execution, copy):
    trace = trace_from_lists(TRACE, E=4)
    return simulate(trace, "lru", _tm(copy), capacity=1, execution=execution, use_cache=False)


def test_hybrid_takes_the_faster_path():
    # a copy of 2 s: loading (1 + 2 + 0.5 compute - 1 = 2.5 s) beats the host (3 + 0.25 = 3.25 s)
    # for every miss: the same schedule as load mode (3.5, 3.5, hit 1.5, 3.5)
    r = _run("hybrid", copy=2.0)
    assert r.tpot_ms == pytest.approx(1e3 * (3.5 + 3.5 + 1.5 + 3.5) / 4)
    assert (r.host_computed, r.demand_loads, r.hits) == (0, 3, 1)
    # a copy of 10 s never beats the host, even into a free slot: every use on the host
    r = _run("hybrid", copy=10.0)
    assert r.tpot_ms == pytest.approx(4250.0)
    assert (r.host_computed, r.demand_loads) == (4, 0)
    assert r.host_computed_per_token == pytest.approx(1.0)
    assert r.compute_ms_per_token == pytest.approx(1e3 * 1.0)


def test_hybrid_ties_go_to_the_policy():
    # a copy of 2.75 s: loading and the host both deliver 3.25 s after the routing, so LRU decides
    # tok0: a free slot: load (1 + 2.75 + 0.5 = 4.25 s)
    # tok1: 1 never used, the victim 0 was: host (4.25 s); 1 is now recent
    # tok2: 1 used after 0: load, evicting 0 (4.25 s)
    # tok3: 0 used before 1: host (4.25 s)
    r = _run("hybrid", copy=2.75)
    assert r.tpot_ms == pytest.approx(4250.0)
    assert (r.host_computed, r.demand_loads, r.hits, r.misses) == (2, 2, 0, 2)
    assert r.host_computed_per_token == pytest.approx(0.5)
    assert r.compute_ms_per_token == pytest.approx(1e3 * (1.0 + 0.5 * 2 / 4))


def test_host_mode_fills_free_slots_then_never_evicts():
    # tok0 fills the free slot (3.5 s); tok1, tok2 on the host (4.25 s); tok3 hits 0 (1.5 s)
    r = _run("host", copy=2.0)
    assert r.tpot_ms == pytest.approx(1e3 * (3.5 + 4.25 + 4.25 + 1.5) / 4)
    assert (r.host_computed, r.demand_loads, r.hits) == (2, 1, 1)


def test_load_mode_is_unchanged():
    # every miss loads: 3.5, 3.5, hit 1.5, 3.5
    r = _run("load", copy=2.0)
    assert r.tpot_ms == pytest.approx(1e3 * (3.5 + 3.5 + 1.5 + 3.5) / 4)
    assert r.host_computed == 0 and r.execution == "load"


def test_host_mode_with_history_starts_from_its_hot_set():
    history = trace_from_lists([[[1], [1], [1], [2]]], E=4)
    trace = trace_from_lists(TRACE, E=4)
    r = simulate(trace, "lru", _tm(2.0), capacity=1, execution="host", history=history,
                 use_cache=False)
    # expert 1 (the history's most used) is resident from the start: tok1, tok2 hit
    assert (r.hits, r.host_computed, r.demand_loads) == (2, 2, 0)


def test_hybrid_needs_a_host_time():
    trace = trace_from_lists(TRACE, E=4)
    with pytest.raises(SimError, match="host compute time"):
        simulate(trace, "lru", TimingModel(attn=1.0, copy=1.0), capacity=1, execution="hybrid")
    with pytest.raises(ValueError, match="execution must be one of"):
        simulate(trace, "lru", _tm(1.0), capacity=1, execution="cpu")


@pytest.mark.parametrize("policy", ["lru", "fmoe", "lfu"])
def test_hybrid_counts_add_up(policy):
    trace = make_trace(T=120, L=3, E=8, K=2, seed=3)
    r = simulate(trace, policy, _tm(0.7), capacity=6, execution="hybrid", use_cache=False)
    uses = int((trace.expert_ids >= 0).sum())
    assert r.hits + r.misses + r.host_computed == uses
    assert r.tpot_ms > 0


# -- the placement rule, by hand -----------------------------------------------------------------

def _table(capacity=2, policy=None):
    return SlotTable(capacity, policy or LRUPolicy(1, 8, capacity))


def test_place_load_always_loads():
    t = _table()
    t.acquire(0)
    t.acquire(1)
    t.unpin()
    assert place("load", t, 5, MissCost(9.0, 1.0))


def test_place_free_slot():
    t = _table()
    assert place("host", t, 5, MissCost(9.0, 1.0))          # the hot set fills
    assert place("hybrid", t, 5, None)
    assert place("hybrid", t, 5, MissCost(1.0, 2.0))
    assert place("hybrid", t, 5, MissCost(2.0, 2.0))        # a tie: the free slot is taken
    assert not place("hybrid", t, 5, MissCost(3.0, 2.0))


def test_place_full_cache():
    t = _table()
    t.acquire(0)
    t.acquire(1)
    t.unpin()
    assert not place("host", t, 5, MissCost(0.1, 9.0))      # host mode never evicts
    # the faster path, whatever the policy thinks of 5
    assert place("hybrid", t, 5, MissCost(1.0, 2.0))
    assert not place("hybrid", t, 5, MissCost(3.0, 2.0))
    # unknown or equal costs: LRU's recency; 5 never used, the victim 0 was
    assert not place("hybrid", t, 5, None)
    assert not place("hybrid", t, 5, MissCost(2.0, 2.0))
    t.host(5)                                               # 5 used on the host: now recent
    assert place("hybrid", t, 5, None)
    assert place("hybrid", t, 5, MissCost(2.0, 2.0))
    assert t.stats.host == 1 and len(t) == 2


def test_place_nothing_evictable():
    t = _table()
    t.acquire(0)
    t.acquire(1)                                            # both pinned (the running layer)
    assert not place("hybrid", t, 5, None)
    assert not place("hybrid", t, 5, MissCost(0.1, 9.0))


def test_fmoe_keep_follows_its_eviction_rule():
    pol = make_policy("fmoe", 1, 8, 2, eviction="lru")
    t = _table(policy=pol)
    t.acquire(0)
    t.acquire(1)
    t.unpin()
    assert not place("hybrid", t, 5, None)
    t.host(5)
    assert place("hybrid", t, 5, None)
    pol.close()
