"""PyTorch paths for the fused MoE: ``gather`` (a loop over slots) and ``grouped_mm``.

Both keep one invariant that makes offloading lossless: the result does not depend on how
experts are numbered. Each (t, k) pair is computed on its own row of a [T*K, H] buffer (an
expert sees the same rows in the same order whatever slot it occupies: the sort by slot is
stable), and the K contributions are summed in k order with
``(y.view(T, K, H) * w[..., None]).sum(1)``. A resident run (ids = expert ids, S = E) and an
offloaded run (ids = cache slots) therefore agree bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .align import moe_align_block_size
from .cpu_gemv import decode_row, expert_linear, swiglu_rows

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _combine(y: torch.Tensor, topk_weights: torch.Tensor, T: int, K: int,
             reduce: bool = True) -> torch.Tensor:
    """y [T*K, H] per-pair expert outputs -> [T, H], weighted and summed in k order
    (``reduce=False``: the weighted terms [T, K, H] before the sum)."""
    y = y.view(T, K, -1) * topk_weights.to(y.dtype).unsqueeze(-1)
    return y.sum(dim=1) if reduce else y


class GateUp:
    """One expert's gate [I, H] and up [I, H] weights held apart (memory-mapped from a file that
    stores them apart, as Mixtral's w1, w2, w3 order does): `swiglu_expert` takes it where it
    takes a stacked w13 [2I, H], so that nothing is copied to stack them."""

    __slots__ = ("gate", "up")

    def __init__(self, gate: torch.Tensor, up: torch.Tensor):
        self.gate, self.up = gate, up

    @property
    def shape(self) -> tuple[int, int]:
        return (2 * self.gate.shape[0], self.gate.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.gate.dtype


def swiglu_expert(xs: torch.Tensor, w13, w2: torch.Tensor) -> torch.Tensor:
    """One expert on its rows: xs [n, H], w13 [2I, H] (gate rows, then up rows), w2 [H, I] ->
    ``w2 @ (silu(w13[:I] @ x) * (w13[I:] @ x))`` per row, [n, H]. Every path that computes
    experts one at a time (gather, mapped, host) calls this, so they agree bit for bit; a bf16
    decode row runs the whole expert in one compiled call (`cpu_gemv.swiglu_rows`), the same one
    `moe_gather` makes for all of a token's experts at once."""
    inter = w2.shape[1]
    if isinstance(w13, GateUp):         # the same sums, on the two weights where they lie
        if decode_row(xs, w13.gate, w13.up):
            return swiglu_rows(xs, w13.gate[None], 0, w13.up[None], 0, w2[None])
        return expert_linear(F.silu(expert_linear(xs, w13.gate)) * expert_linear(xs, w13.up), w2)
    if decode_row(xs, w13):
        return swiglu_rows(xs, w13[None], 0, w13[None], inter, w2[None])
    gu = expert_linear(xs, w13)
    return expert_linear(F.silu(gu[:, :inter]) * gu[:, inter:], w2)


