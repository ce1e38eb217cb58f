"""bf16 matrix-vector products on the CPU, for decode (numba).

At batch 1 a MoE layer's routed experts are matrix-vector products, bound by how fast the
weights stream from memory. torch's bf16 product (oneDNN) streams them at about half the rate
of its fp32 one on the development machine's CPU, so the bf16 model decoded slower than
llama.cpp with the weights in memory; the kernels here widen four weight rows at a time to fp32
in registers and accumulate in fp32, and read each matrix as four long sequential streams
(rows a quarter of the matrix apart), which the hardware prefetchers follow (docs/benchmarks.md
§ Real scale on one box).

- `linear(x, w)`: ``x @ w.t()``, the models' `Linear` for one bf16 row.
- `mla_decode(...)`: DeepSeek's latent attention for one query row, all heads in one call.
- `rms_norm_row`, `rope_rows`: a decode row's norm and rotary embedding, one call each.
- `swiglu_rows(x, ...)`: whole SwiGLU experts on one row, several experts in one call (the
  routed experts of a decode step, a dense or shared MLP), so that a layer is one call rather
  than dozens of small torch ops.

`decode_row(x, *weights)` says whether a caller takes these kernels: it depends only on the
dtype, the device and the number of rows, and every path that computes experts (resident,
offloaded, mapped, on the host) asks it, so they still agree bit for bit.
Each result is rounded to bf16 once, from the fp32 sum (round to nearest even), as torch's
product rounds its fp32 accumulator; the order of the sum differs from torch's, so the bits
differ from torch's product by rounding.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

GEMV_MAX_ROWS = 1       # rows per product computed here (a decode step: one per expert, one token)

_kernels_mod = None
_local = threading.local()
_SLOT0 = np.zeros(1, np.int64)


_serial: threading.Lock | None = None    # set when numba's threading layer is not thread-safe
_load_lock = threading.Lock()


def _k():
    """`fmoe.kernels.gemv_numba`, imported on first use (numba takes a moment to load), with
    numba's thread count set to torch's for the calling thread (numba's count is per thread)."""
    global _kernels_mod, _serial
    if _kernels_mod is None:
        with _load_lock:
            if _kernels_mod is None:
                from . import gemv_numba

                # the layer is chosen at the first parallel call: make it here, alone. Numba's
                # "workqueue" layer (where neither OpenMP nor TBB is found) aborts the process
                # on concurrent calls (host workers beside the forward): serialise them there
                gemv_numba.gemv(np.zeros((4, 4), np.uint16), np.zeros((1, 4), np.float32),
                                np.empty(0, np.float32), np.empty((1, 4), np.uint16))
                import numba

                if numba.threading_layer() == "workqueue":
                    _serial = threading.Lock()
                _kernels_mod = gemv_numba
    n = torch.get_num_threads()
    if getattr(_local, "threads", None) != n:
        import numba
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        _local.threads = n
    return _kernels_mod


def _parallel(kernel, *args) -> None:
    """Call a parallel kernel; one at a time where numba's threading layer needs it."""
    lock = _serial
    if lock is None:
        kernel(*args)
    else:
        with lock:
            kernel(*args)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A contiguous bf16 tensor's storage as uint16 (no copy when already contiguous)."""
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _bf16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)


def warm() -> None:
    """Load the kernels (numba, then their cached machine code) and run each once."""
    x = torch.zeros(1, 4, dtype=torch.bfloat16)
    w = torch.zeros(4, 4, dtype=torch.bfloat16)
    linear(x, w)
    swiglu_rows(x, w[None], 0, w[None], 2, w[None, :, :2])
    sq = w[None, :2, :2]
    rms_norm_row(w[0], w[1], 1e-6)
    rope_rows(w, w[0], w[1], True)
    mla_decode(w[:1, :2], w[:1, 2:], sq, w[:, :2], w[:, 2:], torch.ones(4, dtype=torch.bool), sq, 1.0)


