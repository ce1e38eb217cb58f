"""Mixtral (mistralai/Mixtral-8x7B, 8x22B): grouped-query attention, optional sliding window,
softmax top-k routing with renormalised weights, SwiGLU experts.

Module names follow the hub checkpoints (``model.layers.N.block_sparse_moe.gate``), so the
checkpoint name map is the identity for everything but the routed experts, whose tensors go to
the experts backend (`fmoe.models.experts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RopeConfig, first, read_rope, require
from .experts import ExpertShape, PendingExperts
from .layers import KVCache, RMSNorm, Rotary, apply_rotary, attention_mask, gqa_attention


@dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig(1e6)
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "mixtral"

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
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            num_local_experts=experts, num_experts_per_tok=top_k,
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope=read_rope(cfg, 1e6),
            sliding_window=cfg.get("sliding_window"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        )

    @property
    def moe_layer_ids(self) -> list[int]:
        return list(range(self.num_hidden_layers))

    @property
    def experts(self) -> ExpertShape:
        return ExpertShape(self.num_hidden_layers, self.num_local_experts, self.hidden_size,
                           self.intermediate_size, self.num_experts_per_tok)

    # -- checkpoint names of routed experts -------------------------------------------------
    def expert_keys(self, moe_layer: int, expert: int) -> tuple[str, str, str]:
        """Per-expert layout: (gate [I, H], up [I, H], down [H, I])."""
        p = f"model.layers.{moe_layer}.block_sparse_moe.experts.{expert}"
        return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"

    def fused_expert_keys(self, moe_layer: int) -> tuple[str, str]:
        """Fused layout (transformers >= 5): (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
        p = f"model.layers.{moe_layer}.mlp.experts"
        return f"{p}.gate_up_proj", f"{p}.down_proj"

    # transformers >= 5 saves the MoE block as `.mlp.` when it writes the fused layout
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)


class Attention(nn.Module):
    def __init__(self, cfg: MixtralConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                    cfg.num_key_value_heads, cfg.head_dim)
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        """x [B, T, H] -> [B, T, H]."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = gqa_attention(q, k, v, mask)
        return self.o_proj(out.reshape(B, T, -1))


class SparseMoE(nn.Module):
    """Router softmax -> top-k -> renormalised weights -> experts backend."""

    def __init__(self, cfg: MixtralConfig, moe_layer: int):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = PendingExperts(moe_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        probs = F.softmax(self.gate(flat).float(), dim=-1)            # [N, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)          # [N, K]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(flat, weights, ids, probs).view(B, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MixtralConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.block_sparse_moe = SparseMoE(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MixtralForCausalLM(nn.Module):
    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)

    def moe_blocks(self) -> list[SparseMoE]:
        """The MoE blocks in MoE-layer order; the loader installs their `experts`."""
        return [layer.block_sparse_moe for layer in self.model.layers]

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
