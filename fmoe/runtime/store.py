"""Expert store: the bytes of every routed expert, on disk and in a bounded host tier.

Headers are parsed once (`fmoe.models.checkpoint.CheckpointIndex`); one expert is read with one
`preadv` per tensor segment straight into a preallocated buffer. The host tier keeps recently
read experts in host memory (pinned when the device is CUDA) up to a byte budget, so a re-load
skips the disk; without a tier the OS page cache plays that role.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ..models.checkpoint import FileReader
from ..models.loading import ExpertLayout, read_expert


class ExpertStore:
    """Reads expert `key = layer * E + expert` into (w13 [2I, H], w2 [H, I]) CPU tensors."""

    def __init__(self, layouts: list[list[ExpertLayout]], hidden: int, inter: int,
                 dtype: torch.dtype, host_bytes: int = 0, pin: bool = False,
                 reader: FileReader | None = None):
        self.layouts = layouts
        self.num_experts = len(layouts[0])
        self.hidden, self.inter = hidden, inter
        self.dtype = dtype                   # the device cache's dtype
        self.src_dtype = layouts[0][0].dtype  # the checkpoint's dtype
        self.reader = reader or FileReader()
        self.pin = pin
        self.expert_bytes = 3 * hidden * inter * dtype.itemsize
        self.host_capacity = host_bytes // self.expert_bytes if host_bytes else 0
        self._host: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.disk_reads = 0

    def layout(self, key: int) -> ExpertLayout:
        return self.layouts[key // self.num_experts][key % self.num_experts]

    def _empty(self, dtype):
        w13 = torch.empty(2 * self.inter, self.hidden, dtype=dtype, pin_memory=self.pin)
        w2 = torch.empty(self.hidden, self.inter, dtype=dtype, pin_memory=self.pin)
        return w13, w2

    def new_staging(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A pair of buffers in the cache dtype (pinned on CUDA) for `read_into`."""
        return self._empty(self.dtype)

    def read_into(self, key: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Fill w13 [2I, H], w2 [H, I] (contiguous CPU, cache dtype) with expert `key`."""
        with self._lock:
            hit = self._host.get(key)
            if hit is not None:
                self._host.move_to_end(key)
        if hit is not None:
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
            self._keep(key, w13, w2)

    def _keep(self, key: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        with self._lock:
            if len(self._host) >= self.host_capacity:
                _, (o13, o2) = self._host.popitem(last=False)
                o13.copy_(w13)       # reuse the evicted pair's (pinned) memory
                o2.copy_(w2)
                self._host[key] = (o13, o2)
            else:
                c13, c2 = self._empty(self.dtype)
                c13.copy_(w13)
                c2.copy_(w2)
                self._host[key] = (c13, c2)

    def host_resident(self) -> int:
        return len(self._host)
