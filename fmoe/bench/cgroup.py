"""Run a command inside a memory cgroup, like a machine with that much memory: the limit covers
the process *and its page cache*, so a contender cannot lean on memory the box would not have.

cgroup v1 (``/sys/fs/cgroup/memory``): ``memory.limit_in_bytes``, ``memory.max_usage_in_bytes``,
``memory.oom_control``; cgroup v2: ``memory.max``, ``memory.peak``, ``memory.events``. Needs root.
The command's own pid joins the group before it executes (a pre-exec step), so everything it
allocates is charged from the start. `dry_run` records the steps instead of doing them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunResult:
    returncode: int
    oom_killed: bool
    peak_bytes: int | None
    wall_seconds: float
    stdout: str
    stderr: str


@dataclass
class MemoryCgroup:
    """One memory cgroup with a hard limit (bytes). Use as a context manager: created on enter,
    removed on exit."""

    name: str
    limit: int
    root: Path = Path("/sys/fs/cgroup")
    dry_run: bool = False
    steps: list[str] = field(default_factory=list)

    @property
    def version(self) -> int:
        return 1 if (self.root / "memory" / "memory.limit_in_bytes").exists() or \
            (self.dry_run and (self.root / "memory").is_dir()) else 2

    @property
    def path(self) -> Path:
        return (self.root / "memory" / self.name) if self.version == 1 else (self.root / self.name)

    def _write(self, file: str, value) -> None:
        self.steps.append(f"write {self.path / file} {value}")
        if not self.dry_run:
            (self.path / file).write_text(str(value))

    def _read(self, file: str) -> str | None:
        try:
            return (self.path / file).read_text()
        except OSError:
            return None

    def __enter__(self) -> "MemoryCgroup":
        self.steps.append(f"mkdir {self.path}")
        if not self.dry_run:
            self.path.mkdir(exist_ok=False)
        try:
            if self.version == 1:
                self._write("memory.limit_in_bytes", self.limit)
                # no swap beyond the limit either (ignored where swap accounting is off)
                if (self.path / "memory.memsw.limit_in_bytes").exists() or self.dry_run:
                    self._write("memory.memsw.limit_in_bytes", self.limit)
            else:
                self._write("memory.max", self.limit)
                if (self.path / "memory.swap.max").exists() or self.dry_run:
                    self._write("memory.swap.max", 0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.steps.append(f"rmdir {self.path}")
        if self.dry_run:
            return
        for _ in range(50):                # the killed process may take a moment to leave
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)

    def peak(self) -> int | None:
        text = self._read("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")
        return int(text) if text and text.strip().isdigit() else None

    def oom_kills(self) -> int:
        text = self._read("memory.oom_control" if self.version == 1 else "memory.events") or ""
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill" and v.strip().isdigit():
                return int(v)
        return 0

    def run(self, cmd: list[str], timeout: float | None = None, env: dict | None = None,
            realtime: int = 0) -> RunResult:
        """Run `cmd` inside the group; wait; report exit code, OOM kill and peak usage.
        `realtime` > 0 runs it under SCHED_FIFO at that priority: on a shared machine, other
        work then cannot deschedule its threads mid-computation (which stalls OpenMP)."""
        procs = self.path / "cgroup.procs"
        self.steps.append(f"exec in {procs}{f' (SCHED_FIFO {realtime})' if realtime else ''}: {' '.join(cmd)}")
        if self.dry_run:
            return RunResult(0, False, None, 0.0, "", "")

        def join():                         # runs in the child, before exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
            if realtime:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(realtime))

        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=join, env=env)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        wall = time.perf_counter() - t0
        oom = self.oom_kills() > 0 or proc.returncode == -signal.SIGKILL
        return RunResult(proc.returncode, oom, self.peak(), wall, out, err)


def cpu_times(stat: str | Path = "/proc/stat") -> tuple[int, int]:
    """(all, steal): the machine's CPU time in clock ticks since boot, from the first line of
    `stat` (the kernel's /proc/stat), and the part of it the hypervisor gave other guests."""
    try:
        first = Path(stat).read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0, 0
    if not first or first[0] != "cpu":
        return 0, 0
    ticks = [int(x) for x in first[1:9]]         # user nice system idle iowait irq softirq steal
    ticks += [0] * (8 - len(ticks))
    return sum(ticks), ticks[7]


def steal_fraction(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of CPU time stolen by the hypervisor between two `cpu_times` readings: on a
    shared virtual machine a run with a high share is slowed by other tenants, not by itself."""
    total = after[0] - before[0]
    return (after[1] - before[1]) / total if total > 0 else None


def drop_file_pages(paths) -> int:
    """Drop the cached pages of every file under `paths` (files or directories), so the next run
    starts cold. Returns the bytes covered."""
    from ..models.checkpoint import drop_cached_pages

    files = []
    for p in map(Path, paths):
        files += [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
    return drop_cached_pages(files)
