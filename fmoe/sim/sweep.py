"""Sweeps over cache fractions x policies x hardware profiles: rows, a CSV and a PNG plot.

Demand-paging policies replay once per cache size and are timed under every hardware profile;
prefetching policies replay once per (size, hardware), since their hits depend on timing.
Jobs run in worker processes (fork) when ``jobs > 1``.
"""

from __future__ import annotations

import csv
import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

from ..files import atomic_write
from .replay import SimResult, capacity_for, prefetching_by_timing, simulate
from .timing import TimingModel
from .trace import Trace

COLUMNS = ["hardware", "policy", "cache_fraction", "capacity", "tokens", "hit_rate", "tpot_ms",
           "stall_ms_per_token", "compute_ms_per_token", "loads_per_token", "loads_vs_oracle",
           "tpot_vs_oracle", "bytes_per_token", "prefetch_precision",
           "wasted_prefetch_bytes_per_token", "late", "tpot_p99_ms", "engine", "wall_s"]

_STATE: dict = {}


def _job(args) -> list[tuple[str, dict]]:
    policy, fraction, hw_names, kwargs = args
    trace: Trace = _STATE["trace"]
    timings: dict[str, TimingModel] = _STATE["timings"]
    res = simulate(trace, policy, [timings[h] for h in hw_names], cache_fraction=fraction,
                   **kwargs)
    return [(h, r.to_dict()) for h, r in zip(hw_names, res)]


def run_sweep(trace: Trace, policies: Sequence[str], fractions: Sequence[float],
              timings: dict[str, TimingModel], *, jobs: int = 1, history: Trace | None = None,
              use_cache: bool = True, policy_options: dict | None = None,
              progress=None) -> list[dict]:
    """One row (dict, `COLUMNS` and more) per (hardware, policy, fraction)."""
    hw = list(timings)
    tasks = []
    for f in fractions:
        cap = capacity_for(trace, f)  # validates the fraction
        for p in policies:
            kw = dict(history=history, use_cache=use_cache, policy_options=policy_options)
            # read from instances (a policy's options, and the hardware profile it is given,
            # decide whether it prefetches): the profiles under which it prefetches replay one
            # by one, the others share one demand-paging replay
            flags = prefetching_by_timing(p, trace, cap, [timings[h] for h in hw],
                                          use_cache=use_cache, **(policy_options or {}))
            tasks += [(p, f, [h], kw) for h, on in zip(hw, flags) if on]
            rest = [h for h, on in zip(hw, flags) if not on]
            if rest:
                tasks.append((p, f, rest, kw))
    # slow jobs first, so the pool ends together
    order = {"oracle": 0, "belady": 2, "lfu": 2, "lru": 9}
    tasks.sort(key=lambda t: (order.get(t[0], 1), -t[1]))
    _STATE["trace"], _STATE["timings"] = trace, timings
    out: list[tuple[str, dict]] = []
    try:
        if jobs > 1 and len(tasks) > 1 and hasattr(os, "fork"):
            import multiprocessing as mp

            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
                for r in ex.map(_job, tasks):
                    out += r
                    if progress:
                        progress(r)
        else:
            for t in tasks:
                r = _job(t)
                out += r
                if progress:
                    progress(r)
    finally:
        _STATE.clear()
    rows = []
    for h, d in out:
        d = dict(d)
        d["hardware"] = h
        rows.append(d)
    _compare(rows)
    pol_rank = {p: i for i, p in enumerate(policies)}
    rows.sort(key=lambda r: (hw.index(r["hardware"]), r["cache_fraction"],
                             pol_rank.get(r["policy"], 99)))
    return rows


def _compare(rows: list[dict]) -> None:
    """Add loads_vs_oracle / tpot_vs_oracle against the oracle row (else belady) of the same
    hardware and cache size."""
    ref = {}
    for r in rows:
        k = (r["hardware"], r["capacity"])
        if r["policy"] == "oracle" or (r["policy"] == "belady" and k not in ref):
            ref[k] = r
    for r in rows:
        o = ref.get((r["hardware"], r["capacity"]))
        r["oracle_loads_per_token"] = o["loads_per_token"] if o else None
        r["loads_vs_oracle"] = (r["loads_per_token"] / o["loads_per_token"]
                                if o and o["loads_per_token"] else None)
        r["tpot_vs_oracle"] = r["tpot_ms"] / o["tpot_ms"] if o and o["tpot_ms"] else None


