"""Model shapes, hardware profiles and the timing model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmoe.errors import ConfigError
from fmoe.sim.hardware import HARDWARE, get_hardware
from fmoe.sim.replay import simulate
from fmoe.sim.shapes import MODEL_SHAPES, get_shape, guess_shape, load_config_shape, shape_from_config
from fmoe.sim.timing import TimingModel
from sim_helpers import make_trace


def test_builtin_shapes():
    ds = MODEL_SHAPES["deepseek-v2-lite"]
    assert (ds.num_moe_layers, ds.num_experts, ds.top_k, ds.num_dense_layers) == (26, 64, 6, 1)
    assert ds.expert_bytes == 3 * 2048 * 1408 * 2 == 17_301_504
    assert ds.shared_params == 2 * 3 * 2048 * 1408
    mx = MODEL_SHAPES["mixtral-8x7b"]
    assert (mx.num_moe_layers, mx.num_experts, mx.top_k) == (32, 8, 2)
    assert mx.expert_bytes == 3 * 4096 * 14336 * 2 and mx.shared_params == 0
    qw = MODEL_SHAPES["qwen1.5-moe-a2.7b"]
    assert (qw.num_moe_layers, qw.num_experts, qw.top_k) == (24, 60, 4)
    assert qw.shared_params == 3 * 2048 * 5632 + 2048
    q3 = MODEL_SHAPES["qwen3-30b-a3b"]
    assert (q3.num_moe_layers, q3.num_experts, q3.top_k) == (48, 128, 8)
    assert q3.expert_bytes == 3 * 2048 * 768 * 2
    assert ds.with_dtype("float32").expert_bytes == 2 * ds.expert_bytes
    with pytest.raises(ConfigError, match="unknown dtype"):
        ds.with_dtype("int3")


@pytest.mark.parametrize("model_id,name", [
    ("deepseek-ai/DeepSeek-V2-Lite-Chat", "deepseek-v2-lite"),
    ("deepseek-ai/DeepSeek-V2-Lite", "deepseek-v2-lite"),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b"),
    ("Qwen/Qwen1.5-MoE-A2.7B-Chat", "qwen1.5-moe-a2.7b"),
    ("Qwen/Qwen3-30B-A3B-Instruct-2507", "qwen3-30b-a3b"),
    ("org/unknown-moe", None),
])
def test_guess_shape(model_id, name):
    assert guess_shape(model_id) == name


def test_config_variants(tmp_path):
    # transformers >= 5 spelling (num_local_experts) for a Qwen3-MoE; mlp_only_layers honoured
    cfg = {"model_type": "qwen3_moe", "hidden_size": 128, "num_hidden_layers": 6,
           "num_local_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 64,
           "intermediate_size": 256, "mlp_only_layers": [0], "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 500, "dtype": "float16"}
    s = shape_from_config(cfg)
    assert (s.num_moe_layers, s.num_dense_layers, s.num_experts, s.top_k) == (5, 1, 16, 4)
    assert s.expert_bytes == 3 * 128 * 64 * 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config_shape(tmp_path).num_experts == 16          # a directory works too
    mix = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2,
           "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96,
           "num_attention_heads": 4, "num_key_value_heads": 2, "torch_dtype": "float32"}
    s = shape_from_config(mix)
    assert s.moe_intermediate == 96 and s.expert_bytes == 3 * 64 * 96 * 4
    with pytest.raises(ConfigError, match="routed expert count"):
        shape_from_config({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_shape(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="no such file"):
        load_config_shape(tmp_path / "none.json")
    with pytest.raises(ConfigError, match="unknown model shape"):
        get_shape("gpt-7")


def test_hardware_profiles():
    for name, link, mem in [("rtx3090-pcie4", 25e9, 936e9), ("a5000-pcie4", 25e9, 768e9),
                            ("h100-pcie5", 50e9, 2.0e12), ("h200-pcie5", 50e9, 4.8e12),
                            ("gh200-c2c", 450e9, 4.0e12)]:
        hw = get_hardware(name)
        assert (hw.link_bw, hw.mem_bw) == (link, mem) and hw.matmul_flops > 1e13
    with pytest.raises(ValueError, match="unknown hardware profile"):
        get_hardware("tpu-v9")
    assert len(HARDWARE) >= 5


def test_timing_model_from_shape():
    ds = MODEL_SHAPES["deepseek-v2-lite"]
    hw = HARDWARE["rtx3090-pcie4"]
    tm = TimingModel.from_shape(ds, hw)
    assert tm.copy == pytest.approx(17_301_504 / 25e9)                 # ~0.69 ms
    assert tm.expert == pytest.approx(17_301_504 / 936e9)              # memory-bound at batch 1
    assert tm.shared == pytest.approx(2 * 17_301_504 / 936e9)
    assert tm.token_post == pytest.approx(102400 * 2048 * 2 / 936e9)   # lm_head
    # an expert's copy takes several layers' compute: PCIe offloading is transfer-bound
    layer = tm.attn + tm.shared + 6 * tm.expert
    assert 3 < tm.copy / layer < 5
    gh = TimingModel.from_shape(ds, HARDWARE["gh200-c2c"])
    assert gh.copy < layer


def test_real_shape_timing_on_a_synthetic_trace():
    # 26 x 64 synthetic trace with the DeepSeek-V2-Lite shape: the oracle beats LRU on TPOT
    t = make_trace(T=60, L=26, E=64, K=6, nseq=2, seed=9)
    tm = TimingModel.from_shape(MODEL_SHAPES["deepseek-v2-lite"], HARDWARE["rtx3090-pcie4"])
    lru = simulate(t, "lru", tm, cache_fraction=0.25)
    orc = simulate(t, "oracle", tm, cache_fraction=0.25)
    assert orc.tpot_ms < lru.tpot_ms and orc.hit_rate > lru.hit_rate
    resident = simulate(t, "lru", tm, cache_fraction=1.0)
    # a full cache only pays the first load of each expert
    assert resident.misses == len(np.unique(t.expert_ids[:, :, :] + 64 * np.arange(26)[:, None]))


@pytest.mark.slow
def test_lru_replay_of_a_dev_sized_trace():
    # the dev trace's size (155k tokens x 26 layers x top-6), synthetic (how fast it replays is
    # a benchmark's business: tools/bench_sim.py)
    from fmoe.sim.trace import Trace

    rng = np.random.default_rng(0)
    T, L, E, K = 155_000, 26, 64, 6
    logw = -1.1 * np.log(np.arange(1, E + 1))[rng.permutation(E)]
    ids = np.empty((T, L, K), dtype=np.int16)
    for a in range(0, T, 5000):      # Gumbel top-k: K distinct experts, Zipf-like popularity
        g = logw - np.log(-np.log(rng.random((min(5000, T - a), L, E))))
        ids[a:a + 5000] = np.argpartition(-g, K, axis=2)[:, :, :K]
    offs = np.linspace(0, T, 1601).astype(np.int64)
    t = Trace(ids, offs, E, "synthetic")
    tm = TimingModel.from_shape(MODEL_SHAPES["deepseek-v2-lite"], HARDWARE["rtx3090-pcie4"])
    r = simulate(t, "lru", tm, cache_fraction=0.25, use_cache=False)
    assert r.tokens == T and 0 < r.hit_rate < 1
