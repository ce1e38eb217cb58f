"""Routing replay and `fmoe bench` on a tiny DeepSeek-V2-shaped model: the layers route to the
trace's experts (checked against the trace itself), and every policy gives the same output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fmoe
from bench_helpers import random_trace
from fmoe.bench.replay import ReplayedExperts, attach_replay
from fmoe.bench.run import run_bench
from fmoe.models.experts import Experts
from fmoe.serve.cli import main


class _Spy(Experts):
    """Records the ids the experts backend receives, then computes as usual."""

    def __init__(self, inner, seen):
        super().__init__()
        self.inner, self.moe_layer, self.seen = inner, inner.moe_layer, seen

    def forward(self, x, topk_weights, topk_ids, router_probs=None):
        self.seen.append((self.moe_layer, topk_ids.tolist(), topk_weights.tolist()))
        return self.inner(x, topk_weights, topk_ids, router_probs)


def test_replayed_ids_equal_the_trace(tiny_synth, tmp_path):
    trace = random_trace(tmp_path / "t.npz", tokens=(6, 4), layers=2, experts=8, top_k=2, weights=True)
    model = fmoe.models.from_pretrained(tiny_synth, expert_cache=6, policy="lru")
    seen = []
    for b in model.module.moe_blocks():
        b.experts = _Spy(b.experts, seen)
    result = run_bench(model, trace=trace, sequences=2, log=lambda s: None)
    assert result["routing"] == "replayed:t.npz"
    assert result["tokens"] == 10 - 2                    # first token of each sequence excluded
    assert len(seen) == 10 * 2                           # one call per token and MoE layer
    for i, (layer, ids, weights) in enumerate(seen):
        t = i // 2
        assert layer == i % 2
        assert ids == [trace.expert_ids[t, layer].astype(int).tolist()]
        np.testing.assert_allclose(weights[0], trace.weights[t, layer], rtol=1e-6)
    model.close()


@pytest.fixture(scope="module")
def replay_outputs(tiny_synth, tmp_path_factory):
    trace = random_trace(tmp_path_factory.mktemp("tr") / "t.npz", tokens=(9, 7), layers=2, experts=8, top_k=2)
    outs = {}
    for name, kw in [("resident", {}), ("mmap", {"expert_cache": "mmap"}),
                     ("lru", {"expert_cache": 4, "policy": "lru"}),
                     ("lfu", {"expert_cache": 5, "policy": "lfu"}),
                     ("fmoe", {"expert_cache": 4}),
                     ("fmoe-prefetch", {"expert_cache": 6, "policy_options": {"prefetch": True}})]:
        model = fmoe.models.from_pretrained(tiny_synth, **kw)
        outs[name] = run_bench(model, trace=trace, sequences=2, log=lambda s: None)
        model.close()
    return outs


def test_output_equal_across_policies(replay_outputs):
    hashes = {k: r["output_sha256"] for k, r in replay_outputs.items()}
    assert len(set(hashes.values())) == 1, hashes
    assert replay_outputs["lru"]["misses"] > 0
    assert replay_outputs["fmoe-prefetch"]["prefetched"] > 0      # live orders reach the copy engine


def test_replay_differs_from_model_routing(tiny_synth, tmp_path):
    """The replayed routing really replaces the router's: the output changes with the trace."""
    a = random_trace(tmp_path / "a.npz", tokens=(8,), layers=2, seed=1)
    b = random_trace(tmp_path / "b.npz", tokens=(8,), layers=2, seed=2)
    b_ids = {"token_ids": a.token_ids}
    from fmoe.sim.trace import load_trace, write_trace

    write_trace(tmp_path / "b2.npz", expert_ids=b.expert_ids, seq_offsets=b.seq_offsets, num_experts=8,
                model="test/tiny", **b_ids)
    b = load_trace(tmp_path / "b2.npz")
    outs = []
    for tr in (a, b):
        m = fmoe.models.from_pretrained(tiny_synth)
        outs.append(run_bench(m, trace=tr, log=lambda s: None)["output_sha256"])
    assert outs[0] != outs[1]


def test_replay_refuses_mismatched_traces(tiny_synth, tmp_path):
    model = fmoe.models.from_pretrained(tiny_synth)
    with pytest.raises(ValueError, match="MoE layers"):
        attach_replay(model, random_trace(tmp_path / "few.npz", layers=1))
    with pytest.raises(ValueError, match="out of range"):
        attach_replay(model, random_trace(tmp_path / "wide.npz", layers=2, experts=16))
    with pytest.raises(ValueError, match="experts per token"):
        attach_replay(model, random_trace(tmp_path / "k3.npz", layers=2, top_k=3))
    r = attach_replay(model, random_trace(tmp_path / "ok.npz", layers=3))     # more layers: first L
    assert all(isinstance(b.experts, ReplayedExperts) for b in model.module.moe_blocks())
    assert r.ids.shape[1] == 2


