"""Expert store: the bytes of every routed expert, on disk and in a bounded host tier.

Headers are parsed once (`fmoe.io.checkpoint.CheckpointIndex`); one expert is read with one
`preadv` per tensor segment straight into a preallocated buffer. The host tier keeps recently
read experts in host memory (pinned when the device is CUDA) up to a byte budget, so a re-load
skips the disk; without a tier the OS page cache plays that role.

FP8 block-scaled experts (DeepSeek-V3/R1, Kimi-K2, Qwen3 -FP8) stay FP8 here: the disk read, the
host tier and the copy to the device move the FP8 weights plus their scales (`read_raw_into`),
about half the bytes of bf16, and the expert is dequantised into its slot at the end of the
way (`dequantize_into`: on the device for CUDA, at read on CPU). `expert_bytes` is what one load
moves: FP8 plus scales for such a store, the cache dtype's size otherwise.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ..io.checkpoint import FileReader
from ..io.fp8 import dequantize_expert, expert_scale_shapes
from ..io.layout import ExpertLayout, read_expert


class ExpertStore:
    """Reads expert `key = layer * E + expert` into (w13 [2I, H], w2 [H, I]) CPU tensors."""

    def __init__(self, layouts: list[list[ExpertLayout]], hidden: int, inter: int,
                 dtype: torch.dtype, host_bytes: int = 0, pin: bool = False,
                 reader: FileReader | None = None):
        self.layouts = layouts
        self.num_experts = len(layouts[0])
        self.hidden, self.inter = hidden, inter
        self.dtype = dtype                   # the device cache's dtype
        lay0 = layouts[0][0]
        self.src_dtype = lay0.dtype          # the checkpoint's dtype
        self.reader = reader or FileReader()
        self.pin = pin
        self.quantized = lay0.quantized      # FP8 weights + scales until the slot
        self.block = lay0.block
        if self.quantized:
            self.raw_shapes = ((2 * inter, hidden), (hidden, inter), *expert_scale_shapes(hidden, inter, lay0.block))
            self.raw_dtypes = (lay0.dtype, lay0.dtype, lay0.scale_dtype, lay0.scale_dtype)
            self.expert_bytes = sum(_numel(s) * d.itemsize for s, d in zip(self.raw_shapes, self.raw_dtypes))
        else:
            self.expert_bytes = 3 * hidden * inter * dtype.itemsize
        self.host_capacity = host_bytes // self.host_entry_bytes() if host_bytes else 0
        # key -> buffers as the tier keeps them: (w13, w2) in the cache dtype, or the raw
        # (q13, q2, s13, s2) of an FP8 expert
        self._host: OrderedDict[int, tuple[torch.Tensor, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()      # per reader thread: raw buffers for read_into
        self.disk_reads = 0

    def host_entry_bytes(self) -> int:
        """Bytes one host-tier entry takes. Pinned, each of its tensors comes from torch's
        caching host allocator, which rounds every block up to a power of two (a 17.3 MB
        DeepSeek-V2-Lite expert pins 24 MiB): the tier's budget counts what is pinned."""
        if self.quantized:
            sizes = [_numel(s) * d.itemsize for s, d in zip(self.raw_shapes, self.raw_dtypes)]
        else:
            sizes = [2 * self.hidden * self.inter * self.dtype.itemsize, self.hidden * self.inter * self.dtype.itemsize]
        return sum(1 << (n - 1).bit_length() for n in sizes) if self.pin else sum(sizes)

    def layout(self, key: int) -> ExpertLayout:
        return self.layouts[key // self.num_experts][key % self.num_experts]

    def _empty(self, dtype):
        w13 = torch.empty(2 * self.inter, self.hidden, dtype=dtype, pin_memory=self.pin)
        w2 = torch.empty(self.hidden, self.inter, dtype=dtype, pin_memory=self.pin)
        return w13, w2

    def new_staging(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A pair of buffers in the cache dtype (pinned on CUDA) for `read_into`."""
        return self._empty(self.dtype)

    def new_raw_staging(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
        """Buffers for one expert as stored (FP8 store): (q13 [2I, H], q2 [H, I] float8,
        s13 [2, ceil(I/b0), ceil(H/b1)], s2 [ceil(H/b0), ceil(I/b1)]), pinned on CUDA, or on
        `device` when given."""
        if not self.quantized:
            raise ValueError("new_raw_staging: this store's experts are not FP8")
        kw = {"pin_memory": self.pin} if device is None else {"device": device}
        return tuple(torch.empty(s, dtype=d, **kw) for s, d in zip(self.raw_shapes, self.raw_dtypes))

    def read_raw_into(self, key: int, raw: tuple[torch.Tensor, ...]) -> None:
        """Fill `raw` (from `new_raw_staging`) with FP8 expert `key`, from the host tier or disk."""
        with self._lock:
            hit = self._host.get(key)
            if hit is not None:
                # copied under the lock: another reader's `_keep` reuses an evicted entry's
                # memory in place
                self._host.move_to_end(key)
                for dst, src in zip(raw, hit):
                    dst.copy_(src)
                return
        read_expert(self.reader, self.layout(key), *raw)
        self.disk_reads += 1
        if self.host_capacity:
            self._keep(key, raw)

    def dequantize_into(self, raw: tuple[torch.Tensor, ...], w13: torch.Tensor, w2: torch.Tensor) -> None:
        """An FP8 expert's raw buffers (any device) into slot tensors w13 [2I, H], w2 [H, I]."""
        dequantize_expert(*raw, self.block, w13, w2)

    def read_into(self, key: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Fill w13 [2I, H], w2 [H, I] (contiguous CPU, cache dtype) with expert `key`. An FP8
        expert is read as FP8 plus scales and dequantised here (the CPU path)."""
        if self.quantized:
            raw = getattr(self._local, "raw", None)
            if raw is None:
                raw = self._local.raw = self.new_raw_staging(device="cpu")
            self.read_raw_into(key, raw)
            self.dequantize_into(raw, w13, w2)
            return
        with self._lock:
            hit = self._host.get(key)
            if hit is not None:             # copied under the lock, as in `read_raw_into`
                self._host.move_to_end(key)
                w13.copy_(hit[0])
                w2.copy_(hit[1])
                return
        if self.src_dtype == self.dtype:
            read_expert(self.reader, self.layout(key), w13, w2)
        else:
            s13, s2 = self._empty(self.src_dtype)
            read_expert(self.reader, self.layout(key), s13, s2)
            w13.copy_(s13)
            w2.copy_(s2)
        self.disk_reads += 1
        if self.host_capacity:
            self._keep(key, (w13, w2))

    def _keep(self, key: int, tensors: tuple[torch.Tensor, ...]) -> None:
        with self._lock:
            if len(self._host) >= self.host_capacity:
                _, old = self._host.popitem(last=False)
                for o, t in zip(old, tensors):   # reuse the evicted entry's (pinned) memory
                    o.copy_(t)
                self._host[key] = old
            else:
                kept = []
                for t in tensors:
                    c = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
                    c.copy_(t)
                    kept.append(c)
                self._host[key] = tuple(kept)

    def host_resident(self) -> int:
        return len(self._host)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
