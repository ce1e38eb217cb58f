"""policy="fmoe" in the live runtime: lossless, prefetches reported, map store persisted, and
search kept off the forward thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import fmoe
from fmoe.runtime.fmoe_policy import FmoePolicy


@pytest.fixture(scope="module")
def resident(mixtral_ckpt):
    path, _ = mixtral_ckpt
    model = fmoe.models.from_pretrained(path)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(9))
    return path, ids, model.generate(ids, 24, eos_token_id=[])


@pytest.mark.parametrize("cache", [2, 0.25, 0.5])
def test_fmoe_lossless_and_prefetches(resident, cache):
    path, ids, ref = resident
    model = fmoe.models.from_pretrained(path, expert_cache=cache, policy="fmoe",
                                        policy_options={"max_orders": 4})
    try:
        for _ in range(3):                       # the store fills online
            assert torch.equal(model.generate(ids, 24, eos_token_id=[]), ref)
        model.runtime.scheduler.drain()
        s = model.expert_stats()
        assert s["prefetched"] > 0
        assert 0 <= s["prefetch_used"] <= s["prefetched"]
        assert s["resident_peak"] <= s["capacity"]
        assert model.runtime.policy.store.size > 0
    finally:
        model.close()


@pytest.mark.parametrize("cache", [2, 0.25])
def test_default_fmoe_lossless_and_learns_online(resident, cache):
    """The default (reuse eviction, no prefetch): equal tokens, and the reuse model counts live
    traffic from an empty start."""
    path, ids, ref = resident
    model = fmoe.models.from_pretrained(path, expert_cache=cache)
    try:
        pol = model.runtime.policy
        assert pol.name == "fmoe" and pol.eviction == "reuse" and not pol.uses_maps
        assert pol.reuse.seen.sum() == 0
        for _ in range(2):
            assert torch.equal(model.generate(ids, 24, eos_token_id=[]), ref)
        assert pol.reuse.seen.sum() > 0 and pol.reuse.tokens > 0
        assert pol.store.size == 0                      # no maps kept: nothing reads them
        s = model.expert_stats()
        assert s["misses"] > 0 and s["resident_peak"] <= s["capacity"]
    finally:
        model.close()


def test_search_runs_on_worker_thread(resident):
    path, ids, _ = resident
    default = fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe")
    assert default.runtime.policy.max_orders == 0          # the default: no prefetch ...
    assert default.runtime.scheduler is None               # ... so no worker thread
    default.close()
    cpu = fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe",
                                      policy_options={"max_orders": 1})
    assert not cpu.runtime.scheduler.threaded              # on CPU predictions are synchronous
    cpu.close()
    model = fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe",
                                        policy_options={"max_orders": 1, "worker": True})
    seen = set()
    pred = model.runtime.policy.predictor
    for name in ("layer_start", "routed", "token_end"):
        orig = getattr(pred, name)

        def spy(*a, _orig=orig, **k):
            seen.add(threading.current_thread().name)
            return _orig(*a, **k)
        setattr(pred, name, spy)
    model.generate(ids, 4, eos_token_id=[])
    model.runtime.scheduler.drain()
    model.close()
    assert seen == {"fmoe-predictor"}


_POLICY_EVENTS = ("on_request_start", "on_layer_start", "on_routed", "on_token_end",
                  "on_request_end", "on_hit", "on_insert", "on_evict", "victim", "admit_prefetch")


def test_layer_start_comes_before_the_layers_attention(resident):
    """The event protocol as the runtime drives it: on_layer_start(l) for l > 0 comes after
    on_routed(l - 1) and before the attention of MoE layer l (a prefetch for l has that
    attention's time to land, as in the simulator); the first MoE layer of a token starts when
    its experts run. Once per layer and token."""
    path, ids, ref = resident
    model = fmoe.models.from_pretrained(path, expert_cache=0.5, policy="lru")
    log = []
    pol = model.runtime.policy
    for name in ("on_layer_start", "on_routed", "on_token_end"):
        orig = getattr(pol, name)

        def spy(*a, _orig=orig, _name=name, **k):
            log.append((_name, a[0] if a else None))
            return _orig(*a, **k)
        setattr(pol, name, spy)
    moe_ids = model.config.moe_layer_ids
    hooks = [model.module.model.layers[d].self_attn.register_forward_pre_hook(
        lambda mod, args, _l=l: log.append(("attn", _l))) for l, d in enumerate(moe_ids)]
    try:
        assert torch.equal(model.generate(ids, 6, eos_token_id=[]), ref[:, :ids.shape[1] + 6])
    finally:
        for h in hooks:
            h.remove()
        model.close()
    L = len(moe_ids)
    want = [("attn", 0), ("on_layer_start", 0), ("on_routed", 0)]
    for l in range(1, L):
        want += [("on_layer_start", l), ("attn", l), ("on_routed", l)]
    want.append(("on_token_end", None))
    assert log == want * 6            # six tokens: the prompt's forward and five decode steps


def test_policy_state_has_one_owner_thread(resident):
    """Regression (a race): with prefetch on, the worker used to run the policy's own events
    (on_routed, on_token_end: the reuse model, the running iteration) while the forward thread
    ran its cache events and victim choice on the same object, unlocked. Every event of the
    policy object must come from the forward thread; only the map predictor runs on the
    worker, and it hands back immutable predictions."""
    path, ids, ref = resident
    model = fmoe.models.from_pretrained(path, expert_cache=0.25, policy="fmoe",
                                        policy_options={"max_orders": 4})
    pol = model.runtime.policy
    threads: dict[str, set] = {}
    for name in _POLICY_EVENTS:
        orig = getattr(pol, name)

        def spy(*a, _orig=orig, _name=name, **k):
            threads.setdefault(_name, set()).add(threading.current_thread().name)
            return _orig(*a, **k)
        setattr(pol, name, spy)
    try:
        for _ in range(3):                       # the store fills; searches and victims run
            assert torch.equal(model.generate(ids, 24, eos_token_id=[]), ref)
        model.runtime.scheduler.drain()
    finally:
        model.close()
    assert {"on_layer_start", "on_routed", "on_token_end", "victim"} <= set(threads)
    forward = threading.current_thread().name
    assert all(t == {forward} for t in threads.values()), threads


def test_worker_error_raised_on_next_forward(resident, monkeypatch):
    """Regression: an exception in the prefetch worker's search used to be stored and never
    raised (prefetch silently stopped). It must surface on the forward thread, in the next
    forward, as an exception of the model call."""
    from fmoe.runtime import predictor as predictor_mod

    path, ids, _ = resident
    model = fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe",
                                        policy_options={"max_orders": 1})
    try:
        model.generate(ids, 4, eos_token_id=[])      # fills the map store: searches start
        model.runtime.scheduler.drain()

        def broken(self, *a, **k):
            raise ZeroDivisionError("search failed")
        monkeypatch.setattr(predictor_mod.TrajectorySearch, "observe", broken)
        with pytest.raises(Exception) as info:
            for _ in range(3):
                model.generate(ids, 4, eos_token_id=[])
                model.runtime.scheduler.drain()
        err = info.value
        chain = [err, err.__cause__]
        assert any(isinstance(e, ZeroDivisionError) for e in chain), repr(err)
    finally:
        monkeypatch.undo()
        model.close()


def test_map_store_persists_across_restarts(resident, tmp_path):
    path, ids, ref = resident
    store = tmp_path / "maps" / "store.npz"
    m1 = fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe", map_store=store)
    m1.generate(ids, 8, eos_token_id=[])
    n = m1.runtime.policy.store.size
    counts = m1.runtime.policy.reuse.seen.copy()
    m1.close()
    assert store.exists() and n > 0 and counts.sum() > 0
    m2 = fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe", map_store=store)
    assert m2.runtime.policy.store.size == n        # warm after a restart ...
    assert np.array_equal(m2.runtime.policy.reuse.seen, counts)   # ... reuse counts too
    assert torch.equal(m2.generate(ids, 24, eos_token_id=[]), ref)
    m2.close()
    store.write_bytes(b"garbage")                   # not a store: refused, left as it is
    with pytest.raises(ValueError, match="not an fmoe expert-map store"):
        fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe", map_store=store)
    assert store.read_bytes() == b"garbage"


def test_map_store_refuses_what_fmoe_did_not_write(resident, tmp_path):
    """Regression (issue 18): from_pretrained(map_store=PATH) read a user's file as a "bad
    store", ignored it and overwrote it at close. Like `--map-store` (the same check), it refuses
    a file that is not an fmoe expert-map store, or is another model's, and leaves it untouched."""
    path = resident[0]
    notes = tmp_path / "notes.txt"
    notes.write_text("my thesis notes\n")
    with pytest.raises(ValueError, match=r"map_store .*notes.txt: the file exists but is not an "
                                         r"fmoe expert-map store"):
        fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe", map_store=notes)
    assert notes.read_text() == "my thesis notes\n"
    other = tmp_path / "other.npz"
    np.savez(other, format=np.int64(1), shape=np.array([26, 64, 2048]), maps=np.zeros((0, 26, 64)),
             sem=np.zeros((0, 2048)))
    before = other.read_bytes()
    with pytest.raises(ValueError, match="26 MoE layers x 64 experts; this model has 2 x 8"):
        fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe", map_store=other)
    assert other.read_bytes() == before
    with pytest.raises(ValueError, match="is a directory"):
        fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe", map_store=tmp_path)


def test_map_store_needs_fmoe(resident, tmp_path):
    with pytest.raises(ValueError, match="policy='fmoe'"):
        fmoe.models.from_pretrained(resident[0], expert_cache=0.5, policy="lru", map_store=tmp_path / "x.npz")


def test_policy_hand_worked_distance_eviction():
    """Two layers x 4 experts, 3 slots. At layer 1 the resident keys are (0,0), (0,1), (1,2);
    (1,2) is predicted for this layer, the two layer-0 keys are not needed before the next
    iteration: the rarely used one goes."""
    p = FmoePolicy(2, 4, 3, top_k=1, eviction="distance", prefetch_distance=1)
    for key in (0, 1, 6):
        p.on_insert(key)
    r = p.rule
    r.ema[:] = 0.0
    r.ema[0] = 0.9          # (0,0) used in most iterations
    r.ema[1] = 0.1
    r.ema[6] = 0.1
    r.l_now = 1
    r.p_cur[:] = 0
    r.p_cur[6] = 1.0         # predicted for layer 1 now
    assert p.victim([0, 1, 6], set()) == 1
    assert p.victim([0, 1, 6], {1}) == 0
    d = r.expected_distance()
    assert d[6] == pytest.approx(0.0)            # predicted for the running layer
    assert d[0] == pytest.approx(1 + 2 * (1 / 0.9001 - 1))   # next iteration, used 90% of them
    assert p.admit_prefetch(7, 1) is bool(d[1] > d[7])


def test_policy_option_of_wrong_type_names_it(resident):
    """Regression (issue 18): policy_options={"max_orders": "abc"} failed in the policy's
    constructor with a raw TypeError; the API checks it like the CLIs (one check, in
    `make_options`) and names the option and the expected type."""
    path, _, _ = resident
    with pytest.raises(ValueError, match=r"policy 'fmoe' option max_orders must be an integer"):
        fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe",
                                    policy_options={"max_orders": "abc"})
    with pytest.raises(ValueError, match=r"policy 'fmoe' option lead must be a boolean"):
        fmoe.models.from_pretrained(path, expert_cache=0.5, policy="fmoe",
                                    policy_options={"lead": "yes"})
