"""On-disk cache of arrays derived from traces (access sequences, next-use indices, the
per-layer miss counts of demand-paging runs).

Entries are ``.npy`` files named by a hash of (trace content fingerprint, what was derived,
the source code it was derived with). Location: ``$FMOE_SIM_CACHE``, else
``$XDG_CACHE_HOME/fmoe/sim``, else ``~/.cache/fmoe/sim``. ``FMOE_SIM_CACHE=off`` disables it.
Writes are atomic; an unwritable directory only disables caching.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..files import atomic_write


def cache_dir() -> Path | None:
    env = os.environ.get("FMOE_SIM_CACHE")
    if env is not None:
        if env.strip().lower() in ("", "0", "off", "none", "no"):
            return None
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fmoe" / "sim"


def hashed_files() -> list[Path]:
    """The source files a cached result may depend on: every module of the fmoe package (a
    replay runs the simulator, the slot table, the policies, their eviction rules and
    predictors, and whatever those import), so any change to the package's code starts a fresh
    cache."""
    root = Path(__file__).resolve().parent.parent
    return sorted(root.rglob("*.py"))


@lru_cache(maxsize=None)
def code_version() -> str:
    """Hash of the package's sources (`hashed_files`: paths and contents)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(digest_size=8)
    for f in hashed_files():
        h.update(str(f.relative_to(root)).encode() + b"\0")
        try:
            h.update(f.read_bytes())
        except OSError:
            h.update(b"?")
    return h.hexdigest()


def _path(*parts) -> Path | None:
    d = cache_dir()
    if d is None:
        return None
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16).hexdigest()
    return d / f"{parts[0]}-{h}.npy"


def load(*parts) -> np.ndarray | None:
    p = _path(*parts)
    if p is None or not p.exists():
        return None
    try:
        return np.load(p, allow_pickle=False)
    except (OSError, ValueError):
        return None


def save(arr: np.ndarray, *parts) -> None:
    p = _path(*parts)
    if p is None:
        return
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, lambda f: np.save(f, arr, allow_pickle=False), prefix=".tmp-", suffix=".npy")
    except OSError:
        pass
