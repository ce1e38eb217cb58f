"""Expert-map store, trajectory search and δ-selection on hand-worked cases and random stores."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmoe.runtime.fmoe_policy import FmoePolicy
from fmoe.runtime.predictor import MapStore, TrajectorySearch, select


def onehot_map(rows, E):
    m = np.zeros((len(rows), E), np.float32)
    for l, e in enumerate(rows):
        m[l, e] = 1.0
    return m


def test_store_replaces_most_redundant_hand_worked():
    # L = 2, E = 2, d = 1: redundancy = 0.5 * cos(sem) + 0.5 * cos(map)
    s = MapStore(capacity=3, num_layers=2, num_experts=2, dim=2, prefetch_distance=1)
    a = onehot_map([0, 0], 2)     # map A
    b = onehot_map([1, 1], 2)     # map B (orthogonal to A)
    c = onehot_map([0, 1], 2)     # map C
    s.add(a, np.array([1.0, 0.0]))
    s.add(b, np.array([0.0, 1.0]))
    s.add(c, np.array([1.0, 1.0]))
    new = onehot_map([1, 1], 2)   # equal to B's map
    emb = np.array([1.0, 0.0])    # semantically equal to A
    # vs A: 0.5 * 1 + 0.5 * 0 = 0.5; vs B: 0.5 * 0 + 0.5 * 1 = 0.5; vs C: 0.5 * 0.7071 + 0.5 * 0.5 = 0.6036
    red = s.redundancy(new, emb)
    np.testing.assert_allclose(red, [0.5, 0.5, 0.5 * 2 ** -0.5 + 0.25], rtol=1e-6)
    assert s.add(new, emb) == 2   # C is the most redundant and goes
    np.testing.assert_array_equal(s.maps[2], new)
    assert s.size == 3


def test_store_weights_follow_prefetch_distance():
    s = MapStore(capacity=2, num_layers=4, num_experts=2, dim=2, prefetch_distance=3)
    s.add(onehot_map([0, 0, 0, 0], 2), np.array([0.0, 1.0]))   # same map, other meaning
    s.add(onehot_map([1, 1, 1, 1], 2), np.array([1.0, 0.0]))   # other map, same meaning
    # d/L = 0.75 on semantics: the semantically equal entry is the redundant one
    assert s.add(onehot_map([0, 0, 0, 0], 2), np.array([1.0, 0.0])) == 1


@pytest.mark.parametrize("row,sim,k,want", [
    ([0.5, 0.3, 0.15, 0.05], 0.9, 1, [0]),            # δ = 0.1: the top expert reaches it
    ([0.5, 0.3, 0.15, 0.05], 0.4, 1, [0, 1]),         # δ = 0.6: 0.5 < 0.6 <= 0.8
    ([0.5, 0.3, 0.15, 0.05], 0.1, 1, [0, 1, 2]),      # δ = 0.9: needs 0.95
    ([0.5, 0.3, 0.15, 0.05], -0.5, 1, [0, 1, 2, 3]),  # δ clipped to 1: everything
    ([0.5, 0.3, 0.15, 0.05], 1.0, 2, [0, 1]),         # never fewer than top-k
    ([0.1, 0.6, 0.3, 0.0], 0.5, 1, [1]),              # δ = 0.5: 0.6 alone
    ([0.2, 0.2, 0.6, 0.0], 0.0, 2, [2, 0, 1]),        # ties broken by index; zero mass left out
])
def test_delta_selection(row, sim, k, want):
    assert select(np.array(row), sim, k).tolist() == want


def brute_cos(q_rows, stored, layer):
    q = q_rows[: layer + 1].reshape(-1)
    out = []
    for m in stored:
        v = m[: layer + 1].reshape(-1)
        den = np.linalg.norm(q) * np.linalg.norm(v)
        out.append(float(q @ v / den) if den > 0 else 0.0)
    return np.array(out)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), L=st.integers(1, 6), E=st.integers(2, 9),
       n=st.integers(1, 12), sparse=st.booleans())
def test_incremental_trajectory_equals_brute_force(seed, L, E, n, sparse):
    rng = np.random.default_rng(seed)
    store = MapStore(capacity=16, num_layers=L, num_experts=E, dim=3)
    stored = []
    for _ in range(n):
        m = rng.dirichlet(np.ones(E), size=L).astype(np.float32)
        if sparse:
            m = np.where(m > 1.0 / E, m, 0.0).astype(np.float32)
        stored.append(m)
        store.add(m, rng.normal(size=3))
    q = rng.dirichlet(np.ones(E), size=L)
    ts = TrajectorySearch(store)
    for l in range(L):
        k = max(1, E // 3)
        ids = np.argsort(-q[l])[:k] if sparse else np.arange(E)
        vals = q[l, ids]
        ts.observe(l, ids, vals)
        q_obs = np.zeros_like(q)
        q_obs[: l + 1] = q[: l + 1]
        if sparse:
            for ll in range(l + 1):
                keep = np.argsort(-q[ll])[:k]
                mask = np.zeros(E, bool)
                mask[keep] = True
                q_obs[ll] = np.where(mask, q[ll], 0.0)
        np.testing.assert_allclose(ts.similarities(l), brute_cos(q_obs, stored, l), rtol=1e-5, atol=1e-7)
        i, sim = ts.best(l)
        assert sim == pytest.approx(brute_cos(q_obs, stored, l).max(), rel=1e-5, abs=1e-7)


def test_semantic_search_and_empty_store():
    s = MapStore(4, 2, 3, 2)
    assert s.semantic(np.array([1.0, 0.0])) == (-1, 0.0)
    assert TrajectorySearch(s).best(0) == (-1, 0.0)
    s.add(onehot_map([0, 1], 3), np.array([1.0, 0.0]))
    s.add(onehot_map([2, 2], 3), np.array([0.0, 1.0]))
    i, sim = s.semantic(np.array([0.1, 1.0]))
    assert i == 1 and sim == pytest.approx(1 / np.sqrt(1.01))


def test_save_load_roundtrip_and_bad_files(tmp_path, caplog):
    s = MapStore(8, 2, 3, 4)
    rng = np.random.default_rng(0)
    for _ in range(5):
        s.add(rng.dirichlet(np.ones(3), size=2), rng.normal(size=4))
    p = tmp_path / "maps.npz"
    s.save(p)
    t = MapStore(8, 2, 3, 4)
    assert t.load(p) and t.size == 5
    np.testing.assert_array_equal(t.maps[:5], s.maps[:5])
    assert not list(tmp_path.glob("*.tmp"))

    other = MapStore(8, 3, 3, 4)                    # mismatched model: ignored, not a crash
    assert not other.load(p) and other.size == 0
    assert "ignored" in caplog.text
    (tmp_path / "bad.npz").write_bytes(b"not a zip at all")
    assert not t.load(tmp_path / "bad.npz") and t.size == 5
    assert not t.load(tmp_path / "missing.npz")


@pytest.mark.parametrize("seed", [0, 1])
def test_add_many_equals_sequential_adds(seed):
    rng = np.random.default_rng(seed)
    a = MapStore(capacity=7, num_layers=3, num_experts=5, dim=4, prefetch_distance=2)
    b = MapStore(capacity=7, num_layers=3, num_experts=5, dim=4, prefetch_distance=2)
    maps = rng.dirichlet(np.ones(5), size=(40, 3)).astype(np.float32)
    embs = rng.normal(size=(40, 4)).astype(np.float32)
    for m, e in zip(maps, embs):
        a.add(m, e)
    b.add_many(maps[:3], embs[:3])
    b.add_many(maps[3:], embs[3:])
    np.testing.assert_array_equal(a.maps, b.maps)
    np.testing.assert_allclose(a.sem, b.sem)


# -- reuse model -------------------------------------------------------------------------------

def _cells(m, gap, count, pop, nxt):
    """The cells (full, back-off, gap bucket) of key 0 (layer 0) for these features."""
    n = m.L * m.E
    return tuple(c[:1] for c in m.cells(np.full(n, gap), np.full(n, count), np.full(n, pop),
                                        np.full(n, nxt)))


def test_reuse_model_counts_hand_worked():
    """One layer, two experts, top-1, horizon 2; one stream routed 0, 0, 1, 0.

    Popularity: expert 0 used 3 times, expert 1 once: ranks 1 and 0 of 2, classes 4 and 0.
    Transitions 0->0, 0->1, 1->0: P(. | 0) = (1/2, 1/2), P(. | 1) = (1, 0). Next-pass classes
    (edges 0.7, 0.85, 1, 1.25 x uniform 1/2, right-closed): after 0 both experts get 0.5 -> 3;
    after 1, expert 0 gets 1.0 -> 4 and expert 1 gets 0 -> 0; no previous token -> 5.
    Labels = used at this pass or the next: expert 0 -> 1, 1, 1, 1; expert 1 -> 0, 1, 1, 0."""
    from fmoe.runtime.predictor import ReuseModel

    m = ReuseModel(1, 2, 1, horizon=2, min_count=1)
    used = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], bool)
    m.learn(used, np.array([0, 4]))
    assert m._pop_class().tolist() == [4, 0]
    assert m.transition()[0].tolist() == [[0.5, 0.5], [1.0, 0.0]]
    want = {  # (gap, count, pop, next) -> (seen, reused)
        (0, 0, 4, 5): (1, 1), (1, 1, 4, 3): (1, 1), (1, 2, 4, 3): (1, 1), (2, 2, 4, 4): (1, 1),
        (0, 0, 0, 5): (1, 0), (0, 0, 0, 3): (2, 2), (1, 1, 0, 0): (1, 0),
    }
    cells = [_cells(m, *k) for k in want]
    assert sorted(np.flatnonzero(m.seen).tolist()) == sorted(int(c[0][0]) for c in cells)
    for (n, r), c in zip(want.values(), cells):
        assert m.seen[c[0][0]] == n and m.reused[c[0][0]] == r
        assert m.probability(c)[0] == pytest.approx(r / n)


def test_reuse_score_hand_worked_empty_model():
    """Two layers x two experts, no counts yet: P(reuse within 4 passes) falls back to recency,
    1 / (2 + gap bucket). Score = layers to the next pass + L * (1/q - 1), q = 1 - (1 - p)^(1/4).
    Token 0 used (0,0) and (1,0); during token 1 at layer 1:
      (0,0) passed, gap 2 -> p 1/3,  next pass in 1 layer
      (0,1) passed, never -> p 1/15, next pass in 1 layer
      (1,0) running, gap 1 -> p 1/2,  now
      (1,1) running, never -> p 1/15, now"""
    def wait(p):
        return 2 * (1 / (1 - (1 - p) ** 0.25) - 1)

    p = FmoePolicy(2, 2, 3, top_k=1)
    assert p.eviction == "reuse" and not p.uses_maps
    p.on_request_start(0)
    for layer in (0, 1):
        p.on_layer_start(layer)
        p.on_routed(layer, np.array([0]))
    p.on_token_end()
    p.on_layer_start(0)                  # token 1: layer 0 ran (routing not reported)
    p.on_layer_start(1)
    s = p.reuse.next_use_score(1)
    assert s == pytest.approx([1 + wait(1 / 3), 1 + wait(1 / 15), wait(1 / 2), wait(1 / 15)])
    for key in (0, 1, 2):
        p.on_insert(key)
    assert p.victim([0, 1, 2], set()) == 1
    assert p.victim([0, 1, 2], {1}) == 0
    # a prefetch is admitted when the victim's expected next use (its score) comes later than
    # the layer the prefetch is for: (0, 0) is for layer 0, one layer after the running one
    p.rule._score = np.array([5.0, 0.5, 3.0, 9.0])
    assert p.admit_prefetch(0, 2) is True        # 3.0 > 1
    assert p.admit_prefetch(0, 1) is False       # 0.5 < 1: the victim is needed sooner
    assert p.admit_prefetch(3, 1) is True        # (1, 1) is for the running layer: 0.5 > 0


@given(seed=st.integers(0, 10_000))
@settings(max_examples=20, deadline=None)
def test_reuse_model_online_equals_history(seed):
    """Counting a history at once and living through it pass by pass give the same counts
    (summed over the popularity and next-pass classes, which evolve online) and transitions."""
    from fmoe.runtime.predictor import NP, NQ, ReuseModel

    rng = np.random.default_rng(seed)
    L, E, K = 2, 5, 2
    lens = rng.integers(1, 9, size=rng.integers(1, 5))
    offsets = np.concatenate([[0], np.cumsum(lens)])
    used = np.zeros((offsets[-1], L * E), bool)
    for t in range(offsets[-1]):
        for layer in range(L):
            used[t, layer * E + rng.choice(E, K, replace=False)] = True
    a = ReuseModel(L, E, K)
    a.learn(used, offsets)
    b = ReuseModel(L, E, K)
    for s, e in zip(offsets[:-1], offsets[1:]):
        b.reset_stream()
        for t in range(s, e):
            b.observe(np.flatnonzero(used[t]))
            b.end_pass()
    b.reset_stream()
    # popularity and next-pass classes evolve online: compare the counts summed over them
    assert np.array_equal(a.seen.reshape(-1, NP * NQ).sum(1), b.seen.reshape(-1, NP * NQ).sum(1))
    assert np.array_equal(a.reused.reshape(-1, NP * NQ).sum(1), b.reused.reshape(-1, NP * NQ).sum(1))
    assert a.uses.tolist() == b.uses.tolist() and a.tokens == b.tokens
    assert np.array_equal(a.trans, b.trans) and np.array_equal(a.trans_from, b.trans_from)


def test_maps_from_weights_then_ranks():
    """A trace's gate weights land at the routed experts; without them, rank weights."""
    from fmoe.sim.replay import _router_rows
    from fmoe.sim.trace import Trace

    ids = np.array([[[2, 0], [1, 3]]], np.int16)             # 1 token, 2 layers, top-2
    w = np.array([[[0.7, 0.3], [0.6, 0.4]]], np.float32)
    p = FmoePolicy(2, 4, 4, top_k=2, eviction="distance")
    p.learn_history(expert_ids=ids, seq_offsets=np.array([0, 1]), weights=w)
    assert np.allclose(p.store.maps[0], [[0.3, 0, 0.7, 0], [0, 0.6, 0, 0.4]])
    q = FmoePolicy(2, 4, 4, top_k=2, eviction="distance")
    q.learn_history(expert_ids=ids, seq_offsets=np.array([0, 1]))
    assert np.allclose(q.store.maps[0], [[1 / 3, 0, 2 / 3, 0], [0, 2 / 3, 0, 1 / 3]])
    t = Trace(expert_ids=ids, seq_offsets=np.array([0, 1]), num_experts=4, model="t", weights=w)
    assert _router_rows(t, p)(0, 1).tolist() == pytest.approx([0, 0.6, 0, 0.4])
    assert _router_rows(t, FmoePolicy(2, 4, 4))(0, 1) is None     # reuse eviction: no rows


