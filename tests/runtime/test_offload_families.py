"""Offloading is lossless for every family: expert_cache in {minimum, 0.25, 0.5, 1.0} x policy
in {lru, lfu} gives the resident model's logits (bit for bit) and greedy tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from hf_fixtures import save, tiny_hf  # noqa: E402

import fmoe  # noqa: E402
from fmoe.runtime.offload import min_capacity  # noqa: E402

MLA = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
           n_shared_experts=2, first_k_dense_replace=1)

FAMILIES = {
    "mixtral": lambda: tiny_hf(transformers.MixtralConfig, transformers.MixtralForCausalLM,
                               hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                               num_experts_per_tok=2),
    "qwen2_moe": lambda: tiny_hf(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                                 hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=24, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                 num_experts_per_tok=4, mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_moe": lambda: tiny_hf(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                                 hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=12, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "deepseek_v2": lambda: tiny_hf(transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                                   q_lora_rank=None, topk_method="greedy", **MLA),
    "deepseek_v3": lambda: tiny_hf(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                                   n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                   norm_topk_prob=True, **MLA),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    hf = FAMILIES[request.param]()
    path = save(hf, tmp_path_factory.mktemp(request.param))
    model = fmoe.models.from_pretrained(path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    return path, model, ids, model(ids), model.generate(ids, 16, eos_token_id=[])


@pytest.mark.parametrize("cache", ["min", 0.25, 0.5, 1.0])
def test_lossless_every_family(family, cache):
    path, resident, ids, ref_logits, ref_tokens = family
    shp = resident.config.experts
    cap = min_capacity(shp.top_k) if cache == "min" else cache
    for policy in ("lru", "lfu"):
        model = fmoe.models.from_pretrained(path, expert_cache=cap, policy=policy)
        try:
            assert torch.equal(model(ids), ref_logits)
            assert torch.equal(model.generate(ids, 16, eos_token_id=[]), ref_tokens)
            s = model.expert_stats()
            assert s["resident_peak"] <= s["capacity"]
            if s["capacity"] < shp.num_layers * shp.num_experts:
                assert s["misses"] > 0
        finally:
            model.close()