def _check_bf16(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype != torch.bfloat16 or t.device.type != "cpu":
            raise ValueError(f"the CPU GEMV kernels want bf16 CPU tensors, got {t.dtype} on {t.device}")


_NO_BIAS = np.empty(0, np.float32)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, K] bf16 @ w [N, K] bf16 .t() (+ bias [N]) -> [R, N] bf16, on the CPU (fp32 sums;
    the bias added to the sum before the one rounding, as torch's addmm)."""
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise ValueError(f"linear wants bf16 x and w, got {x.dtype} and {w.dtype}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w {tuple(w.shape)}")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"shape mismatch: bias {tuple(bias.shape)}, w {tuple(w.shape)}")
    k = _k()
    out = np.empty((x.shape[0], w.shape[0]), np.uint16)
    b = _NO_BIAS if bias is None else bias.detach().float().contiguous().numpy()
    _parallel(k.gemv, _bits(w), x.float().contiguous().numpy(), b, out)
    return _bf16(out)


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk_t: torch.Tensor, latent: torch.Tensor,
               k_pe: torch.Tensor, keep: torch.Tensor, w_uv: torch.Tensor, scale: float) -> torch.Tensor:
    """Multi-head latent attention of one query row in latent space, bf16 on the CPU.

    q_nope [h, nope], q_pe [h, rope]; w_uk_t [h, r, nope], w_uv [h, v, r] (kv_b_proj's halves,
    the latent last); latent [S, r], k_pe [S, rope] (the cache); keep [S] bool -> [h, v] bf16,
    ``w_uv[h] @ (softmax(scale * (q_lat . latent + q_pe . k_pe)) @ latent)`` per head, with
    ``q_lat = w_uk_t[h] @ q_nope[h]``."""
    _check_bf16(q_nope, q_pe, w_uk_t, latent, k_pe, w_uv)
    heads, rank, nope = w_uk_t.shape
    S, rope = k_pe.shape
    if (q_nope.shape != (heads, nope) or q_pe.shape != (heads, rope) or latent.shape != (S, rank)
            or keep.shape != (S,) or w_uv.shape[0] != heads or w_uv.shape[2] != rank):
        raise ValueError(f"shape mismatch: q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"w_uk_t {tuple(w_uk_t.shape)}, latent {tuple(latent.shape)}, "
                         f"k_pe {tuple(k_pe.shape)}, keep {tuple(keep.shape)}, w_uv {tuple(w_uv.shape)}")
    k = _k()
    out = np.empty((heads, w_uv.shape[1]), np.uint16)
    _parallel(k.mla_decode, q_nope.float().contiguous().numpy(), q_pe.float().contiguous().numpy(), _bits(w_uk_t),
                 _bits(latent), _bits(k_pe), keep.contiguous().numpy(), _bits(w_uv), np.float32(scale), out)
    return _bf16(out)


def rms_norm_row(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The models' RMSNorm of one bf16 row x [H] with a bf16 weight w [H] -> [H] bf16."""
    _check_bf16(x, w)
    if x.shape != w.shape or x.dim() != 1:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w {tuple(w.shape)}")
    out = np.empty(x.shape[0], np.uint16)
    _k().rms_norm(_bits(x), _bits(w), eps, out)
    return _bf16(out)


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x [n, D] bf16 at one position (cos, sin [D] bf16) -> [n, D] bf16:
    ``x * cos + rotate_half(x) * sin`` after `deinterleave` when `interleaved`, bit for bit
    what those torch ops give."""
    _check_bf16(x, cos, sin)
    if x.dim() != 2 or cos.shape != (x.shape[1],) or sin.shape != cos.shape or x.shape[1] % 2:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    out = np.empty(tuple(x.shape), np.uint16)
    _k().rope(_bits(x), _bits(cos), _bits(sin), interleaved, out)
    return _bf16(out)


def swiglu_rows(x: torch.Tensor, wg: torch.Tensor, g0: int, wu: torch.Tensor, u0: int,
                wd: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU experts on one row: x [1, H] bf16; for each j, with s = slots[j], gate rows
    g0..g0+I of wg[s], up rows u0..u0+I of wu[s] (wg/wu [S, *, H]) and down wd[s] [H, I] ->
    y [J, H] bf16, ``y[j] = wd[s] @ (silu(g) * u)``. A stacked [S, 2I, H] gate-then-up tensor
    passes as wg = wu = w13, g0 = 0, u0 = I; one expert or a dense MLP as its weights with a
    leading dimension of one and no slots (slot 0)."""
    _check_bf16(x, wg, wu, wd)
    S, H, inter = wd.shape
    if (x.shape != (1, H) or wg.shape[0] != S or wu.shape[0] != S or wg.shape[2] != H
            or wu.shape[2] != H or g0 + inter > wg.shape[1] or u0 + inter > wu.shape[1]):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, wg {tuple(wg.shape)} from {g0}, "
                         f"wu {tuple(wu.shape)} from {u0}, wd {tuple(wd.shape)}")
    # the kernel checks the slots' range
    ids = _SLOT0 if slots is None else slots.to(torch.int64).contiguous().numpy()
    k = _k()
    wg_u = _bits(wg)
    wu_u = wg_u if wu is wg else _bits(wu)
    y = np.empty((ids.size, H), np.uint16)
    _parallel(k.swiglu, wg_u, g0, wu_u, u0, _bits(wd), ids, x.float().contiguous().numpy(), y)
    return _bf16(y)


def decode_row(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether x (and `weights`) are the kernels' case: one bf16 row on the CPU (x.numel() ==
    x.shape[-1], a decode step). Every caller decides by this alone (dtype, device, rows), so
    resident, offloaded, mapped and host runs take the same path and agree bit for bit."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1] > 0
            and all(w.dtype == torch.bfloat16 for w in weights)
            # the kernels work on numpy arrays: a forward that records gradients stays in torch
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))))


def expert_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.t()`` (x [R, K], w [N, K]): `linear` for up to GEMV_MAX_ROWS bf16 rows on the
    CPU, torch otherwise."""
    if (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.shape[0] <= GEMV_MAX_ROWS):
        return linear(x, w)
    return x @ w.t()
