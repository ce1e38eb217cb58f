"""Writing fmoe's expert store (`fmoe.models.convert` drives it): streaming copies of checkpoint
byte ranges with a running CRC-32 and dtype conversion, one expert blob at a time, the
safetensors header of the weights file, and files and directories synced before the rename
that publishes a store. The format itself is `fmoe.io.store_format`."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import torch

from . import store_format as sf
from .checkpoint import DTYPE_NAMES, FileReader, TensorInfo, byte_view
from .fp8 import dequantize, dequantize_expert
from .layout import expert_buffers, read_expert


class Copier:
    """Copies byte ranges of checkpoint files into an output file, in chunks, converting the
    dtype on the way and keeping a running CRC-32; one reusable read buffer."""

    def __init__(self, reader: FileReader, chunk_bytes: int, bar=None):
        self.reader = reader
        self.chunk = max(64, chunk_bytes // 64 * 64)
        self.buf = torch.empty(0, dtype=torch.uint8)
        self.bar = bar

    def copy(self, file: Path, offset: int, nbytes: int, src: torch.dtype, dst: torch.dtype, out,
             crc: int, what: str) -> tuple[int, int]:
        """Returns (crc, bytes written)."""
        if self.buf.numel() < min(self.chunk, nbytes):
            self.buf = torch.empty(min(self.chunk, nbytes), dtype=torch.uint8)
        step = max(src.itemsize, self.chunk // src.itemsize * src.itemsize)
        written = 0
        for pos in range(0, nbytes, step):
            n = min(step, nbytes - pos)
            b = self.buf[:n]
            self.reader.readv(file, offset + pos, [b], what)
            data = b if src == dst else b.view(src).to(dst).view(torch.uint8)
            mv = byte_view(data)
            out.write(mv)
            crc = zlib.crc32(mv, crc)
            written += mv.nbytes
            if self.bar is not None:
                self.bar.update(n)
        return crc, written


def write_expert(copier: Copier, out, layout, dtype: torch.dtype, shape: tuple[int, int]) -> tuple[int, int]:
    """Append one expert (w13 segments, then w2 segments; for an FP8 expert kept FP8, then its
    scales s13 and s2) to `out`, converted to `dtype`, and pad it to the alignment. An FP8
    expert asked in another dtype is dequantised. `shape` is (hidden, inter). Returns (length
    without padding, crc32)."""
    crc, length = 0, 0
    if layout.quantized and dtype != layout.dtype:
        hidden, inter = shape
        raw = expert_buffers(layout, hidden, inter)
        read_expert(copier.reader, layout, *raw)
        w13 = torch.empty(2 * inter, hidden, dtype=dtype)
        w2 = torch.empty(hidden, inter, dtype=dtype)
        dequantize_expert(*raw, layout.block, w13, w2)
        for t in (w13, w2):
            mv = byte_view(t)
            out.write(mv)
            crc = zlib.crc32(mv, crc)
            length += mv.nbytes
            if copier.bar is not None:
                copier.bar.update(mv.nbytes)
    else:
        segs = [(seg, layout.dtype, dtype) for seg in layout.w13 + layout.w2]
        segs += [(seg, layout.scale_dtype, layout.scale_dtype) for seg in layout.s13 + layout.s2]
        for seg, src, dst in segs:
            crc, n = copier.copy(seg.info.file, seg.info.offset + seg.byte_offset, seg.nbytes, src,
                                 dst, out, crc, repr(seg.info.name))
            length += n
    out.write(bytes(sf.padded(length) - length))
    return length, crc


def copy_dequantized(copier: Copier, q: TensorInfo, scale: TensorInfo, block: tuple[int, int],
                      dtype: torch.dtype, out, crc: int) -> int:
    """Append FP8 tensor `q` [R, C] dequantised with `scale` to `out` in `dtype`, a band of whole
    block rows at a time (at most about the copier's chunk of float32). Returns the crc."""
    rows, cols = q.shape
    band = max(block[0], copier.chunk // max(1, cols * 4) // block[0] * block[0])
    row_bytes = cols * q.dtype.itemsize
    srow_bytes = scale.shape[1] * scale.dtype.itemsize
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        qb = torch.empty(r1 - r0, cols, dtype=q.dtype)
        copier.reader.readv(q.file, q.offset + r0 * row_bytes, [qb], repr(q.name))
        g0, g1 = r0 // block[0], -(-r1 // block[0])
        sb = torch.empty(g1 - g0, scale.shape[1], dtype=scale.dtype)
        copier.reader.readv(scale.file, scale.offset + g0 * srow_bytes, [sb], repr(scale.name))
        mv = byte_view(dequantize(qb, sb, block, dtype))
        out.write(mv)
        crc = zlib.crc32(mv, crc)
        if copier.bar is not None:
            copier.bar.update(qb.numel() * qb.dtype.itemsize)
    return crc


def safetensors_header(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `tensors` in order."""
    header: dict = {"__metadata__": {"format": "pt", "writer": "fmoe convert"}}
    pos = 0
    for name, dtype, shape in tensors:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def fsync_dir(path: Path) -> None:
    """Sync a directory's entries, so that a file created or renamed in it survives a crash;
    best effort (some file systems refuse to open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: dict, indent=None) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=indent)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_index(path: Path, index: dict) -> None:
    """The index as readable JSON with one line per expert entry."""
    head = json.dumps({k: v for k, v in index.items() if k != "entries"}, indent=1)
    lines = ",\n".join("  " + json.dumps(e) for e in index["entries"])
    text = head[:-2] + ',\n "entries": [\n' + lines + "\n ]\n}\n"
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def remove(path: Path) -> None:
    """Delete a file, or a directory tree (not through a link); a missing path is no error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
