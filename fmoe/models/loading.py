"""From a checkpoint directory (or hub id) to a family module with its non-expert weights loaded,
and a map of where every routed expert's bytes live. Strict: every expected tensor present with
the right shape; missing and unexpected tensors named in the error."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, ModelNotFoundError
from ..io.checkpoint import CheckpointIndex, FileReader, TensorInfo
from ..io.layout import ExpertLayout, Segment, expert_buffers, read_expert
from ..io.store_format import open_store
from .config import build_config, read_config_json
from .registry import family_for

log = logging.getLogger("fmoe.models")

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub lays it out: ``HF_HUB_CACHE``, else ``HF_HOME/hub``,
    else ``~/.cache/huggingface/hub``. Read at call time (huggingface_hub reads its settings
    once, at import)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")   # (legacy name)
    if hub:
        return Path(os.path.expandvars(hub)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def check_snapshot(name: str, root: Path) -> None:
    """A hub snapshot holds config.json and every weight file its index lists (a download that
    stopped half way leaves a snapshot without some shards, or links to absent blobs). Raises
    `ModelNotFoundError` naming the first missing file."""
    import json

    def missing(f: str) -> ModelNotFoundError:
        how = ("HF_HUB_OFFLINE is set: download it with network access first" if _offline()
               else "download it again")
        return ModelNotFoundError(f"{name}: the hub cache snapshot {root} is incomplete: {f} is missing ({how})")

    if not (root / "config.json").exists():          # exists() follows the link to its blob
        raise missing("config.json")
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return                                     # the checkpoint reader names a bad index
        for f in files:
            if not (root / f).exists():
                raise missing(f)
    elif not any(root.glob("*.safetensors")):
        raise missing("model.safetensors")


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local directory, or a hub repo id fetched (or found in the cache) by huggingface_hub.
    With ``HF_HUB_OFFLINE=1`` a hub id resolves from the local cache (``HF_HUB_CACHE``) only,
    and an incomplete snapshot is refused naming the missing file."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        if path.suffix.lower() == ".gguf":
            raise ModelNotFoundError(f"{path}: a GGUF file; fmoe loads the safetensors checkpoint (a "
                                     f"directory with config.json + *.safetensors, or its hub id)")
        raise ModelNotFoundError(f"{path}: not a directory (expected config.json + *.safetensors)")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"{name}: no such directory, and not a hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover
        raise ModelNotFoundError(f"{name}: not a local directory, and huggingface_hub cannot be "
                                 f"imported to fetch it ({e})") from None
    offline = _offline()
    cache = hub_cache_dir()
    try:
        # cache and offline mode passed explicitly: both are read from the environment now, not
        # when huggingface_hub was first imported
        root = Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS, cache_dir=str(cache),
                                      local_files_only=offline))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise ModelNotFoundError(f"{name}: not in the local hub cache ({cache}) and {why}") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{name}: no such repository on the hub") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelNotFoundError(f"{name}: cannot download ({type(e).__name__}: {e})") from None
    check_snapshot(name, root)
    return root


def _whole(info: TensorInfo) -> Segment:
    return Segment(info, 0, info.nbytes)


def _check_shape(info: TensorInfo, shape: tuple[int, ...]) -> None:
    if tuple(info.shape) != tuple(shape):
        raise CheckpointError(f"{info.file.name}: tensor {info.name!r} has shape {list(info.shape)}, "
                              f"expected {list(shape)}")


def locate_experts(cfg, index: CheckpointIndex) -> tuple[list[list[ExpertLayout]], set[str]]:
    """For every MoE layer and expert, its `ExpertLayout`; also the checkpoint names used.
    Accepts per-expert keys and the fused ``gate_up_proj``/``down_proj`` layout, per layer.
    Per-expert FP8 tensors bring their ``weight_scale_inv`` scales (block size from
    ``config.json``)."""
    from ..io.fp8 import is_fp8, scale_name, scale_shape

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
            if is_fp8(gu.dtype) or is_fp8(d.dtype):
                raise CheckpointError(f"{gu.file.name}: tensor {fused_gu!r} is FP8 in the fused expert "
                                      f"layout, which fmoe does not read; FP8 experts must be "
                                      f"per-expert tensors with weight_scale_inv, as published")
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
                if not is_fp8(g.dtype):
                    row.append(ExpertLayout((_whole(g), _whole(u)), (_whole(d),), g.dtype))
                    continue
                quant = index.quant          # raises when config.json gives no block size
                snames = [scale_name(n) for n in names]
                absent = [n for n in snames if n not in index]
                if absent:
                    missing.extend(absent)
                    continue
                gs, us, ds = (index[n] for n in snames)
                for w, sc in ((g, gs), (u, us), (d, ds)):
                    _check_shape(sc, scale_shape(w.shape, quant.block))
                if not gs.dtype == us.dtype == ds.dtype or not gs.dtype.is_floating_point:
                    raise CheckpointError(f"{gs.file.name}: scales of expert {layer}/{e} ({', '.join(snames)}) "
                                          f"must share one floating dtype")
                used.update(snames)
                row.append(ExpertLayout((_whole(g), _whole(u)), (_whole(d),), g.dtype,
                                        s13=(_whole(gs), _whole(us)), s2=(_whole(ds),),
                                        block=quant.block, scale_dtype=gs.dtype))
        layouts.append(row)
    if missing:
        raise _missing("missing tensors", missing, index)
    return layouts, used


def _name_list(what: str, names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return f"{what}: {shown}{more}"


def _missing(what: str, missing: list[str], index) -> CheckpointError:
    """The error for tensors not in the checkpoint, saying so when the checkpoint holds them
    under other names: without the ``model.`` prefix (a base model saved without its
    language-model head, which fmoe does not invent)."""
    bare = [n[len("model."):] for n in missing if n.startswith("model.")]
    hint = ""
    if bare and sum(n in index for n in bare) >= max(1, len(bare) // 2):
        hint = ("; the checkpoint has them without the 'model.' prefix (a base model saved without "
                "its causal-LM wrapper: save the ...ForCausalLM model instead)")
    return CheckpointError(_name_list(what, missing) + hint)


def expert_layouts(root: Path, dtype: torch.dtype | None):
    """What a load knows before it reads any weight: (config, the family's model class, the
    checkpoint index, fmoe's store or None, the routed experts' layouts [L][E], the checkpoint
    names they use, the serving dtype). Also what `fmoe calibrate` reads experts by."""
    raw = read_config_json(root)
    config_cls, model_cls = family_for(raw.get("model_type"), str(root / "config.json")).load()
    cfg = build_config(config_cls, raw, str(root / 'config.json'))
    index = CheckpointIndex(root)
    _ = index.quant              # checked before anything is read: refuses GPTQ, AWQ, ...
    store = open_store(root)     # fmoe's expert-major store (`fmoe convert`), or None for HF files
    dtype = dtype or (store.dtype if store is not None else index.dtype)
    layouts, expert_names = store.layouts(cfg) if store is not None else locate_experts(cfg, index)
    return cfg, model_cls, index, store, layouts, expert_names, dtype


def build_model(root: Path, device: torch.device, dtype: torch.dtype | None):
    """Config, module with non-expert weights loaded (experts still pending), checkpoint index,
    expert layouts and the resolved dtype. FP8 block-scaled weights are dequantised into the
    serving dtype here (routed experts stay FP8 in their layouts); with ``dtype=None`` an FP8
    checkpoint serves in the dtype of its unquantised tensors (bf16 as published)."""
    from ..io.fp8 import is_fp8, scale_name, scale_shape

    cfg, model_cls, index, store, layouts, expert_names, dtype = expert_layouts(root, dtype)
    quant = index.quant

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
        scale = None
        if is_fp8(info.dtype):
            sname = scale_name(key)
            if sname not in index:
                missing.append(sname)
                continue
            scale = index[sname]
            _check_shape(scale, scale_shape(info.shape, quant.block))
            used.add(sname)
        jobs.append((param, info, scale))
        used.add(key)
    _read_params(reader, jobs, quant.block if quant is not None else None)
    if getattr(cfg, "tie_word_embeddings", False):
        if "lm_head.weight" in index:
            used.add("lm_head.weight")
        model.lm_head.weight = model.model.embed_tokens.weight
    if missing:
        raise _missing(f"{root}: missing tensors", missing, index)
    ignored = [re.compile(p) for p in getattr(cfg, "checkpoint_ignore", ())]   # e.g. V3's MTP layers
    rest = [k for k in index.keys() if k not in used and not k.endswith("rotary_emb.inv_freq")]
    skipped = [k for k in rest if any(p.match(k) for p in ignored)]
    unexpected = sorted(k for k in rest if not any(p.match(k) for p in ignored))
    if unexpected:
        raise CheckpointError(_name_list(f"{root}: unexpected tensors", unexpected))
    if skipped:
        n = getattr(cfg, "num_nextn_predict_layers", 0)
        log.info("%s: skipped %d tensors of %d multi-token-prediction layer(s) "
                 "(num_nextn_predict_layers): decoding runs one token per step", root, len(skipped), n)
    model.eval()
    return cfg, model, index, layouts, dtype, reader


def _read_params(reader: FileReader, jobs, block: tuple[int, int] | None = None) -> None:
    """Read every (parameter, tensor, scale) triple, a few at a time: a cold disk serves several
    reads at once faster than one after the other. A CPU parameter of the checkpoint's dtype is
    read straight into its memory; an FP8 tensor (scale not None) is dequantised into it."""
    from concurrent.futures import ThreadPoolExecutor

    from ..io.fp8 import dequantize

    def one(job):
        param, info, scale = job
        with torch.no_grad():
            if scale is not None:
                param.copy_(dequantize(reader.read(info), reader.read(scale), block))
            elif param.device.type == "cpu" and param.dtype == info.dtype and param.is_contiguous():
                reader.read_into(info, param.data)
            else:
                param.copy_(reader.read(info))
        # its pages go as soon as it is read, not after the whole load: under a memory limit the
        # load's page cache filled the cgroup (reclaimed, but at the limit)
        reader.forget(info)
        if scale is not None:
            reader.forget(scale)

    bar = load_bar(sum(info.nbytes for _, info, _ in jobs), "load weights")
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="fmoe-load") as pool:
        for (_, info, _), _ in zip(jobs, pool.map(one, jobs)):
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
    """Every routed expert on `device`: per layer w13 [E, 2I, H] and w2 [E, H, I]. FP8 experts
    are dequantised on `device` into `dtype` (the same function fills offloaded slots)."""
    from ..io.fp8 import dequantize_expert
    from .experts import ResidentExperts

    shp = cfg.experts
    bar = load_bar(sum(l.nbytes for row in layouts for l in row), "load experts")
    for layer, block in enumerate(model.moe_blocks()):
        lay0 = layouts[layer][0]
        if lay0.quantized:
            w13 = torch.empty(shp.num_experts, 2 * shp.inter, shp.hidden, dtype=dtype, device=device)
            w2 = torch.empty(shp.num_experts, shp.hidden, shp.inter, dtype=dtype, device=device)
            raw = expert_buffers(lay0, shp.hidden, shp.inter)
            for e, lay in enumerate(layouts[layer]):
                read_expert(reader, lay, *raw)
                q13, q2, s13, s2 = (t.to(device) for t in raw)
                dequantize_expert(q13, q2, s13, s2, lay.block, w13[e], w2[e])
                if bar is not None:
                    bar.update(lay.nbytes)
            block.experts = ResidentExperts(layer, w13, w2)
            continue
        src_dtype = lay0.dtype
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
