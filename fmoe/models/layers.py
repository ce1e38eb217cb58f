"""Building blocks shared by the model families: norm, rotary embedding, KV cache, attention,
dense SwiGLU MLP, attention masks, softmax top-k routing."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.cpu_gemv import decode_row, rms_norm_row, swiglu_rows
from ..kernels.cpu_gemv import linear as gemv_bf16
from .config import RopeConfig


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint keys) whose bf16 product of one row on the
    CPU (a decode step, `decode_row`) runs fmoe's streaming kernel
    (`fmoe.kernels.cpu_gemv`): torch's bf16 matrix-vector product reads the weights at about
    half the rate the memory allows on the CPUs measured; a bias is added to the fp32 sum before
    the one rounding, as torch's product adds it. Any other product is torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if decode_row(x, w) and (self.bias is None or self.bias.dtype == torch.bfloat16):
            return gemv_bf16(x.reshape(1, -1), w, self.bias).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if decode_row(x, self.weight):     # one call; within one bf16 step of the lines below
            return rms_norm_row(x.reshape(-1), self.weight, self.eps).view(x.shape)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(rope: RopeConfig, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (float32, CPU) and the attention scaling of the rope type."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scale = 1.0
    if rope.type == "linear":
        inv = inv / rope.get("factor", 1.0)
    elif rope.type == "yarn":
        inv, scale = _yarn(rope, dim, max_position)
    # "dynamic" only changes frequencies beyond the trained length; positions inside it use the
    # default frequencies, which is all a bounded-context server sees.
    return inv, scale


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) as transformers computes it for the hub configs of DeepSeek and
    Qwen: an explicit `attention_factor` wins, else mscale/mscale_all_dim, else ln(factor)."""
    orig = rope.get("original_max_position_embeddings") or max_position
    factor = rope.get("factor")
    if factor is None:
        factor = max_position / orig
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1
    mscale = rope.get("mscale")
    mscale_all_dim = rope.get("mscale_all_dim")

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(n_rot):
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp
    inv = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv, float(attention_factor)


