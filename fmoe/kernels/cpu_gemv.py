"""bf16 matrix-vector products on the CPU, for decode (numba).

At batch 1 a MoE layer's routed experts are matrix-vector products, bound by how fast the
weights stream from memory. torch's bf16 product (oneDNN) streams them at about half the rate
of its fp32 one on the development machine's CPU, so the bf16 model decoded slower than
llama.cpp with the weights in memory; `linear` here widens four weight rows at a time to fp32 in
registers and accumulates in fp32 (docs/benchmarks.md § Real scale on one box).

`expert_linear(x, w)` is ``x @ w.t()`` for the experts' computation: this kernel for bf16 rows
on the CPU, one row at a time (so a row's result does not depend on the batch it came in), and
torch otherwise. The choice depends only on the dtype, the device and the number of rows, and
every path that computes experts (resident, offloaded, mapped, on the host) calls it, so they
still agree bit for bit. The result is rounded to bf16 once, from the fp32 sum (round to nearest
even), as torch's product rounds its fp32 accumulator; the order of the sum differs from
torch's, so the bits differ from torch's product by rounding.
"""

from __future__ import annotations

import numpy as np
import torch

GEMV_MAX_ROWS = 1       # rows per expert call computed here (a decode step routes one each)


def _kernels():
    global _gemv
    if _gemv is None:
        _gemv = _build()
    return _gemv


_gemv = None


def _build():
    import numba
    from llvmlite import ir
    from numba import prange, types
    from numba.extending import intrinsic

    @intrinsic
    def bf16_to_f32(typingctx, h):
        def codegen(context, builder, signature, args):
            v = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(v, ir.FloatType())
        return types.float32(types.uint16), codegen

    @intrinsic
    def f32_bits(typingctx, f):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.uint32(types.float32), codegen

    @numba.njit(inline="always")
    def to_bf16(v):  # pragma: no cover - compiled
        u = f32_bits(v)
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):      # NaN: stays a quiet NaN
            return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
        u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
        return np.uint16(u >> np.uint32(16))

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def gemv(w, x, out):  # pragma: no cover - compiled
        """out [R, N] uint16 (bf16 bits) = x [R, K] float32 @ w.T, w [N, K] uint16 (bf16
        bits): four rows of w per step, each widened in registers, summed in fp32."""
        N, K = w.shape
        R = x.shape[0]
        nb = (N + 3) // 4
        for b in prange(nb):
            n = b * 4
            if n + 4 <= N:
                for r in range(R):
                    a0 = np.float32(0.0)
                    a1 = np.float32(0.0)
                    a2 = np.float32(0.0)
                    a3 = np.float32(0.0)
                    for k in range(K):
                        xk = x[r, k]
                        a0 += bf16_to_f32(w[n, k]) * xk
                        a1 += bf16_to_f32(w[n + 1, k]) * xk
                        a2 += bf16_to_f32(w[n + 2, k]) * xk
                        a3 += bf16_to_f32(w[n + 3, k]) * xk
                    out[r, n] = to_bf16(a0)
                    out[r, n + 1] = to_bf16(a1)
                    out[r, n + 2] = to_bf16(a2)
                    out[r, n + 3] = to_bf16(a3)
            else:
                for m in range(n, N):
                    for r in range(R):
                        a = np.float32(0.0)
                        for k in range(K):
                            a += bf16_to_f32(w[m, k]) * x[r, k]
                        out[r, m] = to_bf16(a)

    return gemv


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [R, K] bf16 @ w [N, K] bf16 .t() -> [R, N] bf16, on the CPU (fp32 sums)."""
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise ValueError(f"linear wants bf16 x and w, got {x.dtype} and {w.dtype}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w {tuple(w.shape)}")
    wu = w.contiguous().view(torch.int16).numpy().view(np.uint16)
    xf = x.float().contiguous().numpy()
    out = np.empty((x.shape[0], w.shape[0]), np.uint16)
    _kernels()(wu, xf, out)
    return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)


def expert_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.t()`` (x [R, K], w [N, K]) for the routed experts: `linear` for up to
    GEMV_MAX_ROWS bf16 rows on the CPU, torch otherwise."""
    if (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.shape[0] <= GEMV_MAX_ROWS):
        return linear(x, w)
    return x @ w.t()