def test_policy_copies_are_independent():
    import copy

    p = FmoePolicy(2, 4, 3, top_k=1)
    p.on_request_start(0)
    p.on_routed(0, np.array([1]))
    q = copy.deepcopy(p)
    q.on_routed(1, np.array([2]))
    assert p.reuse._keys == [1] and q.reuse._keys == [1, 6]
    assert q.rule.resident is not p.rule.resident


@pytest.mark.parametrize("as_list", [False, True])
def test_routed_layers_queue_in_their_own_model(as_list):
    """A routed layer's record for the next reader lands in the model that saw it (a copy
    writes its own queue), whether the experts come as an int64 array or a list."""
    import copy

    p = FmoePolicy(2, 4, 3, top_k=2)
    p.on_request_start(0)
    p.reuse.running(0)                       # the pass has scores: routed layers are queued
    q = copy.deepcopy(p)
    q.on_routed(0, [3, 1] if as_list else np.array([3, 1]))
    assert q.reuse._pend[:5].tolist() == [1, 0, 2, 3, 1]
    assert p.reuse._pend[0] == 0 and p.reuse._keys == []
    assert q.reuse._keys == [3, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_scores_equal_direct_formula(seed):
    """The reuse model's per-pass vectors, wait table and running scores give the scores of the
    direct formula (cells -> probability -> wait, with the routed layers' next-pass classes
    from this pass's row), layer by layer, also when a layer is reported in parts."""
    from fmoe.runtime.predictor import NQ, ReuseModel

    L, E = 4, 8
    rng = np.random.default_rng(seed)
    used = np.zeros((300, L * E), bool)
    for t in range(300):
        for layer in range(L):
            used[t, layer * E + rng.choice(E, 2, replace=False)] = True
    m = ReuseModel(L, E, 2, min_count=3)
    m.learn(used, np.array([0, 150, 300]))
    m.reset_stream()

    def direct(l_now):
        pop, seen = m._pop_class(), m.last >= 0
        now = m._wait(m.probability(m.cells(np.where(seen, m.pos - m.last, 0), m.count, pop,
                                            m.next_class(m.prev_row)))) + m.layer_of
        after = m._wait(m.probability(m.cells(np.where(seen, m.pos + 1 - m.last, 0), m.count, pop,
                                              np.full(L * E, NQ - 1)))) + m.layer_of + L
        cur, tp = m.used.reshape(L, E), m.transition()
        for layer in np.flatnonzero(cur.any(1)):
            sl, u = slice(layer * E, (layer + 1) * E), cur[layer]
            ex = np.flatnonzero(u)
            nxt = m._next_classes(tp[layer][ex].sum(0) / len(ex), True)
            last = np.where(u, m.pos, m.last[sl])
            c = m.cells(np.where(last >= 0, m.pos + 1 - last, 0), m.count[sl] + u, pop[sl], nxt,
                        base=m.cell_base[sl])
            after[sl] = m._wait(m.probability(c)) + layer + L
        done = (m.layer_of < l_now) | m.used
        return np.where(done, after, now) - l_now

    for t in range(12):
        rows = [np.flatnonzero(used[t, l * E:(l + 1) * E]) for l in range(L)]
        for layer in range(L):
            if t % 3 == 1 and layer == 1:            # scores asked before the layer reports
                np.testing.assert_allclose(m.next_use_score(layer), direct(layer))
            keys = (layer * E + rows[layer]).tolist()
            if t % 4 == 2 and layer == 2:            # a layer reported in two parts
                m.observe(keys[:1])
                np.testing.assert_allclose(m.next_use_score(layer), direct(layer))
                m.observe(keys[1:])
            elif t % 2:                              # whole layers, queued for the reader
                m.observe_layer(layer, keys, rows[layer])
            else:
                m.observe(keys)
            if t % 2 == 0 or layer == L - 1:
                np.testing.assert_allclose(m.next_use_score(layer), direct(layer))
        m.end_pass()


def test_store_searches_match_a_float64_loop():
    """The store's products run in numpy's own loops (`matvec`, not a multi-threaded BLAS whose
    threads would spin beside the model's compute); they agree with a float64 loop."""
    from fmoe.runtime.expert_maps import matvec

    rng = np.random.default_rng(2)
    a = rng.standard_normal((37, 19)).astype(np.float32)
    v = rng.standard_normal(19).astype(np.float32)
    want = [sum(float(a[i, j]) * float(v[j]) for j in range(19)) for i in range(37)]
    np.testing.assert_allclose(matvec(a, v), want, rtol=1e-5, atol=1e-5)
    s = MapStore(capacity=40, num_layers=2, num_experts=3, dim=19)
    embs = rng.standard_normal((30, 19)).astype(np.float32)
    for e in embs:
        s.add(rng.random((2, 3)).astype(np.float32), e)
    q = rng.standard_normal(19)
    unit = embs.astype(np.float64) / np.linalg.norm(embs.astype(np.float64), axis=1, keepdims=True)
    cos = [float(u @ (q / np.linalg.norm(q))) for u in unit]
    i, sim = s.semantic(q)
    assert i == int(np.argmax(cos)) and sim == pytest.approx(max(cos), abs=1e-5)
