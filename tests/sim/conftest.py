"""Fixtures for the simulator tests: synthetic traces only (never the shared data)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _sim_cache(tmp_path, monkeypatch):
    """Each test gets its own on-disk cache directory."""
    monkeypatch.setenv("FMOE_SIM_CACHE", str(tmp_path / "simcache"))


@pytest.fixture
def tiny_config(tmp_path):
    """A config.json of a small DeepSeek-style MoE (3 MoE layers x 8 experts, top-2)."""
    import json

    cfg = {"model_type": "deepseek_v2", "hidden_size": 64, "num_hidden_layers": 4,
           "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "n_shared_experts": 1, "intermediate_size": 128,
           "num_attention_heads": 4, "kv_lora_rank": 16, "q_lora_rank": None,
           "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "vocab_size": 1000,
           "torch_dtype": "bfloat16"}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    return p
