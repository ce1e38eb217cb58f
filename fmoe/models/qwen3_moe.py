"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, Qwen3-235B-A22B): grouped-query attention with an explicit
`head_dim` and per-head RMSNorm on queries and keys (before rotary), softmax top-k routing
(renormalised if ``norm_topk_prob``), SwiGLU experts, no shared expert. Layers listed in
``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, are dense SwiGLU MLPs.

Module names follow the hub checkpoints (``model.layers.N.self_attn.q_norm``,
``model.layers.N.mlp.gate``), so the checkpoint name map is the identity for everything but the
routed experts, whose tensors go to the experts backend (`fmoe.models.experts`). Attention (with
its q/k norm), decoder layer and `forward` are the shared ones of `fmoe.models.base`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Attention, DecoderLayer, MoeConfig, MoeForCausalLM, SoftmaxMoE
from .config import RopeConfig, first, hf_default, require
from .experts import ExpertShape
from .layers import SwiGLU


@dataclass(frozen=True, kw_only=True)
class Qwen3MoeConfig(MoeConfig):
    moe_intermediate_size: int              # each routed expert
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    attention_bias: bool = False
    sliding_window: int | None = None       # every layer, when set
    rope: RopeConfig = RopeConfig(10000.0)  # transformers' Qwen3MoeConfig default
    model_type: str = "qwen3_moe"

    @classmethod
    def from_hf(cls, cfg: dict) -> "Qwen3MoeConfig":
        vocab, hidden, inter, moe_inter, layers, heads = require(
            cfg, "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", model_type="qwen3_moe")
        # the hub writes `num_experts`; transformers >= 5 may write `num_local_experts`
        experts = first(cfg, "num_experts", "num_local_experts")
        top_k = cfg.get("num_experts_per_tok")
        if experts is None or top_k is None:
            require(cfg, "num_experts", "num_experts_per_tok", model_type="qwen3_moe")
        return cls(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            moe_intermediate_size=moe_inter,
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=hf_default(cfg, "num_key_value_heads", 4, heads),
            head_dim=cfg.get("head_dim") or hidden // heads,
            num_experts=experts, num_experts_per_tok=top_k,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=cfg.get("decoder_sparse_step") or 1,
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            attention_bias=bool(cfg.get("attention_bias", False)),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window") else None,
            **cls.read_common(cfg),
        )

    def is_moe_layer(self, layer: int) -> bool:
        """Not in `mlp_only_layers` and on the `decoder_sparse_step` grid (as Qwen2-MoE)."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def experts(self) -> ExpertShape:
        return ExpertShape(len(self.moe_layer_ids), self.num_experts, self.hidden_size,
                           self.moe_intermediate_size, self.num_experts_per_tok)


class SparseMoE(SoftmaxMoE):
    """Router softmax -> top-k (-> renormalised if `norm_topk_prob`) -> experts backend."""

    def __init__(self, cfg: Qwen3MoeConfig, moe_layer: int):
        super().__init__(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, moe_layer,
                         renormalize=cfg.norm_topk_prob)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Grouped-query attention with per-head q/k RMSNorm (`attention_bias` on all four
    projections; every layer windowed when `sliding_window` is set), then the MoE block or, in
    dense layers, a SwiGLU MLP; both under the checkpoint's name ``mlp``."""

    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__(cfg, cfg.head_dim)

    def build_layer(self, cfg: Qwen3MoeConfig, layer: int, moe_layer: int | None) -> DecoderLayer:
        bias = cfg.attention_bias
        attn = Attention(cfg, layer, qkv_bias=bias, o_bias=bias, qk_norm=True,
                         sliding_window=cfg.sliding_window)
        mlp = (SwiGLU(cfg.hidden_size, cfg.intermediate_size) if moe_layer is None
               else SparseMoE(cfg, moe_layer))
        return DecoderLayer(cfg, attn, mlp)
