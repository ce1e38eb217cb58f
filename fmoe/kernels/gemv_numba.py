"""The compiled kernels behind `fmoe.kernels.cpu_gemv` (numba; cached on disk). Imported on
first use, so that importing fmoe does not load numba.

Every matrix-vector product here goes through `_dot4`: four weight rows a quarter of the matrix
apart, widened from bf16 in registers and summed in fp32, so that each row's sum is computed the
same way whichever kernel, expert count or thread count it runs under."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from ..files import numba_cache

CACHE = numba_cache(__file__)     # before the kernels below are made: where they are cached


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


@numba.njit(inline="always", cache=CACHE)
def to_bf16(v):  # pragma: no cover - compiled
    """float32 -> bf16 bits, rounded to nearest even; a NaN stays a (quiet) NaN."""
    u = f32_bits(v)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16(u >> np.uint32(16))


@numba.njit(inline="always", cache=CACHE)
def bf16_round(v):  # pragma: no cover - compiled
    """float32 -> the nearest bf16 value, as a float32 (exact)."""
    return bf16_to_f32(to_bf16(v))


@numba.njit(inline="always", cache=CACHE)
def _dot4(w, s, n, q, x, r):  # pragma: no cover - compiled
    """fp32 sums of rows n, n+q, n+2q, n+3q of w[s] (uint16 bf16 bits [S, N, K]) times x[r]
    (float32). The callers step n by one over a quarter of the rows, so each of the four is
    one long sequential read (adjacent rows are adjacent in memory), which the hardware
    prefetchers follow far better than four adjacent rows that restart every row (1.2-1.7x the
    read rate on the development machine, most for short rows)."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for k in range(w.shape[2]):
        xk = x[r, k]
        a0 += bf16_to_f32(w[s, n, k]) * xk
        a1 += bf16_to_f32(w[s, n + q, k]) * xk
        a2 += bf16_to_f32(w[s, n + 2 * q, k]) * xk
        a3 += bf16_to_f32(w[s, n + 3 * q, k]) * xk
    return a0, a1, a2, a3


@numba.njit(inline="always", cache=CACHE)
def _dot1(w, s, n, x, r):  # pragma: no cover - compiled
    a = np.float32(0.0)
    for k in range(w.shape[2]):
        a += bf16_to_f32(w[s, n, k]) * x[r, k]
    return a


@numba.njit(parallel=True, fastmath=True, cache=CACHE)
def gemv(w, x, bias, out):  # pragma: no cover - compiled
    """out [R, N] uint16 (bf16 bits) = x [R, K] float32 @ w.T (+ bias [N] float32 when it has
    N entries; empty: none), w [N, K] uint16 (bf16 bits): four rows of w a quarter of the
    matrix apart per step, each widened in registers, summed in fp32, the bias added to the
    fp32 sum and the result rounded once (as torch's addmm); every row of x is summed in the
    same order whatever R is."""
    N, K = w.shape
    w3 = w.reshape(1, N, K)
    q = N // 4
    has_bias = bias.shape[0] == N
    for n in prange(q):
        for r in range(x.shape[0]):
            a0, a1, a2, a3 = _dot4(w3, 0, n, q, x, r)
            if has_bias:
                a0 += bias[n]
                a1 += bias[n + q]
                a2 += bias[n + 2 * q]
                a3 += bias[n + 3 * q]
            out[r, n] = to_bf16(a0)
            out[r, n + q] = to_bf16(a1)
            out[r, n + 2 * q] = to_bf16(a2)
            out[r, n + 3 * q] = to_bf16(a3)
    for m in range(4 * q, N):           # the rows beyond a multiple of four
        for r in range(x.shape[0]):
            a = _dot1(w3, 0, m, x, r)
            if has_bias:
                a += bias[m]
            out[r, m] = to_bf16(a)


