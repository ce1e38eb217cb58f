"""The replay engines agree exactly, and SlotTable's additions keep its semantics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmoe.runtime.policies import LFUPolicy, LRUPolicy, MoEInfinityPolicy, make_policy
from fmoe.runtime.slots import SlotTable
from fmoe.sim.replay import access_sequence, simulate
from fmoe.sim.timing import TimingModel
from sim_helpers import make_trace

TM = TimingModel(attn=1e-4, shared=2e-5, expert=1e-5, copy=7e-4, attn_ctx=1e-7,
                 token_pre=3e-4, token_post=4e-4)
TIMING = {1: TM, 2: dataclasses.replace(TM, lanes=2)}    # lanes -> timing


def counts(r):
    return (r.hits, r.misses, r.late, r.demand_loads, r.prefetched, r.prefetch_used)


@pytest.mark.parametrize("seed,missing,lanes", [(0, 0.0, 1), (1, 0.1, 1), (2, 0.0, 1), (3, 0.0, 2)])
@pytest.mark.parametrize("frac", [0.1, 0.3, 0.6])
def test_engines_agree_on_demand_policies(seed, missing, frac, lanes):
    tm = TIMING[lanes]
    t = make_trace(T=250, L=4, E=8, K=3, nseq=6, seed=seed, missing=missing)
    cap = max(3, int(frac * 32))
    ref = simulate(t, "lru", tm, capacity=cap, engine="events", use_cache=False)
    for eng in ["lru", "demand"]:
        r = simulate(t, "lru", tm, capacity=cap, engine=eng, use_cache=False)
        assert counts(r) == counts(ref)
        assert r.tpot_ms == pytest.approx(ref.tpot_ms, rel=1e-9)
        assert r.stall_ms_per_token == pytest.approx(ref.stall_ms_per_token, rel=1e-9, abs=1e-12)
    for pol in ["lfu", "belady"]:
        a = simulate(t, pol, tm, capacity=cap, engine="events", use_cache=False)
        b = simulate(t, pol, tm, capacity=cap, engine="demand", use_cache=False)
        assert counts(a) == counts(b)
        assert a.tpot_ms == pytest.approx(b.tpot_ms, rel=1e-9)
    # Belady is the floor of demand paging
    bel = simulate(t, "belady", tm, capacity=cap, use_cache=False)
    for pol in ["lru", "lfu"]:
        assert simulate(t, pol, tm, capacity=cap).misses >= bel.misses


@settings(max_examples=25, deadline=None, database=None)
@given(seed=st.integers(0, 10_000), cap=st.integers(2, 12), L=st.integers(1, 3),
       K=st.integers(1, 2))
def test_lru_kernel_equals_slot_table(seed, cap, L, K):
    t = make_trace(T=60, L=L, E=6, K=K, nseq=3, seed=seed)
    cap = min(max(cap, K), L * 6)
    a = simulate(t, "lru", TM, capacity=cap, engine="lru", use_cache=False)
    b = simulate(t, "lru", TM, capacity=cap, engine="events", use_cache=False)
    assert counts(a) == counts(b)


def test_disk_cache_gives_the_same_result(tmp_path, monkeypatch):
    t = make_trace(T=150, L=3, E=8, K=2, seed=5)
    cold = simulate(t, "lfu", TM, capacity=6)
    assert list((tmp_path / "simcache").glob("misses-*.npy"))
    warm = simulate(t, "lfu", TM, capacity=6)
    assert counts(cold) == counts(warm) and cold.tpot_ms == warm.tpot_ms
    k1, n1 = access_sequence(t)
    k2, n2 = access_sequence(t, use_cache=False)
    assert np.array_equal(k1, k2) and np.array_equal(n1, n2)


def test_several_timings_in_one_replay():
    t = make_trace(T=120, L=3, E=8, K=2, seed=6)
    fast = TimingModel(attn=1e-4, copy=1e-4)
    rs = simulate(t, "lfu", [TM, fast], capacity=6)
    assert [r.tpot_ms for r in rs] == [simulate(t, "lfu", TM, capacity=6).tpot_ms,
                                       simulate(t, "lfu", fast, capacity=6).tpot_ms]
    rs = simulate(t, "oracle", [TM, fast], capacity=6)
    one = simulate(t, "oracle", fast, capacity=6)
    assert counts(rs[1]) == counts(one) and rs[1].tpot_ms == one.tpot_ms


def test_oracle_bounds_the_others():
    t = make_trace(T=300, L=4, E=8, K=2, nseq=6, seed=7)
    rs = {p: simulate(t, p, TM, cache_fraction=0.25) for p in
          ["lru", "lfu", "moe-infinity", "belady", "oracle"]}
    assert rs["oracle"].tpot_ms == min(r.tpot_ms for r in rs.values())
    assert rs["belady"].loads_per_token == min(r.loads_per_token for r in rs.values())
    assert rs["oracle"].prefetch_precision == 1.0


# -- SlotTable ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lru", "lfu", "moe-infinity"])
def test_acquire_many_equals_acquire(name):
    rng = np.random.default_rng(0)
    seq = [rng.choice(12, size=3, replace=False).tolist() for _ in range(200)]
    a = SlotTable(5, make_policy(name, 2, 6, 5))
    b = SlotTable(5, make_policy(name, 2, 6, 5))
    for i, keys in enumerate(seq):
        if name == "moe-infinity" and i % 7 == 0:
            for t in (a, b):
                t.policy.on_token_end()
        misses = sum(not a.acquire(k).hit for k in keys)
        assert b.acquire_many(keys) == misses
        a.unpin(keys)
        b.unpin(keys)
        assert a.slot_of == b.slot_of
    assert a.stats == b.stats


def test_ready_flag_counts_late_uses():
    t = SlotTable(2, LRUPolicy(1, 4, 2))
    assert t.prefetch(1).slot == 0
    got = t.acquire(1, ready=False)
    assert got.hit and (t.stats.hits, t.stats.misses, t.stats.late) == (0, 1, 1)
    assert t.stats.prefetch_used == 1 and t.stats.demand_loads == 0
    t.unpin()
    t.acquire(1)
    t.acquire(2)
    assert (t.stats.hits, t.stats.misses, t.stats.demand_loads) == (1, 2, 1)


def test_prefetch_admission_and_release():
    class NoEvict(LRUPolicy):
        def admit_prefetch(self, key, victim):
            return victim is None

    t = SlotTable(2, NoEvict(1, 4, 2))
    assert t.prefetch(0) is not None and t.prefetch(1) is not None
    assert t.prefetch(2) is None and 2 not in t          # would evict: refused
    assert t.stats.prefetched == 2 and t.stats.evictions == 0
    assert t.release(1) == 1 and 1 not in t and t.stats.released == 1
    assert t.prefetch(2) is not None and t.slot_of[2] == 1
    assert t.release(3) is None
    t.acquire(0)
    with pytest.raises(RuntimeError, match="pinned"):
        t.release(0)


def test_lfu_heap_compaction_keeps_order():
    # many hits grow the lazy heap; compaction must not change any decision
    p = LFUPolicy(1, 8, 3)
    t = SlotTable(3, p)
    rng = np.random.default_rng(1)
    ref = []
    for k in rng.integers(0, 8, size=5000).tolist():
        t.acquire(k)
        t.unpin()
        ref.append(sorted(t.slot_of))
    assert len(p._heap) <= 4 * 3 + 1024 + 1
    # an independent plain LFU over the same sequence
    freq, last, res, clock = [0] * 8, {}, [], 0
    out = []
    for k in rng.__class__(np.random.PCG64(1)).integers(0, 8, size=5000).tolist():
        clock += 1
        freq[k] += 1
        if k not in res:
            if len(res) == 3:
                v = min(res, key=lambda x: (freq[x], last[x]))
                res.remove(v)
            res.append(k)
        last[k] = clock
        out.append(sorted(res))
    assert out == ref
    assert p.freq.tolist() == freq


def test_moe_infinity_policy_in_a_slot_table():
    p = MoEInfinityPolicy(2, 4, 3)
    t = SlotTable(3, p)
    for keys in ([0, 4], [1, 5], [0, 6], [2, 4]):
        for k in keys:
            t.acquire(k)
        p.on_routed(keys[0] // 4, np.array([keys[0] % 4]))
        t.unpin()
        p.on_token_end()
    assert len(t) == 3 and set(np.flatnonzero(p.resident)) == set(t.slot_of)
