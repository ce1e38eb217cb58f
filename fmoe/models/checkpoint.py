"""Safetensors checkpoints read by byte range: headers parsed once, tensors read with `preadv`.

A checkpoint is a directory with one ``*.safetensors`` file, or several with the
``model.safetensors.index.json`` weight map. `CheckpointIndex` knows, for every tensor, its file,
dtype, shape and byte range, so the expert store can read one expert straight into a
preallocated (pinned) buffer without touching the rest of the file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int   # absolute byte offset in `file`
    nbytes: int


def read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header. Returns (header dict, absolute offset of the data)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n > os.fstat(f.fileno()).st_size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + n


class CheckpointIndex:
    """Every tensor of a safetensors checkpoint directory, by name."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files():
            self._add_file(file)

    def _files(self) -> list[Path]:
        index = self.root / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: bad index file ({e})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.root / name).exists():
                    raise CheckpointError(f"{self.root / name}: missing (listed in {index.name})")
            return [self.root / n for n in files]
        files = sorted(self.root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.root}: no *.safetensors files")
        return files

    def _add_file(self, file: Path) -> None:
        header, data_start = read_header(file)
        size = file.stat().st_size
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES[meta["dtype"]]
                shape = tuple(int(s) for s in meta["shape"])
                begin, end = (int(o) for o in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * dtype.itemsize
            if end - begin != nbytes or data_start + end > size or begin < 0:
                raise CheckpointError(
                    f"{file}: tensor {name!r} byte range [{begin}, {end}) does not match its "
                    f"shape {list(shape)} or the file size")
            self.tensors[name] = TensorInfo(name, file, dtype, shape, data_start + begin, nbytes)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def keys(self):
        return self.tensors.keys()

    @property
    def dtype(self) -> torch.dtype:
        """The most common floating dtype of the checkpoint."""
        counts: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
        return max(counts, key=counts.get) if counts else torch.float32


class FileReader:
    """Keeps one file descriptor per checkpoint file and reads byte ranges into tensors."""

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = os.open(file, os.O_RDONLY)
            self._fds[file] = fd
        return fd

    def read_into(self, info: TensorInfo, out: torch.Tensor, byte_offset: int = 0,
                  nbytes: int | None = None) -> None:
        """Read `nbytes` of `info` starting `byte_offset` bytes into it, into the contiguous CPU
        tensor `out` (whose byte size must equal `nbytes`)."""
        nbytes = info.nbytes - byte_offset if nbytes is None else nbytes
        view = out.view(torch.uint8).reshape(-1).numpy()
        if view.nbytes != nbytes:
            raise ValueError(f"buffer holds {view.nbytes} bytes, {nbytes} requested")
        mv = memoryview(view)
        fd = self._fd(info.file)
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [mv[done:]], info.offset + byte_offset + done)
            if n <= 0:
                raise CheckpointError(f"{info.file}: unexpected end of file reading {info.name!r}")
            done += n

    def read(self, info: TensorInfo) -> torch.Tensor:
        out = torch.empty(info.shape, dtype=info.dtype)
        self.read_into(info, out)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
