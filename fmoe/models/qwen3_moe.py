"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, Qwen3-235B-A22B): grouped-query attention with an explicit
`head_dim` and per-head RMSNorm on queries and keys (before rotary), softmax top-k routing
(renormalised if ``norm_topk_prob``), SwiGLU experts, no shared expert. Layers listed in
``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, are dense SwiGLU MLPs.

Module names follow the hub checkpoints (``model.layers.N.self_attn.q_norm``,
``model.layers.N.mlp.gate``), so the checkpoint name map is the identity for everything but the
routed experts, whose tensors go to the experts backend (`fmoe.models.experts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RopeConfig, first, read_rope, require
from .experts import ExpertShape, PendingExperts
from .layers import KVCache, RMSNorm, Rotary, SwiGLU, apply_rotary, attention_mask, gqa_attention


@dataclass(frozen=True)
class Qwen3MoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int                  # dense MLP layers
    moe_intermediate_size: int              # each routed expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    attention_bias: bool = False
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig(1e6)
    sliding_window: int | None = None       # every layer, when set
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
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
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            num_experts=experts, num_experts_per_tok=top_k,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=cfg.get("decoder_sparse_step") or 1,
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            attention_bias=bool(cfg.get("attention_bias", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=read_rope(cfg, 1e6),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window") else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        )

    def is_moe_layer(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layer_ids(self) -> list[int]:
        """Model layer index of each MoE layer, in order."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def experts(self) -> ExpertShape:
        return ExpertShape(len(self.moe_layer_ids), self.num_experts, self.hidden_size,
                           self.moe_intermediate_size, self.num_experts_per_tok)

    # -- checkpoint names of routed experts -------------------------------------------------
    def expert_keys(self, moe_layer: int, expert: int) -> tuple[str, str, str]:
        """Per-expert layout: (gate [I, H], up [I, H], down [H, I])."""
        p = f"model.layers.{self.moe_layer_ids[moe_layer]}.mlp.experts.{expert}"
        return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"

    def fused_expert_keys(self, moe_layer: int) -> tuple[str, str]:
        """Fused layout (transformers >= 5): (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
        p = f"model.layers.{self.moe_layer_ids[moe_layer]}.mlp.experts"
        return f"{p}.gate_up_proj", f"{p}.down_proj"

    checkpoint_renames = ()


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                    cfg.num_key_value_heads, cfg.head_dim)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)     # over each head's dims
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        """x [B, T, H] -> [B, T, H]."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = gqa_attention(q, k, v, mask)
        return self.o_proj(out.reshape(B, T, -1))


class SparseMoE(nn.Module):
    """Router softmax -> top-k (-> renormalised) -> experts backend."""

    def __init__(self, cfg: Qwen3MoeConfig, moe_layer: int):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = PendingExperts(moe_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        probs = F.softmax(self.gate(flat).float(), dim=-1)            # [N, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)          # [N, K]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(flat, weights, ids, probs).view(B, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, layer: int, moe_layer: int | None):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = (SwiGLU(cfg.hidden_size, cfg.intermediate_size) if moe_layer is None
                    else SparseMoE(cfg, moe_layer))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        moe_index = {layer: i for i, layer in enumerate(cfg.moe_layer_ids)}
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, moe_index.get(i))
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)

    def moe_blocks(self) -> list[SparseMoE]:
        """The MoE blocks in MoE-layer order; the loader installs their `experts`."""
        return [self.model.layers[i].mlp for i in self.config.moe_layer_ids]

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, key_valid: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or [B, 1, V] with `last_only`).

        positions [B, T]: rotary positions (default: cache.seen + arange(T)).
        key_valid [B, S]: False marks left padding over all S = cache.seen + T positions.
        """
        B, T = input_ids.shape
        seen = cache.seen if cache is not None else 0
        if positions is None:
            positions = torch.arange(seen, seen + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        mask = attention_mask(T, seen + T, key_valid, x.device, self.config.sliding_window)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()
