"""Kernel parameters for the Triton fused MoE: tuned JSON files, and defaults.

A config file holds the tiles tuned for one weight shape on one device with one Triton
version. Its name is the key::

    E={slots},N={I},K={H},device_name={name},dtype={dtype},triton={version}.json

(N = intermediate size per expert, K = hidden size; the kernel runs ``[M, H] x [H, 2I]`` and
``[M, I] x [I, H]`` with the same tiles). The content maps a token count T to a config::

    {"1": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1,
           "num_warps": 4, "num_stages": 3}, "64": {...}, ...}

and the entry with the nearest T is used. Files are read from ``fmoe/kernels/configs/`` and,
first, from the directory in ``$FMOE_KERNEL_CONFIG_DIR`` if set. ``tools/tune_fused_moe.py``
writes them.

Why the number of slots only breaks ties: resident runs (S = E) and offloaded runs
(S = cache capacity) of the same model must run the same tiles, or their results could differ
in the last bit on a GPU. So a file is matched on (N, K, device, dtype); E only chooses among
several such files (nearest E), and the default config depends on T and top-k, never on S.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_DIR_ENV = "FMOE_KERNEL_CONFIG_DIR"
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")

_NAME_RE = re.compile(
    r"^E=(?P<E>\d+),N=(?P<N>\d+),K=(?P<K>\d+),device_name=(?P<device>[^,]+),"
    r"dtype=(?P<dtype>[a-z0-9]+),triton=(?P<triton>[^,]+)\.json$")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def device_name(device: torch.device | str) -> str:
    """A file-name-safe device name: "NVIDIA_H200", or "cpu" for the interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_device_name(index)
    return device.type


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_").replace(",", "_")


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def config_file_name(num_slots: int, inter: int, hidden: int, device: str, dtype: torch.dtype | str,
                     version: str) -> str:
    """The file name that keys one tuned table (see the module docstring)."""
    dt = dtype if isinstance(dtype, str) else dtype_name(dtype)
    return f"E={num_slots},N={inter},K={hidden},device_name={device},dtype={dt},triton={version}.json"


def _config_dirs() -> tuple[Path, ...]:
    extra = os.environ.get(CONFIG_DIR_ENV)
    return (Path(extra), CONFIG_DIR) if extra else (CONFIG_DIR,)


@functools.lru_cache(maxsize=None)
def _find_table(dirs: tuple[Path, ...], num_slots: int, inter: int, hidden: int, device: str,
                dtype: str, version: str) -> tuple[str, dict[int, dict]] | None:
    """Pick the best matching file: same (N, K, device, dtype); then same Triton version;
    then nearest E. Returns (path, {T: config}) or None. Cached: files are read once."""
    candidates = []
    for order, d in enumerate(dirs):
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.json")):
            m = _NAME_RE.match(path.name)
            if not m or (int(m["N"]), int(m["K"]), m["device"], m["dtype"]) != (inter, hidden, device, dtype):
                continue
            rank = (order, m["triton"] != version, abs(int(m["E"]) - num_slots), int(m["E"]))
            candidates.append((rank, path))
    if not candidates:
        return None
    rank, path = min(candidates)
    with open(path) as f:
        raw = json.load(f)
    table = {int(t): {k: int(v) for k, v in cfg.items() if k in CONFIG_KEYS} for t, cfg in raw.items()}
    if rank[1]:
        logger.info("fused_moe: using %s, tuned with another Triton version than %s", path.name, version)
    return str(path), table


@functools.lru_cache(maxsize=None)
def _log_default(key: tuple, warn: bool) -> None:
    msg = ("fused_moe: no tuned config for %s in %s; using defaults (tune with "
           "tools/tune_fused_moe.py from a clone of the repository, into $FMOE_KERNEL_CONFIG_DIR)",
           config_file_name(*key), [str(d) for d in _config_dirs()])
    (logger.warning if warn else logger.info)(*msg)


# Shared memory the default tiles may use: fits every NVIDIA GPU from sm_80 on (sm_86/89 offer
# ~99 KiB per block; A100/H100/H200 more).
DEFAULT_SMEM_BUDGET = 96 * 1024


def default_config(num_tokens: int, top_k: int, interpret: bool = False, element_size: int = 2) -> dict:
    """Tiles that work everywhere, chosen by the number of (token, k) pairs only.

    Decode (few pairs, about one row per expert) wants short M tiles and long K tiles to keep
    the weight stream going; prefill wants square-ish tiles and grouped ordering so a weight
    tile is reused from L2 across M blocks. Pipeline stages are cut until the staged A and B
    tiles fit ``DEFAULT_SMEM_BUDGET`` (fp32 gets fewer). Under the CPU interpreter the cost is
    per program, so tiles are large.
    """
    pairs = num_tokens * top_k
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1)
    if pairs <= 64:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    elif pairs <= 1024:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    stage_bytes = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * element_size
    while cfg["num_stages"] > 1 and cfg["num_stages"] * stage_bytes > DEFAULT_SMEM_BUDGET:
        cfg["num_stages"] -= 1
    return cfg


def get_config(num_tokens: int, top_k: int, num_slots: int, inter: int, hidden: int,
               dtype: torch.dtype, device: torch.device | str, interpret: bool = False) -> dict:
    """The kernel parameters for one call: tuned (nearest T) if a file matches, else defaults."""
    dev = device_name(device)
    version = triton_version()
    found = _find_table(_config_dirs(), num_slots, inter, hidden, dev, dtype_name(dtype), version)
    default = default_config(num_tokens, top_k, interpret, element_size=dtype.itemsize)
    if found is None:
        _log_default((num_slots, inter, hidden, dev, dtype_name(dtype), version), warn=not interpret)
        return default
    _, table = found
    nearest = min(table, key=lambda t: (abs(t - num_tokens), t))
    return default | table[nearest]          # keys a file leaves out come from the defaults


def clear_cache() -> None:
    """Forget files read so far (after writing a new config, or in tests)."""
    _find_table.cache_clear()
    _log_default.cache_clear()
