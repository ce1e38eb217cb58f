"""The reuse rule's compiled paths against their references: a layer taken in one call against
the per-use events, and the counting, back-off and wait-table kernels against numpy forms of the
same formulas."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmoe.runtime import reuse_kernels
from fmoe.runtime.policies.fmoe import FmoePolicy
from fmoe.runtime.reuse_features import _COUNT_LUT, _GAP_LUT, _NEXT_EDGES, _NONE, NC, NG, NP, NQ
from fmoe.runtime.reuse_model import ReuseModel
from fmoe.runtime.slots import SlotArray, SlotTable


class PerUse(FmoePolicy):
    """The same policy, driven by one event per use: a subclass that listens to `on_hit` gets
    no `take`."""

    def on_hit(self, key: int) -> None:
        super().on_hit(key)


def drive(policy, capacity, routes, pins, other=None):
    """Drive `routes` through a table of `policy`; `pins` and `other` ((token, layer) -> keys)
    are keys pinned by someone else, and keys prefetched (even) or released (odd) before the
    layer's uses."""
    table = SlotTable(capacity, policy)
    log = []
    policy.on_request_start(0)
    for t, token in enumerate(routes):
        for layer, experts in enumerate(token):
            policy.on_layer_start(layer)
            for key in pins.get((t, layer), ()):       # keys pinned by someone else
                if key in table:
                    table.pinned.add(key)
            for key in (other or {}).get((t, layer), ()):
                got = table.prefetch(key) if key % 2 == 0 else table.release(key)
                log.append(None if got is None else getattr(got, "slot", got))
            keys = [layer * policy.num_experts + int(e) for e in experts]
            slots, hits = [], []
            misses = table.acquire_many(keys, slots=slots, hits=hits)
            log.append((misses, slots, hits, dict(table.slot_of)))
            # slot -> key agrees with key -> slot, and the count with both
            assert {int(k): s for s, k in enumerate(table.key_of) if k >= 0} == dict(table.slot_of)
            assert len(table) == int((table.key_of >= 0).sum()) == capacity - len(table.free)
            policy.on_routed(layer, np.asarray(experts))
            table.pinned.clear()
        policy.on_token_end()
    return log, table.stats


@given(seed=st.integers(0, 10_000), frac=st.sampled_from([0.2, 0.3, 0.5]),
       K=st.sampled_from([3, 10]))
@settings(max_examples=16, deadline=None)
def test_take_equals_per_use_events(seed, frac, K):
    """A layer taken in one call gives the same hits, victims, slots and counts as the per-use
    events in order, with free slots at first, pinned keys from elsewhere, and a learned model;
    K = 10 of 16 experts per layer is a prefill's burst of victims."""
    L, E = 6, 16
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(E, 0.4), size=L)
    routes = [[rng.choice(E, K, replace=False, p=pop[l]) for l in range(L)] for _ in range(120)]
    pins = {(int(t), int(l)): [int(l2) * E + int(e) for l2, e in zip(rng.integers(0, L, 2),
                                                                     rng.integers(0, E, 2))]
            for t, l in zip(rng.integers(0, 120, 40), rng.integers(0, L, 40))}
    cap = max(K, int(frac * L * E))
    fast, slow = FmoePolicy(L, E, cap, top_k=K), PerUse(L, E, cap, top_k=K)
    assert hasattr(fast, "take") and not hasattr(slow, "take")
    got, got_stats = drive(fast, cap, routes, pins)
    want, want_stats = drive(slow, cap, routes, pins)
    assert got_stats.evictions > 100
    assert got == want
    assert got_stats == want_stats
    np.testing.assert_array_equal(fast.rule.touch, slow.rule.touch)
    np.testing.assert_array_equal(fast.rule.resident, slow.rule.resident)


