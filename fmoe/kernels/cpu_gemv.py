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

GEMV_MAX_ROWS = 1       # rows per product computed here (a decode step: one per expert, one token)


def _kernels():
    """`fmoe.kernels.gemv_numba.gemv`, imported on first use (numba takes a moment to load),
    and numba's `set_num_threads`."""
    global _gemv
    if _gemv is None:
        import numba

        from .gemv_numba import gemv

        def set_threads(n: int) -> None:
            numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))

        _gemv = gemv, set_threads
    return _gemv


_gemv = None


def warm() -> None:
    """Load the kernel (numba, then its cached machine code) and run it once."""
    linear(torch.zeros(1, 4, dtype=torch.bfloat16), torch.zeros(4, 4, dtype=torch.bfloat16))


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [R, K] bf16 @ w [N, K] bf16 .t() -> [R, N] bf16, on the CPU (fp32 sums)."""
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise ValueError(f"linear wants bf16 x and w, got {x.dtype} and {w.dtype}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w {tuple(w.shape)}")
    wu = w.contiguous().view(torch.int16).numpy().view(np.uint16)
    xf = x.float().contiguous().numpy()
    out = np.empty((x.shape[0], w.shape[0]), np.uint16)
    gemv, set_threads = _kernels()
    set_threads(torch.get_num_threads())    # as many threads as torch's products use
    gemv(wu, xf, out)
    return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)


def expert_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.t()`` (x [R, K], w [N, K]) for the routed experts: `linear` for up to
    GEMV_MAX_ROWS bf16 rows on the CPU, torch otherwise."""
    if (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.shape[0] <= GEMV_MAX_ROWS):
        return linear(x, w)
    return x @ w.t()