def write_csv(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    body = buf.getvalue().encode("utf-8")
    atomic_write(p, lambda f: f.write(body))      # whole or not at all, a unique temporary name
    return p


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows written by `write_csv`, numbers parsed back."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            d = {}
            for k, v in r.items():
                if v == "":
                    d[k] = None
                    continue
                try:
                    d[k] = int(v) if k in ("capacity", "tokens", "late") else float(v)
                except ValueError:
                    d[k] = v
            rows.append(d)
    return rows


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def plot(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Hit rate and TPOT against cache size, one column per hardware profile (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    hws = list(dict.fromkeys(r["hardware"] for r in rows))
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(2, len(hws), figsize=(5.2 * len(hws), 7.2), squeeze=False,
                             sharex=True)
    styles = {"oracle": dict(color="black", linestyle="--", marker="*"),
              "belady": dict(color="gray", linestyle=":", marker="x")}
    for j, h in enumerate(hws):
        for p in pols:
            rs = sorted((r for r in rows if r["hardware"] == h and r["policy"] == p),
                        key=lambda r: r["cache_fraction"])
            if not rs:
                continue
            x = [100 * r["cache_fraction"] for r in rs]
            kw = styles.get(p, dict(marker="o"))
            axes[0, j].plot(x, [r["hit_rate"] for r in rs], label=p, **kw)
            axes[1, j].plot(x, [r["tpot_ms"] for r in rs], label=p, **kw)
        rs = [r for r in rows if r["hardware"] == h]
        if rs and rs[0].get("compute_ms_per_token"):
            axes[1, j].axhline(rs[0]["compute_ms_per_token"], color="tab:purple", alpha=0.6,
                               linewidth=1, linestyle="-.", label="all resident")
        axes[0, j].set_title(h)
        axes[0, j].set_ylabel("expert hit rate")
        axes[0, j].set_ylim(0, 1)
        axes[1, j].set_ylabel("TPOT (ms)")
        axes[1, j].set_yscale("log")
        axes[1, j].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes[1, j].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[1, j].set_xlabel("expert cache (% of routed experts)")
        for ax in axes[:, j]:
            ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        # whole or not at all: written beside it, then renamed over it (the type from the
        # destination's name, as savefig(p) would take it, not from the temporary one's)
        fmt = p.suffix[1:].lower() or matplotlib.rcParams["savefig.format"]
        atomic_write(p, lambda f: fig.savefig(f, dpi=110, format=fmt))
    finally:
        plt.close(fig)
    return p


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table (also valid Markdown)."""
    head = ["hardware", "cache", "policy", "hit rate", "TPOT ms", "stall ms", "loads/tok",
            "vs oracle", "MB/tok", "prefetch prec."]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        prec = r.get("prefetch_precision")
        vs = r.get("loads_vs_oracle")
        lines.append("| " + " | ".join([
            r["hardware"], f"{100 * r['cache_fraction']:.0f}% ({r['capacity']})", r["policy"],
            f"{r['hit_rate']:.3f}", f"{r['tpot_ms']:.2f}", f"{r['stall_ms_per_token']:.2f}",
            f"{r['loads_per_token']:.1f}", "" if vs is None else f"{vs:.2f}x",
            f"{r['bytes_per_token'] / 1e6:.0f}", "-" if prec is None else f"{prec:.3f}",
        ]) + " |")
    return "\n".join(lines)


def single_table(r: SimResult | dict) -> str:
    d = r.to_dict() if isinstance(r, SimResult) else r
    prec = d.get("prefetch_precision")
    items = [
        ("policy", d["policy"]), ("timing", d["timing"]), ("tokens", d["tokens"]),
        ("capacity", f"{d['capacity']} slots ({100 * d['cache_fraction']:.1f}%)"),
    ]
    counts = f"{d['hits']} hits, {d['misses']} misses, {d['late']} late"
    if d.get("execution", "load") == "load":
        items.append(("hit rate", f"{d['hit_rate']:.4f}  ({counts})"))
    else:
        # the hit rate covers the uses the device ran; a use computed on the host is neither a
        # hit nor a miss, and without this line a host run looks like an almost perfect cache
        device = d["hits"] + d["misses"]
        items.append(("hit rate", f"{d['hit_rate']:.4f} of the {device} uses on the device  "
                                  f"({counts})"))
        items.append(("host", f"{d['host_computed']} uses computed on the host "
                              f"({d['host_computed_per_token']:.2f} per token; not in the hit "
                              f"rate)"))
    items += [
        ("TPOT", f"{d['tpot_ms']:.3f} ms  (compute {d['compute_ms_per_token']:.3f} + stall "
                 f"{d['stall_ms_per_token']:.3f}; p50 {d['tpot_p50_ms']:.3f}, p99 "
                 f"{d['tpot_p99_ms']:.3f})"),
        ("loads/token", f"{d['loads_per_token']:.2f}  ({d['bytes_per_token'] / 1e6:.1f} MB/token)"),
        ("prefetch", "none" if prec is None else
         f"{d['prefetched']} loads, precision {prec:.3f}, wasted "
         f"{d['wasted_prefetch_bytes_per_token'] / 1e6:.1f} MB/token"),
    ]
    if d.get("belady_loads_per_token") is not None:
        items.append(("vs oracle", f"Belady needs {d['belady_loads_per_token']:.2f} loads/token "
                                   f"(hit {d['belady_hit_rate']:.4f}): "
                                   f"x{d['loads_vs_belady']:.2f}"))
    items.append(("replay", f"{d['engine']} engine, {d['wall_s']:.1f} s"))
    w = max(len(k) for k, _ in items)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in items)