class Rotary(nn.Module):
    """cos/sin tables for given positions. Interleaved=False: rotate halves (Llama style)."""

    def __init__(self, rope: RopeConfig, dim: int, max_position: int):
        super().__init__()
        self._args = (rope, dim, max_position)
        inv, self.attention_scaling = rope_inv_freq(rope, dim, max_position)
        self.register_buffer("inv_freq", inv, persistent=False)

    def reset_buffers(self, device) -> None:
        # Buffers are lost when the model is built on the meta device; the loader calls this.
        with torch.device("cpu"):
            inv, self.attention_scaling = rope_inv_freq(*self._args)
        self.inv_freq = inv.to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, dim]."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.attention_scaling).to(dtype),
                (emb.sin() * self.attention_scaling).to(dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D]; cos/sin [B, T, D]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Per-layer growing buffers of cached tensors shaped ``[B, S, ...]`` (sequence dim 1).

    Families decide what they cache: K and V for grouped-query attention, the compressed latent
    and the rope key for multi-head latent attention. `seen` is the number of positions cached
    before the current forward; the model calls `advance(T)` once all layers have appended.
    """

    def __init__(self, num_layers: int):
        self.layers: list[list[torch.Tensor] | None] = [None] * num_layers
        self.seen = 0
        # the most positions a buffer may grow to while it holds at least that many (None: no
        # bound): the serving loop sets it so that rows x capacity stays within its KV budget
        self.max_len: int | None = None

    @property
    def capacity(self) -> int:
        """Positions the buffers hold room for (the largest layer's)."""
        return max((b[0].shape[1] for b in self.layers if b is not None), default=0)

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append `new` ([B, T, ...] each) at positions seen..seen+T; return [B, seen+T, ...]."""
        T = new[0].shape[1]
        end = self.seen + T
        bufs = self.layers[layer]
        if bufs is None or bufs[0].shape[1] < end:
            cap = max(end, 2 * (bufs[0].shape[1] if bufs else 0), 16)
            if self.max_len is not None:
                cap = max(end, min(cap, self.max_len))
            grown = []
            for i, t in enumerate(new):
                b = t.new_empty((t.shape[0], cap) + tuple(t.shape[2:]))
                if bufs is not None:
                    b[:, : self.seen] = bufs[i][:, : self.seen]
                grown.append(b)
            bufs = self.layers[layer] = grown
        for b, t in zip(bufs, new):
            b[:, self.seen:end] = t
        return tuple(b[:, :end] for b in bufs)

    def advance(self, n: int) -> None:
        self.seen += n

    # -- row operations of continuous batching (every tensor of every layer alike) -------------
    def trim(self, n: int) -> None:
        """Drop the first `n` cached positions of every row (columns that are padding in all
        rows): [B, seen, ...] -> [B, seen - n, ...], views of the buffers."""
        self.layers = [None if b is None else [t[:, n:self.seen] for t in b] for b in self.layers]
        self.seen -= n

    def select(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` [b] (long), in that order: [B, seen, ...] -> [b, seen, ...]
        (a copy; the next `update` regrows it)."""
        for i, b in enumerate(self.layers):   # layer by layer: one layer's copy is extra at a time
            if b is not None:
                self.layers[i] = [t[:, :self.seen].index_select(0, index) for t in b]

    def merge(self, other: "KVCache", headroom: int = 16) -> None:
        """Append the rows of `other` below this cache's rows, both right-aligned on
        S = max(seen, other.seen): [B1, seen1, ...] + [B2, seen2, ...] -> [B1 + B2, S, ...].
        The shorter side is left-padded with zeros (the caller masks those keys); `headroom`
        spare columns save the next `update` a regrowth."""
        S = max(self.seen, other.seen)
        if any((a is None) != (b is None) for a, b in zip(self.layers, other.layers)):
            raise RuntimeError("cannot merge caches: a layer is cached in one batch only")
        if self.max_len is not None:
            headroom = max(0, min(headroom, self.max_len - S))
        for i, (a, b) in enumerate(zip(self.layers, other.layers)):
            if a is not None:          # layer by layer: one layer's copy is extra at a time
                self.layers[i] = [self._stack_right_aligned([x[:, :self.seen], y[:, :other.seen]], S, headroom)
                                  for x, y in zip(a, b)]
        self.seen = S

    @staticmethod
    def _stack_right_aligned(parts: list[torch.Tensor], S: int, headroom: int) -> torch.Tensor:
        """Stack [b_i, s_i, ...] along the batch dim into one zero-padded
        [sum b_i, S + headroom, ...] buffer with every part's last column at S - 1."""
        ref = parts[0]
        out = ref.new_zeros((sum(p.shape[0] for p in parts), S + headroom) + tuple(ref.shape[2:]))
        r = 0
        for p in parts:
            b, s = p.shape[0], p.shape[1]
            out[r:r + b, S - s:S] = p
            r += b
        return out


def attention_mask(q_len: int, k_len: int, key_valid: torch.Tensor | None, device,
                   sliding_window: int | None = None) -> torch.Tensor:
    """Boolean mask [B or 1, 1, q_len, k_len]; True = attend.

    Queries are the last `q_len` of `k_len` positions. Causal, optionally limited to the last
    `sliding_window` positions, and restricted to `key_valid` [B, k_len] (False for left padding).
    Every query may attend to itself so that padding rows stay finite.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    mask = mask[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].bool()
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


class SwiGLU(nn.Module):
    """Dense gated MLP (dense layers, shared experts): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=bias)
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        if self.gate_proj.bias is None and decode_row(x, g, u, d):
            # one decode row: the whole MLP in one call of the CPU kernel (the routed experts' one)
            return swiglu_rows(x.reshape(1, -1), g[None], 0, u[None], 0, d[None]).view(x.shape)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax routing (Mixtral, Qwen-MoE): router logits [N, E] -> topk_weights [N, K] float32,
    topk_ids [N, K] int64, router_probs [N, E] float32. The softmax runs in float32 whatever the
    model dtype; `renormalize` rescales the K weights to sum to one."""
    probs = F.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids, probs


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  scale: float | None = None) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, S, Hkv, D(v)], mask [B|1, 1, T, S] -> [B, T, Hq, Dv]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
