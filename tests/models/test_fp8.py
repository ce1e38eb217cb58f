"""FP8 block-scaled checkpoints (DeepSeek-V3/R1, Kimi-K2, Qwen3 -FP8 as published): fmoe against
HF transformers on the dequantised checkpoint, resident and offloaded, through the converter,
and the bytes one expert load moves."""

import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fp8_fixtures import dequantised_copy, make_fp8, round_to_bf16  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import fmoe  # noqa: E402
from fmoe.errors import CheckpointError  # noqa: E402
from fmoe.models.fp8 import dequantize, quantize, scale_shape  # noqa: E402
from hf_fixtures import REL_TOL, prompt, rel_err, save, tiny_hf  # noqa: E402

# hidden 40 and expert width 24 are not multiples of the blocks below: edge blocks are partial
MLA = dict(hidden_size=40, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
           n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24, n_group=4, topk_group=2,
           routed_scaling_factor=2.5, norm_topk_prob=True)
QWEN3 = dict(hidden_size=40, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=True)


def deepseek_v3(**kw):
    return tiny_hf(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, **{**MLA, **kw})


def qwen3(**kw):
    return tiny_hf(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, **{**QWEN3, **kw})


FAMILIES = {"deepseek_v3": (deepseek_v3, transformers.DeepseekV3ForCausalLM),
            "qwen3_moe": (qwen3, transformers.Qwen3MoeForCausalLM)}


def build(tmp_path, family: str, block, **kw):
    """(FP8 checkpoint dir, HF reference model on its dequantised copy)."""
    make, hf_cls = FAMILIES[family]
    hf = round_to_bf16(make(**kw))
    src = save(hf, tmp_path / "fp32")
    fp8 = make_fp8(src, tmp_path / "fp8", block)
    ref = hf_cls.from_pretrained(dequantised_copy(fp8, tmp_path / "deq", block), dtype=torch.float32).eval()
    return fp8, ref


@torch.no_grad()
def check_against(ref, model, new_tokens: int = 12):
    """Full-forward logits within the parity tolerance, identical greedy tokens."""
    ids = prompt(vocab=ref.config.vocab_size)
    expected = ref(ids).logits
    got = model(ids)
    assert rel_err(got, expected) < REL_TOL, rel_err(got, expected)
    want = ref.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                        attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, max_new_tokens=new_tokens), want)
    return got


# -- the recipe -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape,block", [((40, 24), (16, 16)), ((37, 70), (32, 16)), ((64, 256), (128, 128)),
                                         ((256, 128), (128, 128))])
def test_quantize_dequantize_blocks(shape, block):
    w = torch.randn(shape) * 0.3
    q, s = quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == shape
    assert s.dtype == torch.float32 and tuple(s.shape) == scale_shape(shape, block)
    back = dequantize(q, s, block)
    # e4m3 keeps 3 mantissa bits: within 1/16 of each block's amax
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            amax = w[blk].abs().max()
            assert s[i, j] == pytest.approx(float(amax) / 448, rel=1e-6)
            assert (back[blk] - w[blk]).abs().max() <= amax / 16
    # the blocked fast path and the general path agree exactly
    grid = s.repeat_interleave(block[0], 0)[:shape[0]].repeat_interleave(block[1], 1)[:, :shape[1]]
    assert torch.equal(back, q.float() * grid)


# -- parity against HF transformers ---------------------------------------------------------

@pytest.mark.parametrize("family,block", [("deepseek_v3", (16, 16)), ("deepseek_v3", (128, 128)),
                                          ("qwen3_moe", (16, 16)), ("qwen3_moe", (32, 16))])
def test_fp8_parity_resident_and_offloaded(tmp_path, family, block):
    fp8, ref = build(tmp_path, family, block)
    f8 = [k for k, v in load_file(next(fp8.glob("*.safetensors"))).items() if v.dtype == torch.float8_e4m3fn]
    assert any(".experts." in k for k in f8) and any("self_attn" in k for k in f8)
    resident = fmoe.models.from_pretrained(fp8, dtype=torch.float32)
    logits = check_against(ref, resident)
    offloaded = fmoe.models.from_pretrained(fp8, dtype=torch.float32, expert_cache=0.25, policy="lru")
    ids = prompt(vocab=ref.config.vocab_size)
    assert torch.equal(offloaded(ids), logits)               # lossless, as for any checkpoint
    check_against(ref, offloaded)
    assert offloaded.expert_stats()["misses"] > 0
    offloaded.close()


