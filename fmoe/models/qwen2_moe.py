"""Qwen-MoE (Qwen/Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): grouped-query attention with q/k/v bias,
softmax top-k routing (renormalised only if ``norm_topk_prob``), SwiGLU experts, plus one shared
expert per MoE layer scaled by ``sigmoid(shared_expert_gate(x))``. Layers listed in
``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, are dense SwiGLU MLPs.

Module names follow the hub checkpoints (``model.layers.N.mlp.gate``,
``model.layers.N.mlp.shared_expert``), so the checkpoint name map is the identity for everything
but the routed experts, whose tensors go to the experts backend (`fmoe.models.experts`). The
shared expert and the dense MLPs are ordinary resident modules. Attention, decoder layer and
`forward` are the shared ones of `fmoe.models.base`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Attention, DecoderLayer, MoeConfig, MoeForCausalLM, SoftmaxMoE
from .config import RopeConfig, first, hf_default, require
from .experts import ExpertShape
from .layers import Linear, SwiGLU


@dataclass(frozen=True, kw_only=True)
class Qwen2MoeConfig(MoeConfig):
    moe_intermediate_size: int              # each routed expert
    shared_expert_intermediate_size: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    qkv_bias: bool = True
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()    # layers that use `sliding_window`
    rope: RopeConfig = RopeConfig(10000.0)  # transformers' Qwen2MoeConfig default
    model_type: str = "qwen2_moe"

    @classmethod
    def from_hf(cls, cfg: dict) -> "Qwen2MoeConfig":
        vocab, hidden, inter, moe_inter, shared_inter, layers, heads = require(
            cfg, "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "shared_expert_intermediate_size", "num_hidden_layers", "num_attention_heads",
            model_type="qwen2_moe")
        experts = first(cfg, "num_experts", "num_local_experts")
        top_k = cfg.get("num_experts_per_tok")
        if experts is None or top_k is None:
            require(cfg, "num_experts", "num_experts_per_tok", model_type="qwen2_moe")
        # transformers 5 writes `layer_types`; older configs imply them (as transformers does)
        types = cfg.get("layer_types")
        if types is None:
            use = bool(cfg.get("use_sliding_window", False))
            max_window = cfg.get("max_window_layers", 28)
            types = ["sliding_attention" if use and (i + 1) % 2 and i < max_window else "full_attention"
                     for i in range(layers)]
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        return cls(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            moe_intermediate_size=moe_inter,
            shared_expert_intermediate_size=shared_inter,
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=hf_default(cfg, "num_key_value_heads", 16, heads),
            head_dim=cfg.get("head_dim") or hidden // heads,
            num_experts=experts, num_experts_per_tok=top_k,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=cfg.get("decoder_sparse_step") or 1,
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            qkv_bias=bool(cfg.get("qkv_bias", True)),
            sliding_window=cfg.get("sliding_window") if sliding else None,
            sliding_layers=sliding,
            **cls.read_common(cfg),
        )

    def is_moe_layer(self, layer: int) -> bool:
        """Not in `mlp_only_layers` and on the `decoder_sparse_step` grid."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def experts(self) -> ExpertShape:
        return ExpertShape(len(self.moe_layer_ids), self.num_experts, self.hidden_size,
                           self.moe_intermediate_size, self.num_experts_per_tok)


class SparseMoE(SoftmaxMoE):
    """Router softmax -> top-k (-> renormalised if `norm_topk_prob`) -> experts backend, plus the
    shared expert scaled by ``sigmoid(shared_expert_gate(x))``."""

    def __init__(self, cfg: Qwen2MoeConfig, moe_layer: int):
        super().__init__(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, moe_layer,
                         renormalize=cfg.norm_topk_prob)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        routed = self.experts(flat, *self.route(flat))
        shared = torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return (routed + shared).view(B, T, H)


class Qwen2MoeForCausalLM(MoeForCausalLM):
    """Grouped-query attention with q/k/v bias (windowed in `sliding_layers`), then the MoE block
    or, in dense layers, a SwiGLU MLP; both under the checkpoint's name ``mlp``."""

    def __init__(self, cfg: Qwen2MoeConfig):
        super().__init__(cfg, cfg.head_dim)

    def build_layer(self, cfg: Qwen2MoeConfig, layer: int, moe_layer: int | None) -> DecoderLayer:
        window = cfg.sliding_window if layer in cfg.sliding_layers else None
        attn = Attention(cfg, layer, qkv_bias=cfg.qkv_bias, sliding_window=window)
        mlp = (SwiGLU(cfg.hidden_size, cfg.intermediate_size) if moe_layer is None
               else SparseMoE(cfg, moe_layer))
        return DecoderLayer(cfg, attn, mlp)
