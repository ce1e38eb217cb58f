"""DeepSeek-V2 / V2-Lite / V3 against tiny random transformers models, through the real loader."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import fmoe  # noqa: E402
from fmoe.models.deepseek_v2 import DeepseekV2Config, Router  # noqa: E402
from hf_fixtures import check_parity, prompt, rel_err, rewrite_config, save, tiny_hf, to_legacy_rope  # noqa: E402

MLA = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
           n_shared_experts=2, first_k_dense_replace=1)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1}


def v2(**kw):
    return tiny_hf(transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, **{**MLA, **kw})


def v3(**kw):
    kw = {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True, **kw}
    return tiny_hf(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, **{**MLA, **kw})


# -- parity ---------------------------------------------------------------------------------

def test_v2_lite_greedy_no_q_lora(tmp_path):
    """DeepSeek-V2-Lite's shape: q_lora_rank None, softmax greedy top-k, one dense layer."""
    hf = v2(q_lora_rank=None, topk_method="greedy")
    model = check_parity(hf, save(hf, tmp_path))
    cfg = model.config
    assert cfg.moe_layer_ids == [1, 2] and cfg.experts.num_layers == 2
    assert cfg.experts.num_experts == 8 and cfg.experts.inter == 16       # shared not counted
    names = dict(model.module.named_parameters())
    assert names["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (32, 32)
    assert "model.layers.0.mlp.gate_proj.weight" in names                  # dense layer
    assert "model.layers.0.self_attn.q_proj.weight" in names


def test_v2_group_limited_q_lora_yarn_legacy_config(tmp_path):
    """DeepSeek-V2's shape: q_lora_rank set, group-limited greedy, routed_scaling_factor, YaRN
    with mscale = mscale_all_dim, config.json in the hub's spelling (rope_scaling "type")."""
    yarn = {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
    hf = v2(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            num_experts_per_tok=3, routed_scaling_factor=4.0, rope_parameters=yarn,
            max_position_embeddings=256)
    assert hf.model.rotary_emb.rope_type == "yarn"
    assert hf.model.layers[0].self_attn.scaling != (16 ** -0.5)          # mscale² in the scale
    path = save(hf, tmp_path, max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    cfg = rewrite_config(path, to_legacy_rope)
    assert cfg["rope_scaling"]["type"] == "yarn"
    model = check_parity(hf, path)
    assert model.config.rope.type == "yarn" and model.config.topk_method == "group_limited_greedy"
    assert model.config.softmax_scale == pytest.approx(hf.model.layers[0].self_attn.scaling)


def test_v3_sigmoid_bias_group_topk_fused(tmp_path):
    """DeepSeek-V3's shape: sigmoid scores, e_score_correction_bias, group top-k by the sum of
    the two best, normalised then scaled weights; fused expert layout."""
    hf = v3(q_lora_rank=24)
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().max() > 0
    path = save(hf, tmp_path, fused=True)
    model = check_parity(hf, path)
    router = model.module.moe_blocks()[0].gate
    assert torch.equal(router.e_score_correction_bias, bias)
    assert model.config.topk_method == "noaux_tc" and model.config.routed_scaling_factor == 2.5


def test_v3_yarn_attention_factor_sharded_legacy(tmp_path):
    """V3 YaRN as the hub writes it (mscale 1.0, mscale_all_dim 1.0), here with unequal values so
    that the rotary attention factor is not 1; q_lora None; sharded; hub-style config.json."""
    yarn = {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}
    hf = v3(q_lora_rank=None, rope_parameters=yarn, max_position_embeddings=256)
    assert hf.model.rotary_emb.attention_scaling != 1.0
    path = save(hf, tmp_path, max_shard_size="40KB")

    def hub_style(cfg):
        to_legacy_rope(cfg)
        cfg["topk_method"], cfg["scoring_func"] = "noaux_tc", "sigmoid"
        for key in ("head_dim", "qk_head_dim"):
            cfg.pop(key, None)
    rewrite_config(path, hub_style)
    check_parity(hf, path)


def test_v3_without_rope_interleave(tmp_path):
    hf = v3(rope_interleave=False, n_group=2, topk_group=1, first_k_dense_replace=0)
    model = check_parity(hf, save(hf, tmp_path))
    assert model.config.moe_layer_ids == [0, 1, 2]


def test_v2_ignores_rope_interleave_as_transformers_does(tmp_path):
    """transformers' DeepSeek-V2 always rotates interleaved pairs: a rope_interleave false
    written into a V2 config.json changes nothing there, nor in fmoe."""
    hf = v2(q_lora_rank=None)
    path = save(hf, tmp_path)
    rewrite_config(path, lambda c: c.update(rope_interleave=False))
    model = check_parity(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                         path)
    assert model.config.rope_interleave


# -- MLA cache ------------------------------------------------------------------------------

@torch.no_grad()
def test_mla_cache_holds_latent_and_rope_key(tmp_path):
    hf = v2(q_lora_rank=None)
    model = fmoe.models.from_pretrained(save(hf, tmp_path))
    cfg = model.config
    ids = prompt(batch=2, length=5)
    cache = model.module.new_cache()
    model.module(ids, cache=cache)
    model.module(ids[:, :1], cache=cache)
    assert cache.seen == 6
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim                    # 16 + 8
    for layer in range(cfg.num_hidden_layers):
        latent, k_rope = cache.layers[layer]
        assert latent.shape[-1] == cfg.kv_lora_rank and k_rope.shape[-1] == cfg.qk_rope_head_dim
        assert latent.dim() == k_rope.dim() == 3                          # no head dimension
        assert sum(t.shape[-1] for t in cache.layers[layer]) == per_token
    used = sum(t[:, :cache.seen].numel() for b in cache.layers for t in b)
    assert used == cfg.num_hidden_layers * 2 * cache.seen * per_token
    # far below expanded K/V: heads * (qk_nope + qk_rope + v) values per token per layer
    assert per_token < cfg.num_attention_heads * (8 + 8 + 12)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@torch.no_grad()
def test_mla_latent_attention_in_chunks_matches_full_forward(tmp_path, q_lora_rank):
    """Once the cache holds tokens, MLA attends in latent space (kv_b_proj absorbed into the
    query and output); chunks of several tokens must agree with one expanded full forward."""
    hf = v2(q_lora_rank=q_lora_rank)
    model = fmoe.models.from_pretrained(save(hf, tmp_path))
    ids = prompt(batch=2, length=12)
    cache = model.module.new_cache()
    chunks = [model.module(ids[:, a:b], cache=cache) for a, b in ((0, 3), (3, 7), (7, 8), (8, 12))]
    assert rel_err(torch.cat(chunks, 1), model(ids)) < 1e-5


@torch.no_grad()
def test_mla_bf16_decode_row_through_the_cpu_kernel_matches_the_batched_path(tmp_path):
    """bf16 on the CPU, one decode row attends through `cpu_gemv.mla_decode` (all heads in one
    call); two identical rows take torch's batched products and attention. Both stay within
    bf16 rounding of each other and of the float32 model."""
    hf = v2(q_lora_rank=None)
    path = save(hf, tmp_path)
    model = fmoe.models.from_pretrained(path, dtype=torch.bfloat16)
    ref = fmoe.models.from_pretrained(path)
    ids = prompt(batch=1, length=6)

    def decode(m, rows):
        cache = m.module.new_cache()
        m.module(ids[:, :5].expand(rows, 5), cache=cache)
        return m.module(ids[:, 5:].expand(rows, 1), cache=cache)[:1].float()

    one, two, full = decode(model, 1), decode(model, 2), decode(ref, 1)
    assert rel_err(one, two) < 0.03 and rel_err(one, full) < 0.05 and rel_err(two, full) < 0.05


def test_mla_left_padded_batch_matches_single_rows(tmp_path):
    hf = v3(q_lora_rank=24)
    model = fmoe.models.from_pretrained(save(hf, tmp_path))
    a, b = prompt(1, 7, seed=3)[0], prompt(1, 4, seed=4)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    out = model.generate(batch, max_new_tokens=8, attention_mask=mask)
    assert torch.equal(out[0, 7:], model.generate(a[None], max_new_tokens=8)[0, 7:])
    assert torch.equal(out[1, 7:], model.generate(b[None], max_new_tokens=8)[0, 4:])


# -- checkpoints and config -----------------------------------------------------------------

def test_v3_ignores_multi_token_prediction_layers(tmp_path):
    hf = v3(q_lora_rank=None, num_mtp_layers=1)
    path = save(hf, tmp_path)
    file = next(path.glob("*.safetensors"))
    tensors = load_file(file)
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)         # as the hub's layer 61
    tensors["model.layers.3.mlp.experts.0.up_proj.weight"] = torch.zeros(16, 32)
    save_file(tensors, file, metadata={"format": "pt"})
    model = fmoe.models.from_pretrained(path)
    ids = prompt()
    assert rel_err(model(ids), hf(ids).logits) < 1e-4
    tensors["model.layers.4.eh_proj.weight"] = torch.zeros(1)              # beyond the MTP layers
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(fmoe.errors.CheckpointError, match="unexpected tensors: model.layers.4.eh"):
        fmoe.models.from_pretrained(path)


def test_router_weights_stay_float32_in_bf16(tmp_path):
    hf = v3(q_lora_rank=None)
    model = fmoe.models.from_pretrained(save(hf, tmp_path), dtype=torch.bfloat16)
    router = model.module.moe_blocks()[0].gate
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.e_score_correction_bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)
    assert model.module.model.layers[1].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert model(prompt()).isfinite().all()


def _hub_v2_lite():
    """The routing-relevant fields of deepseek-ai/DeepSeek-V2-Lite's config.json."""
    return {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
            "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
            "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
            "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
            "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy", "n_group": 1,
            "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0,
            "scoring_func": "softmax", "max_position_embeddings": 163840, "rope_theta": 10000,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                             "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                             "type": "yarn"}}


def test_hub_v2_lite_config():
    cfg = DeepseekV2Config.from_hf(_hub_v2_lite())
    shp = cfg.experts
    assert (shp.num_layers, shp.num_experts, shp.hidden, shp.inter, shp.top_k) == (26, 64, 2048, 1408, 6)
    assert cfg.moe_layer_ids == list(range(1, 27))
    assert cfg.expert_keys(0, 63)[0] == "model.layers.1.mlp.experts.63.gate_proj.weight"
    # yarn: softmax scale 1/sqrt(192) * (0.1 * 0.707 * ln 40 + 1)^2
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.0707 * 3.6888794541139363 + 1) ** 2)
    with pytest.raises(fmoe.errors.ConfigError, match="unsupported routing"):
        DeepseekV2Config.from_hf({**_hub_v2_lite(), "scoring_func": "sigmoid"})