def moe_gather(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Loop over the slots that received tokens: gather their rows, two matmuls, scatter back.

    x [T, H]; w13 [S, 2I, H]; w2 [S, H, I]; topk_weights [T, K]; topk_ids [T, K] -> [T, H].
    One host sync (the list of used slots). Cheapest when few slots are used (decode). A bf16
    decode row on the CPU with stacked weights computes its K experts in one compiled call,
    each exactly as `swiglu_expert` would.
    """
    T, H = x.shape
    K = topk_ids.shape[1]
    if isinstance(w13, torch.Tensor) and decode_row(x, w13):
        y = swiglu_rows(x, w13, 0, w13, w2.shape[2], w2, topk_ids[0])
        return _combine(y, topk_weights, T, K, reduce)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    slots, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    y = x.new_empty(T * K, H)
    start = 0
    for slot, n in zip(slots.tolist(), counts.tolist()):
        pairs = order[start:start + n]
        start += n
        y[pairs] = swiglu_expert(x[pairs // K], w13[slot], w2[slot])
    return _combine(y, topk_weights, T, K, reduce)


def grouped_mm_available() -> bool:
    """Whether the installed torch has a grouped GEMM (``F.grouped_mm`` / ``torch._grouped_mm``)."""
    return _GROUPED_MM is not None


def grouped_mm_unsupported_reason(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> str | None:
    """Why ``moe_grouped_mm`` cannot take these tensors, or None if it can.

    torch's grouped GEMM wants fp32/fp16/bf16 (bf16 only on CUDA), rows whose byte strides are
    multiples of 16, 16-byte aligned weight pointers and weights contiguous in their last dim.
    """
    if _GROUPED_MM is None:
        return f"torch {torch.__version__} has no grouped_mm"
    if not (x.dtype == w13.dtype == w2.dtype):
        return f"dtypes differ: x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}"
    if x.dtype not in _GROUPED_MM_DTYPES:
        return f"grouped_mm does not take {x.dtype}"
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return "grouped_mm on CUDA takes bfloat16 only"
    if x.device.type not in ("cpu", "cuda"):
        return f"grouped_mm not wired for device {x.device.type}"
    es = x.element_size()
    H, inter = w2.shape[1], w2.shape[2]
    if (H * es) % 16 or (inter * es) % 16:
        return f"row sizes H={H}, I={inter} are not multiples of 16 bytes"
    for name, w in (("w13", w13), ("w2", w2)):
        if w.stride(-1) != 1 or (w.stride(0) * es) % 16 or (w.stride(1) * es) % 16:
            return f"{name} strides {tuple(w.stride())} are not grouped_mm compatible"
        if w.data_ptr() % 16:
            return f"{name} is not 16-byte aligned"
    return None


def _rows_for_alignment(es: int, *row_lengths: int) -> int:
    """Smallest row count r such that r rows of each length span a multiple of 64 bytes.

    Starting every slot's group on a 64-byte boundary means a group's rows meet the BLAS
    kernel at the same alignment whatever slots precede it, so results cannot depend on the
    slot numbering through alignment. For real model sizes (H, I multiples of 32) r = 1.
    """
    r = 1
    for n in row_lengths:
        need = 64 // math.gcd(64, n * es)
        r = r * need // math.gcd(r, need)
    return r


def moe_grouped_mm(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Two grouped GEMMs over all S slots (``torch.nn.functional.grouped_mm``), no Python loop.

    x [T, H]; w13 [S, 2I, H]; w2 [S, H, I]; topk_weights [T, K]; topk_ids [T, K] -> [T, H].
    Rows are gathered into slot order (one group per slot, empty groups allowed), the weights
    are read in place as ``w.transpose(1, 2)`` views of the cache buffers.
    """
    reason = grouped_mm_unsupported_reason(x, w13, w2)
    if reason is not None:
        raise ValueError(f"grouped_mm backend unavailable: {reason}")
    T, H = x.shape
    K = topk_ids.shape[1]
    S, inter = w2.shape[0], w2.shape[2]
    P = T * K
    r = _rows_for_alignment(x.element_size(), H, inter, 2 * inter)
    aligned = moe_align_block_size(topk_ids, r, S)
    ids = aligned.sorted_token_ids.to(torch.int64)            # [M] pair per row; P = padding
    padded_counts = (aligned.counts + r - 1) // r * r
    offs = torch.cumsum(padded_counts, 0).to(torch.int32)      # [S] end row of each slot's group

    # padding rows read x[0]; their outputs are never gathered back
    xs = x[torch.where(ids < P, ids // K, 0)]                  # [M, H]
    gu = _GROUPED_MM(xs, w13.transpose(1, 2), offs=offs)       # [M, 2I]
    h = F.silu(gu[:, :inter]) * gu[:, inter:]                  # [M, I]
    ys = _GROUPED_MM(h, w2.transpose(1, 2), offs=offs)         # [M, H]; rows past offs[-1] unset
    y = ys[aligned.pair_positions]                             # [P, H] back in pair order
    return _combine(y, topk_weights, T, K, reduce)
