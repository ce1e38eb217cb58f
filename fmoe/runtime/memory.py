"""How much memory this process may use: the memory cgroup's limit when one is set (v1 or v2,
the tightest along the hierarchy), else the machine's MemAvailable. `expert_cache="auto"` sizes
the cache from it, so a user on a small box (or in a container) need not do the arithmetic."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_UNLIMITED = 1 << 60          # v1 writes "no limit" as a huge number (9223372036854771712)


@dataclass(frozen=True)
class MemoryLimit:
    limit: int | None          # the cgroup limit in bytes, None when no cgroup limit applies
    available: int             # bytes still free for this process to allocate
    source: str                # "cgroup v1 <path>", "cgroup v2 <path>" or "MemAvailable"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _UNLIMITED else None


def _meminfo(proc: Path) -> dict[str, int]:
    out = {}
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def _rss(proc: Path) -> int:
    try:
        for line in (proc / "self" / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _ancestors(rel: str) -> list[str]:
    """'/a/b' -> ['/a/b', '/a', '/']"""
    parts = [p for p in rel.strip().split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_limit(proc: str | os.PathLike = "/proc",
                 cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> tuple[int, str] | None:
    """(limit bytes, source) of the memory cgroup this process is in, or None without one.
    Reads /proc/self/cgroup; v1 ``memory.limit_in_bytes`` and v2 ``memory.max`` files, taking the
    tightest limit along the path to the root."""
    proc, root = Path(proc), Path(cgroup_root)
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None

    def consider(value: int | None, source: str) -> None:
        nonlocal best
        if value is not None and (best is None or value < best[0]):
            best = (value, source)

    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, rel = fields
        if "memory" in controllers.split(","):                      # cgroup v1
            for base in (root / "memory", root):
                for anc in _ancestors(rel):
                    f = base / anc.lstrip("/") / "memory.limit_in_bytes"
                    consider(_read_int(f), f"cgroup v1 {f.parent}")
        elif controllers == "":                                      # cgroup v2 (unified)
            for base in (root, root / "unified"):
                for anc in _ancestors(rel):
                    f = base / anc.lstrip("/") / "memory.max"
                    consider(_read_int(f), f"cgroup v2 {f.parent}")
    return best


def memory_limit(proc: str | os.PathLike = "/proc",
                 cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> MemoryLimit:
    """What this process may still allocate: under a cgroup limit, the limit less what the
    process already holds (its page cache is reclaimable and not counted), never more than the
    machine's MemAvailable; without one, MemAvailable."""
    proc = Path(proc)
    info = _meminfo(proc)
    avail = info.get("MemAvailable", info.get("MemFree", 0))
    cg = cgroup_limit(proc, cgroup_root)
    if cg is None:
        return MemoryLimit(None, avail, "MemAvailable")
    limit, source = cg
    return MemoryLimit(limit, max(0, min(limit - _rss(proc), avail or limit)), source)


def device_memory(device) -> MemoryLimit:
    """What a CUDA device has free (`torch.cuda.mem_get_info`: other processes' use included),
    with its total as the limit; on the CPU, `memory_limit()`."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return memory_limit()
    free, total = torch.cuda.mem_get_info(device)
    return MemoryLimit(int(total), int(free), f"{device} memory")


def headroom(limit: MemoryLimit) -> int:
    """Bytes kept free beside the cache: activations, KV cache, read buffers, allocator slack:
    512 MiB + 8% of the limit (else of what is available); under a limit below 2 GiB, a quarter
    of it instead of the 512 MiB, so that a small model in a small container still gets a cache."""
    base = limit.limit if limit.limit is not None else limit.available
    return min(512 << 20, base // 4) + int(0.08 * base)


def auto_capacity(expert_bytes: int, total_experts: int, extra_per_slot: int = 0,
                  limit: MemoryLimit | None = None) -> tuple[int, str]:
    """The largest number of expert slots that fits, and a line saying how it was chosen."""
    limit = limit or memory_limit()
    room = limit.available - headroom(limit)
    slots = max(0, room // (expert_bytes + extra_per_slot))
    slots = min(slots, total_experts)
    gib = 2 ** 30
    where = (f"limit {limit.limit / gib:.1f} GiB ({limit.source})" if limit.limit is not None
             else f"{limit.source} {limit.available / gib:.1f} GiB")
    line = (f"expert_cache=auto: {slots} of {total_experts} experts "
            f"({slots * expert_bytes / gib:.2f} GiB); {where}, {limit.available / gib:.1f} GiB free "
            f"for this process, {headroom(limit) / gib:.2f} GiB kept as headroom")
    return int(slots), line
