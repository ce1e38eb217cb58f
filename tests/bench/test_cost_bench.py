"""tools/bench_fmoe_live.py's policy-cost table driven by a recorded trace's routing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fmoe.sim.trace import write_trace

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("bench_fmoe_live_tool",
                                                  ROOT / "tools/bench_fmoe_live.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trace_routing_drives_the_cost_table(tmp_path, capsys):
    """The routes are the trace's own ids per token and layer (padding -1 dropped), its shape
    sets the table's, and every policy row runs on them."""
    T, L, E, K = 8, 3, 8, 2
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)])
                    for _ in range(T)]).astype(np.int64)
    ids[5, 1, 1] = -1                                   # a layer that routed one expert
    gate = rng.dirichlet(np.ones(E), size=(T, L)).astype(np.float32)
    path = write_trace(tmp_path / "t.npz", expert_ids=ids, seq_offsets=[0, T], num_experts=E,
                       model="org/m", gate_probs=gate)
    tool = _tool()
    routes, probs, l, e, k = tool.trace_routes(path, T)
    assert (l, e, k) == (L, E, K)
    np.testing.assert_allclose(probs[5][1], gate[5, 1], rtol=1e-3)   # stored as float16
    assert [r.tolist() for r in routes[5]] == [ids[5, 0].tolist(), [ids[5, 1, 0]], ids[5, 2].tolist()]
    out = tool.cost_table(T // 2, 1, trace=path)
    assert len(out) == 4 and all(len(v) == 2 and min(v) > 0 for v in out.values())
    assert f"routing of t.npz's first {T} tokens ({L} x {E}, top-{K})" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="the cost runs need 20"):
        tool.trace_routes(path, 20)


def test_the_floor_table_times_the_compiled_kernels_and_restores_them(capsys):
    """Every part has a figure and the kernels are the module's own again afterwards. (The
    compiled share and the total come from separate timed runs: how they compare depends on
    the machine's load, so it is not asserted.)"""
    from fmoe.runtime import reuse_kernels
    from fmoe.runtime.policies import eviction

    before = {name: getattr(reuse_kernels, name) for name in ("take", "pass_vectors", "sync")}
    tool = _tool()
    out = tool.floor_table(3, 1)
    assert set(out) == {"events alone", "null policy", "lru", "fmoe", "fmoe: compiled kernels"}
    assert all(len(v) == 2 and min(v) > 0 for k, v in out.items() if k != "fmoe: compiled kernels")
    resident, quarter = out["fmoe: compiled kernels"]
    assert quarter > 0 and resident >= 0      # at 25% every pass ranks victims in `take`
    assert {name: getattr(reuse_kernels, name) for name in before} == before
    assert eviction._take in (None, before["take"])
    assert "| fmoe: compiled kernels |" in capsys.readouterr().out


def test_router_probabilities_reach_only_the_policies_that_read_them():
    """`drive` sends each routed layer its router output when the policy wants it (as the
    runtime does: the map-reading rows use it) and None otherwise; skewed routing brings its
    popularity as every token's router output."""
    tool = _tool()
    L, E, K, T = 3, 8, 2, 2
    routes, probs = tool.skewed_routes(L, E, K, 2 * T)
    assert len(probs) == 2 * T and all(p.shape == (E,) and p.dtype == np.float32
                                       for p in probs[0])
    np.testing.assert_allclose([p.sum() for p in probs[1]], 1.0, rtol=1e-5)

    class Recorder(tool.NoEvents):
        def __init__(self, wants):
            super().__init__()
            self.wants_probs, self.seen = wants, []

        def on_routed(self, layer, experts, p):
            self.seen.append(p)

    for wants in (True, False):
        pol = Recorder(wants)
        tool.drive(pol, tool.NoEvents(), routes, L, E, T, probs=probs)
        assert len(pol.seen) == 2 * T * L
        if wants:
            assert all(a is b for a, b in zip(pol.seen, [p for row in probs for p in row]))
        else:
            assert all(p is None for p in pol.seen)
