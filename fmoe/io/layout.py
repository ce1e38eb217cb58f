"""Where one routed expert's bytes live (`ExpertLayout`: segments of checkpoint tensors, or one
blob of fmoe's store) and how they are read into preallocated buffers (`read_expert`).

The loader (`fmoe.models.loading.locate_experts`) and the store reader
(`fmoe.io.store_format.StoreIndex.layouts`) build layouts; the runtime's expert store and the
converter read through them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .checkpoint import FileReader, TensorInfo, byte_view
from .fp8 import expert_scale_shapes


@dataclass(frozen=True)
class Segment:
    """A contiguous byte range of one checkpoint tensor."""

    info: TensorInfo
    byte_offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertLayout:
    """Where one routed expert lives: w13 bytes (gate rows then up rows) and w2 bytes, each the
    concatenation of its segments, in checkpoint dtype `dtype`.

    FP8 block-scaled experts (`block` set) also carry their scales: `s13` the gate's then the
    up's ``weight_scale_inv`` (together [2, ceil(I/b0), ceil(H/b1)]), `s2` the down's
    ([ceil(H/b0), ceil(I/b1)]), in `scale_dtype`."""

    w13: tuple[Segment, ...]
    w2: tuple[Segment, ...]
    dtype: torch.dtype
    checksum: int | None = None   # CRC-32 of the w13, w2 (then s13, s2) bytes (fmoe store only)
    name: str | None = None       # for errors, e.g. "expert 5 of layer 3"
    s13: tuple[Segment, ...] = ()
    s2: tuple[Segment, ...] = ()
    block: tuple[int, int] | None = None
    scale_dtype: torch.dtype | None = None

    @property
    def quantized(self) -> bool:
        return self.block is not None

    @property
    def nbytes(self) -> int:
        """Bytes read from disk for this expert (FP8 weights plus scales when quantised)."""
        return sum(s.nbytes for s in self.w13 + self.w2 + self.s13 + self.s2)


def read_expert(reader: FileReader, layout: ExpertLayout, w13: torch.Tensor, w2: torch.Tensor,
                s13: torch.Tensor | None = None, s2: torch.Tensor | None = None) -> None:
    """Read one expert into contiguous CPU buffers w13 [2I, H] and w2 [H, I] of the checkpoint
    dtype (and, for an FP8 layout, its scales into s13 [2, ceil(I/b0), ceil(H/b1)] and s2
    [ceil(H/b0), ceil(I/b1)] of the scale dtype). Segments contiguous in one file are read with
    one `preadv` into several buffers: one read per expert from fmoe's store, and usually from
    HF files too (an expert's gate, up and down tensors sit side by side there). With
    ``FMOE_VERIFY_READS=1`` a store expert's CRC-32 is checked after the read."""
    parts = [(layout.w13, w13), (layout.w2, w2)]
    if layout.quantized:
        if s13 is None or s2 is None:
            raise ValueError(f"{layout.name or 'an FP8 expert'}: reading it needs scale buffers")
        parts += [(layout.s13, s13), (layout.s2, s2)]
    pieces = []   # (file, absolute offset, destination bytes, tensor name)
    for segs, out in parts:
        flat = byte_view(out)
        if flat.nbytes != sum(s.nbytes for s in segs):
            raise ValueError(f"buffer holds {flat.nbytes} bytes, the expert's tensor needs "
                             f"{sum(s.nbytes for s in segs)}")
        pos = 0
        for s in segs:
            pieces.append((s.info.file, s.info.offset + s.byte_offset, flat[pos:pos + s.nbytes], s.info.name))
            pos += s.nbytes
    pieces.sort(key=lambda p: (str(p[0]), p[1]))
    i = 0
    while i < len(pieces):
        file, start, _, _ = pieces[i]
        j, end = i + 1, start + pieces[i][2].nbytes
        while j < len(pieces) and pieces[j][0] == file and pieces[j][1] == end:
            end += pieces[j][2].nbytes
            j += 1
        what = layout.name or ", ".join(repr(p[3]) for p in pieces[i:j])
        reader.readv(file, start, [p[2] for p in pieces[i:j]], what)
        i = j
    if layout.checksum is not None and os.environ.get("FMOE_VERIFY_READS", "0") not in ("", "0"):
        import zlib

        crc = 0
        for _, out in parts:
            crc = zlib.crc32(byte_view(out), crc)
        if crc != layout.checksum:
            raise CheckpointError(f"{layout.w13[0].info.file}: checksum mismatch in {layout.name or 'an expert'} "
                                  f"(crc32 {crc:08x}, index says {layout.checksum:08x}): the store is corrupt")


def expert_buffers(layout: ExpertLayout, hidden: int, inter: int, pin: bool = False,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """Empty buffers for one expert as stored: (w13 [2I, H], w2 [H, I]) in the checkpoint dtype,
    plus (s13, s2) scale buffers for an FP8 layout (see `read_expert`)."""
    kw = {"pin_memory": pin} if device is None else {"device": device}
    out = [torch.empty(2 * inter, hidden, dtype=layout.dtype, **kw),
           torch.empty(hidden, inter, dtype=layout.dtype, **kw)]
    if layout.quantized:
        for shape in expert_scale_shapes(hidden, inter, layout.block):
            out.append(torch.empty(shape, dtype=layout.scale_dtype, **kw))
    return tuple(out)
