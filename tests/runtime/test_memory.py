"""`expert_cache="auto"`: the memory limit read from fake /proc and cgroup trees (v1 and v2),
and the capacity arithmetic."""

from __future__ import annotations

import pytest

from fmoe.runtime.memory import MemoryLimit, auto_capacity, cgroup_limit, headroom, memory_limit

GiB = 2 ** 30


def fake_proc(tmp_path, cgroup_lines, avail_kb=20 * 2**20, rss_kb=2 * 2**20):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("\n".join(cgroup_lines) + "\n")
    (proc / "meminfo").write_text(f"MemTotal: {24 * 2**20} kB\nMemFree: 1000 kB\nMemAvailable: {avail_kb} kB\n")
    (proc / "self" / "status").write_text(f"Name: python\nVmRSS:\t{rss_kb} kB\n")
    return proc


def test_v1_limit_nearest_and_tightest(tmp_path):
    proc = fake_proc(tmp_path, ["4:memory:/outer/inner", "3:cpu:/", "0::/"])
    root = tmp_path / "cg"
    for rel, limit in (("memory/outer/inner", 12 * GiB), ("memory/outer", 16 * GiB),
                       ("memory", 9223372036854771712)):
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "memory.limit_in_bytes").write_text(f"{limit}\n")
    assert cgroup_limit(proc, root)[0] == 12 * GiB
    (root / "memory/outer/memory.limit_in_bytes").write_text(f"{8 * GiB}\n")   # a tighter parent
    lim = memory_limit(proc, root)
    assert lim.limit == 8 * GiB and "cgroup v1" in lim.source
    assert lim.available == 8 * GiB - 2 * GiB          # the limit less this process's RSS


def test_v2_max_and_unlimited(tmp_path):
    proc = fake_proc(tmp_path, ["0::/user.slice/job"])
    root = tmp_path / "cg"
    (root / "user.slice/job").mkdir(parents=True)
    (root / "user.slice/job/memory.max").write_text("max\n")
    assert cgroup_limit(proc, root) is None
    lim = memory_limit(proc, root)
    assert lim == MemoryLimit(None, 20 * GiB, "MemAvailable")
    (root / "user.slice/memory.max").write_text(f"{6 * GiB}\n")
    lim = memory_limit(proc, root)
    assert lim.limit == 6 * GiB and "cgroup v2" in lim.source


def test_available_never_above_memavailable(tmp_path):
    proc = fake_proc(tmp_path, ["4:memory:/x"], avail_kb=3 * 2**20)
    (tmp_path / "cg/memory/x").mkdir(parents=True)
    (tmp_path / "cg/memory/x/memory.limit_in_bytes").write_text(f"{12 * GiB}")
    assert memory_limit(proc, tmp_path / "cg").available == 3 * GiB


def test_no_cgroup_file(tmp_path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemAvailable: 1048576 kB\n")
    assert memory_limit(proc, tmp_path / "none") == MemoryLimit(None, GiB, "MemAvailable")


def test_auto_capacity_arithmetic():
    lim = MemoryLimit(12 * GiB, 9 * GiB, "cgroup v1 /x")
    room = headroom(lim)
    assert room == 512 * 2**20 + int(0.08 * 12 * GiB)
    slots, line = auto_capacity(17 * 2**20, 10_000, limit=lim)
    assert slots == (9 * GiB - room) // (17 * 2**20)
    assert f"{slots} of 10000 experts" in line and "cgroup v1" in line
    assert auto_capacity(17 * 2**20, 100, limit=lim)[0] == 100           # everything fits
    assert auto_capacity(17 * 2**20, 100, limit=MemoryLimit(GiB, 100, "x"))[0] == 0
    # a small container: a quarter of an 800 MiB limit, not 512 MiB, is kept (the fixed 512 MiB
    # left no room at all beside a 228 MiB process)
    small = MemoryLimit(800 * 2**20, 572 * 2**20, "cgroup v1 /small")
    assert headroom(small) == 200 * 2**20 + int(0.08 * 800 * 2**20)
    assert auto_capacity(2**20, 48, limit=small)[0] == 48


def test_auto_in_from_pretrained(mixtral_ckpt, capsys):
    import fmoe

    path, _ = mixtral_ckpt
    m = fmoe.models.from_pretrained(path, expert_cache="auto", policy="lru")
    assert m.expert_stats()["capacity"] == 2 * 8           # a tiny model: every expert fits
    assert "expert_cache=auto: 16 of 16 experts" in capsys.readouterr().err
    m.close()


def test_auto_too_small_is_a_clear_error(mixtral_ckpt, monkeypatch):
    import fmoe
    import fmoe.runtime.memory as memory

    path, _ = mixtral_ckpt
    monkeypatch.setattr(memory, "memory_limit", lambda: MemoryLimit(GiB, 0, "cgroup v1 /tiny"))
    with pytest.raises(ValueError, match="no expert fits"):
        fmoe.models.from_pretrained(path, expert_cache="auto")


def test_numpy_scalars_are_cache_sizes():
    import numpy as np

    from fmoe.runtime.offload import cache_form

    assert cache_form(np.int64(4)) == ("count", 4)
    assert cache_form(np.float32(0.5)) == ("fraction", 0.5)


def test_auto_on_cuda_sizes_the_cache_from_the_gpus_free_memory(monkeypatch, capsys):
    """On a CUDA device the cache is what the GPU has free (less headroom), not host memory."""
    import torch

    from fmoe.runtime.offload import parse_capacity

    GiB = 2**30
    seen = []

    def info(device):
        seen.append(torch.device(device))
        return 20 * GiB, 80 * GiB

    monkeypatch.setattr(torch.cuda, "mem_get_info", info)
    monkeypatch.setattr("fmoe.runtime.memory.memory_limit",
                        lambda *a, **k: pytest.fail("host memory read for a CUDA cache"))
    slots = parse_capacity("auto", 26, 64, 6, GiB // 8, torch.device("cuda:1"))
    # 20 GiB free less 512 MiB and 8% of 80 GiB (6.4 GiB) = 13.1 GiB -> 104 experts of 128 MiB
    assert slots == (20 * GiB - 512 * 2**20 - int(0.08 * 80 * GiB)) // (GiB // 8) == 104
    assert seen == [torch.device("cuda:1")]
    assert "cuda:1 memory" in capsys.readouterr().err
