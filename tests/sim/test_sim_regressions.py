"""Regression tests for defects found in the simulator (each failed on the code before its fix)."""

from __future__ import annotations

import inspect
import pathlib

import numpy as np
import pytest

from fmoe.sim import diskcache
from fmoe.sim.replay import simulate
from fmoe.sim.timing import TimingModel
from sim_helpers import make_trace


def _module_file(name: str) -> pathlib.Path:
    import importlib

    return pathlib.Path(inspect.getfile(importlib.import_module(name))).resolve()


@pytest.mark.parametrize("module", ["fmoe.runtime.predictor", "fmoe.runtime.fmoe_policy",
                                    "fmoe.runtime.policies.fmoe",
                                    "fmoe.runtime.policies.eviction"])
def test_cache_key_covers_fmoe_policy_code(module, monkeypatch):
    """The disk cache's code version once hashed replay/oracle/policies/slots only: after a
    change to the fmoe policy's victim choice a cached replay still returned the old misses.
    A change to any module a replay runs must change the key."""
    target = _module_file(module)
    diskcache.code_version.cache_clear()
    before = diskcache.code_version()
    real = pathlib.Path.read_bytes

    def edited(self):
        data = real(self)
        return data + b"\n# edited\n" if pathlib.Path(self).resolve() == target else data
    monkeypatch.setattr(pathlib.Path, "read_bytes", edited)
    diskcache.code_version.cache_clear()
    try:
        assert diskcache.code_version() != before
    finally:
        monkeypatch.undo()
        diskcache.code_version.cache_clear()


def test_cache_key_covers_every_module_a_replay_imports():
    import sys

    trace = make_trace(T=60, L=3, E=8, K=2, nseq=3)
    simulate(trace, "fmoe", TimingModel(copy=1e-3), capacity=6,
             policy_options={"eviction": "distance", "max_orders": 1})
    hashed = {f.resolve() for f in diskcache.hashed_files()}
    ran = {pathlib.Path(m.__file__).resolve() for name, m in list(sys.modules.items())
           if name.startswith("fmoe.") and getattr(m, "__file__", None)}
    assert ran and ran <= hashed, sorted(str(p) for p in ran - hashed)


@pytest.mark.parametrize("eviction", ["distance", "pfreq", "lru-pred", "reuse"])
def test_horizon_with_map_eviction_and_token_ids(eviction):
    """`--policy horizon` with eviction=distance on a trace with token ids raised TypeError:
    the horizon bound's `tokens` (an int) overwrote fmoe's token embedder."""
    T = 80
    trace = make_trace(T=T, L=3, E=8, K=2, nseq=4,
                       token_ids=np.arange(T, dtype=np.int32) % 17)
    r = simulate(trace, "horizon", TimingModel(copy=1e-3), capacity=8,
                 policy_options={"eviction": eviction, "tokens": 1})
    assert r.hits + r.misses == T * 3 * 2


def test_sweep_reads_prefetch_flag_from_instances(monkeypatch):
    """sweep.py read `prefetches` from the class, where FmoePolicy had a property object (always
    true): fmoe counted as prefetching and was replayed once per hardware profile. The default
    fmoe policy does not prefetch under these profiles (a copy takes many layers of compute),
    so one demand-paging replay serves both."""
    from fmoe.sim import sweep

    calls = []
    real = sweep.simulate

    def spy(trace, policy, timings, **kw):
        calls.append((policy, len(timings)))
        return real(trace, policy, timings, **kw)
    monkeypatch.setattr(sweep, "simulate", spy)
    trace = make_trace(T=60, L=3, E=8, K=2, nseq=3)
    slow = {"a": TimingModel(attn=1e-4, expert=1e-5, copy=1e-2, name="a"),
            "b": TimingModel(attn=1e-4, expert=1e-5, copy=2e-2, name="b")}
    rows = sweep.run_sweep(trace, ["fmoe", "lru"], [0.5], slow)
    assert sorted(calls) == [("fmoe", 2), ("lru", 2)]
    assert {r["engine"] for r in rows if r["policy"] == "fmoe"} == {"demand"}
    # with prefetch forced on, each profile replays on its own (hits depend on timing)
    calls.clear()
    sweep.run_sweep(trace, ["fmoe"], [0.5], slow, policy_options={"max_orders": 1})
    assert calls == [("fmoe", 1), ("fmoe", 1)]
