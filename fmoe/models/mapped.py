"""Routed experts memory-mapped from the checkpoint files, on CPU: the page-cache way.

This is how llama.cpp (mmap, the default) and safetensors' ``safe_open`` run a model larger than
RAM: every expert is addressable, the OS reads pages in on first touch and the page cache decides
what stays. Loading is instant and nothing is copied; a model that does not fit still runs, at
the speed of the page cache. fmoe uses it for ``expert_cache=None`` on CPU when the experts do
not fit in memory (or when asked with ``expert_cache="mmap"``), and as the baseline of the
real-scale benchmarks.

The mapping is private and read-only (``MAP_PRIVATE``, ``PROT_READ``): pages stay shared with
the page cache, never dirty, and count against a memory cgroup as page cache, which the kernel
reclaims. Read-only also means no commit charge: a writable private mapping of a file larger
than RAM (the expert store's single `experts.bin`) is refused with ENOMEM under the kernel's
default overcommit heuristic.
"""

from __future__ import annotations

import mmap
import warnings
from pathlib import Path

import torch

from ..kernels.torch_moe import GateUp, moe_gather
from .experts import Experts


class MappedFiles:
    """One private read-only mapping per checkpoint file."""

    def __init__(self):
        self._maps: dict[Path, mmap.mmap] = {}

    def view(self, file: Path, offset: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """A tensor over bytes [offset, offset + nbytes) of `file`. Read-only: the kernels only
        read expert weights; a write would fault."""
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
            self._maps[file] = mm
        count = nbytes // dtype.itemsize
        with warnings.catch_warnings():
            # torch warns that it has no read-only tensors; these are never written
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(mm, dtype=dtype, count=count, offset=offset).view(shape)

    def gate_up(self, segs, dtype: torch.dtype, inter: int, hidden: int) -> GateUp | None:
        """An expert's w13 segments as two views (gate [I, H], up [I, H]) when they are the two
        whole matrices lying apart (Mixtral's w1, w2, w3 order), else None."""
        if len(segs) != 2 or any(s.nbytes != inter * hidden * dtype.itemsize for s in segs):
            return None
        return GateUp(*(self.view(s.info.file, s.info.offset + s.byte_offset, s.nbytes, dtype,
                                  (inter, hidden)) for s in segs))

    def advise(self, advice: int) -> None:
        for mm in self._maps.values():
            try:
                mm.madvise(advice)
            except (OSError, AttributeError, ValueError):
                pass


class _ExpertList:
    """A per-expert list of tensors that `moe_gather` indexes like a stacked [E, ...] tensor."""

    def __init__(self, tensors: list):
        self.tensors = tensors
        self.shape = (len(tensors), *tensors[0].shape)
        self.dtype = tensors[0].dtype

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tensors[i]

    def __len__(self) -> int:
        return len(self.tensors)


class MappedExperts(Experts):
    """Every expert of one layer as views into the mapped checkpoint: w13[e] is [2I, H] (gate
    rows then up rows), w2[e] is [H, I]. Computed by the gather path (a loop over the routed experts), so
    only the routed experts' pages are touched."""

    def __init__(self, moe_layer: int, w13: list[torch.Tensor], w2: list[torch.Tensor]):
        super().__init__()
        self.moe_layer = moe_layer
        self.w13 = _ExpertList(w13)
        self.w2 = _ExpertList(w2)

    def forward(self, x, topk_weights, topk_ids, router_probs=None):
        return moe_gather(x, self.w13, self.w2, topk_weights, topk_ids)


def _span(segments) -> tuple[Path, int, int] | None:
    """(file, offset, nbytes) when `segments` are back to back in one file, else None."""
    file, start = segments[0].info.file, segments[0].info.offset + segments[0].byte_offset
    end = start
    for s in segments:
        off = s.info.offset + s.byte_offset
        if s.info.file != file or off != end:
            return None
        end = off + s.nbytes
    return file, start, end - start


def install_mapped_experts(model, cfg, layouts) -> MappedFiles:
    """Give every MoE block of `model` `MappedExperts` over the checkpoint files. An expert whose
    gate and up tensors lie apart (Mixtral's files store w1, w2, w3 in that order) keeps two
    views (`GateUp`); only tensors split some other way are copied into memory."""
    shp = cfg.experts
    files = MappedFiles()
    for layer, block in enumerate(model.moe_blocks()):
        w13, w2 = [], []
        for lay in layouts[layer]:
            for segs, shape, out in ((lay.w13, (2 * shp.inter, shp.hidden), w13),
                                     (lay.w2, (shp.hidden, shp.inter), w2)):
                span = _span(segs)
                apart = None
                if span is None and out is w13:
                    apart = files.gate_up(segs, lay.dtype, shp.inter, shp.hidden)
                if span is not None:
                    out.append(files.view(span[0], span[1], span[2], lay.dtype, shape))
                elif apart is not None:
                    out.append(apart)
                else:
                    parts = [files.view(s.info.file, s.info.offset + s.byte_offset, s.nbytes, lay.dtype, (-1,))
                             for s in segs]
                    out.append(torch.cat(parts).view(shape))
        block.experts = MappedExperts(layer, w13, w2)
    return files


def experts_fit(layouts, dtype: torch.dtype, available: int) -> bool:
    """Whether every routed expert, in `dtype`, fits in `available` bytes with a margin."""
    per = layouts[0][0].nbytes // layouts[0][0].dtype.itemsize * dtype.itemsize
    return per * sum(len(row) for row in layouts) < 0.9 * available
