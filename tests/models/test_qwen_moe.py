"""Qwen2-MoE and Qwen3-MoE against tiny random transformers models, through the real loader."""

import pytest

transformers = pytest.importorskip("transformers")

import fmoe  # noqa: E402
from fmoe.models.qwen2_moe import Qwen2MoeConfig  # noqa: E402
from fmoe.models.qwen3_moe import Qwen3MoeConfig  # noqa: E402
from hf_fixtures import check_parity, rewrite_config, save, tiny_hf, to_legacy_rope  # noqa: E402

QWEN2 = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             shared_expert_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1])

QWEN3 = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=True)


def qwen2(**kw):
    return tiny_hf(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, **{**QWEN2, **kw})


def qwen3(**kw):
    return tiny_hf(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, **{**QWEN3, **kw})


# -- Qwen2-MoE ------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen2_parity_dense_layer_and_shared_expert(tmp_path, norm_topk_prob):
    hf = qwen2(norm_topk_prob=norm_topk_prob)
    model = check_parity(hf, save(hf, tmp_path))
    cfg = model.config
    assert cfg.moe_layer_ids == [0, 2]                      # layer 1 is in mlp_only_layers
    assert cfg.experts.num_layers == 2 and cfg.experts.inter == 16
    assert len(model.module.moe_blocks()) == 2
    # the shared expert and the dense MLP are resident modules with checkpoint names
    names = dict(model.module.named_parameters())
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in names
    assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert not any(".experts." in n for n in names)


def test_qwen2_fused_sharded_legacy_config(tmp_path):
    hf = qwen2(decoder_sparse_step=1, mlp_only_layers=[0])
    path = save(hf, tmp_path, fused=True, max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 1

    def hub_style(cfg):                                     # as Qwen1.5-MoE-A2.7B's config.json
        to_legacy_rope(cfg)
        cfg.pop("layer_types")
        cfg.pop("qkv_bias")
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = 32768
    rewrite_config(path, hub_style)
    model = check_parity(hf, path)
    assert model.config.moe_layer_ids == [1, 2]


def test_qwen2_sliding_window_layers(tmp_path):
    # transformers' rule: odd-numbered layers below max_window_layers slide (here layer 0)
    hf = qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert hf.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    path = save(hf, tmp_path)
    model = check_parity(hf, path)
    assert model.config.sliding_layers == (0,) and model.config.sliding_window == 4
    rewrite_config(path, lambda cfg: cfg.pop("layer_types"))     # implied, as in hub configs
    assert fmoe.models.from_pretrained(path).config.sliding_layers == (0,)


def test_qwen2_decoder_sparse_step():
    cfg = Qwen2MoeConfig.from_hf(dict(QWEN2, vocab_size=128, num_hidden_layers=6,
                                      decoder_sparse_step=2, mlp_only_layers=[3]))
    assert cfg.moe_layer_ids == [1, 5]
    assert cfg.expert_keys(1, 7) == ("model.layers.5.mlp.experts.7.gate_proj.weight",
                                     "model.layers.5.mlp.experts.7.up_proj.weight",
                                     "model.layers.5.mlp.experts.7.down_proj.weight")
    assert cfg.fused_expert_keys(0) == ("model.layers.1.mlp.experts.gate_up_proj",
                                        "model.layers.1.mlp.experts.down_proj")


# -- Qwen3-MoE ------------------------------------------------------------------------------

def test_qwen3_parity_explicit_head_dim(tmp_path):
    hf = qwen3(mlp_only_layers=[2])
    model = check_parity(hf, save(hf, tmp_path))
    assert model.config.head_dim == 16 != 32 // 4
    assert model.config.moe_layer_ids == [0, 1]
    assert "model.layers.0.self_attn.q_norm.weight" in dict(model.module.named_parameters())


def test_qwen3_yarn_fused_sharded_legacy_config(tmp_path):
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 64}
    hf = qwen3(rope_parameters=yarn, max_position_embeddings=256, norm_topk_prob=False)
    assert hf.model.rotary_emb.rope_type == "yarn"
    path = save(hf, tmp_path, fused=True, max_shard_size="40KB")

    def hub_style(cfg):                                     # as Qwen3-30B-A3B's config.json
        to_legacy_rope(cfg)
        cfg["num_experts"] = cfg.pop("num_local_experts", None) or cfg.pop("num_experts")
        cfg["use_sliding_window"] = False
    cfg = rewrite_config(path, hub_style)
    assert cfg["rope_scaling"]["type"] == "yarn" and "num_local_experts" not in cfg
    model = check_parity(hf, path)
    assert model.config.rope.type == "yarn"


