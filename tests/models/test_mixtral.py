"""Mixtral parity against HF transformers (fp32, CPU) through fmoe's real loader."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM

import fmoe
from tests.conftest import rel_err, rewrite_config, save_hf, tiny_mixtral_config


def assert_parity(path, hf, new_tokens=16, batch=2, prompt_len=11):
    model = fmoe.models.from_pretrained(path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, hf.config.vocab_size, (batch, prompt_len), generator=g)
    with torch.no_grad():
        ref = hf(ids).logits
    got = model(ids)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-4
    for row in ids:
        row = row[None]
        want = hf.generate(row, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        out = model.generate(row, max_new_tokens=new_tokens, eos_token_id=[])
        assert out.shape[1] == prompt_len + new_tokens
        assert torch.equal(out, want), (out, want)
    # routing is not degenerate: tokens do not all pick the same experts
    probs = torch.softmax(model.module.model.layers[0].block_sparse_moe.gate(
        model.module.model.embed_tokens(ids[0])), -1)
    assert len(torch.unique(torch.topk(probs, 2).indices)) > 2


@pytest.mark.parametrize("overrides", [
    dict(),                                                       # GQA 4 q heads / 2 kv heads
    dict(num_key_value_heads=4, num_hidden_layers=3),              # MHA
    dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1, intermediate_size=40,
         num_local_experts=4, num_experts_per_tok=1),
    dict(sliding_window=5),                                         # sliding window shorter than prompt
    dict(head_dim=24),                                              # explicit head_dim != hidden/heads
])
def test_parity_shapes(tmp_path, overrides):
    torch.manual_seed(0)
    hf = MixtralForCausalLM(tiny_mixtral_config(**overrides)).eval()
    assert_parity(save_hf(hf, tmp_path), hf)


def test_parity_sharded(tmp_path, mixtral_ckpt):
    _, hf = mixtral_ckpt
    path = save_hf(hf, tmp_path, max_shard_size="20KB")
    assert len(list(path.glob("*.safetensors"))) > 3
    assert (path / "model.safetensors.index.json").exists()
    assert_parity(path, hf)


def test_parity_fused_layout(tmp_path, mixtral_ckpt):
    _, hf = mixtral_ckpt
    path = save_hf(hf, tmp_path, save_original_format=False)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())
    assert_parity(path, hf)


def test_parity_legacy_hub_config(tmp_path, mixtral_ckpt):
    """A config.json in the hub's style: rope_theta at the top, num_local_experts."""
    _, hf = mixtral_ckpt
    path = save_hf(hf, tmp_path)

    def legacy(cfg):
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = None
        cfg.pop("transformers_version", None)

    rewrite_config(path, legacy)
    assert_parity(path, hf)


def test_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    hf = MixtralForCausalLM(tiny_mixtral_config(tie_word_embeddings=True)).eval()
    assert_parity(save_hf(hf, tmp_path), hf, new_tokens=4)


def test_dtype_override(mixtral_ckpt):
    path, hf = mixtral_ckpt
    model = fmoe.models.from_pretrained(path, dtype=torch.bfloat16)
    assert model.module.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(3, 128, (1, 8))
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(model(ids), ref) < 5e-2
