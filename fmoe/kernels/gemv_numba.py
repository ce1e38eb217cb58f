"""The compiled kernel behind `fmoe.kernels.cpu_gemv` (numba; cached on disk). Imported on
first use, so that importing fmoe does not load numba."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic


@intrinsic
def bf16_to_f32(typingctx, h):
    """uint16 bf16 bits -> float32 (the bits shifted up: exact)."""
    def codegen(context, builder, signature, args):
        v = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def f32_bits(typingctx, f):
    """float32 -> its uint32 bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@numba.njit(inline="always", cache=True)
def to_bf16(v):  # pragma: no cover - compiled
    """float32 -> bf16 bits, rounded to nearest even; a NaN stays a (quiet) NaN."""
    u = f32_bits(v)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16(u >> np.uint32(16))


@numba.njit(parallel=True, fastmath=True, cache=True)
def gemv(w, x, out):  # pragma: no cover - compiled
    """out [R, N] uint16 (bf16 bits) = x [R, K] float32 @ w.T, w [N, K] uint16 (bf16 bits):
    four rows of w per step, each widened in registers, summed in fp32; every row of x is
    summed in the same order whatever R is."""
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