@numba.njit(inline="always", cache=CACHE)
def _products(w, slots, row0, rows, x, each, out):  # pragma: no cover - compiled
    """out[j, i] (float32, bf16 values) = row row0 + i of w[slots[j]] . x[j if each else 0],
    for i < rows: four rows a quarter of the rows apart per parallel item (`_dot4`), for every
    matrix. A sum depends only on its row and x, never on how many matrices there are."""
    q = rows // 4
    for item in prange(slots.shape[0] * q):
        j = item // q
        i = item - j * q
        r = j if each else 0
        a0, a1, a2, a3 = _dot4(w, slots[j], row0 + i, q, x, r)
        out[j, i] = bf16_round(a0)
        out[j, i + q] = bf16_round(a1)
        out[j, i + 2 * q] = bf16_round(a2)
        out[j, i + 3 * q] = bf16_round(a3)
    for j in range(slots.shape[0]):     # the rows beyond a multiple of four
        for m in range(4 * q, rows):
            out[j, m] = bf16_round(_dot1(w, slots[j], row0 + m, x, j if each else 0))


@numba.njit(inline="always", cache=CACHE)
def _silu_mul(g, u):  # pragma: no cover - compiled
    """bf16(bf16(silu(g)) * u) for bf16 values g, u (float32), silu in fp32."""
    return bf16_round(bf16_round(g / (np.float32(1.0) + np.exp(-g))) * u)


@numba.njit(parallel=True, fastmath=True, cache=CACHE, error_model="numpy")
def swiglu(wg, g0, wu, u0, wd, slots, x, y):  # pragma: no cover - compiled
    """y [J, H] uint16 (bf16 bits): for each j, with s = slots[j], the SwiGLU expert
    ``wd[s] @ (silu(g) * u)`` on x [1, H] float32 (bf16 values), where g and u are rows
    g0..g0+I of wg[s] and u0..u0+I of wu[s] times x (wg/wu [S, *, H], wd [S, H, I], uint16
    bf16 bits; a stacked [S, 2I, H] gate-then-up tensor passes as wg = wu with u0 = I).

    Rounded to bf16 where torch's bf16 ops round: g and u, silu(g) (computed in fp32), its
    product with u, and each output. Two parallel passes: four gate rows and the four matching
    up rows per item (then their activations), and the down rows."""
    J = slots.shape[0]
    S, H, inter = wd.shape
    for j in range(J):
        if slots[j] < 0 or slots[j] >= S:
            raise IndexError("swiglu: an expert slot is out of range")
    act = np.empty((J, inter), np.float32)
    q = inter // 4
    for item in prange(J * q):
        j = item // q
        i = item - j * q
        s = slots[j]
        a0, a1, a2, a3 = _dot4(wg, s, g0 + i, q, x, 0)
        b0, b1, b2, b3 = _dot4(wu, s, u0 + i, q, x, 0)
        act[j, i] = _silu_mul(bf16_round(a0), bf16_round(b0))
        act[j, i + q] = _silu_mul(bf16_round(a1), bf16_round(b1))
        act[j, i + 2 * q] = _silu_mul(bf16_round(a2), bf16_round(b2))
        act[j, i + 3 * q] = _silu_mul(bf16_round(a3), bf16_round(b3))
    for j in range(J):                  # the rows beyond a multiple of four
        for m in range(4 * q, inter):
            act[j, m] = _silu_mul(bf16_round(_dot1(wg, slots[j], g0 + m, x, 0)),
                                  bf16_round(_dot1(wu, slots[j], u0 + m, x, 0)))
    res = np.empty((J, H), np.float32)
    _products(wd, slots, 0, H, act, True, res)
    for j in range(J):
        for n in range(H):
            y[j, n] = to_bf16(res[j, n])


