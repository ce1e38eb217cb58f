"""`fmoe convert SRC DST` (and ``python tools/convert.py``): an HF checkpoint, from a local
directory or the hub, into fmoe's expert-major store, where one routed expert is one read.

The store format is specified in docs/store-format.md; its reader is `fmoe.io.store_format`.
Conversion streams: every tensor (and every expert, also out of fused ``[E, 2I, H]`` tensors) is
copied in chunks of at most `CHUNK_BYTES`, so peak memory does not grow with the model. It writes a
uniquely named ``.DST.<random>.tmp`` beside DST and renames it to DST only when everything,
config.json last, is written and synced: an interrupted conversion leaves no DST (a failed one
removes its own temporary directory; nothing that existed before is touched). ``--force``
replaces only an fmoe store (a directory with an ``fmoe-store.json`` of this format), never
anything else.

Tensor dtypes: without ``--dtype`` every tensor keeps its checkpoint dtype. With ``--dtype`` the
routed experts and every floating tensor that fmoe holds in that dtype are converted; tensors
the model keeps in another dtype whatever the serving dtype (DeepSeek's float32 router) keep
theirs. So ``from_pretrained(DST)`` equals ``from_pretrained(SRC, dtype=...)`` exactly.

FP8 block-scaled checkpoints (DeepSeek-V3/R1, Qwen3 -FP8) stay FP8 by default: experts are written
as FP8 weights followed by their scales (store version 2), and FP8 non-expert weights keep their
``weight_scale_inv`` beside them (the loader dequantises them, as from the source). With
``--dtype`` everything is dequantised (per block, in float32, then cast) and the store holds no
scales and no ``quantization_config``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import torch

from ..errors import CheckpointError, FmoeError
from ..files import plain_mode, unwritable
from ..io import store_format as sf
from ..io.checkpoint import DTYPE_NAMES, CheckpointIndex, FileReader, TensorInfo, byte_view

# module-level names convert() calls, so that a test can patch one here (a dying write)
from ..io.store_writer import Copier as _Copier
from ..io.store_writer import copy_dequantized as _copy_dequantized
from ..io.store_writer import fsync_dir as _fsync_dir
from ..io.store_writer import remove as _remove
from ..io.store_writer import safetensors_header as _safetensors_header
from ..io.store_writer import write_expert as _write_expert
from ..io.store_writer import write_index as _write_index
from ..io.store_writer import write_json as _write_json
from .config import build_config, read_config_json

# the command line lives in convert_cli (registering it must not import torch)
from .convert_cli import add_arguments, cmd_convert, main, register  # noqa: F401
from .loading import _check_shape, _find, _name_list, locate_experts, resolve
from .registry import family_for

CHUNK_BYTES = 32 << 20
# files copied beside the weights (config.json is written last, by the converter itself)
AUX_PATTERNS = ("*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", sf.INDEX_FILE}

DTYPE_CHOICES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                 "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
                 "fp32": torch.float32, "float": torch.float32}


class ConvertError(FmoeError):
    """A conversion that cannot start (destination exists, source and destination overlap...)."""


def parse_dtype(name) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if str(name).lower() in ("auto", "none"):
        return None
    try:
        return DTYPE_CHOICES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use bfloat16, float16 or float32") from None


# -- planning -------------------------------------------------------------------------------

def _plan_weights(cfg, model_cls, index: CheckpointIndex, expert_names: set[str], root: Path,
                  dtype: torch.dtype | None) -> list[tuple[str, TensorInfo, torch.dtype, TensorInfo | None]]:
    """(output name, source tensor, output dtype, scale) for every non-expert weight, with the
    loader's strictness: missing and unexpected tensors are errors. An FP8 weight is kept FP8
    with its ``weight_scale_inv`` beside it (scale None on both), or, with `dtype`, planned
    with its scale: dequantised while copied."""
    from ..io.fp8 import is_fp8, scale_name, scale_shape

    with torch.device("meta"):
        model = model_cls(cfg)
    if dtype is not None:
        model = model.to(dtype)
        for m in model.modules():                 # e.g. DeepSeek's router goes back to float32
            if hasattr(m, "reset_buffers"):
                m.reset_buffers(torch.device("meta"))
    tied = getattr(cfg, "tie_word_embeddings", False)
    renames = getattr(cfg, "checkpoint_renames", ())
    used = set(expert_names)
    plan, missing = [], []
    for name, param in model.named_parameters():
        if name == "lm_head.weight" and tied:
            continue
        key = _find(name, index, renames)
        if key is None:
            missing.append(name)
            continue
        info = index[key]
        _check_shape(info, tuple(param.shape))
        used.add(key)
        if is_fp8(info.dtype):
            sname = scale_name(key)
            if sname not in index:
                missing.append(sname)
                continue
            scale = index[sname]
            _check_shape(scale, scale_shape(info.shape, index.quant.block))
            used.add(sname)
            if dtype is None:
                plan.append((name, info, info.dtype, None))
                plan.append((scale_name(name), scale, scale.dtype, None))
            else:
                plan.append((name, info, param.dtype, scale))
            continue
        out = info.dtype
        if dtype is not None and info.dtype.is_floating_point and param.dtype == dtype:
            out = dtype
        plan.append((name, info, out, None))
    if tied and "lm_head.weight" in index:
        used.add("lm_head.weight")
    if missing:
        raise CheckpointError(_name_list(f"{root}: missing tensors", missing))
    import re

    ignored = [re.compile(p) for p in getattr(cfg, "checkpoint_ignore", ())]
    unexpected = sorted(k for k in index.keys() if k not in used and not k.endswith("rotary_emb.inv_freq")
                        and not any(p.match(k) for p in ignored))
    if unexpected:
        raise CheckpointError(_name_list(f"{root}: unexpected tensors", unexpected))
    return plan


def _bar(total: int, progress: bool, desc: str):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                dynamic_ncols=True)


# -- conversion -----------------------------------------------------------------------------

def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, force: bool = False,
            verify: bool = False, progress: bool = True, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Convert checkpoint `src` (local directory or hub id; an fmoe store works too) into the
    store `dst`. `dtype`: None keeps the checkpoint's dtypes, or "bfloat16" / "float16" /
    "float32" (or a torch dtype). Refuses an existing `dst` unless `force`. With `verify`, the
    written store's checksums are recomputed before it is renamed into place. Returns a summary
    dict (path, experts, expert_bytes, weight_bytes, seconds)."""
    t0 = time.perf_counter()
    dtype = parse_dtype(dtype)
    dst = Path(dst).expanduser()
    _check_dst_parent(dst)       # before resolving the source: a hub id downloads it
    root = resolve(src)
    real_src, real_dst = root.resolve(), dst.resolve()
    if real_dst == real_src or real_dst in real_src.parents or real_src in real_dst.parents:
        raise ConvertError(f"{dst}: the destination must not contain, or be inside, the source {root}")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise ConvertError(f"{dst}: already exists (use --force to replace it)")
        if not _is_fmoe_store(dst):
            raise ConvertError(f"{dst}: exists and is not an fmoe store (no {sf.INDEX_FILE} of format "
                               f"{sf.FORMAT!r}); --force only replaces an fmoe store: move it away "
                               "or choose another destination")

    raw = read_config_json(root)
    family = family_for(raw.get("model_type"))
    config_cls, model_cls = family.load()
    cfg = build_config(config_cls, raw, str(root / 'config.json'))
    index = CheckpointIndex(root)
    src_store = sf.open_store(root)
    if src_store is not None:
        layouts, expert_names = src_store.layouts(cfg)
        default = src_store.dtype
    else:
        layouts, expert_names = locate_experts(cfg, index)
        default = index.dtype
    target = dtype or default
    quant = index.quant          # refuses GPTQ, AWQ, ... configs; FP8 block size
    plan = _plan_weights(cfg, model_cls, index, expert_names, root, dtype)
    shp = cfg.experts
    lay0 = layouts[0][0]
    expert_dtype = dtype or lay0.dtype
    fp8_experts = lay0.quantized and expert_dtype == lay0.dtype     # kept FP8, with scales
    if any(lay.dtype != layouts[0][0].dtype for row in layouts for lay in row) and dtype is None:
        raise CheckpointError(f"{root}: routed experts have mixed dtypes; pass --dtype")
    moe_layers = [int(x) for x in getattr(cfg, "moe_layer_ids", range(shp.num_layers))]

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        # a directory of our own, unique: nothing that exists is ever touched
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    except OSError as e:
        raise _cannot_create(dst, e) from None
    plain_mode(tmp)                       # mkdtemp's 0700 would carry over to DST
    total_in = sum(l.nbytes for row in layouts for l in row) + sum(i.nbytes for _, i, _, _ in plan)
    reader = FileReader()
    bar = _bar(total_in, progress, f"convert {dst.name}")
    try:
        copier = _Copier(reader, chunk_bytes, bar)
        store_id = uuid.uuid4().hex

        # 1. routed experts: header page, then one aligned blob per expert in (layer, expert) order
        entries = []
        with open(tmp / sf.BLOB_FILE, "wb") as out:
            out.write(sf.blob_header(store_id, sf.FP8_VERSION if fp8_experts else 1))
            offset = sf.ALIGN
            for l, row in enumerate(layouts):
                for e, lay in enumerate(row):
                    length, crc = _write_expert(copier, out, lay, expert_dtype, (shp.hidden, shp.inter))
                    entries.append({"layer": moe_layers[l], "moe_layer": l, "expert": e, "offset": offset,
                                    "length": length, "crc32": crc})
                    offset += sf.padded(length)
            out.flush()
            os.fsync(out.fileno())
            blob_size = out.tell()

        # 2. non-expert weights: one safetensors file, streamed tensor by tensor
        header = _safetensors_header([(n, d, tuple(i.shape)) for n, i, d, _ in plan])
        with open(tmp / sf.WEIGHTS_FILE, "wb") as out:
            out.write(header)
            crc = zlib.crc32(header)
            for _name, info, out_dtype, scale in plan:
                if scale is not None:      # FP8 asked in another dtype: dequantised on the way
                    crc = _copy_dequantized(copier, info, scale, index.quant.block, out_dtype, out, crc)
                    continue
                crc, _ = copier.copy(info.file, info.offset, info.nbytes, info.dtype, out_dtype, out, crc,
                                     repr(info.name))
            out.flush()
            os.fsync(out.fileno())
            weights = {"file": sf.WEIGHTS_FILE, "size": out.tell(), "crc32": crc}

        # 3. tokenizer, generation config and other small files
        copied = []
        for pattern in AUX_PATTERNS:
            for f in sorted(root.glob(pattern)):
                if f.is_file() and f.name not in _NOT_COPIED and f.name not in copied:
                    shutil.copyfile(f, tmp / f.name)
                    copied.append(f.name)

        # 4. the index, then config.json: a directory without them does not load
        expert_bytes = (2 * shp.inter * shp.hidden + shp.hidden * shp.inter) * expert_dtype.itemsize
        experts = {"num_layers": shp.num_layers, "num_experts": shp.num_experts,
                   "hidden": shp.hidden, "inter": shp.inter, "dtype": DTYPE_NAMES[expert_dtype],
                   "w13_shape": [2 * shp.inter, shp.hidden], "w2_shape": [shp.hidden, shp.inter],
                   "expert_bytes": expert_bytes, "moe_layers": moe_layers}
        if fp8_experts:
            from ..io.fp8 import expert_scale_shapes

            s13, s2 = expert_scale_shapes(shp.hidden, shp.inter, lay0.block)
            experts["scales"] = {"dtype": DTYPE_NAMES[lay0.scale_dtype], "block": list(lay0.block),
                                 "w13_shape": list(s13), "w2_shape": list(s2)}
            experts["expert_bytes"] = lay0.nbytes         # FP8 weights + scales: one read
        index_json = {
            "format": sf.FORMAT, "version": sf.FP8_VERSION if fp8_experts else 1, "store_id": store_id,
            "alignment": sf.ALIGN, "model_type": raw.get("model_type"), "dtype": DTYPE_NAMES[target],
            "source": str(src), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "writer": _writer(),
            "experts": experts,
            "blob": {"file": sf.BLOB_FILE, "size": blob_size, "header_bytes": sf.ALIGN},
            "weights": weights,
            "files": copied,
            "entries": entries,
        }
        _write_index(tmp / sf.INDEX_FILE, index_json)
        config = dict(raw)
        if dtype is not None:
            name = str(dtype).replace("torch.", "")
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = name
            if quant is not None or lay0.quantized:
                config.pop("quantization_config", None)   # dequantised: nothing FP8 is left
        _write_json(tmp / "config.json", config, indent=2)
        _fsync_dir(tmp)
        if bar is not None:
            bar.close()
            bar = None
        if verify:
            verify_store(tmp, progress=progress)

        # 5. into place
        old = None
        if dst.exists() or dst.is_symlink():
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:12]}")
            os.replace(dst, old)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
        if old is not None:
            _remove(old)
    except BaseException:
        if bar is not None:
            bar.close()
        _remove(tmp)
        raise
    finally:
        reader.close()
    return {"path": str(dst), "experts": len(entries), "expert_bytes": blob_size,
            "weight_bytes": weights["size"], "dtype": str(target).replace("torch.", ""),
            "verified": verify, "seconds": time.perf_counter() - t0}