def test_kimi_k2_model_type_is_deepseek_v3(tmp_path):
    """Kimi-K2 checkpoints: V3's architecture and FP8 recipe under model_type "kimi_k2" (with
    V3's defaults: noaux_tc routing when the config does not name it)."""
    import json

    fp8, ref = build(tmp_path, "deepseek_v3", (16, 16))
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    cfg.pop("topk_method", None)
    cfg.pop("scoring_func", None)
    (fp8 / "config.json").write_text(json.dumps(cfg))
    model = fmoe.models.from_pretrained(fp8, dtype=torch.float32)
    assert model.config.topk_method == "noaux_tc" and model.config.model_type == "kimi_k2"
    check_against(ref, model, new_tokens=4)


def test_fp8_serves_in_bf16_by_default(tmp_path):
    """Published FP8 checkpoints keep embeddings and norms in bf16: that is the serving dtype."""
    fp8, ref = build(tmp_path, "deepseek_v3", (16, 16))
    model = fmoe.models.from_pretrained(fp8)
    assert model.dtype == torch.bfloat16
    assert model.module.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    # the same numbers as the dequantised checkpoint cast to bf16 at load: dequantisation is
    # done in float32 and rounded once, whatever the path
    deq = fmoe.models.from_pretrained(tmp_path / "deq", dtype=torch.bfloat16)
    ids = prompt(vocab=ref.config.vocab_size)
    assert torch.equal(model(ids), deq(ids))
    offloaded = fmoe.models.from_pretrained(fp8, expert_cache=0.25, policy="lru")
    assert torch.equal(offloaded(ids), deq(ids))
    offloaded.close()


def test_bytes_loaded_counts_fp8_and_scales(tmp_path):
    """One expert load moves the FP8 weights and their scales: about half its bf16 size."""
    block = (16, 16)
    fp8, ref = build(tmp_path, "deepseek_v3", block)
    H, I = MLA["hidden_size"], MLA["moe_intermediate_size"]
    scales = (2 * math.prod(scale_shape((I, H), block)) + math.prod(scale_shape((H, I), block))) * 4
    per_load = 3 * H * I + scales
    model = fmoe.models.from_pretrained(fp8, dtype=torch.float32, expert_cache=0.25, policy="lru")
    model(prompt(vocab=ref.config.vocab_size))
    stats = model.expert_stats()
    reads = model.runtime.store.disk_reads
    assert reads > 0 and stats["bytes_loaded"] == reads * per_load
    assert model.runtime.store.expert_bytes == per_load
    bf16 = 3 * H * I * 2
    assert per_load < 0.55 * bf16
    model.close()


def test_store_raw_path_matches_read_into(tmp_path):
    """The pieces the CUDA copy engine chains (raw FP8 staging, a copy of it "on the device",
    dequantisation into the slot) give the slot `read_into` fills on CPU, for every expert."""
    import json

    from fmoe.models.checkpoint import CheckpointIndex
    from fmoe.models.loading import locate_experts, read_expert
    from fmoe.models.qwen3_moe import Qwen3MoeConfig
    from fmoe.runtime.store import ExpertStore

    fp8, _ = build(tmp_path, "qwen3_moe", (16, 16))
    cfg = Qwen3MoeConfig.from_hf(json.loads((fp8 / "config.json").read_text()))
    layouts, _ = locate_experts(cfg, CheckpointIndex(fp8))
    H, I = QWEN3["hidden_size"], QWEN3["moe_intermediate_size"]
    store = ExpertStore(layouts, H, I, torch.float32)
    assert store.quantized and store.expert_bytes == 3 * H * I + (2 * 2 * 3 + 3 * 2) * 4
    raw, dev = store.new_raw_staging(), store.new_raw_staging(device="cpu")
    assert [t.dtype for t in raw] == [torch.float8_e4m3fn] * 2 + [torch.float32] * 2
    for key in range(len(layouts) * len(layouts[0])):
        a13, a2 = store.new_staging()
        store.read_into(key, a13, a2)
        store.read_raw_into(key, raw)
        for d, h in zip(dev, raw):
            d.copy_(h)
        b13, b2 = torch.full_like(a13, float("nan")), torch.full_like(a2, float("nan"))
        store.dequantize_into(dev, b13, b2)
        assert torch.equal(a13, b13) and torch.equal(a2, b2)
    with pytest.raises(ValueError, match="needs scale buffers"):
        read_expert(store.reader, layouts[0][0], raw[0], raw[1])


