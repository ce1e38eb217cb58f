"""Determinism of the fmoe policy: identical live runs give identical counts (prefetch off), and
with prefetch on, what is ordered and when is a function of the events alone (the predictor
driven synchronously). Also the worker's hand-over: stale work dropped, errors re-raised."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import fmoe
from fmoe.runtime.policies import FmoePolicy, make_policy
from fmoe.runtime.predictor import Prediction
from fmoe.runtime.scheduler import PredictorError, PredictorWorker
from fmoe.runtime.slots import SlotTable

COUNTS = ("capacity", "resident_peak", "hits", "misses", "prefetched", "prefetch_used",
          "bytes_loaded", "host_computed")


def test_five_live_runs_identical_stats(mixtral_ckpt):
    path, _ = mixtral_ckpt
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (1, int(n)), generator=g) for n in (3, 5, 2)]
    runs = []
    for _ in range(5):
        model = fmoe.models.from_pretrained(path, expert_cache=0.25, policy="fmoe")
        try:
            policy = model.runtime.policy
            assert not policy.prefetches and policy.reuse.background
            for p, n in zip(prompts, (16, 16, 80)):
                # the long one: a batch of its passes is counted on the counting thread
                model.generate(p, n, eos_token_id=[])
            s = model.expert_stats()
            assert policy.reuse.samples > 0
        finally:
            model.close()
        runs.append({k: s[k] for k in COUNTS if k in s})
    assert runs[0]["misses"] > 0 and runs[0]["hits"] > 0
    assert all(r == runs[0] for r in runs), runs


def _drive(policy: FmoePolicy, routes, capacity: int, states: list | None = None):
    """Drive `policy` through a SlotTable with `routes` [[token [layer [experts]]]] per
    sequence, placing every prefetch order at once; returns (orders log, table stats).
    `states`, when given, gets the slots' keys after every layer."""
    table = SlotTable(capacity, policy)
    E = policy.num_experts
    log = []
    for n, seq in enumerate(routes):
        policy.on_request_start(n)
        for tok in seq:
            for layer, experts in enumerate(tok):
                orders = policy.on_layer_start(layer)
                log.append((n, layer, tuple(orders)))
                for key, _ in orders:
                    table.prefetch(key)
                table.acquire_many([layer * E + e for e in experts])
                policy.on_routed(layer, np.array(experts, dtype=np.int64))
                table.unpin()
                if states is not None:
                    states.append(table.key_of.tolist())
            policy.on_token_end()
        policy.on_request_end(n)
    return log, table.stats


def _routes(seed: int, L=3, E=8, K=2, seqs=4, tokens=12):
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(E, 0.4), size=L)
    return [[[sorted(rng.choice(E, K, replace=False, p=pop[l]).tolist()) for l in range(L)]
             for _ in range(tokens)] for _ in range(seqs)]


@pytest.mark.parametrize("eviction", ["reuse", "distance", "pfreq", "lru-pred"])
def test_synchronous_predictor_orders_are_a_function_of_events(eviction):
    routes = _routes(1)
    opts = dict(top_k=2, max_orders=3, min_similarity=0.0, eviction=eviction, worker=False)
    a_log, a_stats = _drive(make_policy("fmoe", 3, 8, 7, **opts), routes, 7)
    b_log, b_stats = _drive(make_policy("fmoe", 3, 8, 7, **opts), routes, 7)
    assert a_log == b_log and a_stats == b_stats
    assert a_stats.prefetched > 0 and sum(len(o) for *_, o in a_log) > 0


def _one_map_policy(**opts) -> FmoePolicy:
    """L = 2, E = 4, top-1; the store holds one map: layer 0 -> expert 1, layer 1 -> expert 2."""
    opts = {"prefetch_distance": 2, "max_orders": 4, **opts}
    p = FmoePolicy(2, 4, 3, top_k=1, min_similarity=-1.0, **opts)
    p.learn_history(expert_ids=np.array([[[1], [2]]], np.int16), seq_offsets=np.array([0, 1]))
    return p