@given(seed=st.integers(0, 10_000))
@settings(max_examples=8, deadline=None)
def test_take_between_prefetches_and_releases(seed):
    """Prefetches and releases between layers (per-use events, which free and take slots
    outside `take`) leave the one-call path and the per-use one in the same state: the same
    slots, victims, prefetch uses and counts."""
    L, E, K = 6, 16, 4
    rng = np.random.default_rng(seed)
    routes = [[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(60)]
    other = {(int(t), int(l)): rng.integers(0, L * E, 3).tolist()
             for t, l in zip(rng.integers(0, 60, 80), rng.integers(0, L, 80))}
    cap = int(0.3 * L * E)
    fast, slow = FmoePolicy(L, E, cap, top_k=K), PerUse(L, E, cap, top_k=K)
    got, got_stats = drive(fast, cap, routes, {}, other)
    want, want_stats = drive(slow, cap, routes, {}, other)
    assert got_stats.prefetched > 20 and got_stats.released > 5
    assert got == want
    assert got_stats == want_stats


def test_all_hit_layers_skip_the_compiled_call():
    """A layer whose keys are all resident goes through `hit_all` (no compiled call), with the
    same slots, counts and touch order as the per-use events; `take` runs only for the layers
    with a miss."""
    L, E, K = 4, 8, 3
    rng = np.random.default_rng(5)
    routes = [[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(30)]
    fast, slow = FmoePolicy(L, E, L * E, top_k=K), PerUse(L, E, L * E, top_k=K)
    calls = []
    take = fast.take
    fast.take = lambda *a: calls.append(1) or take(*a)
    got, got_stats = drive(fast, L * E, routes, {})
    want, want_stats = drive(slow, L * E, routes, {})
    assert got == want and got_stats == want_stats
    np.testing.assert_array_equal(fast.rule.touch, slow.rule.touch)
    assert len(calls) == sum(1 for misses, *_ in got if misses) < len(got) // 2


def test_take_refuses_when_everything_is_pinned():
    p = FmoePolicy(1, 4, 2, top_k=2)
    table = SlotTable(2, p)
    p.on_request_start(0)
    p.on_layer_start(0)
    table.acquire_many([0, 1])
    with pytest.raises(RuntimeError, match="pinned"):
        table.acquire_many([2])


def numpy_count_segment(m: ReuseModel, u, last0, count0, prev0, final, pop, tp):
    """The counting of `ReuseModel._count_segment` written with numpy array operations."""
    n, N = u.shape
    L, E, h = m.L, m.E, m.horizon
    ar = np.arange(n)[:, None]
    run = np.maximum.accumulate(np.where(u, ar, _NONE), axis=0)
    lb = np.maximum(np.vstack([np.full((1, N), _NONE), run[:-1]]), last0[None, :])
    cb = count0[None, :] + np.vstack([np.zeros((1, N), np.int64), np.cumsum(u, axis=0)[:-1]])
    k = n if final else max(0, n - (h - 1))
    seen, reused = np.zeros_like(m.seen), np.zeros_like(m.reused)
    trans, trans_from = np.zeros_like(m.trans), np.zeros_like(m.trans_from)
    if k:
        prev = np.vstack([prev0[None, :], u[:k - 1]]).reshape(k, L, E).astype(np.float64)
        cur = u[:k].reshape(k, L, E).astype(np.float64)
        for layer in range(L):
            trans[layer] += prev[:, layer].T @ cur[:, layer]
        trans_from += prev.sum(axis=0)
        gap = np.where(lb[:k] > _NONE, ar[:k] - lb[:k], 0)
        cells = m.cells(gap, cb[:k], pop[None, :], m.next_class(prev.astype(bool), tp))[0]
        label = u.copy()
        for j in range(1, h):
            label[:-j] |= u[j:]
        np.add.at(seen, cells.reshape(-1), 1.0)
        np.add.at(reused, cells.reshape(-1), label[:k].reshape(-1).astype(np.float64))
    return k, lb[k] if k < n else None, cb[k] if k < n else None, seen, reused, trans, trans_from


@given(seed=st.integers(0, 10_000), final=st.booleans(), n=st.integers(1, 12))
@settings(max_examples=25, deadline=None)
def test_count_segment_equals_numpy(seed, final, n):
    L, E, K = 3, 8, 2
    rng = np.random.default_rng(seed)
    m = ReuseModel(L, E, K, min_count=2)
    u = np.zeros((n, L * E), bool)
    for t in range(n):
        for layer in range(L):
            u[t, layer * E + rng.choice(E, K, replace=False)] = True
    m.trans = rng.integers(0, 5, (L, E, E)).astype(np.float64)
    m.trans_from = m.trans.sum(axis=2)
    tp = m.transition()
    last0 = np.where(rng.random(L * E) < 0.5, -rng.integers(1, 70, L * E), _NONE)
    count0 = rng.integers(0, 20, L * E)
    prev0 = rng.random(L * E) < 0.25
    pop = rng.integers(0, NP, L * E)
    want = numpy_count_segment(m, u, last0, count0, prev0, final, pop, tp)
    t0, f0 = m.trans.copy(), m.trans_from.copy()
    k, last, count = m._count_segment(u, last0, count0, prev0, final, pop, tp)
    assert k == want[0]
    if k < n:
        np.testing.assert_array_equal(last, want[1])
        np.testing.assert_array_equal(count, want[2])
    np.testing.assert_array_equal(m.seen, want[3])
    np.testing.assert_array_equal(m.reused, want[4])
    np.testing.assert_array_equal(m.trans - t0, want[5])
    np.testing.assert_array_equal(m.trans_from - f0, want[6])
    assert m.samples == k * L * E


def test_backoffs_and_wait_table_equal_numpy():
    L = 3
    rng = np.random.default_rng(0)
    m = ReuseModel(L, 8, 2, min_count=5)
    m.seen = rng.integers(0, 12, len(m.seen)).astype(np.float64)
    m.reused = np.floor(m.seen * rng.random(len(m.seen)))
    m._backoff_dirty = True
    tab = m.wait_table()
    shape = (L, NG, NC, NP, NQ)
    c_seen = m.seen.reshape(shape).sum(axis=(0, 3)).reshape(-1)
    c_reused = m.reused.reshape(shape).sum(axis=(0, 3)).reshape(-1)
    np.testing.assert_array_equal(m.c_seen, c_seen)
    np.testing.assert_array_equal(m.c_reused, c_reused)
    cells = np.arange(len(m.seen))
    rest = cells % (NG * NC * NP * NQ)
    g, c = rest // (NC * NP * NQ), (rest // (NP * NQ)) % NC
    q = rest % NQ
    want = m._wait(m.probability((cells, (g * NC + c) * NQ + q, g)))
    np.testing.assert_allclose(tab, want, rtol=1e-12)
    for horizon in (1, 3):           # other horizons take the general power
        out = np.empty(4)
        p = np.array([0.0, 0.3, 0.9, 1.0])
        reuse_kernels.wait_table(np.full(4, 9.0), p * 9.0, np.zeros(1), np.zeros(4, np.int64), 5,
                                 horizon, L, out)
        m.horizon = horizon
        np.testing.assert_allclose(out, m._wait(p), rtol=1e-12)


def test_lookup_tables_cover_the_kernels_range():
    # the kernels index the gap and count tables up to 65 and 18
    assert len(_GAP_LUT) == 66 and len(_COUNT_LUT) == 19
    assert len(_NEXT_EDGES) == NQ - 2


def test_slot_array_is_a_mapping():
    """The array form of `slot_of` answers as the dictionary did: membership, lookups, deletes
    and the count; a missing key raises KeyError."""
    m = SlotArray(8)
    m[5] = 2
    m[1] = 0
    m[5] = 3                       # a move keeps the count
    assert len(m) == 2 and 5 in m and 4 not in m
    assert m[5] == 3 and m.get(4) is None and m.get(1) == 0
    assert list(m) == [1, 5] and dict(m) == {1: 0, 5: 3} and m == {5: 3, 1: 0}
    assert m.pop(1) == 0 and len(m) == 1 and 1 not in m
    with pytest.raises(KeyError):
        m[1]
    with pytest.raises(KeyError):
        del m[1]
    assert m.a.tolist() == [-1, -1, -1, -1, -1, 3, -1, -1]