def test_host_tier_keeps_fp8(tmp_path):
    fp8, ref = build(tmp_path, "qwen3_moe", (16, 16))
    model = fmoe.models.from_pretrained(fp8, dtype=torch.float32, expert_cache=0.25, policy="lru",
                                        host_cache="1MiB")
    ids = prompt(vocab=ref.config.vocab_size)
    first = model(ids)
    store = model.runtime.store
    reads = store.disk_reads
    assert store.host_resident() > 0
    kept = next(iter(store._host.values()))
    assert kept[0].dtype == torch.float8_e4m3fn and kept[2].dtype == torch.float32
    assert torch.equal(model(ids), first)
    assert store.disk_reads == reads                      # every re-load came from the host tier
    model.close()


# -- checkpoints: MTP layers, errors --------------------------------------------------------

def test_v3_mtp_layers_skipped_with_a_note(tmp_path, caplog):
    hf = round_to_bf16(deepseek_v3(num_nextn_predict_layers=1))
    src = save(hf, tmp_path / "fp32")
    H = MLA["hidden_size"]
    extra = {"model.layers.3.eh_proj.weight": torch.randn(H, 2 * H),          # as the hub's layer 61
             "model.layers.3.mlp.experts.0.up_proj.weight": torch.randn(24, H),
             "model.layers.3.enorm.weight": torch.ones(H)}
    fp8 = make_fp8(src, tmp_path / "fp8", (16, 16), extra=extra)
    assert "model.layers.3.eh_proj.weight_scale_inv" in load_file(next(fp8.glob("*.safetensors")))
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(
        dequantised_copy(make_fp8(src, tmp_path / "fp8b", (16, 16)), tmp_path / "deq", (16, 16)),
        dtype=torch.float32).eval()
    with caplog.at_level(logging.INFO, logger="fmoe.models"):
        model = fmoe.models.from_pretrained(fp8, dtype=torch.float32)
    assert "multi-token-prediction" in caplog.text and "skipped 5 tensors" in caplog.text
    check_against(ref, model, new_tokens=4)


def _edit(fp8, fn):
    file = next(fp8.glob("*.safetensors"))
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_scale_is_named(tmp_path):
    fp8, _ = build(tmp_path, "qwen3_moe", (16, 16))
    name = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"
    _edit(fp8, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensors: {name}"):
        fmoe.models.from_pretrained(fp8)
    fp8b, _ = build(tmp_path / "b", "qwen3_moe", (16, 16))
    attn = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    _edit(fp8b, lambda t: t.pop(attn))
    with pytest.raises(CheckpointError, match=f"missing tensors: {attn}"):
        fmoe.models.from_pretrained(fp8b)


def test_wrong_scale_shape_and_config_errors(tmp_path):
    import json

    fp8, _ = build(tmp_path, "qwen3_moe", (16, 16))
    name = "model.layers.0.mlp.experts.1.gate_proj.weight_scale_inv"
    _edit(fp8, lambda t: t.update({name: torch.ones(1, 1)}))
    with pytest.raises(CheckpointError, match=f"{name}' has shape \\[1, 1\\], expected \\[2, 3\\]"):
        fmoe.models.from_pretrained(fp8)
    cfg_file = fp8 / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("quantization_config")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="is FP8 but .*config.json has no FP8 quantization_config"):
        fmoe.models.from_pretrained(fp8)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not supported"):
        fmoe.models.from_pretrained(fp8)