def test_v3_single_pick_is_renormalised(tmp_path):
    """transformers' V3 renormalises the top-k weights whenever norm_topk_prob is set, a single
    pick too (its weight becomes routed_scaling_factor)."""
    hf = v3(num_experts_per_tok=1, n_group=1, topk_group=1)
    model = check_parity(hf, save(hf, tmp_path))
    weights, _, _ = model.module.moe_blocks()[0].gate(torch.randn(5, 32))
    assert torch.allclose(weights, torch.full((5, 1), 2.5))


def test_v2_group_limited_picks_past_the_kept_groups_weigh_zero(tmp_path):
    """With more picks than the kept groups hold (top-2, one group of one expert kept), the
    second pick comes from a dropped group and weighs 0, as transformers' V2 has it."""
    hf = v2(topk_method="group_limited_greedy", n_group=8, topk_group=1, num_experts_per_tok=2)
    model = check_parity(hf, save(hf, tmp_path))
    weights, _, _ = model.module.moe_blocks()[0].gate(torch.randn(5, 32))
    assert (weights[:, 0] > 0).all() and (weights[:, 1] == 0).all()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("make", [v2, v3], ids=["v2", "v3"])
def test_no_shared_experts_loads_transformers_checkpoint(tmp_path, make):
    """n_shared_experts=0: transformers saves a zero-width shared MLP; it loads (and adds nothing)."""
    hf = make(n_shared_experts=0)
    path = save(hf, tmp_path)
    from safetensors import safe_open

    with safe_open(str(next(path.glob("*.safetensors"))), "pt") as f:
        assert any(".shared_experts." in k for k in f.keys())
    model = check_parity(hf, path)
    assert not any("shared_experts" in n for n, _ in model.module.named_parameters())


