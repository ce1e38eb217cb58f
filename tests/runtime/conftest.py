"""Shared fixtures of the runtime tests: one tiny random HF model per family."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

import fmoe  # noqa: E402
from hf_fixtures import save, tiny_hf  # noqa: E402

transformers = pytest.importorskip("transformers")

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
    """(checkpoint dir, resident model, ids [2, 10], its logits, its 16 greedy tokens)."""
    hf = FAMILIES[request.param]()
    path = save(hf, tmp_path_factory.mktemp(request.param))
    model = fmoe.models.from_pretrained(path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    return path, model, ids, model(ids), model.generate(ids, 16, eos_token_id=[])
