"""Routed experts computed on the host, from where their weights live (`execution="host"|"hybrid"`).

A layer's missed experts that the placement rule keeps off the device are computed here, by a
small pool of worker threads running torch CPU ops, while the forward thread runs the resident
experts on the device and the copy engine loads others. On CUDA the activations come to host
memory and the results go back; on a CPU-only machine host and device coincide and the pool
computes beside the forward thread, straight from the weights' host copies.

Weights come, per expert, from (first that applies):

* a memory map of the checkpoint file when the expert's tensors are stored in the run dtype
  (the page cache holds them; nothing is copied), as llama.cpp runs ``--cpu-moe``;
* otherwise the store's own read path (`ExpertStore.read_into`: its host tier, else the disk)
  into a buffer of the worker's, converted to the run dtype.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import CheckpointError, ExpertReadError
from ..kernels.torch_moe import swiglu_expert
from ..models.mapped import MappedFiles, _span


class HostWeights:
    """w13 [2I, H] and w2 [H, I] of any expert `key`, in `dtype`, on the host."""

    def __init__(self, store, dtype: torch.dtype, mmap: bool = True):
        self.store = store
        self.dtype = dtype
        self.hidden, self.inter = store.hidden, store.inter
        self._files = MappedFiles() if mmap else None
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _mapped(self, key: int):
        """Views into the memory-mapped checkpoint, or None when the layout does not allow
        them (another dtype, gate and up apart, ...)."""
        with self._lock:
            if key in self._views:
                return self._views[key]
            lay = self.store.layout(key)
            got = None
            if lay.dtype == self.dtype:
                s13, s2 = _span(lay.w13), _span(lay.w2)
                H, inter = self.hidden, self.inter
                apart = self._files.gate_up(lay.w13, lay.dtype, inter, H) if s13 is None else None
                if s2 is not None and apart is not None:     # gate and up apart: two views
                    got = (apart, self._files.view(*s2, lay.dtype, (H, inter)))
                elif s13 is not None and s2 is not None:
                    got = (self._files.view(*s13, lay.dtype, (2 * inter, H)),
                           self._files.view(*s2, lay.dtype, (H, inter)))
            self._views[key] = got
            return got

    def get(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._files is not None:
            got = self._mapped(key)
            if got is not None:
                return got
        buf = getattr(self._local, "buf", None)
        if buf is None:      # one pair per worker thread, reused (the store's dtype is the run dtype)
            buf = self._local.buf = self.store.new_staging()
        try:
            self.store.read_into(key, buf[0], buf[1])
        except CheckpointError as e:        # as the copy engine reports a failed load
            E = self.store.num_experts
            raise ExpertReadError(f"cannot read expert {key // E}/{key % E} (layer/expert) for the "
                                  f"host: {e}") from e
        return buf


def expert_terms(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 experts: list[int], weights) -> torch.Tensor:
    """The weighted outputs of the (token, k) pairs routed to `experts`, zero elsewhere.

    x [T, H] (host), topk_weights [T, K], topk_ids [T, K] expert ids; `weights(e)` gives
    (w13 [2I, H], w2 [H, I]) of expert e. Returns [T, K, H] in x's dtype: row (t, k) is
    ``topk_weights[t, k] * w2 @ (silu(w13[:I] @ x[t]) * (w13[I:] @ x[t]))`` when
    ``topk_ids[t, k]`` is in `experts`. Each expert sees its rows in token order, as the
    device's gather path does."""
    T, K = topk_ids.shape
    H = x.shape[1]
    y = x.new_zeros(T * K, H)
    flat = topk_ids.reshape(-1)
    for e in experts:
        pairs = torch.nonzero(flat == e).flatten()
        if pairs.numel() == 0:
            continue
        w13, w2 = weights(e)
        y[pairs] = swiglu_expert(x[pairs // K], w13, w2)
    return y.view(T, K, H) * topk_weights.to(y.dtype).unsqueeze(-1)


class HostExecutor:
    """A pool of `workers` threads computing routed experts on the host.

    `submit` returns a Future of (the [T, K, H] terms (`expert_terms`), seconds it took); its
    exception, if any,
    is raised by `Future.result()` in the caller. `close` cancels queued work, waits for the
    running job and refuses later submissions (idempotent)."""

    def __init__(self, weights: HostWeights, workers: int = 1):
        if workers < 1:
            raise ValueError(f"host workers must be >= 1, got {workers}")
        self.weights = weights
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fmoe-host")
        self._closed = False
        self._lock = threading.Lock()

    def submit(self, layer: int, num_experts: int, x: torch.Tensor, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor, experts: list[int]) -> Future:
        """Compute the pairs of `experts` (ids within MoE layer `layer`) on the host. x, the
        weights and the ids must already be host tensors the caller no longer writes."""
        base = layer * num_experts
        get = self.weights.get

        def job():
            t0 = time.perf_counter()
            with torch.no_grad():
                terms = expert_terms(x, topk_weights, topk_ids, experts, lambda e: get(base + e))
            return terms, time.perf_counter() - t0

        with self._lock:
            if self._closed:
                raise RuntimeError("the host executor is closed")
            return self._pool.submit(job)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