def test_qwen3_sliding_window(tmp_path):
    hf = qwen3(use_sliding_window=True, sliding_window=4)
    model = check_parity(hf, save(hf, tmp_path))
    assert model.config.sliding_window == 4


def test_qwen3_reads_num_local_experts():
    base = dict(QWEN3, vocab_size=128)
    base.pop("num_experts")
    assert Qwen3MoeConfig.from_hf({**base, "num_local_experts": 8}).experts.num_experts == 8
    assert Qwen3MoeConfig.from_hf({**base, "num_experts": 8}).experts.num_experts == 8


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_rope_theta_left_out_is_transformers_default(tmp_path, family):
    """Without rope_theta in config.json, the family computes with transformers' own default
    for that model type (1e4), not Mixtral's 1e6."""
    import torch

    hf = qwen2() if family == "qwen2_moe" else qwen3()
    path = save(hf, tmp_path)

    def drop(c):
        for k in ("rope_theta", "rope_scaling", "rope_parameters"):
            c.pop(k, None)
    rewrite_config(path, drop)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = check_parity(ref, path)
    assert model.config.rope.theta == 10000.0


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_an_activation_other_than_silu_is_refused(tmp_path, act):
    hf = qwen2()
    path = save(hf, tmp_path)
    rewrite_config(path, lambda c: c.update(hidden_act=act))
    with pytest.raises(fmoe.errors.ConfigError, match="hidden_act"):
        fmoe.models.from_pretrained(path)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("spelling", [
    # rope_parameters without its theta: the top-level one fills it in
    lambda c: c.update(rope_parameters=dict(YARN), rope_theta=50000.0),
    # both spellings: rope_scaling wins
    lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_scaling=dict(YARN)),
    # a top-level original_max_position_embeddings (Phi-3's spelling) over the nested one
    lambda c: c.update(rope_parameters={**YARN, "rope_theta": 10000.0}, original_max_position_embeddings=16),
], ids=["theta-outside", "rope-scaling-wins", "top-level-original"])
def test_rope_spellings_read_as_transformers_reads_them(tmp_path, spelling):
    """Each spelling loads into transformers and into fmoe from the same file, compared over 100
    positions (past the original context, where the rope types differ)."""
    import torch

    path = save(qwen3(max_position_embeddings=128), tmp_path)
    rewrite_config(path, spelling)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert ref.config.rope_parameters["rope_type"] == "yarn"
    check_parity(ref, path, ids=torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(0)))


def test_a_cached_forward_past_the_context_is_refused(tmp_path):
    """The positions a cache holds count against max_position_embeddings, as without one."""
    import torch

    model = fmoe.models.from_pretrained(save(qwen3(max_position_embeddings=16), tmp_path))
    cache = model.new_cache()
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="the cache holds 10 positions; 7 more is beyond the model's context of 16"):
        model(torch.zeros(1, 7, dtype=torch.long), cache=cache)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)


def test_yarn_extends_the_context_to_original_times_factor(tmp_path):
    """Qwen3's long-context recipe: YaRN x4 over 32 positions in a config whose
    max_position_embeddings says 40. The context is 128 (as vLLM takes it), and positions past
    40 compute what transformers computes; dynamic NTK, which fmoe computes only inside
    max_position_embeddings, is not extended."""
    import torch

    from fmoe.runtime.engine import context_length

    path = save(qwen3(max_position_embeddings=40), tmp_path / "yarn")
    rewrite_config(path, lambda c: c.update(rope_parameters={**YARN, "rope_theta": 10000.0}))
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = check_parity(ref, path, ids=torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1)))
    assert context_length(model) == 128
    with pytest.raises(ValueError, match="beyond the model's context of 128"):
        model.generate(torch.zeros(1, 100, dtype=torch.long), max_new_tokens=29)
    path = save(qwen3(max_position_embeddings=40), tmp_path / "dynamic")
    rewrite_config(path, lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                                             "rope_theta": 10000.0}))
    assert context_length(fmoe.models.from_pretrained(path)) == 40