def test_mmap_refuses_fp8(tmp_path):
    fp8, _ = build(tmp_path, "qwen3_moe", (16, 16))
    with pytest.raises(ValueError, match="memory-mapped experts cannot serve an FP8 checkpoint"):
        fmoe.models.from_pretrained(fp8, expert_cache="mmap")


# -- the converter --------------------------------------------------------------------------

def test_convert_keeps_fp8_and_loads_with_the_same_logits(tmp_path, monkeypatch):
    import json

    from fmoe.models.convert import main as convert_main

    block = (16, 16)
    fp8, ref = build(tmp_path, "deepseek_v3", block)
    dst = tmp_path / "store"
    assert convert_main([str(fp8), str(dst), "--verify", "--no-progress"]) == 0
    index = json.loads((dst / "fmoe-store.json").read_text())
    ex = index["experts"]
    H, I = MLA["hidden_size"], MLA["moe_intermediate_size"]
    assert index["version"] == 2 and ex["dtype"] == "F8_E4M3" and index["dtype"] == "BF16"
    assert ex["scales"] == {"dtype": "F32", "block": [16, 16], "w13_shape": [2, 2, 3], "w2_shape": [3, 2]}
    per_load = 3 * H * I + (2 * 2 * 3 + 3 * 2) * 4
    assert ex["expert_bytes"] == per_load and all(e["length"] == per_load for e in index["entries"])
    weights = load_file(dst / "model.safetensors")
    q = weights["model.layers.0.self_attn.q_a_proj.weight"]
    assert q.dtype == torch.float8_e4m3fn and "model.layers.0.self_attn.q_a_proj.weight_scale_inv" in weights
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["weight_block_size"] == [16, 16]

    ids = prompt(vocab=ref.config.vocab_size)
    src_logits = fmoe.models.from_pretrained(fp8, dtype=torch.float32)(ids)
    monkeypatch.setenv("FMOE_VERIFY_READS", "1")                 # checksums over FP8 + scales
    assert torch.equal(fmoe.models.from_pretrained(dst, dtype=torch.float32)(ids), src_logits)
    offloaded = fmoe.models.from_pretrained(dst, dtype=torch.float32, expert_cache=0.25, policy="lru")
    assert torch.equal(offloaded(ids), src_logits)
    assert offloaded.expert_stats()["bytes_loaded"] == offloaded.runtime.store.disk_reads * per_load
    offloaded.close()
    check_against(ref, fmoe.models.from_pretrained(dst, dtype=torch.float32), new_tokens=4)


def test_convert_with_dtype_dequantises(tmp_path):
    import json

    from fmoe.models.convert import convert

    fp8, ref = build(tmp_path, "qwen3_moe", (32, 16))
    dst = convert(fp8, tmp_path / "bf16", dtype="bfloat16", progress=False, chunk_bytes=1024)["path"]
    index = json.loads((tmp_path / "bf16" / "fmoe-store.json").read_text())
    assert index["version"] == 1 and index["experts"]["dtype"] == "BF16" and "scales" not in index["experts"]
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert not any(k.endswith("_scale_inv") for k in weights)
    assert all(t.dtype == torch.bfloat16 for k, t in weights.items() if k.endswith("_proj.weight"))
    ids = prompt(vocab=ref.config.vocab_size)
    # bit for bit the FP8 source served in bf16 (dequantised in float32, rounded once)
    assert torch.equal(fmoe.models.from_pretrained(dst)(ids),
                       fmoe.models.from_pretrained(fp8, dtype=torch.bfloat16)(ids))
    # and back from an FP8 store: the same
    fp8_store = convert(fp8, tmp_path / "f8store", progress=False)["path"]
    again = convert(fp8_store, tmp_path / "bf16b", dtype="bfloat16", progress=False)["path"]
    assert torch.equal(fmoe.models.from_pretrained(again)(ids), fmoe.models.from_pretrained(dst)(ids))


# -- the simulator --------------------------------------------------------------------------

