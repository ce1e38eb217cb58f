"""Mixtral (mistralai/Mixtral-8x7B, 8x22B): grouped-query attention, optional sliding window,
softmax top-k routing with renormalised weights, SwiGLU experts.

Module names follow the hub checkpoints (``model.layers.N.block_sparse_moe.gate``), so the
checkpoint name map is the identity for everything but the routed experts, whose tensors go to
the experts backend (`fmoe.models.experts`). Attention, decoder layer and `forward` are the
shared ones of `fmoe.models.base`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Attention, DecoderLayer, MoeConfig, MoeForCausalLM, SoftmaxMoE
from .config import first, hf_default, require
from .experts import ExpertShape


@dataclass(frozen=True, kw_only=True)
class MixtralConfig(MoeConfig):
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    # transformers' MixtralConfig defaults, for fields a config.json leaves out
    max_position_embeddings: int = 131072
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    model_type: str = "mixtral"

    # transformers >= 5 saves the MoE block as `.mlp.` when it writes the fused layout
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)

    @classmethod
    def from_hf(cls, cfg: dict) -> "MixtralConfig":
        vocab, hidden, inter, layers, heads = require(
            cfg, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", model_type="mixtral")
        experts = first(cfg, "num_local_experts", "num_experts")
        top_k = cfg.get("num_experts_per_tok")
        if experts is None or top_k is None:
            require(cfg, "num_local_experts", "num_experts_per_tok", model_type="mixtral")
        return cls(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=hf_default(cfg, "num_key_value_heads", 8, heads),
            head_dim=cfg.get("head_dim") or hidden // heads,
            num_local_experts=experts, num_experts_per_tok=top_k,
            sliding_window=cfg.get("sliding_window"),
            **cls.read_common(cfg),
        )

    @property
    def experts(self) -> ExpertShape:
        """Every layer is a MoE layer; each expert has the dense `intermediate_size`."""
        return ExpertShape(self.num_hidden_layers, self.num_local_experts, self.hidden_size,
                           self.intermediate_size, self.num_experts_per_tok)

    def expert_keys(self, moe_layer: int, expert: int) -> tuple[str, str, str]:
        """Per-expert layout: (gate [I, H], up [I, H], down [H, I]) are w1, w3, w2."""
        p = f"model.layers.{moe_layer}.block_sparse_moe.experts.{expert}"
        return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"


class SparseMoE(SoftmaxMoE):
    """Router softmax -> top-k -> renormalised weights -> experts backend."""

    def __init__(self, cfg: MixtralConfig, moe_layer: int):
        super().__init__(cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok, moe_layer,
                         renormalize=True)


class MixtralForCausalLM(MoeForCausalLM):
    """Every layer: grouped-query attention (no bias; every layer windowed when the config sets
    `sliding_window`), then the MoE block under the checkpoint's name ``block_sparse_moe``."""

    def __init__(self, cfg: MixtralConfig):
        super().__init__(cfg, cfg.head_dim)

    def build_layer(self, cfg: MixtralConfig, layer: int, moe_layer: int | None) -> DecoderLayer:
        attn = Attention(cfg, layer, sliding_window=cfg.sliding_window)
        return DecoderLayer(cfg, attn, SparseMoE(cfg, moe_layer), ffn_name="block_sparse_moe")