def _cannot_create(dst: Path, e: OSError) -> ConvertError:
    # named by DST: the temporary name in the OSError is ours, not the user's
    return ConvertError(f"{dst}: cannot create the output next to it, in {str(dst.parent)!r} "
                        f"({e.strerror or e})")


def _check_dst_parent(dst: Path) -> None:
    """DST's directory can take the output (`fmoe.files.unwritable`; convert makes missing
    directories)."""
    why = unwritable(dst)
    if why and why != "is a directory":          # an existing DST is refused (or --force) later
        raise ConvertError(f"{dst}: cannot create the output next to it ({why})")


def _is_fmoe_store(path: Path) -> bool:
    """Whether `path` is a directory holding an fmoe store index (the marker --force needs)."""
    try:
        raw = json.loads((path / sf.INDEX_FILE).read_text())
    except (OSError, ValueError):
        return False
    return path.is_dir() and isinstance(raw, dict) and raw.get("format") == sf.FORMAT


def _writer() -> str:
    try:
        from .. import __version__
    except ImportError:  # pragma: no cover
        __version__ = "?"
    return f"fmoe {__version__}"


# -- verification ---------------------------------------------------------------------------

def verify_store(path: str | os.PathLike, *, progress: bool = False, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Recompute every checksum of the store at `path`: each expert's CRC-32 and the weights
    file's. Raises `CheckpointError` naming the first corrupt expert (or file). Returns a summary."""
    path = Path(path)
    store = sf.StoreIndex.load(path)
    store.check_blob()
    CheckpointIndex(path)                      # the weights file's header parses and fits
    reader = FileReader()                      # buffered: a verify pass should not need O_DIRECT
    step = max(4096, chunk_bytes // 4096 * 4096)
    buf = torch.empty(min(step, store.expert_bytes), dtype=torch.uint8)
    entries = list(store)
    bar = _bar(len(entries) * store.expert_bytes, progress, f"verify {path.name}")
    try:
        for e in entries:
            crc = 0
            for pos in range(0, e.length, step):
                n = min(step, e.length - pos)
                reader.readv(store.blob, e.offset + pos, [buf[:n]], e.label)
                crc = zlib.crc32(byte_view(buf[:n]), crc)
                if bar is not None:
                    bar.update(n)
            if crc != e.crc32:
                raise CheckpointError(f"{store.blob}: checksum mismatch in {e.label} (bytes [{e.offset}, "
                                      f"{e.offset + e.length}): crc32 {crc:08x}, index says {e.crc32:08x})")
        w = store.raw.get("weights") or {}
        wfile = path / str(w.get("file", sf.WEIGHTS_FILE))
        size = wfile.stat().st_size
        if "size" in w and size != int(w["size"]):
            raise CheckpointError(f"{wfile}: {size} bytes, {sf.INDEX_FILE} says {w['size']}")
        if "crc32" in w:
            crc = 0
            with open(wfile, "rb") as f:
                while chunk := f.read(step):
                    crc = zlib.crc32(chunk, crc)
            if crc != int(w["crc32"]):
                raise CheckpointError(f"{wfile}: checksum mismatch (crc32 {crc:08x}, index says "
                                      f"{int(w['crc32']):08x})")
    finally:
        if bar is not None:
            bar.close()
        reader.close()
    return {"experts": len(entries), "bytes": len(entries) * store.expert_bytes}


if __name__ == "__main__":
    sys.exit(main())