def test_orders_hand_worked_and_lead_across_tokens():
    """Layer 0: the semantic neighbour (similarity 0, δ = 1: the whole mass, one expert per
    row) orders (0, 1) with priority 1 and (1, 2) with 1/2. Layer 1, after layer 0 routed to
    expert 1: the trajectory neighbour matches exactly (δ = 0: top-1) and orders (1, 2) with
    priority 1, then, leading across the token boundary, the next token's (0, 1) with 1/2."""
    p = _one_map_policy()
    assert p.prefetches and p.predictor is not None and not p.runner.threaded
    p.on_request_start(0)
    assert p.on_layer_start(0) == [(1, 1.0), (6, 0.5)]
    p.on_routed(0, np.array([1]))
    assert p.on_layer_start(1) == [(6, 1.0), (1, 0.5)]
    assert p.applied.orders == ((1, 6, 1.0), (2, 1, 0.5))     # (target step, key, priority)
    q = _one_map_policy(lead=False)
    q.on_request_start(0)
    q.on_layer_start(0)
    q.on_routed(0, np.array([1]))
    assert q.on_layer_start(1) == [(6, 1.0)]


def test_stale_prediction_orders_dropped_at_layer_start():
    """A prediction is applied at the start of a layer: its orders for steps that have passed
    are dropped, and an older iteration's prediction does not reach the eviction rule."""
    p = FmoePolicy(2, 4, 3, top_k=1, max_orders=4, eviction="lru-pred")
    p.iteration = 1                                   # step of (iteration 1, layer 0) = 2
    old = Prediction(0, 1, orders=((1, 6, 1.0), (2, 1, 0.5), (3, 7, 0.25)),
                     window=frozenset({6, 1}))
    assert p._apply(old, 0) == [(1, 0.5), (7, 0.25)]
    assert p.rule.window == frozenset()              # made for iteration 0: not applied
    fresh = Prediction(1, 0, orders=((2, 1, 0.5),), window=frozenset({1}))
    assert p._apply(fresh, 0) == [(1, 0.5)] and p.rule.window == {1}
    with pytest.raises(AttributeError):
        fresh.layer = 3                               # predictions are immutable


class _GatedPredictor:
    """A stand-in predictor whose first layer start blocks until released."""

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls = []

    def layer_start(self, iteration, layer):
        self.calls.append(("layer_start", iteration, layer))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return Prediction(iteration, layer)

    def routed(self, layer, *a):
        self.calls.append(("routed", layer))
        if layer < 0:
            raise ZeroDivisionError("bad layer")

    def token_end(self):
        self.calls.append(("token_end",))


def test_worker_drops_stale_layer_starts_and_reraises_errors():
    pred = _GatedPredictor()
    w = PredictorWorker(pred)
    try:
        w.post("layer_start", 0, 0)
        assert pred.entered.wait(30)                 # the worker is inside layer 0's search
        w.post("routed", 0)
        w.post("layer_start", 0, 1)                  # stale before the worker gets to it
        w.post("routed", 1)
        w.post("layer_start", 0, 2)
        pred.release.set()
        w.drain()
        assert pred.calls == [("layer_start", 0, 0), ("routed", 0), ("routed", 1),
                              ("layer_start", 0, 2)]
        assert w.dropped == 1
        got = w.latest()
        assert (got.iteration, got.layer) == (0, 2)
        w.post("routed", -1)                         # fails on the worker ...
        with pytest.raises(PredictorError) as info:
            w.drain()                                # ... and is raised on this thread
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        w.post("token_end")                          # raised once; the worker goes on
        w.drain()
    finally:
        w.close()


@pytest.mark.parametrize("copy,layer,want", [
    (0.692e-3, 0.178e-3, (False, 4, 1)),    # PCIe 4.0 GPU: a copy takes 3.9 layers
    (0.038e-3, 0.042e-3, (True, 1, 1)),     # NVLink-C2C: a copy fits in one layer
    (0.010, 0.025, (True, 1, 2)),           # a copy in 0.4 layers: two orders per layer
    (0.018, 0.010, (True, 2, 1)),           # 1.8 layers: d = 2
    (None, 0.010, (False, 3, 1)),           # no profile: off
])
def test_prefetch_plan(copy, layer, want):
    from fmoe.runtime.policies import prefetch_plan

    assert prefetch_plan(copy, layer) == want


@pytest.mark.parametrize("copy,layer,lanes,want", [
    # a CPU with two readers (calibrated here: 13.1 ms per expert, 11.2 ms per MoE layer): a
    # read takes 26.2 ms, 2.3 layers: off, where one lane's 1.2 layers would have said on
    (0.0131, 0.0112, 2, (False, 3, 1)),
    (0.0131, 0.0112, 1, (True, 2, 1)),
    # two lanes, 10 ms per expert (each read 20 ms) beside 25 ms layers: a read in 0.8
    # layers, d = 1; the link moves 2.5 experts per layer: two orders
    (0.010, 0.025, 2, (True, 1, 2)),
])
def test_prefetch_plan_lanes(copy, layer, lanes, want):
    """With `lanes` reads in flight, a read takes lanes x the per-expert time: that sets d and
    whether to prefetch; the link's rate (per expert) sets the orders per layer."""
    from fmoe.runtime.policies import prefetch_plan

    assert prefetch_plan(copy, layer, lanes) == want


