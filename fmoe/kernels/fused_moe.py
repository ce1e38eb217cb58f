"""`fused_moe`: the one experts computation used by resident and offloaded runs alike."""

from __future__ import annotations

import functools

import torch

from .torch_moe import grouped_mm_unsupported_reason, moe_gather, moe_grouped_mm

BACKENDS = ("triton", "torch", "gather", "grouped_mm")

# CPU choice between the two torch paths, by T only (never by slot ids, so resident and
# offloaded runs take the same path). Both run the same per-slot GEMMs and differ in overhead:
# gather has a Python loop over the used slots, grouped_mm a fixed ~0.1-0.15 ms of sorting plus
# one C++ loop over all slots. Measured on the development machine (2-core Sapphire Rapids VM,
# torch 2.13.0+cpu with MKL, 1 thread, minimum process CPU time over alternating runs; redo with
# `python tools/bench_kernels.py --cpu-compare`), gather / grouped_mm in ms:
#   H=512  I=256   E=8  K=2 fp32:  T=1 0.29/0.42  T=2 0.40/0.51  T=3 0.43/0.53 (2 thr)  T=4 0.80/0.76
#                                  T=64 2.19/2.12  T=512 9.37/9.40
#   H=512  I=256   E=8  K=2 bf16:  T=1 0.38/0.53  T=2 0.56/0.66  T=4 1.18/1.14  T=512 8.53/7.86
#   H=1024 I=2816 E=16  K=4 bf16:  T=1 6.83/6.88  T=4 20.7/19.5  T=64 49.9/46.5  T=512 87.7/99.0
#   H=2048 I=1408 E=64  K=6 bf16:  T=1 11.0/10.8  T=4 39.4/35.7  T=64 120.8/112.6  T=512 330/304
#   H=2048 I=1408 E=64  K=6 fp32:  T=1 13.3/12.7  T=8 81.3/75.8  T=128 590/564  T=512 663/692
#   H=4096 I=14336 E=8  K=2 bf16:  T=1..512 within +-10% either way, run to run (bound by the
#                                  weight stream: 235 MB per expert)
# So: gather below 4 tokens (up to 1.5x faster on small layers, at most ~7% slower on large
# ones), grouped_mm from 4 tokens on (typically 3-9% faster). Under heavy background load the
# 2-thread runs were dominated by OpenMP stalls and told nothing either way.
_CPU_GROUPED_MM_MIN_TOKENS = 4


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        from . import triton_moe  # noqa: F401  (creates the @triton.jit kernels)
    except Exception as e:            # triton missing (ImportError), or a broken install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    return None


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """Why ``backend="triton"`` cannot run on ``device``, or None if it can."""
    error = _triton_import_error()
    if error is not None:
        return error
    from .triton_moe import is_interpreted
    device = torch.device(device)
    if device.type == "cuda" or is_interpreted():
        return None
    return (f"on {device.type}, Triton runs only under TRITON_INTERPRET=1, set before fmoe.kernels "
            f"first loads its Triton kernels")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` (``grouped_mm`` also depends on dtype and shapes)."""
    names = ["torch", "gather"]
    from .torch_moe import grouped_mm_available
    if grouped_mm_available():
        names.append("grouped_mm")
    if triton_unavailable_reason(device) is None:
        names.append("triton")
    return names


def _cpu_torch_backend(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> str:
    if x.shape[0] >= _CPU_GROUPED_MM_MIN_TOKENS and grouped_mm_unsupported_reason(x, w13, w2) is None:
        return "grouped_mm"
    return "gather"


def select_backend(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> str:
    """The backend ``backend=None`` runs: triton on CUDA (when available), else a torch path.

    The choice depends only on the device, dtype, shapes and T, never on the slot ids, so a
    resident and an offloaded run of the same batch take the same path.
    """
    if x.device.type == "cuda":
        if triton_unavailable_reason(x.device) is None:
            return "triton"
        return "gather"
    return _cpu_torch_backend(x, w13, w2)


def _check(x, w13, w2, topk_weights, topk_ids) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("fused_moe expects x [T, H], w13 [S, 2I, H], w2 [S, H, I]")
    T, H = x.shape
    S, two_i, h13 = w13.shape
    if h13 != H or w2.shape != (S, H, two_i // 2) or two_i % 2:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} "
                         f"must both be [T={T}, K]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"x, w13, w2 dtypes differ: {x.dtype}, {w13.dtype}, {w2.dtype}")


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, backend: str | None = None,
              reduce: bool = True) -> torch.Tensor:
    """SwiGLU experts indexed by slot.

    x [T, H]; w13 [S, 2I, H] (gate rows, then up rows); w2 [S, H, I]; topk_weights [T, K];
    topk_ids [T, K] int32/int64 slot ids. Returns [T, H] in x's dtype:
    ``out[t] = sum_k topk_weights[t,k] * w2[id] @ (silu(w13[id][:I] @ x[t]) * (w13[id][I:] @ x[t]))``.

    ``backend``: None picks by device (see ``select_backend``); "triton" the Triton kernel
    (CUDA, or the interpreter under TRITON_INTERPRET=1); "torch" the CPU-preferred PyTorch
    path; "gather" / "grouped_mm" a specific PyTorch path.

    The torch paths do not depend on how experts are numbered: each (t, k) pair is computed
    on its own and the K contributions are summed in k order, so resident and offloaded runs
    (different slot ids for the same experts) agree bit for bit.

    ``reduce=False`` returns the weighted per-pair terms [T, K, H] whose ``.sum(1)`` is the
    result: the offload runtime adds the terms of several cache-sized chunks of one layer and
    sums once, which keeps a chunked layer bit-identical to the resident one.
    """
    if backend not in (None, *BACKENDS):
        raise ValueError(f"unknown fused_moe backend {backend!r}; choose from {BACKENDS} or None")
    _check(x, w13, w2, topk_weights, topk_ids)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape) if reduce else x.new_zeros(0, topk_ids.shape[1], x.shape[1])
    if backend is None:
        backend = select_backend(x, w13, w2)
    elif backend == "torch":
        backend = _cpu_torch_backend(x, w13, w2) if x.device.type != "cuda" else "gather"

    if backend == "gather":
        return moe_gather(x, w13, w2, topk_weights, topk_ids, reduce)
    if backend == "grouped_mm":
        return moe_grouped_mm(x, w13, w2, topk_weights, topk_ids, reduce)
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"fused_moe backend 'triton' unavailable: {reason}")
    from .triton_moe import fused_moe_triton
    return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, reduce=reduce)
