"""Safetensors checkpoints read by byte range: headers parsed once, tensors read with `preadv`.

A checkpoint is a directory with one ``*.safetensors`` file, or several with the
``model.safetensors.index.json`` weight map. `CheckpointIndex` knows, for every tensor, its file,
dtype, shape and byte range, so the expert store can read one expert straight into a
preallocated (pinned) buffer without touching the rest of the file.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    # FP8 block-scaled checkpoints (DeepSeek-V3/R1, Kimi-K2, Qwen3 -FP8); see fmoe.io.fp8
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
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


def _refuse_overlaps(file: Path, ranges: list[tuple[int, int, str]]) -> None:
    """Two tensors of one file whose byte ranges overlap: a corrupt or forged header."""
    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise CheckpointError(f"{file}: tensors {n0!r} (bytes [{b0}, {e0})) and {n1!r} (bytes "
                                  f"[{b1}, {e1})) overlap: the header is corrupt")


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
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: bad index file (weight_map must map tensor names to "
                                      "file names)")
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
            if isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and meta["dtype"] not in DTYPES:
                raise CheckpointError(f"{file}: tensor {name!r} has dtype {meta['dtype']}, which fmoe does "
                                      f"not read (supported: {', '.join(DTYPES)})")
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
        _refuse_overlaps(file, [(t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values()
                                if t.file == file and t.nbytes])

    @property
    def quant(self):
        """The checkpoint's FP8 settings (`fmoe.io.fp8.Fp8Config`) from ``config.json``'s
        ``quantization_config``, or None. Raises `CheckpointError` for another quantisation
        method, or for FP8 tensors without that config."""
        if not hasattr(self, "_quant"):
            from .fp8 import is_fp8, read_quant_config

            cfg_path = self.root / "config.json"
            raw = {}
            if cfg_path.exists():
                try:
                    raw = json.loads(cfg_path.read_text())
                except ValueError:
                    raw = {}             # the config reader reports a broken config.json
            quant = read_quant_config(raw if isinstance(raw, dict) else {}, str(cfg_path))
            if quant is None:
                fp8 = next((t for t in self.tensors.values() if is_fp8(t.dtype)), None)
                if fp8 is not None:
                    raise CheckpointError(
                        f"{fp8.file}: tensor {fp8.name!r} is FP8 but {cfg_path} has no FP8 "
                        f"quantization_config (weight_block_size): cannot tell its scale blocks")
            self._quant = quant
        return self._quant

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def keys(self):
        return self.tensors.keys()

    @property
    def dtype(self) -> torch.dtype:
        """The most common floating dtype of the checkpoint, FP8 weights and their scales left
        out: an FP8 checkpoint serves in the dtype of its unquantised tensors (bf16 as
        published)."""
        from .fp8 import SCALE_SUFFIX, is_fp8

        counts: dict[torch.dtype, int] = {}
        quantized = False
        for t in self.tensors.values():
            if is_fp8(t.dtype) or t.name.endswith(SCALE_SUFFIX):
                quantized = True
                continue
            if t.dtype.is_floating_point:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
        if not counts:
            return torch.bfloat16 if quantized else torch.float32
        return max(counts, key=counts.get)


def drop_cached_pages(files) -> int:
    """``posix_fadvise(DONTNEED)`` on `files`: their cached pages leave the page cache (the next
    read is cold). Returns the bytes covered; unreadable files are skipped."""
    total = 0
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


ALIGN = 4096   # O_DIRECT alignment of file offsets, lengths and memory addresses
BOUNCE_BYTES = 64 << 20   # per-thread bounce buffer for O_DIRECT reads into unaligned buffers


def byte_view(buf) -> memoryview:
    """A writable byte memoryview of a contiguous CPU tensor (any dtype), numpy array or buffer."""
    if isinstance(buf, torch.Tensor):
        if not buf.is_contiguous() or buf.device.type != "cpu":
            raise ValueError("read buffers must be contiguous CPU tensors")
        buf = buf.view(torch.uint8).reshape(-1).numpy() if buf.numel() else bytearray()
    mv = memoryview(buf)
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _copy_bytes(dst: memoryview, src: memoryview) -> None:
    """dst[:] = src, large copies through torch, which releases the GIL while it copies (a
    reader thread's memcpy of an expert would otherwise hold up the forward thread)."""
    if dst.nbytes < (1 << 20):
        dst[:] = src
        return
    torch.frombuffer(dst, dtype=torch.uint8).copy_(torch.frombuffer(src, dtype=torch.uint8))


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if view.nbytes else 0


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """`views` without their first `n` bytes (after a short read)."""
    out = []
    for v in views:
        if n >= v.nbytes:
            n -= v.nbytes
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


class FileReader:
    """Keeps one file descriptor per checkpoint file and reads byte ranges into tensors.

    `readv` reads one contiguous byte range into several buffers with a single ``preadv``.
    Files registered with `use_direct` (fmoe's expert store) are read with ``O_DIRECT`` where
    the OS and filesystem allow it: straight into buffers whose address and size are multiples
    of 4096 (pinned memory), otherwise through a per-thread aligned bounce buffer (at most
    BOUNCE_BYTES per read). A filesystem that refuses (``EINVAL``, e.g. tmpfs) falls back to
    buffered reads. ``FMOE_DIRECT_IO`` chooses (default "auto": only for stores larger than half
    the RAM, which the page cache could not keep)."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._direct: dict[Path, int | None] = {}   # O_DIRECT fd; None once refused
        self._direct_wanted: set[Path] = set()
        self._retired: list[int] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    try:
                        fd = os.open(file, os.O_RDONLY)
                    except OSError as e:
                        raise CheckpointError(f"{file}: cannot open ({e.strerror})") from None
                    self._fds[file] = fd
        return fd

    def forget(self, info: TensorInfo) -> None:
        """Drop the cached file pages of tensor `info` (``posix_fadvise(DONTNEED)`` on its byte
        range): read into the model's own memory, they would only count against a memory
        cgroup until reclaimed. Best effort."""
        try:
            os.posix_fadvise(self._fd(info.file), info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass

    # -- O_DIRECT ---------------------------------------------------------------------------
    def use_direct(self, file: str | os.PathLike, large: bool | None = None) -> bool:
        """Read `file` with O_DIRECT from now on, where supported. Returns whether it will try.
        ``FMOE_DIRECT_IO``: "1" where supported, "0" never, "auto" (default) only for data the
        page cache could not keep anyway: `large` says so when the caller knows (the experts of
        a model larger than the memory it may use), else the file must exceed half the RAM."""
        mode = os.environ.get("FMOE_DIRECT_IO", "auto").lower()
        if not hasattr(os, "O_DIRECT") or mode in ("0", "false", "no", "off"):
            return False
        if mode == "auto" and large is not None:
            if not large:
                return False
        elif mode == "auto":
            try:
                ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                if os.stat(file).st_size <= ram // 2:
                    return False
            except (OSError, ValueError):
                return False
        self._direct_wanted.add(Path(file))
        return True

    def is_direct(self, file: str | os.PathLike) -> bool:
        """Whether reads of `file` currently go through O_DIRECT (False after a fallback)."""
        file = Path(file)
        return file in self._direct_wanted and self._direct_fd(file) is not None

    def _direct_fd(self, file: Path) -> int | None:
        if file in self._direct:
            return self._direct[file]
        with self._lock:
            if file not in self._direct:
                try:
                    self._direct[file] = os.open(file, os.O_RDONLY | os.O_DIRECT)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise CheckpointError(f"{file}: cannot open ({e.strerror})") from None
                    self._direct[file] = None          # the filesystem refuses O_DIRECT
        return self._direct[file]

    def _bounce(self, nbytes: int) -> memoryview:
        """A per-thread buffer of at least `nbytes` (at most BOUNCE_BYTES) at an ALIGN-aligned address."""
        have = getattr(self._local, "view", None)
        if have is None or have.nbytes < nbytes:
            size = -(-nbytes // ALIGN) * ALIGN
            raw = torch.empty(size + ALIGN, dtype=torch.uint8).numpy()
            pad = -raw.ctypes.data % ALIGN
            self._local.raw = raw
            self._local.view = have = memoryview(raw)[pad:pad + size]
        return have

    def _read_direct(self, fd: int, file: Path, offset: int, views: list[memoryview], total: int,
                     what: str) -> None:
        def eof():
            return CheckpointError(f"{file}: unexpected end of file reading {what} "
                                   f"(bytes [{offset}, {offset + total}); the file is truncated)")

        if offset % ALIGN == 0 and all(v.nbytes % ALIGN == 0 and _address(v) % ALIGN == 0 for v in views):
            done = 0                       # aligned buffers (pinned memory): straight into them
            while done < total:
                n = os.preadv(fd, views if not done else _skip(views, done), offset + done)
                if n <= 0:
                    raise eof()
                done += n
                if n % ALIGN and done < total:
                    raise eof()
            return
        # through an aligned bounce buffer, in pieces of at most BOUNCE_BYTES
        start = offset - offset % ALIGN
        end = offset + total
        stop = -(-end // ALIGN) * ALIGN
        buf = self._bounce(min(BOUNCE_BYTES, stop - start))
        vi, vpos = 0, 0                    # where the next useful byte goes
        pos = start
        while pos < end:
            want = min(buf.nbytes, stop - pos)
            got = 0
            while got < want:
                n = os.preadv(fd, [buf[got:want]], pos + got)
                if n <= 0:
                    break
                got += n
                if n % ALIGN:              # end of file: a further O_DIRECT read would be unaligned
                    break
            if pos + got < min(pos + want, end):
                raise eof()
            data = buf[max(pos, offset) - pos:min(pos + got, end) - pos]
            k = 0
            while k < data.nbytes:
                v = views[vi]
                take = min(v.nbytes - vpos, data.nbytes - k)
                _copy_bytes(v[vpos:vpos + take], data[k:k + take])
                k += take
                vpos += take
                if vpos == v.nbytes:
                    vi, vpos = vi + 1, 0
            pos += want

    # -- reads -----------------------------------------------------------------------------
    def _forget(self, file: Path) -> bool:
        """After a failed read of `file`: where the path now names another file (restored by
        rename: a re-download, `mv`, rsync), its handles are retired (closed by `close`: another
        thread may hold one) and the next read opens the path again; a file still the same
        keeps its handles (a retry must not cost a descriptor). Returns whether it was
        replaced."""
        try:
            now = os.stat(file)
        except OSError:
            return False            # nothing at the path yet: keep the handles, retry later
        replaced = False
        with self._lock:
            for table in (self._fds, self._direct):
                fd = table.get(file)
                if fd is None:
                    continue
                then = os.fstat(fd)
                if (then.st_dev, then.st_ino) != (now.st_dev, now.st_ino):   # replaced: reopen
                    del table[file]
                    self._retired.append(fd)
                    replaced = True
        return replaced

    def readv(self, file: str | os.PathLike, offset: int, buffers, what: str = "") -> None:
        """Read the contiguous byte range of `file` starting at `offset` into `buffers` (contiguous
        CPU tensors, arrays or memoryviews, filled in order): one ``preadv`` call (more only after
        a short read). A failure is a CheckpointError naming the file; the next read of that
        file opens it again."""
        try:
            self._readv(Path(file), offset, buffers, what)
        except CheckpointError:
            if not self._forget(Path(file)):
                raise
            self._readv(Path(file), offset, buffers, what)     # once more, from the new file

    def _readv(self, file: Path, offset: int, buffers, what: str) -> None:
        views = [byte_view(b) for b in buffers]
        views = [v for v in views if v.nbytes]
        total = sum(v.nbytes for v in views)
        what = what or f"bytes [{offset}, {offset + total})"
        if not total:
            return
        if file in self._direct_wanted:
            fd = self._direct_fd(file)
            if fd is not None:
                try:
                    return self._read_direct(fd, file, offset, views, total, what)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise CheckpointError(f"{file}: cannot read {what} ({e.strerror})") from None
                    with self._lock:                 # refused at read time: buffered from now on
                        self._direct[file] = None
                        self._retired.append(fd)     # closed by close(): another thread may hold it
        fd = self._fd(file)
        done = 0
        while done < total:
            try:
                n = os.preadv(fd, views if not done else _skip(views, done), offset + done)
            except OSError as e:
                raise CheckpointError(f"{file}: cannot read {what} ({e.strerror})") from None
            if n <= 0:
                raise CheckpointError(f"{file}: unexpected end of file reading {what}")
            done += n

    def read_into(self, info: TensorInfo, out: torch.Tensor, byte_offset: int = 0,
                  nbytes: int | None = None) -> None:
        """Read `nbytes` of `info` starting `byte_offset` bytes into it, into the contiguous CPU
        tensor `out` (whose byte size must equal `nbytes`)."""
        nbytes = info.nbytes - byte_offset if nbytes is None else nbytes
        view = byte_view(out)
        if view.nbytes != nbytes:
            raise ValueError(f"buffer holds {view.nbytes} bytes, {nbytes} requested")
        self.readv(info.file, info.offset + byte_offset, [view], repr(info.name))

    def read(self, info: TensorInfo) -> torch.Tensor:
        out = torch.empty(info.shape, dtype=info.dtype)
        self.read_into(info, out)
        return out

    def close(self) -> None:
        for fd in list(self._fds.values()) + [fd for fd in self._direct.values() if fd is not None] \
                + getattr(self, "_retired", []):
            os.close(fd)
        self._fds.clear()
        self._direct.clear()
        self._retired.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
