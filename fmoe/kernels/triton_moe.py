"""Triton fused MoE: one grouped GEMM kernel over cache slots, used twice.

Algorithm (the idea follows vLLM's fused_moe; the code is fmoe's own):

1. ``moe_align_block_size`` sorts the P = T*K (token, k) pairs by slot and pads each slot's
   run to a multiple of BLOCK_M, so every BLOCK_M block of sorted positions belongs to one
   slot (``expert_ids[block]``). Padding positions hold the sentinel P.
2. ``_moe_grouped_gemm_kernel`` computes, for each block, ``C[pair] = A[row(pair)] @ B[slot]^T``.
   A rows are gathered in place through the sorted pair ids (x is never copied into sorted
   order), B is the cache buffer indexed by slot, accumulation is fp32, and C is written back
   in pair order. Launch 1: A = x [T, H], row = pair // K, B = w13 [S, 2I, H] -> gu [P, 2I].
3. ``_silu_and_mul_kernel``: h = silu(gu[:, :I]) * gu[:, I:] -> [P, I] (fp32 math).
4. Launch 2: A = h, row = pair, B = w2 [S, H, I], the top-k weight multiplied in the epilogue
   -> y [P, H]; then ``y.view(T, K, H).sum(1)``.

This module imports triton at the top; ``fmoe.kernels.fused_moe`` imports it lazily.
On a CPU it only works under ``TRITON_INTERPRET=1`` set before this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align import moe_align_block_size
from .tile_config import get_config


@triton.jit
def _moe_grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, topk_weights_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, num_pairs, num_sorted,
    stride_am, stride_ak, stride_bs, stride_bn, stride_bk, stride_cm, stride_cn,
    A_ROW_DIV: tl.constexpr,            # A row of a pair = pair // A_ROW_DIV (top_k for x, 1 for h)
    MUL_ROUTED_WEIGHT: tl.constexpr,    # multiply row `pair` by topk_weights[pair] in the epilogue
    FP32_IEEE: tl.constexpr,            # fp32 inputs: full-precision dot, not TF32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[pair, n] = sum_k A[pair // A_ROW_DIV, k] * B[slot(block), n, k]  (* w[pair]).

    One program computes a BLOCK_M x BLOCK_N tile of sorted rows; all rows of a block share a
    slot. Pads (pair == num_pairs) are masked on load and store. Shapes: A [*, K] with strides
    (stride_am, stride_ak); B [S, N, K]; C [num_pairs, N].
    """
    # Grouped ordering: GROUP_M row blocks sweep the N blocks together, so a weight tile is
    # fetched once into L2 and reused by the neighbouring row blocks of the same slot.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_sorted, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    # The grid is sized by an upper bound (no host sync on CUDA): blocks past the end exit.
    if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_token_ids_ptr + offs_m).to(tl.int64)
    row_ok = pair < num_pairs
    slot = tl.load(expert_ids_ptr + pid_m).to(tl.int64)   # int64: S * 2I * H can pass 2**31

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // A_ROW_DIV)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + slot * stride_bs + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP32_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if MUL_ROUTED_WEIGHT:
        w = tl.load(topk_weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _silu_and_mul_kernel(gu_ptr, h_ptr, num_rows, inter, stride_gm, stride_hm,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """h[r, c] = silu(gu[r, c]) * gu[r, inter + c] for gu [R, 2*inter] -> h [R, inter], fp32 math."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < num_rows)[:, None] & (cols < inter)[None, :]
    g_ptrs = gu_ptr + rows[:, None] * stride_gm + cols[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


def is_interpreted() -> bool:
    """True when the kernels were created under TRITON_INTERPRET=1 (the CPU interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_moe_grouped_gemm_kernel, InterpretedFunction)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, topk_weights_flat: torch.Tensor,
                 aligned, num_sorted: int, a_row_div: int, mul_weight: bool, config: dict) -> None:
    """One launch of the grouped GEMM, writing c in place.

    a [R, Kd] (any strides; row of pair p is p // a_row_div); b [S, N, Kd] (any strides,
    indexed by slot); c [P, N] (any strides), P = number of pairs; topk_weights_flat [P];
    aligned: ``moe_align_block_size(topk_ids, config["BLOCK_M"], S)``; num_sorted: sorted
    positions the grid covers (``num_tokens_post_padded`` or the bound
    ``aligned.sorted_token_ids.numel()``).
    """
    num_pairs, n = c.shape
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    grid = (triton.cdiv(num_sorted, bm) * triton.cdiv(n, bn),)
    _moe_grouped_gemm_kernel[grid](
        a, b, c, topk_weights_flat,
        aligned.sorted_token_ids, aligned.expert_ids, aligned.num_tokens_post_padded,
        n, b.shape[2], num_pairs, num_sorted,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div, MUL_ROUTED_WEIGHT=mul_weight, FP32_IEEE=a.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def silu_and_mul(gu: torch.Tensor, h: torch.Tensor) -> None:
    """h = silu(gu[:, :I]) * gu[:, I:], written in place; gu [R, 2I], h [R, I], unit column stride."""
    rows, inter = h.shape
    if gu.shape != (rows, 2 * inter) or gu.stride(1) != 1 or h.stride(1) != 1:
        raise ValueError(f"silu_and_mul: gu {tuple(gu.shape)}, h {tuple(h.shape)}: "
                         "need [R, 2I] and [R, I] with unit column stride")
    block_c = min(triton.next_power_of_2(inter), 1024)
    block_r = 16 if is_interpreted() else 1    # the interpreter pays per program
    grid = (triton.cdiv(rows, block_r), triton.cdiv(inter, block_c))
    _silu_and_mul_kernel[grid](gu, h, rows, inter, gu.stride(0), h.stride(0),
                               BLOCK_R=block_r, BLOCK_C=block_c)


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, config: dict | None = None,
                     reduce: bool = True) -> torch.Tensor:
    """The Triton path of ``fused_moe``; x [T, H], w13 [S, 2I, H], w2 [S, H, I] -> [T, H].

    ``config`` (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) overrides the lookup in
    ``tile_config`` (the tuner uses it).
    """
    T, H = x.shape
    top_k = topk_ids.shape[1]
    S, inter = w2.shape[0], w2.shape[2]
    interpreted = is_interpreted()
    if x.device.type != "cuda" and not interpreted:
        raise RuntimeError("the Triton fused_moe needs a CUDA device, or TRITON_INTERPRET=1 set "
                           "before fmoe.kernels runs its first Triton call")
    if config is None:
        config = get_config(T, top_k, S, inter, H, x.dtype, x.device, interpret=interpreted)
    if x.device.type == "cuda":
        # Triton launches on the thread's current device: on cuda:1 from a thread whose
        # current device is 0 the kernels would run on the wrong GPU
        with torch.cuda.device(x.device):
            return _launch(x, w13, w2, topk_weights, topk_ids, config, reduce)
    return _launch(x, w13, w2, topk_weights, topk_ids, config, reduce)


def _launch(x, w13, w2, topk_weights, topk_ids, config: dict, reduce: bool) -> torch.Tensor:
    """`fused_moe_triton`'s kernels, on the current device."""
    T, H = x.shape
    top_k = topk_ids.shape[1]
    S, inter = w2.shape[0], w2.shape[2]
    P = T * top_k
    aligned = moe_align_block_size(topk_ids, config["BLOCK_M"], S)
    if x.device.type == "cuda":
        num_sorted = aligned.sorted_token_ids.numel()   # bound: no sync, CUDA-graph friendly
    else:
        # the interpreter pays for every program, even idle ones: launch only the used blocks
        num_sorted = int(aligned.num_tokens_post_padded.item())
    topk_weights_flat = topk_weights.reshape(-1).contiguous()

    gu = x.new_empty(P, 2 * inter)
    grouped_gemm(x, w13, gu, topk_weights_flat, aligned, num_sorted, top_k, False, config)

    h = x.new_empty(P, inter)
    silu_and_mul(gu, h)

    y = x.new_empty(P, H)
    grouped_gemm(h, w2, y, topk_weights_flat, aligned, num_sorted, 1, True, config)
    y = y.view(T, top_k, H)
    return y.sum(dim=1) if reduce else y
