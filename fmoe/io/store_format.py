"""fmoe's expert-major store: the reader the loader uses, and the constants the writer shares.

A store (written by `fmoe.models.convert`, specified in docs/store-format.md) is a directory:

    config.json, tokenizer and generation files    copied from the source checkpoint
    model.safetensors                               the non-expert weights, fmoe parameter names
    experts.bin                                     a 4 KiB header page, then every routed expert
                                                    as one 4 KiB-aligned blob: w13 [2I, H] (gate
                                                    rows, then up rows) then w2 [H, I]; FP8
                                                    experts (version 2) then their scales s13
                                                    [2, ceil(I/b0), ceil(H/b1)] and s2
                                                    [ceil(H/b0), ceil(I/b1)]
    fmoe-store.json                                 the index: where each expert is, its CRC-32

`open_store` returns None for a plain HF checkpoint, so the loader keeps reading those. Opening
a store checks the index against itself, the blob's header and the blob's size (O(1) disk
reads); a problem raises `CheckpointError` naming the expert. Checksums are verified by
`fmoe convert --verify` (`fmoe.models.convert.verify_store`) and, with ``FMOE_VERIFY_READS=1``,
on every expert read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .checkpoint import DTYPES, TensorInfo
from .layout import ExpertLayout, Segment

INDEX_FILE = "fmoe-store.json"
BLOB_FILE = "experts.bin"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "fmoe-store"
VERSION = 2          # the newest version this fmoe reads; 1 is written unless experts are FP8
FP8_VERSION = 2      # stores whose experts are FP8 block-scaled (the index has experts.scales)
ALIGN = 4096
MAGIC = b"FMOEBLOB"


def padded(nbytes: int) -> int:
    """`nbytes` rounded up to the alignment."""
    return -(-nbytes // ALIGN) * ALIGN


def blob_header(store_id: str, version: int = 1) -> bytes:
    """The first ALIGN bytes of experts.bin: magic, version, alignment, the store id (32 ASCII
    hex digits, also in the index), zeros."""
    head = MAGIC + struct.pack("<II", version, ALIGN) + store_id.encode("ascii")
    return head + bytes(ALIGN - len(head))


@dataclass(frozen=True)
class StoreEntry:
    layer: int       # model layer number (as in checkpoint names)
    moe_layer: int   # position among the MoE layers
    expert: int
    offset: int      # byte offset in experts.bin, a multiple of ALIGN
    length: int      # w13 + w2 (+ scales) bytes (the blob is padded to a multiple of ALIGN)
    crc32: int       # CRC-32 (zlib) of those `length` bytes

    @property
    def label(self) -> str:
        return f"expert {self.expert} of layer {self.layer}"


class StoreIndex:
    """A parsed and self-consistent ``fmoe-store.json``."""

    def __init__(self, root: Path, raw: dict):
        self.root = Path(root)
        self.path = self.root / INDEX_FILE
        self.raw = raw
        where = self.path
        try:
            if raw.get("format") != FORMAT:
                raise CheckpointError(f"{where}: not an fmoe store index (format {raw.get('format')!r})")
            version = int(raw["version"])
            if version > VERSION:
                raise CheckpointError(f"{where}: store version {version} is newer than this fmoe reads "
                                      f"({VERSION}); upgrade fmoe")
            self.store_id = str(raw["store_id"])
            self.dtype = _dtype(raw["dtype"], where)
            ex = raw["experts"]
            self.expert_dtype = _dtype(ex["dtype"], where)
            self.num_layers, self.num_experts = int(ex["num_layers"]), int(ex["num_experts"])
            self.hidden, self.inter = int(ex["hidden"]), int(ex["inter"])
            self.moe_layers = [int(x) for x in ex["moe_layers"]]
            blob = raw["blob"]
            self.blob = self.root / str(blob["file"])
            self.blob_size = int(blob["size"])
            self.alignment = int(raw.get("alignment", ALIGN))
            entries = raw["entries"]
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{where}: corrupt store index (bad or missing field: {e})") from None
        if self.alignment != ALIGN or len(self.moe_layers) != self.num_layers or min(
                self.num_layers, self.num_experts, self.hidden, self.inter) <= 0:
            raise CheckpointError(f"{where}: corrupt store index (inconsistent expert shape fields)")
        w = self.expert_dtype.itemsize
        self.w13_bytes = 2 * self.inter * self.hidden * w
        self.w2_bytes = self.hidden * self.inter * w
        self.block, self.scale_dtype, self.s13_shape, self.s2_shape = self._parse_scales(ex.get("scales"))
        ws = self.scale_dtype.itemsize if self.scale_dtype is not None else 0
        self.s13_bytes = _prod(self.s13_shape) * ws
        self.s2_bytes = _prod(self.s2_shape) * ws
        self.expert_bytes = self.w13_bytes + self.w2_bytes + self.s13_bytes + self.s2_bytes
        self.entries = self._parse_entries(entries)

    # -- parsing ---------------------------------------------------------------------------
    def _parse_scales(self, scales):
        """FP8 experts' ``experts.scales``: (block, dtype, s13 shape, s2 shape), or Nones and ()."""
        from .fp8 import expert_scale_shapes, is_fp8

        where = self.path
        if scales is None:
            if is_fp8(self.expert_dtype):
                raise CheckpointError(f"{where}: corrupt store index (FP8 experts without experts.scales)")
            return None, None, (), ()
        try:
            block = tuple(int(b) for b in scales["block"])
            dt = _dtype(scales["dtype"], where)
            s13, s2 = tuple(int(x) for x in scales["w13_shape"]), tuple(int(x) for x in scales["w2_shape"])
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: corrupt store index (bad experts.scales: {e})") from None
        if len(block) != 2 or min(block) < 1 or not is_fp8(self.expert_dtype) \
                or (s13, s2) != expert_scale_shapes(self.hidden, self.inter, block):
            raise CheckpointError(f"{where}: corrupt store index (experts.scales {scales!r} do not fit "
                                  f"{self.expert_dtype} experts of hidden {self.hidden}, inter {self.inter})")
        return block, dt, s13, s2

    def _parse_entries(self, entries) -> list[list[StoreEntry]]:
        where = self.path
        if not isinstance(entries, list):
            raise CheckpointError(f"{where}: corrupt store index (entries is not a list)")
        grid: list[list[StoreEntry | None]] = [[None] * self.num_experts for _ in range(self.num_layers)]
        for i, e in enumerate(entries):
            try:
                ent = StoreEntry(int(e["layer"]), int(e["moe_layer"]), int(e["expert"]), int(e["offset"]),
                                 int(e["length"]), int(e["crc32"]))
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{where}: corrupt store index (entry {i}: {e!r:.120})") from None
            if not (0 <= ent.moe_layer < self.num_layers and 0 <= ent.expert < self.num_experts) \
                    or self.moe_layers[ent.moe_layer] != ent.layer:
                raise CheckpointError(f"{where}: corrupt store index: {ent.label} (MoE layer {ent.moe_layer}) "
                                      f"is outside the {self.num_layers} x {self.num_experts} experts")
            if grid[ent.moe_layer][ent.expert] is not None:
                raise CheckpointError(f"{where}: corrupt store index: {ent.label} is listed twice")
            if ent.length != self.expert_bytes:
                raise CheckpointError(f"{where}: corrupt store index: {ent.label} has length {ent.length}, "
                                      f"its shapes need {self.expert_bytes} bytes")
            if ent.offset % ALIGN or ent.offset < ALIGN:
                raise CheckpointError(f"{where}: corrupt store index: {ent.label} at offset {ent.offset} "
                                      f"is not {ALIGN}-aligned past the header")
            grid[ent.moe_layer][ent.expert] = ent
        absent = [f"expert {e} of layer {self.moe_layers[l]}" for l, row in enumerate(grid)
                  for e, ent in enumerate(row) if ent is None]
        if absent:
            more = f" (and {len(absent) - 3} more)" if len(absent) > 3 else ""
            raise CheckpointError(f"{where}: corrupt store index: no entry for {', '.join(absent[:3])}{more}")
        by_offset = sorted((ent for row in grid for ent in row), key=lambda x: x.offset)
        for a, b in zip(by_offset, by_offset[1:]):
            if b.offset < a.offset + padded(a.length):
                raise CheckpointError(f"{where}: corrupt store index: {b.label} overlaps {a.label}")
        self._by_offset = by_offset
        return grid   # type: ignore[return-value]

    # -- the blob --------------------------------------------------------------------------
    def check_blob(self) -> None:
        """The blob exists, carries this index's store id, and holds every expert's bytes."""
        try:
            size = self.blob.stat().st_size
            with open(self.blob, "rb") as f:
                head = f.read(ALIGN)
        except OSError as e:
            raise CheckpointError(f"{self.blob}: cannot read the store's expert blob ({e.strerror})") from None
        beyond = [e for e in self._by_offset if e.offset + e.length > size]
        if beyond:
            e = beyond[0]
            k = len(beyond) - 1
            more = f" ({k} more expert{'s' if k > 1 else ''} past the end too)" if k else ""
            raise CheckpointError(f"{self.blob}: truncated: {e.label} needs bytes [{e.offset}, "
                                  f"{e.offset + e.length}) but the file has {size} bytes{more}")
        if len(head) < len(MAGIC) + 8 + 32 or head[:len(MAGIC)] != MAGIC:
            raise CheckpointError(f"{self.blob}: not an fmoe expert blob (bad magic)")
        sid = head[len(MAGIC) + 8:len(MAGIC) + 40].decode("ascii", "replace")
        if sid != self.store_id:
            raise CheckpointError(f"{self.blob}: store id {sid} does not match {INDEX_FILE} "
                                  f"({self.store_id}): blob and index come from different conversions")
        if size != self.blob_size:
            raise CheckpointError(f"{self.blob}: {size} bytes, {INDEX_FILE} says {self.blob_size}")

    def layouts(self, cfg):
        """`ExpertLayout`s (one w13 and one w2 segment, adjacent in the blob) for `cfg`, and the
        (empty) set of checkpoint names they use."""
        shp = cfg.experts
        want = (shp.num_layers, shp.num_experts, shp.hidden, shp.inter)
        have = (self.num_layers, self.num_experts, self.hidden, self.inter)
        if want != have:
            raise CheckpointError(f"{self.path}: the store holds {have[0]} MoE layers x {have[1]} experts "
                                  f"of hidden {have[2]}, inter {have[3]}; config.json says {want[0]} x "
                                  f"{want[1]} of hidden {want[2]}, inter {want[3]}")
        ids = getattr(cfg, "moe_layer_ids", None)
        if ids is not None and list(ids) != self.moe_layers:
            raise CheckpointError(f"{self.path}: MoE layers {self.moe_layers} do not match config.json's {list(ids)}")
        H, I, dt = self.hidden, self.inter, self.expert_dtype
        out = []
        for row in self.entries:
            lay = []
            for e in row:
                w13 = TensorInfo(f"{e.label} w13", self.blob, dt, (2 * I, H), e.offset, self.w13_bytes)
                w2 = TensorInfo(f"{e.label} w2", self.blob, dt, (H, I), e.offset + self.w13_bytes, self.w2_bytes)
                scales = {}
                if self.block is not None:
                    at = e.offset + self.w13_bytes + self.w2_bytes
                    s13 = TensorInfo(f"{e.label} s13", self.blob, self.scale_dtype, self.s13_shape, at,
                                     self.s13_bytes)
                    s2 = TensorInfo(f"{e.label} s2", self.blob, self.scale_dtype, self.s2_shape,
                                    at + self.s13_bytes, self.s2_bytes)
                    scales = dict(s13=(Segment(s13, 0, s13.nbytes),), s2=(Segment(s2, 0, s2.nbytes),),
                                  block=self.block, scale_dtype=self.scale_dtype)
                lay.append(ExpertLayout((Segment(w13, 0, w13.nbytes),), (Segment(w2, 0, w2.nbytes),), dt,
                                        checksum=e.crc32, name=e.label, **scales))
            out.append(lay)
        return out, set()

    def __iter__(self):
        """Entries in blob order."""
        return iter(self._by_offset)

    @classmethod
    def load(cls, root: str | Path) -> "StoreIndex":
        path = Path(root) / INDEX_FILE
        try:
            raw = json.loads(path.read_text())
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt store index (not valid JSON: {e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: corrupt store index (not a JSON object)")
        return cls(Path(root), raw)


def _dtype(name, where) -> torch.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise CheckpointError(f"{where}: corrupt store index (unknown dtype {name!r})") from None


def _prod(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def is_store(root: str | Path) -> bool:
    return (Path(root) / INDEX_FILE).exists()


def open_store(root: str | Path) -> StoreIndex | None:
    """The store index of `root`, checked against its blob; None when `root` is a plain HF
    checkpoint (no ``fmoe-store.json``)."""
    if not is_store(root):
        return None
    store = StoreIndex.load(root)
    store.check_blob()
    return store
