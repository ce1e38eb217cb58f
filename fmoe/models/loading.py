"""From a checkpoint directory (or hub id) to a family module with its non-expert weights loaded,
and a map of where every routed expert's bytes live. Strict: every expected tensor present with
the right shape; missing and unexpected tensors named in the error."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, ModelNotFoundError
from .checkpoint import CheckpointIndex, FileReader, TensorInfo
from .config import build_config, read_config_json
from .registry import family_for
from .store_format import open_store

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local directory, or a hub repo id fetched (or found in the cache) by huggingface_hub.
    Honours HF_HUB_OFFLINE."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise ModelNotFoundError(f"{path}: not a directory (expected config.json + *.safetensors)")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"{name}: no such directory, and not a hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError)
    except ImportError:  # pragma: no cover
        raise ModelNotFoundError(f"{name}: not a local directory and huggingface_hub is missing")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise ModelNotFoundError(f"{name}: not in the local hub cache and {why}") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{name}: no such repository on the hub") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"{name}: cannot download ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Segment:
    """A contiguous byte range of one checkpoint tensor."""

    info: TensorInfo
    byte_offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertLayout:
    """Where one routed expert lives: w13 bytes (gate rows then up rows) and w2 bytes, each the
    concatenation of its segments, in checkpoint dtype `dtype`."""

    w13: tuple[Segment, ...]
    w2: tuple[Segment, ...]
    dtype: torch.dtype
    checksum: int | None = None   # CRC-32 of the w13 bytes then the w2 bytes (fmoe store only)
    name: str | None = None       # for errors, e.g. "expert 5 of layer 3"

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.w13 + self.w2)


def _whole(info: TensorInfo) -> Segment:
    return Segment(info, 0, info.nbytes)


def _check_shape(info: TensorInfo, shape: tuple[int, ...]) -> None:
    if tuple(info.shape) != tuple(shape):
        raise CheckpointError(f"{info.file.name}: tensor {info.name!r} has shape {list(info.shape)}, "
                              f"expected {list(shape)}")


def locate_experts(cfg, index: CheckpointIndex) -> tuple[list[list[ExpertLayout]], set[str]]:
    """For every MoE layer and expert, its `ExpertLayout`; also the checkpoint names used.
    Accepts per-expert keys and the fused ``gate_up_proj``/``down_proj`` layout, per layer."""
    shp = cfg.experts
    H, I, E = shp.hidden, shp.inter, shp.num_experts
    layouts: list[list[ExpertLayout]] = []
    used: set[str] = set()
    missing: list[str] = []
    for layer in range(shp.num_layers):
        fused_gu, fused_d = cfg.fused_expert_keys(layer)
        row: list[ExpertLayout] = []
        if fused_gu in index and fused_d in index:
            gu, d = index[fused_gu], index[fused_d]
            _check_shape(gu, (E, 2 * I, H))
            _check_shape(d, (E, H, I))
            used.update((fused_gu, fused_d))
            n13, n2 = gu.nbytes // E, d.nbytes // E
            for e in range(E):
                row.append(ExpertLayout((Segment(gu, e * n13, n13),), (Segment(d, e * n2, n2),), gu.dtype))
        else:
            for e in range(E):
                names = cfg.expert_keys(layer, e)
                absent = [n for n in names if n not in index]
                if absent:
                    missing.extend(absent)
                    continue
                g, u, d = (index[n] for n in names)
                _check_shape(g, (I, H))
                _check_shape(u, (I, H))
                _check_shape(d, (H, I))
                if not g.dtype == u.dtype == d.dtype:
                    raise CheckpointError(f"expert {layer}/{e}: tensors have mixed dtypes")
                used.update(names)
                row.append(ExpertLayout((_whole(g), _whole(u)), (_whole(d),), g.dtype))
        layouts.append(row)
    if missing:
        raise CheckpointError(_name_list("missing tensors", missing))
    return layouts, used


def _name_list(what: str, names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return f"{what}: {shown}{more}"


def read_expert(reader: FileReader, layout: ExpertLayout, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """Read one expert into contiguous CPU buffers w13 [2I, H] and w2 [H, I] of the checkpoint
    dtype. Segments contiguous in one file are read with one `preadv` into several buffers: one
    read per expert from fmoe's store, and usually from HF files too (an expert's gate, up and
    down tensors sit side by side there). With ``FMOE_VERIFY_READS=1`` a store expert's CRC-32
    is checked after the read."""
    from .checkpoint import byte_view

    pieces = []   # (file, absolute offset, destination bytes, tensor name)
    for segs, out in ((layout.w13, w13), (layout.w2, w2)):
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

        crc = zlib.crc32(byte_view(w2), zlib.crc32(byte_view(w13)))
        if crc != layout.checksum:
            raise CheckpointError(f"{layout.w13[0].info.file}: checksum mismatch in {layout.name or 'an expert'} "
                                  f"(crc32 {crc:08x}, index says {layout.checksum:08x}): the store is corrupt")


def build_model(root: Path, device: torch.device, dtype: torch.dtype | None):
    """Config, module with non-expert weights loaded (experts still pending), checkpoint index,
    expert layouts and the resolved dtype."""
    raw = read_config_json(root)
    family = family_for(raw.get("model_type"))
    config_cls, model_cls = family.load()
    cfg = build_config(config_cls, raw, str(root / 'config.json'))
    index = CheckpointIndex(root)
    store = open_store(root)     # fmoe's expert-major store (`fmoe convert`), or None for HF files
    dtype = dtype or (store.dtype if store is not None else index.dtype)
    layouts, expert_names = store.layouts(cfg) if store is not None else locate_experts(cfg, index)

    with torch.device("meta"):
        model = model_cls(cfg)
    model = model.to_empty(device=device).to(dtype)
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers(device)

    reader = FileReader()
    if store is not None:
        reader.use_direct(store.blob)
    renames = getattr(cfg, "checkpoint_renames", ())
    used = set(expert_names)
    missing = []
    params = dict(model.named_parameters())
    jobs = []
    for name, param in params.items():
        if name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue
        key = _find(name, index, renames)
        if key is None:
            missing.append(name)
            continue
        info = index[key]
        _check_shape(info, tuple(param.shape))
        jobs.append((param, info))
        used.add(key)
    _read_params(reader, jobs)
    if getattr(cfg, "tie_word_embeddings", False):
        if "lm_head.weight" in index:
            used.add("lm_head.weight")
        model.lm_head.weight = model.model.embed_tokens.weight
    if missing:
        raise CheckpointError(_name_list(f"{root}: missing tensors", missing))
    ignored = [re.compile(p) for p in getattr(cfg, "checkpoint_ignore", ())]   # e.g. V3's MTP layers
    unexpected = sorted(k for k in index.keys() if k not in used and not k.endswith("rotary_emb.inv_freq")
                        and not any(p.match(k) for p in ignored))
    if unexpected:
        raise CheckpointError(_name_list(f"{root}: unexpected tensors", unexpected))
    model.eval()
    return cfg, model, index, layouts, dtype, reader


def _read_params(reader: FileReader, jobs) -> None:
    """Read every (parameter, tensor) pair, a few at a time: a cold disk serves several reads
    at once faster than one after the other. A CPU parameter of the checkpoint's dtype is read
    straight into its memory."""
    from concurrent.futures import ThreadPoolExecutor

    def one(job):
        param, info = job
        with torch.no_grad():
            if param.device.type == "cpu" and param.dtype == info.dtype and param.is_contiguous():
                reader.read_into(info, param.data)
            else:
                param.copy_(reader.read(info))

    bar = load_bar(sum(info.nbytes for _, info in jobs), "load weights")
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="fmoe-load") as pool:
        for (_, info), _ in zip(jobs, pool.map(one, jobs)):
            if bar is not None:
                bar.update(info.nbytes)
    if bar is not None:
        bar.close()


# Loads of at least this many bytes show a progress bar on a terminal (FMOE_PROGRESS=0 hides
# it, FMOE_PROGRESS=1 shows it whatever the size and the terminal).
PROGRESS_BYTES = 1 << 30


def load_bar(total: int, desc: str):
    """A tqdm bar over `total` bytes on stderr, or None (small load, no terminal, no tqdm)."""
    mode = os.environ.get("FMOE_PROGRESS", "auto").lower()
    if mode in ("0", "false", "no", "off") or (mode == "auto" and total < PROGRESS_BYTES):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=None if mode == "auto" else False, file=sys.stderr)


def _find(name: str, index: CheckpointIndex, renames) -> str | None:
    if name in index:
        return name
    for old, new in renames:
        alt = name.replace(old, new)
        if alt in index:
            return alt
    return None


def install_resident_experts(model: nn.Module, cfg, layouts, reader: FileReader,
                             device: torch.device, dtype: torch.dtype) -> None:
    """Every routed expert on `device`: per layer w13 [E, 2I, H] and w2 [E, H, I]."""
    from .experts import ResidentExperts

    shp = cfg.experts
    bar = load_bar(sum(l.nbytes for row in layouts for l in row), "load experts")
    for layer, block in enumerate(model.moe_blocks()):
        src_dtype = layouts[layer][0].dtype
        w13 = torch.empty(shp.num_experts, 2 * shp.inter, shp.hidden, dtype=src_dtype)
        w2 = torch.empty(shp.num_experts, shp.hidden, shp.inter, dtype=src_dtype)
        for e, lay in enumerate(layouts[layer]):
            read_expert(reader, lay, w13[e], w2[e])
            if bar is not None:
                bar.update(lay.nbytes)
        block.experts = ResidentExperts(layer, w13.to(device=device, dtype=dtype),
                                        w2.to(device=device, dtype=dtype))
    if bar is not None:
        bar.close()