def test_auto_prefetch_follows_profile_and_link_slack():
    """prefetch="auto" with a profile where a copy fits in one layer: on, d = 1, one order per
    layer; orders go out only while the running mean of demand loads per layer keeps the link
    less than half busy (it starts as if every use missed)."""
    p = _one_map_policy(copy_seconds=1.0, layer_seconds=1.0, max_orders=None,
                        prefetch_distance=None)
    assert p.prefetches and p.gated and (p.d, p.max_orders) == (1, 1)
    assert not _one_map_policy(prefetch=False).prefetches
    slow = FmoePolicy(2, 4, 3, top_k=1, copy_seconds=4.0, layer_seconds=1.0)
    assert not slow.prefetches and slow.predictor is None
    searched = []
    search = p.predictor.layer_start
    p.predictor.layer_start = lambda *a: searched.append(a) or search(*a)
    p.on_request_start(0)
    assert p.on_layer_start(0) == []             # closed: 1 demand load per layer x 1 s > 0.5 s
    assert searched == []                        # ... and no search ran for it
    p.demand_per_layer = 0.0
    p.on_routed(0, np.array([1]))
    assert p.on_layer_start(1) == [(6, 1.0)]     # open: layer 1's expert, one layer ahead
    assert searched == [(0, 1)]
    p.on_routed(1, np.array([2]))
    p.on_token_end()
    for key in range(30):
        p.on_insert(key % 8)                     # 30 demand loads in one layer
    assert p.on_layer_start(0) == []             # the mean: 0.02 x 30 = 0.6 loads x 1 s > 0.5 s



def test_background_counting_decides_as_counting_in_place():
    """The reuse model counts each batch of passes on the counting thread; the counts land a
    fixed number of passes later whatever the thread's speed, so the victims are the same as
    with the batches counted on the forward thread."""
    from fmoe.runtime.reuse_features import COUNT_LAG, FLUSH_PASSES

    routes = _routes(3, L=4, E=16, K=2, seqs=3, tokens=2 * FLUSH_PASSES + COUNT_LAG + 9)
    runs = []
    for background in (True, False, True):
        p = make_policy("fmoe", 4, 16, 16, top_k=2, reuse_background=background)
        assert p.reuse.background is background
        states = []
        _, stats = _drive(p, routes, 16, states)
        runs.append((states, stats, p.reuse.samples))
    assert runs[0][2] > 0 and runs[0][1].misses > 100 and runs[0][1].prefetched == 0
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("background", [True, False])
def test_online_counts_land_count_lag_passes_after_the_batch(background):
    from fmoe.runtime.reuse_features import COUNT_LAG, FLUSH_PASSES
    from fmoe.runtime.reuse_model import ReuseModel

    L, E = 2, 4
    m = ReuseModel(L, E, 1, horizon=4, background=background)
    rng = np.random.default_rng(0)
    landed = []
    for _ in range(FLUSH_PASSES + 3 + COUNT_LAG):
        m.observe([l * E + int(rng.integers(E)) for l in range(L)])
        m.end_pass()
        landed.append(m.samples)
    start = FLUSH_PASSES + 3 - 1           # the pass at whose end the batch starts (0-based)
    assert set(landed[:start + COUNT_LAG]) == {0}
    assert landed[start + COUNT_LAG] == FLUSH_PASSES * L * E
    assert len(m._buf) == 3 + COUNT_LAG    # the passes whose labels were not complete, and later


def test_counting_thread_error_raised_at_landing():
    from fmoe.runtime.reuse_features import COUNT_LAG, FLUSH_PASSES
    from fmoe.runtime.reuse_model import ReuseModel

    class Broken(ReuseModel):
        def _count_batch(self, *args):
            raise ZeroDivisionError("bad batch")

    m = Broken(2, 4, 1)
    for _ in range(FLUSH_PASSES + 3 + COUNT_LAG - 1):
        m.observe([1, 5])
        m.end_pass()
    m.observe([1, 5])
    with pytest.raises(ZeroDivisionError, match="bad batch"):
        m.end_pass()