@numba.njit(parallel=True, fastmath=True, cache=CACHE, error_model="numpy")
def mla_decode(q_nope, q_pe, w_uk_t, latent, k_pe, keep, w_uv, scale, out):  # pragma: no cover
    """Multi-head latent attention for one query row, in latent space, a head per parallel item.

    q_nope [h, nope], q_pe [h, rope] float32 (bf16 values); w_uk_t [h, r, nope], w_uv [h, v, r],
    latent [S, r], k_pe [S, rope] uint16 bf16 bits; keep [S] bool (the key mask); scale: the
    softmax scale. out [h, v] uint16: ``w_uv[h] @ softmax(scale * (q_lat . latent + q_pe .
    k_pe)) @ latent`` with ``q_lat = w_uk_t[h] @ q_nope[h]``. Rounded to bf16 where the
    torch path rounds (q_lat, the attention's output, the result); fp32 in between."""
    heads, rank, nope = w_uk_t.shape
    S, rope = k_pe.shape
    v_dim = w_uv.shape[1]
    for h in prange(heads):
        q_lat = np.empty((1, rank), np.float32)
        q = rank // 4
        for i in range(q):
            a0, a1, a2, a3 = _dot4(w_uk_t, h, i, q, q_nope, h)
            q_lat[0, i] = bf16_round(a0)
            q_lat[0, i + q] = bf16_round(a1)
            q_lat[0, i + 2 * q] = bf16_round(a2)
            q_lat[0, i + 3 * q] = bf16_round(a3)
        for i in range(4 * q, rank):
            q_lat[0, i] = bf16_round(_dot1(w_uk_t, h, i, q_nope, h))
        scores = np.empty(S, np.float32)
        top = -np.inf
        for s in range(S):
            if keep[s]:
                a = np.float32(0.0)
                for i in range(rank):
                    a += q_lat[0, i] * bf16_to_f32(latent[s, i])
                for j in range(rope):
                    a += q_pe[h, j] * bf16_to_f32(k_pe[s, j])
                a *= scale
                scores[s] = a
                top = max(top, a)
        total = np.float32(0.0)
        for s in range(S):
            if keep[s]:
                p = np.exp(scores[s] - top)
                scores[s] = p
                total += p
            else:
                scores[s] = 0.0
        ctx = np.zeros((1, rank), np.float32)
        for s in range(S):
            p = scores[s]
            if p != 0.0:
                for i in range(rank):
                    ctx[0, i] += p * bf16_to_f32(latent[s, i])
        for i in range(rank):
            ctx[0, i] = bf16_round(ctx[0, i] / total)
        q = v_dim // 4
        for c in range(q):
            a0, a1, a2, a3 = _dot4(w_uv, h, c, q, ctx, 0)
            out[h, c] = to_bf16(a0)
            out[h, c + q] = to_bf16(a1)
            out[h, c + 2 * q] = to_bf16(a2)
            out[h, c + 3 * q] = to_bf16(a3)
        for c in range(4 * q, v_dim):
            out[h, c] = to_bf16(_dot1(w_uv, h, c, ctx, 0))


@numba.njit(cache=CACHE, error_model="numpy")
def rms_norm(x, w, eps, out):  # pragma: no cover - compiled
    """out [H] uint16 = bf16(w * bf16(x / sqrt(mean(x^2) + eps))): x, w [H] uint16 bf16 bits,
    the statistics in fp32 (as the models' RMSNorm on a bf16 row)."""
    H = x.shape[0]
    ss = np.float32(0.0)
    for i in range(H):
        v = bf16_to_f32(x[i])
        ss += v * v
    r = np.float32(1.0) / np.sqrt(ss / np.float32(H) + np.float32(eps))
    for i in range(H):
        out[i] = to_bf16(bf16_to_f32(w[i]) * bf16_round(bf16_to_f32(x[i]) * r))


@numba.njit(cache=CACHE)
def rope(x, cos, sin, interleaved, out):  # pragma: no cover - compiled
    """Rotary embedding of rows x [n, D] uint16 (bf16 bits) by cos, sin [D] (bf16 bits):
    ``x * cos + rotate_half(x) * sin``, each product and the sum rounded to bf16 as torch's
    bf16 ops round. `interleaved`: x's pairs (x0, x1), (x2, x3), ... are first reordered to
    evens then odds (DeepSeek's layout), as `deinterleave` does."""
    n, D = x.shape
    half = D // 2
    for r in range(n):
        for j in range(D):
            if interleaved:
                xj = x[r, 2 * j] if j < half else x[r, 2 * (j - half) + 1]
                o = j + half if j < half else j - half
                xo = x[r, 2 * o] if o < half else x[r, 2 * (o - half) + 1]
            else:
                xj = x[r, j]
                xo = x[r, j + half] if j < half else x[r, j - half]
            a = bf16_to_f32(xj)
            b = bf16_to_f32(xo)
            if j < half:
                b = -b
            out[r, j] = to_bf16(bf16_round(a * bf16_to_f32(cos[j])) + bf16_round(b * bf16_to_f32(sin[j])))
