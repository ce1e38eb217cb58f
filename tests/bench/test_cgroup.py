"""The memory-limited harness: cgroup set-up in dry-run mode, v1 and v2, and the tool's plan."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fmoe.bench.cgroup import MemoryCgroup

ROOT = Path(__file__).resolve().parents[2]


def test_v1_steps(tmp_path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")
    g = MemoryCgroup("job", 8 * 2**30, root=tmp_path, dry_run=True)
    with g:
        g.run(["python", "-c", "pass"], realtime=10)
    assert g.steps == [
        f"mkdir {tmp_path}/memory/job",
        f"write {tmp_path}/memory/job/memory.limit_in_bytes {8 * 2**30}",
        f"write {tmp_path}/memory/job/memory.memsw.limit_in_bytes {8 * 2**30}",
        f"exec in {tmp_path}/memory/job/cgroup.procs (SCHED_FIFO 10): python -c pass",
        f"rmdir {tmp_path}/memory/job",
    ]
    assert not (tmp_path / "memory" / "job").exists()       # a dry run touches nothing


def test_v2_steps(tmp_path):
    g = MemoryCgroup("job", 2**30, root=tmp_path, dry_run=True)
    with g:
        g.run(["true"])
    assert g.steps[:3] == [f"mkdir {tmp_path}/job", f"write {tmp_path}/job/memory.max {2**30}",
                           f"write {tmp_path}/job/memory.swap.max 0"]


def test_real_group_in_a_fake_tree(tmp_path):
    """Against a writable tree the group is created, limited, read back and removed."""
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("0")
    g = MemoryCgroup("job", 123, root=tmp_path)
    with g:
        assert (tmp_path / "memory/job/memory.limit_in_bytes").read_text() == "123"
        (tmp_path / "memory/job/memory.max_usage_in_bytes").write_text("77\n")
        (tmp_path / "memory/job/memory.oom_control").write_text("oom_kill_disable 0\noom_kill 1\n")
        assert g.peak() == 77 and g.oom_kills() == 1
        for f in (tmp_path / "memory/job").iterdir():
            f.unlink()                                     # a kernel tree empties itself
    assert not (tmp_path / "memory/job").exists()


def test_tool_dry_run(tmp_path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("0")
    out = subprocess.run([sys.executable, str(ROOT / "tools/bench_memlimit.py"), "--model", str(tmp_path),
                          "--limits", "8,12", "--contenders", "fmoe,pagecache", "--rounds", "2",
                          "--cgroup-root", str(tmp_path), "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    runs = [ln for ln in out.splitlines() if ln.startswith("# ")]
    assert runs == ["# fmoe at 8 GiB (round 1)", "# pagecache at 8 GiB (round 1)",
                    "# fmoe at 12 GiB (round 1)", "# pagecache at 12 GiB (round 1)",
                    "# pagecache at 8 GiB (round 2)", "# fmoe at 8 GiB (round 2)",
                    "# pagecache at 12 GiB (round 2)", "# fmoe at 12 GiB (round 2)"]
    assert f"write {tmp_path}/memory/" in out and "--expert-cache mmap" in out
    assert "fadvise DONTNEED" in out


def test_steal_fraction_from_proc_stat(tmp_path):
    from fmoe.bench.cgroup import cpu_times, steal_fraction

    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
    before = cpu_times(stat)
    assert before == (1000, 40)
    stat.write_text("cpu  200 0 100 1500 10 0 0 190 0 0\n")
    after = cpu_times(stat)
    assert after == (2000, 190)
    assert steal_fraction(before, after) == 0.15     # 150 stolen of 1000 ticks
    assert steal_fraction(after, after) is None
    assert cpu_times(tmp_path / "missing") == (0, 0)


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memlimit_tool", ROOT / "tools/bench_memlimit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tool_calibrates_and_simulates_each_fmoe_run(tmp_path):
    """`--calibrate DIR`: before each fmoe run a calibration at its limit, given to the run;
    after it a simulation of the same tokens on that profile, with the run's policy options;
    none for the page cache. Without a trace, or with per-sequence truncation, it is refused."""
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("0")
    cal = tmp_path / "cal"
    base = [sys.executable, str(ROOT / "tools/bench_memlimit.py"), "--model", str(tmp_path), "--limits", "8",
            "--cgroup-root", str(tmp_path), "--dry-run", "--calibrate", str(cal), "--sequences", "2"]
    out = subprocess.run(base + ["--contenders", "fmoe-lru,pagecache", "--routing-trace", "t.npz",
                                 "--extra", "fmoe-pf=--expert-cache auto --policy-option prefetch=true"],
                         capture_output=True, text=True, check=True).stdout
    blocks = {b.splitlines()[0]: b for b in out.split("# ")[1:]}
    lru, pf, pc = (blocks[f"{n} at 8 GiB (round 1)"] for n in ("fmoe-lru", "fmoe-pf", "pagecache"))
    for name, block in (("fmoe-lru", lru), ("fmoe-pf", pf)):
        prof = f"{cal}/cal-1-8-{name}.json"
        steps = block.splitlines()[1:]
        assert "fmoe.serve.cli calibrate" in steps[0] and f"--memory-limit 8GiB --out {prof}" in steps[0]
        # the run reads the profile where its policy does (LRU does not: bench refuses it there)
        reads = name != "fmoe-lru"
        assert any("fmoe.serve.cli bench" in s and (f"--hardware-profile {prof}" in s) == reads
                   for s in steps)
        assert "fmoe.serve.cli simulate" in steps[-1] and f"--hardware {prof}" in steps[-1]
        assert "--trace t.npz" in steps[-1]
    assert "--policy-option prefetch=true" in pf.splitlines()[-1]
    assert "--policy-option" not in lru.splitlines()[-1]
    assert "cli calibrate" not in pc and "cli simulate" not in pc and "--hardware" not in pc
    bad = subprocess.run(base + ["--contenders", "fmoe"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--calibrate needs --routing-trace" in bad.stderr
    bad = subprocess.run(base + ["--contenders", "fmoe", "--routing-trace", "t.npz", "--max-tokens", "50"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "without --max-tokens" in bad.stderr


def test_simulate_command_replays_the_runs_tokens():
    """The simulation of a finished run: its policy, capacity and execution, the trace's first
    tokens + sequences tokens (whole sequences from the first), its policy options; tokens/s
    from the simulator's TPOT."""
    import argparse

    tool = _tool()
    args = argparse.Namespace(python="py", routing_trace=Path("t.npz"), model=Path("m"))
    row = {"policy": "lru", "capacity": 247, "tokens": 403, "sequences": 12, "execution": "host"}
    cmd = tool.simulate_command(args, row, ["bench", "--policy-option", "a=1", "--threads", "2"], Path("p.json"))
    flag = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert cmd[:4] == ["py", "-m", "fmoe.serve.cli", "simulate"]
    assert flag["--policy"] == "lru" and flag["--capacity"] == "247" and flag["--max-tokens"] == "415"
    assert flag["--execution"] == "host" and flag["--hardware"] == "p.json" and flag["--trace"] == "t.npz"
    assert flag["--policy-option"] == "a=1" and "--threads" not in cmd
    # several options after one flag, as `fmoe bench` takes them, each passed on
    cmd = tool.simulate_command(args, row, ["bench", "--policy-option", "a=1", "b=2", "--json"], Path("p.json"))
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--policy-option"] == ["a=1", "b=2"]
    got = tool.parse_simulated('progress\n{"tpot_ms": 500.0, "hit_rate": 0.5}\n')
    assert got == {"simulated_tokens_per_s": 2.0, "simulated_hit_rate": 0.5}
    assert tool.calibrates("fmoe", ["--expert-cache", "auto"])
    assert not tool.calibrates("pagecache", ["--expert-cache", "mmap"])
    assert not tool.calibrates("llama.cpp", ["-lm", "mmap"])
