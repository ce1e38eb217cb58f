"""`fused_moe`: the one experts computation used by resident and offloaded runs alike."""

from __future__ import annotations

import torch

from .torch_moe import moe_gather


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SwiGLU experts indexed by slot.

    x [T, H]; w13 [S, 2I, H] (gate rows, then up rows); w2 [S, H, I]; topk_weights [T, K];
    topk_ids [T, K] int32/int64 slot ids. Returns [T, H]:
    ``out[t] = sum_k topk_weights[t,k] * w2[id] @ (silu(w13[id][:I] @ x[t]) * (w13[id][I:] @ x[t]))``.

    The result does not depend on how experts are numbered: each (t, k) pair is computed on
    its own and the K contributions are summed in k order, so resident and offloaded runs
    (different slot ids for the same experts) agree bit for bit.
    """
    if backend not in (None, "torch"):
        raise ValueError(f"unknown fused_moe backend {backend!r}")
    return moe_gather(x, w13, w2, topk_weights, topk_ids)