def test_sim_shapes_take_the_checkpoint_dtype():
    from fmoe.sim.shapes import MODEL_SHAPES, guess_shape, shape_from_config

    v3 = MODEL_SHAPES["deepseek-v3"]
    # 3 x 7168 x 2048 FP8 bytes + float32 scales: gate and up 16 x 56 each, down 56 x 16
    assert v3.expert_bytes == 3 * 7168 * 2048 + (2 * 16 * 56 + 56 * 16) * 4 == 44_050_944
    assert v3.with_dtype("bfloat16").expert_bytes == 3 * 7168 * 2048 * 2
    assert v3.dtype_bytes == 2                        # the device computes on dequantised bf16
    assert (v3.num_moe_layers, v3.num_experts, v3.top_k) == (58, 256, 8)
    assert guess_shape("deepseek-ai/DeepSeek-R1") == guess_shape("deepseek-ai/DeepSeek-V3") == "deepseek-v3"
    assert guess_shape("moonshotai/Kimi-K2-Instruct") == "kimi-k2"
    k2 = MODEL_SHAPES["kimi-k2"]
    assert (k2.num_moe_layers, k2.num_experts, k2.expert_bytes) == (60, 384, v3.expert_bytes)
    assert guess_shape("Qwen/Qwen3-30B-A3B-FP8") == "qwen3-30b-a3b-fp8"
    assert guess_shape("Qwen/Qwen3-30B-A3B") == "qwen3-30b-a3b"
    q3 = MODEL_SHAPES["qwen3-30b-a3b"]
    assert q3.with_dtype("fp8").expert_bytes == MODEL_SHAPES["qwen3-30b-a3b-fp8"].expert_bytes
    assert MODEL_SHAPES["qwen3-30b-a3b-fp8"].expert_bytes == 3 * 2048 * 768 + (2 * 6 * 16 + 16 * 6) * 4
    # a config.json's own block size (the tiny test models use 16 x 16)
    cfg = {"model_type": "qwen3_moe", "hidden_size": 40, "num_hidden_layers": 2, "num_experts": 8,
           "num_experts_per_tok": 2, "moe_intermediate_size": 24, "num_attention_heads": 4,
           "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
    assert shape_from_config(cfg).expert_bytes == 3 * 40 * 24 + (2 * 2 * 3 + 3 * 2) * 4


def test_simulated_tpot_deepseek_v3_fp8_vs_bf16(tmp_path, capsys):
    """A DeepSeek-V3-shaped trace: FP8 experts halve the bytes per miss, and the stall with them."""
    import json

    import numpy as np

    from fmoe.sim.__main__ import main
    from fmoe.sim.trace import write_trace

    T, L, E, K = 40, 58, 256, 8
    rng = np.random.default_rng(0)
    pop = 1.0 / np.arange(1, E + 1) ** 1.1
    ids = np.empty((T, L, K), dtype=np.int16)
    for l in range(L):
        p = rng.permutation(pop / pop.sum())
        for t in range(T):
            ids[t, l] = rng.choice(E, size=K, replace=False, p=p)
    trace = write_trace(tmp_path / "v3.npz", expert_ids=ids, seq_offsets=[0, 20, 40], num_experts=E,
                        model="deepseek-ai/DeepSeek-V3")

    def run(*extra):
        assert main(["simulate", "--trace", str(trace), "--policy", "lru", "--cache-fraction", "0.1",
                     "--hardware", "h100-pcie5", "--json", "--no-cache", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    fp8, bf16 = run(), run("--dtype", "bfloat16")
    assert fp8["expert_bytes"] == 44_050_944 and bf16["expert_bytes"] == 88_080_384
    assert fp8["hit_rate"] == bf16["hit_rate"] < 1
    assert fp8["bytes_per_token"] / bf16["bytes_per_token"] == pytest.approx(44_050_944 / 88_080_384)
    # demand loads: stall = copies - what the shared expert hides; halving each copy more than halves it
    assert 0 < fp8["stall_ms_per_token"] <= 0.5 * bf16["stall_ms_per_token"] + 1e-9
    assert fp8["tpot_ms"] < bf16["tpot_ms"]
