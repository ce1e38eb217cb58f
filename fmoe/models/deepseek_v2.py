"""DeepSeek-V2 and -V3 (deepseek-ai/DeepSeek-V2-Lite, DeepSeek-V2, DeepSeek-V3, DeepSeek-R1; the
Kimi-K2 checkpoints, ``model_type`` kimi_k2, have V3's architecture).

Multi-head latent attention (MLA): queries come straight from x (``q_lora_rank`` None) or through
a low-rank bottleneck; keys and values are rebuilt from a shared compressed latent
(``kv_lora_rank``) by ``kv_b_proj``, and one extra rotary key (``qk_rope_head_dim``) is shared by
all heads. The KV cache holds only that latent and that rotary key per token, not expanded K/V.
Rotary runs over interleaved pairs (DeepSeek's layout), with YaRN scaling as the hub configs use
it; under YaRN the softmax scale also carries ``mscale(factor, mscale_all_dim)**2``.

Feed-forward: the first ``first_k_dense_replace`` layers are dense SwiGLU MLPs; the others are MoE
layers with ``n_shared_experts`` shared experts (one resident SwiGLU, never routed) plus routed
SwiGLU experts. Routing (``topk_method``):

- ``greedy`` (V2-Lite): softmax, top-k.
- ``group_limited_greedy`` (V2): softmax; keep the ``topk_group`` groups with the best single
  expert, top-k inside them.
- ``noaux_tc`` (V3, R1): sigmoid; choose with ``e_score_correction_bias`` added, groups ranked by
  the sum of their two best biased scores; weights are the unbiased sigmoid scores.

Weights are renormalised when ``norm_topk_prob``, and scaled by ``routed_scaling_factor``
(V2's reference code renormalises only more than one pick and applies the factor only when it
does not renormalise; V3's always does both). With ``group_limited_greedy`` a pick from a dropped
group weighs 0. A published V2 config never sets ``norm_topk_prob``: transformers' V2 ignores the
field (it never renormalises) where this follows the reference code.
Module names follow the hub checkpoints, so the checkpoint name map is the identity for
everything but the routed experts, whose tensors go to the experts backend. The decoder layer
and `forward` are the shared ones of `fmoe.models.base`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..kernels.cpu_gemv import decode_row, mla_decode, rope_rows
from .base import DecoderLayer, MoeConfig, MoeForCausalLM
from .config import RopeConfig, first, hf_default, require
from .experts import ExpertShape, PendingExperts
from .layers import KVCache, Linear, RMSNorm, SwiGLU, apply_rotary, gqa_attention, yarn_mscale

# (topk_method, scoring_func) pairs the reference code defines
_ROUTING = {"greedy": "softmax", "group_limited_greedy": "softmax", "noaux_tc": "sigmoid"}
# model types with V3's defaults (noaux_tc routing, renormalised weights): Kimi-K2 is V3-shaped
V3_TYPES = ("deepseek_v3", "kimi_k2")


# transformers' DeepseekV2Config / DeepseekV3Config defaults of the fields fmoe reads, for a
# config.json that leaves one out
_V2_DEFAULTS = dict(n_group=1, topk_group=1, routed_scaling_factor=1.0, q_lora_rank=1536,
                    n_shared_experts=2, first_k_dense_replace=0, max_position_embeddings=2048,
                    bos_token_id=1, eos_token_id=2)
_V3_DEFAULTS = dict(n_group=8, topk_group=4, routed_scaling_factor=2.5, q_lora_rank=1536,
                    n_shared_experts=1, first_k_dense_replace=3, max_position_embeddings=4096,
                    bos_token_id=0, eos_token_id=1)


@dataclass(frozen=True, kw_only=True)
class DeepseekV2Config(MoeConfig):
    moe_intermediate_size: int              # each routed expert (and each shared expert)
    n_routed_experts: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    rope: RopeConfig = RopeConfig(10000.0)
    num_nextn_predict_layers: int = 0       # V3's multi-token-prediction layers: not used
    model_type: str = "deepseek_v2"

    @classmethod
    def from_hf(cls, cfg: dict) -> "DeepseekV2Config":
        model_type = cfg.get("model_type") or "deepseek_v2"
        v3 = model_type in V3_TYPES
        vocab, hidden, inter, moe_inter, layers, heads, kv_rank, nope, rope_dim, v_dim = require(
            cfg, "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", model_type=model_type)
        experts = first(cfg, "n_routed_experts", "num_local_experts", "num_experts")
        top_k = cfg.get("num_experts_per_tok")
        if experts is None or top_k is None:
            require(cfg, "n_routed_experts", "num_experts_per_tok", model_type=model_type)
        method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        scoring = cfg.get("scoring_func") or _ROUTING.get(method)
        if _ROUTING.get(method) != scoring:
            raise ConfigError(f"config.json ({model_type}): unsupported routing topk_method={method!r} "
                              f"with scoring_func={scoring!r}; supported: "
                              + ", ".join(f"{m}/{s}" for m, s in _ROUTING.items()))
        # a field the file leaves out takes transformers' config class default (V2's or V3's)
        d = _V3_DEFAULTS if v3 else _V2_DEFAULTS
        n_group = hf_default(cfg, "n_group", d["n_group"], 1)
        if experts % n_group:
            raise ConfigError(f"config.json ({model_type}): n_routed_experts={experts} is not a "
                              f"multiple of n_group={n_group}")
        return cls(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            moe_intermediate_size=moe_inter, num_hidden_layers=layers, num_attention_heads=heads,
            n_routed_experts=experts, num_experts_per_tok=top_k,
            kv_lora_rank=kv_rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=v_dim,
            q_lora_rank=hf_default(cfg, "q_lora_rank", d["q_lora_rank"]),
            n_shared_experts=hf_default(cfg, "n_shared_experts", d["n_shared_experts"], 0),
            first_k_dense_replace=hf_default(cfg, "first_k_dense_replace", d["first_k_dense_replace"], 0),
            moe_layer_freq=cfg.get("moe_layer_freq") or 1,
            topk_method=method, n_group=n_group,
            topk_group=hf_default(cfg, "topk_group", d["topk_group"], 1),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", v3)),
            routed_scaling_factor=float(hf_default(cfg, "routed_scaling_factor",
                                                   d["routed_scaling_factor"], 1.0)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            # transformers' V2 always rotates interleaved pairs; only V3 (and Kimi-K2) read the flag
            rope_interleave=bool(cfg.get("rope_interleave", True)) if v3 else True,
            num_nextn_predict_layers=cfg.get("num_nextn_predict_layers") or 0,
            model_type=model_type,
            **{**cls.read_common(cfg),
               "max_position_embeddings": cfg.get("max_position_embeddings", d["max_position_embeddings"]),
               "bos_token_id": hf_default(cfg, "bos_token_id", d["bos_token_id"]),
               "eos_token_id": hf_default(cfg, "eos_token_id", d["eos_token_id"])},
        )

    def is_moe_layer(self, layer: int) -> bool:
        """Past the `first_k_dense_replace` dense layers and on the `moe_layer_freq` grid."""
        return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    @property
    def experts(self) -> ExpertShape:
        return ExpertShape(len(self.moe_layer_ids), self.n_routed_experts, self.hidden_size,
                           self.moe_intermediate_size, self.num_experts_per_tok)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk head dim), times mscale(factor, mscale_all_dim)**2 under scaled rotary."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        mscale_all_dim = self.rope.get("mscale_all_dim")
        if self.rope.type != "default" and mscale_all_dim:
            scale *= yarn_mscale(self.rope.get("factor") or 1.0, mscale_all_dim) ** 2
        return scale

    @property
    def checkpoint_ignore(self) -> tuple[str, ...]:
        """Checkpoint names that are not part of this model: V3's multi-token-prediction layers
        (``model.layers.{num_hidden_layers}...``), which plain decoding does not run, and the
        empty shared experts of a model with none."""
        mtp = tuple(rf"model\.layers\.{self.num_hidden_layers + i}\."
                    for i in range(self.num_nextn_predict_layers))
        # without shared experts transformers still saves a zero-width shared MLP
        return mtp + ((r"model\.layers\.\d+\.mlp\.shared_experts\.",) if not self.n_shared_experts else ())


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., (d/2 pairs of 2)] -> [..., evens then odds]: DeepSeek rotates interleaved pairs
    (x0, x1), (x2, x3), ...; after this permutation the usual rotate-half rotary applies. The
    same permutation on queries and keys leaves their dot products unchanged."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MLAttention(nn.Module):
    """Multi-head latent attention. Cache per token: latent [kv_lora_rank] + rotary key [rope]."""

    def __init__(self, cfg: DeepseekV2Config, layer: int):
        super().__init__()
        self.layer = layer
        self.heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.interleave = cfg.rope_interleave
        self.scale = cfg.softmax_scale
        self.q_lora = cfg.q_lora_rank is not None
        qk_dim = self.nope + self.rope
        if not self.q_lora:
            self.q_proj = Linear(cfg.hidden_size, self.heads * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.rank + self.rope,
                                            bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(self.heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)

    @property
    def cache_width(self) -> int:
        """Elements one cached position takes in this layer: the latent and the rotary key."""
        return self.rank + self.rope

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        """x [B, T, H] -> [B, T, H]."""
        B, T, _ = x.shape
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(B, T, self.heads, -1).split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)                          # [B, T, r]
        row = decode_row(x, self.kv_b_proj.weight)    # one bf16 row on the CPU: the kernels
        if row:
            # one decode row: both rotations in one kernel call (the same bits as below)
            pe = rope_rows(torch.cat((q_pe.reshape(self.heads, self.rope), k_pe.reshape(1, self.rope))),
                           cos.reshape(-1), sin.reshape(-1), self.interleave)
            q_pe, k_pe = pe[:self.heads].view(B, T, self.heads, self.rope), pe[self.heads:].view(B, T, self.rope)
        else:
            if self.interleave:
                q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
            q_pe = apply_rotary(q_pe, cos, sin)                       # [B, T, heads, rope]
            k_pe = apply_rotary(k_pe[:, :, None], cos, sin)[:, :, 0]  # [B, T, rope]
        decoding = cache is not None and cache.seen > 0
        if cache is not None:
            latent, k_pe = cache.update(self.layer, latent, k_pe)     # [B, S, r], [B, S, rope]
        if decoding:
            out = self._attend_latent(q_nope, q_pe, latent, k_pe, mask, row)
        else:
            out = self._attend_expanded(q_nope, q_pe, latent, k_pe, mask)
        return self.o_proj(out.reshape(B, T, -1))

    def _attend_expanded(self, q_nope, q_pe, latent, k_pe, mask):
        """Prefill: rebuild per-head K [B, S, heads, nope+rope] and V from the latent."""
        B, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, self.heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(B, S, self.heads, self.rope)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        return gqa_attention(q, k, v, mask, scale=self.scale)         # [B, T, heads, v]

    def _attend_latent(self, q_nope, q_pe, latent, k_pe, mask, row: bool):
        """Decode: attend in latent space ("absorbed" kv_b_proj), one key per token shared by all
        heads: score = (q_nope W_uk) . latent + q_pe . k_pe; out = (p @ latent) W_uv^T."""
        B, T, heads, _ = q_nope.shape
        S = latent.shape[1]
        w_uk_t, w_uv = self._absorbed()                                # [h, r, nope], [h, v, r]
        if row:                    # every head's products and attention in one kernel call
            out = mla_decode(q_nope.reshape(heads, self.nope), q_pe.reshape(heads, self.rope), w_uk_t,
                             latent[0], k_pe[0], mask.reshape(S), w_uv, self.scale)
            return out.view(B, T, heads, self.v_dim)
        q_lat = torch.matmul(q_nope.permute(2, 0, 1, 3).reshape(heads, B * T, self.nope),
                             w_uk_t.transpose(1, 2))
        q_lat = q_lat.view(heads, B, T, self.rank).permute(1, 2, 0, 3)  # [B, T, h, r]
        q = torch.cat((q_lat, q_pe), dim=-1)
        q = q.reshape(B, 1, T * heads, self.rank + self.rope)         # heads as extra query rows
        k = torch.cat((latent, k_pe), dim=-1)[:, None]                 # [B, 1, S, r + rope]
        mask = mask[:, :, :, None, :].expand(-1, -1, T, heads, S).reshape(mask.shape[0], 1, T * heads, S)
        ctx = F.scaled_dot_product_attention(q, k, latent[:, None], attn_mask=mask, scale=self.scale)
        ctx = ctx.view(B, T, heads, self.rank).permute(2, 0, 1, 3).reshape(heads, B * T, self.rank)
        return torch.matmul(ctx, w_uv.transpose(1, 2)).view(heads, B, T, self.v_dim).permute(1, 2, 0, 3)

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split for decoding, made contiguous once (not copied every step):
        W_uk^T [h, r, nope] and W_uv [h, v, r], each head's matrix with the latent last (the
        layout of a matrix-vector product over the latent, and of its transpose)."""
        w = self.kv_b_proj.weight
        key = (w.data_ptr(), w._version)
        cached = self.__dict__.get("_absorb")
        if cached is None or cached[0] != key:
            w3 = w.detach().view(self.heads, self.nope + self.v_dim, self.rank)
            cached = (key, w3[:, : self.nope].transpose(1, 2).contiguous(), w3[:, self.nope:].contiguous())
            self.__dict__["_absorb"] = cached
        return cached[1], cached[2]


