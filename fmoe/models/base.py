"""What the model families share: a base config (the fields every family reads, where the MoE
layers are, the checkpoint names of routed experts), grouped-query attention, the pre-norm
decoder layer, the softmax-routed MoE block, and the causal-LM wrapper with `forward`,
`new_cache` and `moe_blocks`.

A family file (`mixtral.py`, `qwen2_moe.py`, `qwen3_moe.py`, `deepseek_v2.py`) subclasses these
and keeps what differs: how its ``config.json`` is read, its router, shared experts, dense
layers, MLA attention. Module names are the hub checkpoints' (``model.layers.N.self_attn.q_proj``,
``model.embed_tokens``, ``lm_head``), so the checkpoint name map stays the identity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .config import RopeConfig, check_activation, hf_default, read_rope
from .experts import PendingExperts
from .layers import KVCache, Linear, RMSNorm, Rotary, apply_rotary, attention_mask, gqa_attention, softmax_topk


@dataclass(frozen=True, kw_only=True)
class MoeConfig:
    """Fields under their hub ``config.json`` names. A family subclass adds its own fields and
    may change a default (by declaring the field again); keyword-only, so that required fields
    of a subclass may follow defaults here."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int                  # dense MLP layers (Mixtral: each routed expert)
    num_hidden_layers: int
    num_attention_heads: int
    num_experts_per_tok: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig(1e6)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = ""

    # pairs of substrings mapping checkpoint names to parameter names (none by default)
    checkpoint_renames = ()

    @classmethod
    def read_common(cls, cfg: dict) -> dict:
        """The optional fields every family reads alike, with this class's defaults:
        context length, norm epsilon, rotary settings, tied embeddings, special token ids."""
        default = {f.name: f.default for f in dataclasses.fields(cls)}
        check_activation(cfg, cfg.get("model_type", ""))
        return dict(
            max_position_embeddings=cfg.get("max_position_embeddings", default["max_position_embeddings"]),
            rms_norm_eps=cfg.get("rms_norm_eps", default["rms_norm_eps"]),
            rope=read_rope(cfg, default["rope"].theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=hf_default(cfg, "bos_token_id", default["bos_token_id"]),
            eos_token_id=hf_default(cfg, "eos_token_id", default["eos_token_id"]),
        )

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` routes (default: every layer)."""
        return True

    @property
    def moe_layer_ids(self) -> list[int]:
        """Model layer index of each MoE layer, in order."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # -- checkpoint names of routed experts -------------------------------------------------
    def expert_keys(self, moe_layer: int, expert: int) -> tuple[str, str, str]:
        """Per-expert layout: (gate [I, H], up [I, H], down [H, I])."""
        p = f"model.layers.{self.moe_layer_ids[moe_layer]}.mlp.experts.{expert}"
        return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"

    def fused_expert_keys(self, moe_layer: int) -> tuple[str, str]:
        """Fused layout (transformers >= 5): (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
        p = f"model.layers.{self.moe_layer_ids[moe_layer]}.mlp.experts"
        return f"{p}.gate_up_proj", f"{p}.down_proj"


class Attention(nn.Module):
    """Grouped-query attention with rotary positions; the KV cache holds K and V
    [B, S, kv_heads, head_dim]. Options: bias on q/k/v (`qkv_bias`) and on o (`o_bias`),
    per-head RMSNorm on queries and keys before rotary (`qk_norm`, as Qwen3), and a sliding
    window the model's mask honours for this layer (`sliding_window`, None: full causal)."""

    def __init__(self, cfg, layer: int, qkv_bias: bool = False, o_bias: bool = False,
                 qk_norm: bool = False, sliding_window: int | None = None):
        super().__init__()
        self.layer = layer
        self.sliding_window = sliding_window
        self.heads, self.kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                    cfg.num_key_value_heads, cfg.head_dim)
        self.q_proj = Linear(cfg.hidden_size, self.heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.heads * self.head_dim, cfg.hidden_size, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)     # over each head's dims
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    @property
    def cache_width(self) -> int:
        """Elements one cached position takes in this layer: K and V."""
        return 2 * self.kv_heads * self.head_dim

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        """x [B, T, H], cos/sin [B, T, head_dim], mask [B|1, 1, T, S] -> [B, T, H]."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = gqa_attention(q, k, v, mask)
        return self.o_proj(out.reshape(B, T, -1))


class SoftmaxMoE(nn.Module):
    """A MoE block routed by softmax (Mixtral, Qwen-MoE): router ``gate`` [E, H] (no bias) ->
    softmax top-k (renormalised if `renormalize`) -> the experts backend ``experts``."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, moe_layer: int, renormalize: bool):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Linear(hidden, num_experts, bias=False)
        self.experts = PendingExperts(moe_layer)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """flat [N, H] -> topk_weights [N, K], topk_ids [N, K], router_probs [N, E]."""
        return softmax_topk(self.gate(flat), self.top_k, self.renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        return self.experts(flat, *self.route(flat)).view(B, T, H)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)). The feed-forward
    module (dense MLP or MoE block) is registered under `ffn_name`, the checkpoint's name for it:
    "mlp", or Mixtral's "block_sparse_moe"."""

    def __init__(self, cfg, self_attn: nn.Module, ffn: nn.Module, ffn_name: str = "mlp"):
        super().__init__()
        self.self_attn = self_attn
        self.ffn_name = ffn_name
        setattr(self, ffn_name, ffn)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.ffn_name)

    def forward(self, x, cos, sin, mask, cache):
        """x [B, T, H] -> [B, T, H]."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.ffn(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """``model.``: token embedding, the decoder layers, the final norm. `make_layer(layer,
    moe_layer)` builds decoder layer `layer`; `moe_layer` is its index among the MoE layers, or
    None for a dense layer."""

    def __init__(self, cfg: MoeConfig, make_layer: Callable[[int, int | None], nn.Module]):
        super().__init__()
        moe_index = {layer: i for i, layer in enumerate(cfg.moe_layer_ids)}
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(make_layer(i, moe_index.get(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoeForCausalLM(nn.Module):
    """Backbone, ``lm_head`` and the rotary tables over `rope_dim` dims. A family subclass
    implements `build_layer(cfg, layer, moe_layer)`: its attention, MoE block and dense MLP."""

    def __init__(self, cfg: MoeConfig, rope_dim: int):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, lambda layer, moe_layer: self.build_layer(cfg, layer, moe_layer))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rope, rope_dim, cfg.max_position_embeddings)

    def build_layer(self, cfg: MoeConfig, layer: int, moe_layer: int | None) -> DecoderLayer:
        raise NotImplementedError

    def moe_blocks(self) -> list[nn.Module]:
        """The MoE blocks in MoE-layer order; the loader installs their `experts`."""
        return [self.model.layers[i].ffn for i in self.config.moe_layer_ids]

    def new_cache(self) -> KVCache:
        """Per layer, what its attention caches: K and V [B, S, kv_heads, head_dim] for
        grouped-query attention; MLA's latent [B, S, kv_lora_rank] and rotary key
        [B, S, qk_rope_head_dim]."""
        return KVCache(self.config.num_hidden_layers)

    def kv_bytes_per_position(self) -> int:
        """Bytes one cached position of one sequence takes over every layer (the cache holds
        activations, in the embedding's dtype)."""
        size = self.model.embed_tokens.weight.element_size()
        return size * sum(layer.self_attn.cache_width for layer in self.model.layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, key_valid: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] float32 (or [B, 1, V] with `last_only`).

        positions [B, T]: rotary positions (default: cache.seen + arange(T)).
        key_valid [B, S]: False marks left padding over all S = cache.seen + T positions.
        """
        B, T = input_ids.shape
        seen = cache.seen if cache is not None else 0
        if positions is None:
            positions = torch.arange(seen, seen + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        masks = {}      # [B|1, 1, T, S] per sliding window (None: full causal), built once each
        for layer in self.model.layers:
            window = getattr(layer.self_attn, "sliding_window", None)
            if window not in masks:
                masks[window] = attention_mask(T, seen + T, key_valid, x.device, window)
            x = layer(x, cos, sin, masks[window], cache)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()
