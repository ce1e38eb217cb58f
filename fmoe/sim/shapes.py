"""Model shapes for the timing model: what one token reads from device memory, and what one
routed expert weighs on the host link.

Built in: DeepSeek-V2-Lite, Mixtral-8x7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, and the FP8
releases DeepSeek-V3 (and R1, same shape), Kimi-K2 and Qwen3-30B-A3B-FP8. Any other model:
`shape_from_config` reads its HF ``config.json`` through the config class of the fmoe family that
loads its model type (deepseek_v2/v3, kimi_k2, mixtral, qwen2_moe, qwen3_moe), so the simulator
sees the layers and experts the loader builds; other model types, and partial configs a family
refuses, get a generic reading of the usual field names.

An FP8 block-scaled checkpoint (``quantization_config.quant_method == "fp8"``) moves its routed
experts over the link as they are stored: one byte per weight plus a float32 scale per block
(`ModelShape.expert_bytes`), about half of bf16. The device computes on weights dequantised into
the serving dtype (``torch_dtype``, bf16 as published), so compute keeps `dtype_bytes`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError
from ..models.config import build_config, read_json_object
from ..models.registry import FAMILIES

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4,
               "float8_e4m3fn": 1, "fp8": 1, "int8": 1}
# expert dtypes meaning FP8 block-scaled experts (weights at 1 byte plus float32 block scales)
FP8_NAMES = ("float8_e4m3fn", "fp8")
SCALE_BYTES = 4                    # float32 weight_scale_inv, as published


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts per part of the model, and the element size of the weights."""

    name: str
    hidden: int
    num_moe_layers: int            # L (MoE layers only)
    num_dense_layers: int          # decoder layers with a dense MLP (run once per token)
    num_experts: int               # E routed experts per MoE layer
    top_k: int                     # K routed experts per token
    moe_intermediate: int          # I of one routed expert
    attn_params: int               # one layer's attention weights (+ norms, router excluded)
    kv_elems: int                  # KV-cache elements read per context token per layer
    attn_ctx_flops: int            # attention flops per context token per layer
    shared_params: int             # one MoE layer's always-on shared experts (0 if none)
    dense_mlp_params: int          # one dense layer's MLP
    vocab: int
    dtype_bytes: int = 2               # the serving dtype: what the device reads per weight
    quant_block: tuple[int, int] | None = None   # FP8 experts: one scale per block (rows, cols)

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate

    @property
    def expert_scales(self) -> int:
        """Scales of one FP8 routed expert: gate and up [ceil(I/b0), ceil(H/b1)] each, down
        [ceil(H/b0), ceil(I/b1)]; 0 when experts are not FP8."""
        if self.quant_block is None:
            return 0
        b0, b1 = self.quant_block
        H, I = self.hidden, self.moe_intermediate
        return 2 * math.ceil(I / b0) * math.ceil(H / b1) + math.ceil(H / b0) * math.ceil(I / b1)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert (gate, up, down) as stored: what one load moves over the
        link. FP8 experts: one byte per weight plus their float32 scales."""
        if self.quant_block is not None:
            return self.expert_params + self.expert_scales * SCALE_BYTES
        return self.expert_params * self.dtype_bytes

    @property
    def router_params(self) -> int:
        return self.hidden * self.num_experts

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    def with_dtype(self, dtype: str | None) -> "ModelShape":
        """The shape with experts in `dtype`: "float8_e4m3fn"/"fp8" keep the serving dtype and
        make the experts FP8 block-scaled (the model's blocks, else 128 x 128); any other dtype
        is the serving and expert dtype (no FP8)."""
        if dtype is None:
            return self
        dtype = str(dtype).replace("torch.", "")
        if dtype in FP8_NAMES:
            return replace(self, quant_block=self.quant_block or (128, 128))
        try:
            return replace(self, dtype_bytes=DTYPE_BYTES[dtype], quant_block=None)
        except KeyError:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of "
                              f"{', '.join(sorted(DTYPE_BYTES))}") from None

    def describe(self) -> str:
        fp8 = " (FP8 + scales)" if self.quant_block is not None else ""
        return (f"{self.name}: {self.num_moe_layers} MoE layers x {self.num_experts} experts, "
                f"top-{self.top_k}, expert {self.expert_bytes / 1e6:.1f} MB{fp8}")


def _gqa(hidden: int, heads: int, kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    params = (hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
              + heads * head_dim * hidden)
    kv = 2 * kv_heads * head_dim
    ctx_flops = 2 * heads * head_dim * 2          # q.k and p.v per context token
    return params + 2 * hidden, kv, ctx_flops


def _mla(hidden: int, heads: int, q_lora: int | None, kv_lora: int, nope: int, rope: int,
         v_dim: int) -> tuple[int, int, int]:
    qk = nope + rope
    if q_lora:
        q = hidden * q_lora + q_lora + q_lora * heads * qk
    else:
        q = hidden * heads * qk
    kv_a = hidden * (kv_lora + rope) + kv_lora
    kv_b = kv_lora * heads * (nope + v_dim)
    o = heads * v_dim * hidden
    kv = kv_lora + rope                            # compressed latent + rope key, per token
    ctx_flops = 2 * heads * (kv_lora + rope) + 2 * heads * kv_lora   # absorbed-MLA decode
    return q + kv_a + kv_b + o + 2 * hidden, kv, ctx_flops


def _dtype_bytes(cfg: dict) -> int:
    d = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return DTYPE_BYTES.get(str(d).replace("torch.", ""), 2)


def _quant_block(cfg: dict) -> tuple[int, int] | None:
    """The FP8 block of a config whose ``quantization_config`` says quant_method "fp8"."""
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        return None
    block = q.get("weight_block_size") or [128, 128]
    try:
        b0, b1 = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ConfigError(f"quantization_config.weight_block_size {block!r} is not two integers") from None
    if b0 < 1 or b1 < 1:
        raise ConfigError(f"quantization_config.weight_block_size {block!r} is not two integers >= 1")
    return b0, b1


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _need(cfg: dict, *keys: str, what: str):
    v = _first(cfg, *keys)
    if v is None:
        raise ConfigError(f"config.json lacks {what} (looked for {', '.join(keys)})")
    return v


def shape_from_config(cfg: dict, name: str | None = None) -> ModelShape:
    """A `ModelShape` from a HF ``config.json`` dict (a multimodal config's ``text_config`` is
    read as the model's). Read by fmoe's own family config (`fmoe.models.registry`) where one
    exists and accepts the dict; by `_generic_fields` otherwise."""
    mt = str(cfg.get("model_type", ""))
    cfg = dict(cfg)
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg.update(cfg["text_config"])
    fields = _family_fields(cfg)
    if fields is None:
        fields = _generic_fields(cfg, mt)
    return ModelShape(name=name or str(cfg.get("_name_or_path") or mt or "custom"), **fields,
                      dtype_bytes=_dtype_bytes(cfg), quant_block=_quant_block(cfg))


def _fields(H: int, n_layers: int, L: int, E: int, K: int, I: int, dense_inter: int,
            attn: tuple[int, int, int], shared: int, vocab: int) -> dict:
    """`ModelShape` keyword arguments (all but name, dtype and FP8 block)."""
    if L == 0:
        raise ConfigError("config.json describes no MoE layer")
    params, kv, ctx = attn
    return dict(hidden=H, num_moe_layers=L, num_dense_layers=n_layers - L, num_experts=E, top_k=K,
                moe_intermediate=I, attn_params=params, kv_elems=kv, attn_ctx_flops=ctx,
                shared_params=shared, dense_mlp_params=3 * H * dense_inter, vocab=vocab)


def _family_fields(cfg: dict) -> dict | None:
    """The shape as the model family that loads this ``model_type`` reads the config: the same
    fields, defaults and MoE-layer placement as `from_pretrained`. None where no family has this
    model type, or where the family refuses the dict (a partial config that names only what a
    shape needs, say): `_generic_fields` reads those."""
    family = FAMILIES.get(cfg.get("model_type"))
    if family is None:
        return None
    try:
        c = build_config(family.load()[0], cfg, "config.json")
    except ConfigError:
        return None
    shp, H, heads = c.experts, c.hidden_size, c.num_attention_heads
    if hasattr(c, "kv_lora_rank"):          # DeepSeek: MLA, `n_shared_experts` of expert size
        attn = _mla(H, heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim,
                    c.qk_rope_head_dim, c.v_head_dim)
        shared = 3 * H * shp.inter * c.n_shared_experts
    else:
        attn = _gqa(H, heads, c.num_key_value_heads, c.head_dim)
        si = getattr(c, "shared_expert_intermediate_size", 0)     # Qwen2-MoE's shared expert
        shared = 3 * H * si + (H if si else 0)                    # + the shared-expert gate
    return _fields(H, c.num_hidden_layers, shp.num_layers, shp.num_experts, shp.top_k, shp.inter,
                   c.intermediate_size, attn, shared, c.vocab_size)


def _generic_fields(cfg: dict, mt: str) -> dict:
    """The usual field names, with defaults, for what no family reads: model types fmoe does not
    load, and partial configs (a shape needs fewer fields than a model)."""
    H = int(_need(cfg, "hidden_size", "d_model", "n_embd", what="the hidden size"))
    n_layers = int(_need(cfg, "num_hidden_layers", "n_layer", "num_layers", what="the layer count"))
    E = int(_need(cfg, "n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts",
                  what="the routed expert count"))
    K = int(_need(cfg, "num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token",
                  what="the experts per token (top-k)"))
    heads = int(_need(cfg, "num_attention_heads", "n_head", what="the attention head count"))
    kv_heads = int(_first(cfg, "num_key_value_heads", default=heads))
    head_dim = int(_first(cfg, "head_dim", default=H // heads))
    dense_inter = int(_first(cfg, "intermediate_size", "ffn_dim", default=4 * H))
    # Mixtral-style configs give experts the dense `intermediate_size`
    I = int(_first(cfg, "moe_intermediate_size", "expert_intermediate_size", default=dense_inter))

    deepseek = mt.startswith("deepseek") or mt == "kimi_k2"     # Kimi-K2 is V3-shaped
    # which decoder layers are MoE
    if deepseek:
        first_dense = int(_first(cfg, "first_k_dense_replace", default=0))
        freq = int(_first(cfg, "moe_layer_freq", default=1))
        moe = [i for i in range(n_layers) if i >= first_dense and i % freq == 0]
    else:
        step = int(_first(cfg, "decoder_sparse_step", default=1) or 1)
        mlp_only = set(_first(cfg, "mlp_only_layers", default=[]) or [])
        moe = [i for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0]

    # shared experts
    if deepseek:
        shared = 3 * H * I * int(_first(cfg, "n_shared_experts", default=0) or 0)
    else:
        si = int(_first(cfg, "shared_expert_intermediate_size", default=0) or 0)
        shared = 3 * H * si + (H if si else 0)   # + the shared-expert gate

    # attention
    if cfg.get("kv_lora_rank"):
        attn = _mla(H, heads, cfg.get("q_lora_rank"), int(cfg["kv_lora_rank"]),
                    int(_first(cfg, "qk_nope_head_dim", default=128)),
                    int(_first(cfg, "qk_rope_head_dim", default=64)),
                    int(_first(cfg, "v_head_dim", default=128)))
    else:
        attn = _gqa(H, heads, kv_heads, head_dim)
    vocab = int(_first(cfg, "vocab_size", default=32000))
    return _fields(H, n_layers, len(moe), E, K, I, dense_inter, attn, shared, vocab)


# Hub config.json fields of the built-in models (only what the shape needs).
_BUILTIN_CONFIGS = {
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2", "hidden_size": 2048, "num_hidden_layers": 27,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "moe_intermediate_size": 1408, "n_shared_experts": 2,
        "intermediate_size": 10944, "num_attention_heads": 16, "num_key_value_heads": 16,
        "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 102400,
        "torch_dtype": "bfloat16",
    },
    "mixtral-8x7b": {
        "model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32,
        "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "torch_dtype": "bfloat16",
    },
    "qwen1.5-moe-a2.7b": {
        "model_type": "qwen2_moe", "hidden_size": 2048, "num_hidden_layers": 24,
        "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "intermediate_size": 5632,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": 151936, "torch_dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "intermediate_size": 6144, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "vocab_size": 151936, "torch_dtype": "bfloat16",
    },
}
_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
_BUILTIN_CONFIGS.update({
    # deepseek-ai/DeepSeek-V3 (DeepSeek-R1 has the same shape); FP8 as published
    "deepseek-v3": {
        "model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61,
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_routed_experts": 256,
        "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "n_shared_experts": 1,
        "intermediate_size": 18432, "num_attention_heads": 128, "num_key_value_heads": 128,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280,
        "torch_dtype": "bfloat16", "quantization_config": _FP8,
    },
    # moonshotai/Kimi-K2-Instruct: DeepSeek-V3's architecture, 384 experts, one dense layer
    "kimi-k2": {
        "model_type": "kimi_k2", "hidden_size": 7168, "num_hidden_layers": 61,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 384,
        "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "n_shared_experts": 1,
        "intermediate_size": 18432, "num_attention_heads": 64, "num_key_value_heads": 64,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 163840,
        "torch_dtype": "bfloat16", "quantization_config": _FP8,
    },
})
_BUILTIN_CONFIGS["qwen3-30b-a3b-fp8"] = {**_BUILTIN_CONFIGS["qwen3-30b-a3b"], "quantization_config": _FP8}

MODEL_SHAPES: dict[str, ModelShape] = {n: shape_from_config(c, n)
                                       for n, c in _BUILTIN_CONFIGS.items()}

# hub-id patterns -> built-in shape (matched against the lower-cased id without the org)
_PATTERNS = [
    (r"deepseek-v2-lite", "deepseek-v2-lite"),
    (r"deepseek-(v3|r1)", "deepseek-v3"),
    (r"kimi-k2", "kimi-k2"),
    (r"qwen3-30b-a3b.*fp8", "qwen3-30b-a3b-fp8"),
    (r"mixtral-8x7b", "mixtral-8x7b"),
    (r"qwen1\.5-moe-a2\.7b", "qwen1.5-moe-a2.7b"),
    (r"qwen3-30b-a3b", "qwen3-30b-a3b"),
]


def guess_shape(model_id: str) -> str | None:
    """The built-in shape name for a trace's `model` hub id, or None."""
    mid = model_id.strip().lower().rsplit("/", 1)[-1]
    if mid in MODEL_SHAPES:
        return mid
    for pat, name in _PATTERNS:
        if re.search(pat, mid):
            return name
    return None


def get_shape(name: str) -> ModelShape:
    try:
        return MODEL_SHAPES[name]
    except KeyError:
        raise ConfigError(f"unknown model shape {name!r}; built in: {', '.join(MODEL_SHAPES)} "
                          "(or pass --model-config config.json)") from None


def load_config_shape(path: str | Path) -> ModelShape:
    """`shape_from_config` of a config.json file (or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"{p}: no such file")
    cfg = read_json_object(p)
    try:
        return shape_from_config(cfg, name=p.parent.name if p.name == "config.json" else p.stem)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{p}: a field has the wrong type ({e})") from None