class Router(nn.Module):
    """The ``mlp.gate`` of a MoE layer. Weight and correction bias stay float32 whatever the model
    dtype, as in the reference implementation: routing is decided at full precision."""

    def __init__(self, cfg: DeepseekV2Config):
        super().__init__()
        E = cfg.n_routed_experts
        self.top_k, self.method = cfg.num_experts_per_tok, cfg.topk_method
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size), requires_grad=False)
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(E), requires_grad=False)

    def reset_buffers(self, device) -> None:
        # The loader calls this after casting the model to the serving dtype: back to float32.
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(torch.zeros(p.shape, dtype=torch.float32, device=device),
                                             requires_grad=False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> topk_weights [N, K] float32, topk_ids [N, K] int64, router_probs [N, E]
        float32 (the softmax; for sigmoid scoring, the scores normalised to sum to one)."""
        N = x.shape[0]
        logits = F.linear(x.float(), self.weight.float())            # [N, E]
        if self.method == "noaux_tc":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.view(N, self.n_group, -1).topk(2, dim=-1).values.sum(-1)
        else:
            scores = choice = logits.softmax(dim=-1)
            group_scores = scores.view(N, self.n_group, -1).amax(dim=-1)
        if self.method != "greedy":                                    # group-limited
            groups = torch.topk(group_scores, self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
            keep = keep[:, :, None].expand(N, self.n_group, choice.shape[1] // self.n_group)
            choice = choice.masked_fill(~keep.reshape(N, -1), float("-inf"))
        ids = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.method == "group_limited_greedy":
            # V2 takes the weights from the masked scores: a pick from a dropped group (top-k
            # larger than the kept groups hold) weighs 0
            weights = weights.masked_fill(choice.gather(1, ids) == float("-inf"), 0.0)
        # V3 renormalises even a single pick (to 1), V2's reference code only from two picks
        normalise = self.norm_topk_prob and (self.top_k > 1 or self.method == "noaux_tc")
        if normalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.method == "noaux_tc" or not normalise:
            weights = weights * self.scaling
        probs = scores if self.method != "noaux_tc" else scores / scores.sum(dim=-1, keepdim=True)
        return weights, ids, probs


class MoE(nn.Module):
    """Router -> experts backend, plus the shared experts (resident, always applied)."""

    def __init__(self, cfg: DeepseekV2Config, moe_layer: int):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = PendingExperts(moe_layer)
        if cfg.n_shared_experts:
            self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                         bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        weights, ids, probs = self.gate(flat)
        out = self.experts(flat, weights, ids, probs)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(flat)
        return out.view(B, T, H)


class DeepseekV2ForCausalLM(MoeForCausalLM):
    """Multi-head latent attention, then the MoE block or, in the first `first_k_dense_replace`
    layers (and off the `moe_layer_freq` grid), a SwiGLU MLP; both under the checkpoint's name
    ``mlp``. Rotary tables cover the `qk_rope_head_dim` dims of the shared rotary key."""

    def __init__(self, cfg: DeepseekV2Config):
        super().__init__(cfg, cfg.qk_rope_head_dim)

    def build_layer(self, cfg: DeepseekV2Config, layer: int, moe_layer: int | None) -> DecoderLayer:
        attn = MLAttention(cfg, layer)
        mlp = (SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
               if moe_layer is None else MoE(cfg, moe_layer))
        return DecoderLayer(cfg, attn, mlp)


# One family, two model types: V3 differs only in its config defaults and routing.
DeepseekV3Config = DeepseekV2Config
DeepseekV3ForCausalLM = DeepseekV2ForCausalLM

__all__ = ["DeepseekV2Config", "DeepseekV2ForCausalLM", "DeepseekV3Config", "DeepseekV3ForCausalLM"]
