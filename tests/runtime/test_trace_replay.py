"""A trace recorded live replays in the simulator to the runtime's own hit and miss counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fmoe
from fmoe.sim.replay import simulate
from fmoe.sim.timing import TimingModel
from fmoe.sim.trace import load_trace


@pytest.mark.parametrize("policy,cache", [("lru", 4), ("lru", 6), ("lfu", 5), ("lfu", 8),
                                          ("fmoe", 4), ("fmoe", 6)])
def test_recorded_trace_replays_to_same_counts(tmp_path, mixtral_ckpt, policy, cache):
    path, _ = mixtral_ckpt
    trace_path = tmp_path / "live.npz"
    model = fmoe.models.from_pretrained(path, expert_cache=cache, policy=policy, trace_path=trace_path)
    g = torch.Generator().manual_seed(11)
    for _n in range(3):              # three requests, one token per step (prompt of one token)
        model.generate(torch.randint(3, 128, (1, 1), generator=g), max_new_tokens=20, eos_token_id=[])
    live = model.expert_stats()
    model.close()

    trace = load_trace(trace_path)
    assert trace.num_sequences == 3
    assert trace.num_tokens == 60
    assert trace.expert_ids.shape == (60, 2, 2)
    assert trace.gate_probs is not None and trace.gate_probs.shape == (60, 2, 8)
    np.testing.assert_allclose(trace.gate_probs.sum(-1), 1.0, rtol=1e-5)
    assert list(trace.phase[:2]) == [0, 1]

    timing = TimingModel(attn=1e-4, shared=0.0, expert=1e-5, copy=1e-3)
    sim = simulate(trace, policy, timing, capacity=cache)
    assert (sim.hits, sim.misses) == (live["hits"], live["misses"])
    if policy == "fmoe":            # the default: the learned reuse eviction, no prefetch
        assert sim.prefetched == live["prefetched"] == 0
    assert live["misses"] > 0 and live["hits"] > 0


def test_recorded_trace_simulates_without_model_config(tmp_path, mixtral_ckpt):
    """Regression (issue 18): a trace recorded from a local checkpoint names the directory, not a
    known model, and could be simulated only with --model-config. It carries the model's
    config.json (`model_config`), and `fmoe simulate` takes the shape from it."""
    import json

    from fmoe.sim.__main__ import main

    path, _ = mixtral_ckpt
    trace_path = tmp_path / "live.npz"
    model = fmoe.models.from_pretrained(path, expert_cache=4, policy="lru", trace_path=trace_path)
    model.generate(torch.randint(3, 128, (1, 2), generator=torch.Generator().manual_seed(3)),
                   max_new_tokens=6, eos_token_id=[])
    model.close()
    trace = load_trace(trace_path)
    assert trace.model == path.name and str(path) not in trace.model     # no local path
    assert trace.model_config["num_local_experts"] == 8

    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["simulate", "--trace", str(trace_path), "--policy", "lru",
                     "--cache-fraction", "0.5", "--json", "--no-cache"])
    assert code == 0, err.getvalue()
    d = json.loads(out.getvalue().strip().splitlines()[-1])
    assert d["tokens"] == trace.num_tokens and d["capacity"] == 8 and d["model"] == path.name
    assert d["expert_bytes"] == 3 * 64 * 48 * 4          # the config's hidden x inter, float32