def test_v2_norm_topk_prob_follows_reference_code():
    """V2's reference code renormalises *instead of* scaling; V3's renormalises, then scales."""
    base = {k: v for k, v in _hub_v2_lite().items() if k not in ("rope_scaling",)}
    base.update(hidden_size=8, n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=3.0)
    x = torch.randn(5, 8)
    for model_type, norm, expected_sum in [("deepseek_v2", True, 1.0), ("deepseek_v3", True, 3.0)]:
        cfg = DeepseekV2Config.from_hf({**base, "model_type": model_type, "norm_topk_prob": norm,
                                        "topk_method": None, "scoring_func": None})
        router = Router(cfg)
        torch.nn.init.normal_(router.weight)
        weights, ids, probs = router(x)
        assert weights.sum(-1) == pytest.approx(torch.full((5,), expected_sum), rel=1e-5)
        assert probs.sum(-1) == pytest.approx(torch.ones(5), rel=1e-5)
    cfg = DeepseekV2Config.from_hf({**base, "norm_topk_prob": False})
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    weights, ids, probs = router(x)
    assert torch.allclose(weights, 3.0 * probs.gather(1, ids))


def test_v3_fields_left_out_take_transformers_defaults(tmp_path):
    """A config.json without n_group, topk_group, routed_scaling_factor (and the token ids)
    computes what transformers computes from the same file: its DeepseekV3Config defaults (8, 4,
    2.5), not fmoe's own."""
    hf = v3(q_lora_rank=24, n_routed_experts=16, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    path = save(hf, tmp_path)
    rewrite_config(path, lambda c: [c.pop(k) for k in ("n_group", "topk_group", "routed_scaling_factor")])
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert (ref.config.n_group, ref.config.topk_group, ref.config.routed_scaling_factor) == (8, 4, 2.5)
    model = check_parity(ref, path)
    assert (model.config.n_group, model.config.topk_group, model.config.routed_scaling_factor) == (8, 4, 2.5)