def test_replay_is_off_unless_asked(tiny_synth):
    model = fmoe.models.from_pretrained(tiny_synth)
    assert not any(isinstance(b.experts, ReplayedExperts) for b in model.module.moe_blocks())
    assert run_bench(model, prompt_tokens=5, new_tokens=3, log=lambda s: None)["routing"] == "model"


def test_cli_bench_json(tiny_synth, tmp_path, capsys):
    random_trace(tmp_path / "t.npz", tokens=(5, 5), layers=2)
    rc = main(["bench", str(tiny_synth), "--routing-trace", str(tmp_path / "t.npz"), "--sequences", "2",
               "--expert-cache", "0.5", "--policy", "lru", "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    res = json.loads(captured.out.strip().splitlines()[-1])
    for key in ("tokens", "tokens_per_s", "ttft_s", "hit_rate", "bytes_loaded", "stall_seconds",
                "policy_seconds", "host_computed", "peak_rss_bytes", "capacity", "output_sha256", "routing"):
        assert key in res
    assert res["routing"] == "replayed:t.npz" and res["tokens"] == 8
    assert "routing replayed from t.npz" in captured.err
    # the model's own routing: prompt then generated tokens
    assert main(["bench", str(tiny_synth), "--prompt-tokens", "6", "--new-tokens", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["routing"] == "model" and res["tokens"] == 3 and res["prefill_tokens_per_s"] > 0


def test_cli_bench_bad_input(tiny_synth, tmp_path, capsys):
    assert main(["bench", str(tiny_synth), "--routing-trace", str(tmp_path / "missing.npz")]) != 0
    assert "missing.npz" in capsys.readouterr().err
    assert main(["bench", str(tiny_synth), "--sequences", "0"]) != 0
    assert main(["bench", str(tiny_synth), "--policy-option", "prefetch=true"]) != 0
    assert "--expert-cache" in capsys.readouterr().err
    assert main(["bench", str(tiny_synth), "--execution", "host"]) != 0
    assert "needs --expert-cache" in capsys.readouterr().err


def test_cli_bench_host_and_hybrid(tiny_synth, capsys):
    # (output equality across modes is tested in fp32: tests/runtime/test_hybrid.py)
    for execution in ("load", "host", "hybrid"):
        assert main(["bench", str(tiny_synth), "--prompt-tokens", "5", "--new-tokens", "4",
                     "--expert-cache", "0.25", "--policy", "lru", "--execution", execution,
                     "--json"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["execution"] == execution
        assert (res["host_computed"] > 0) == (execution != "load")


def test_mmap_experts_equal_resident(tiny_synth):
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    res = fmoe.models.from_pretrained(tiny_synth)
    mm = fmoe.models.from_pretrained(tiny_synth, expert_cache="mmap")
    from fmoe.models.mapped import MappedExperts

    assert all(isinstance(b.experts, MappedExperts) for b in mm.module.moe_blocks())
    assert torch.equal(res.generate(ids, 6, eos_token_id=[]), mm.generate(ids, 6, eos_token_id=[]))
    torch.testing.assert_close(mm(ids), res(ids), rtol=1e-5, atol=1e-5)


def test_mmap_maps_a_file_larger_than_memory(tmp_path):
    # the expert store keeps every expert in one file (28.8 GB for DeepSeek-V2-Lite); a writable
    # private mapping of a file larger than RAM + swap is refused with ENOMEM by the kernel's
    # default overcommit heuristic, so the mapping must be read-only
    from fmoe.models.mapped import MappedFiles

    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    total = sum(int(meminfo[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    big = tmp_path / "experts.bin"
    with open(big, "wb") as f:                     # sparse: takes no disk
        f.truncate(2 * total + 8192)
        f.seek(2 * total)
        f.write(np.arange(1024, dtype=np.float32).tobytes())
    files = MappedFiles()
    t = files.view(big, 2 * total, 4096, torch.float32, (32, 32))
    assert torch.equal(t.reshape(-1), torch.arange(1024, dtype=torch.float32))
    assert files.view(big, 0, 64, torch.float32, (16,)).eq(0).all()


def test_mmap_refuses_other_dtype(tiny_synth):
    with pytest.raises(ValueError, match="checkpoint's dtype"):
        fmoe.models.from_pretrained(tiny_synth, expert_cache="mmap", dtype=torch.bfloat16)
