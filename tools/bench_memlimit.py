"""Contenders side by side inside a memory limit, like a small machine: each run is a fresh process
in its own memory cgroup (the limit covers its page cache too), with the model files' cached pages
dropped first; contenders alternate run by run; medians and ratios at the end.

    # fmoe (default policy, expert_cache=auto) vs fmoe lru vs the page cache (mmap), replayed routing
    python tools/bench_memlimit.py --model DIR --limits 8,12 --rounds 2 \\
        --routing-trace ../shared/data/traces/deepseek-v2-lite-puffin-dev.npz --sequences 2 \\
        --max-tokens 160 --contenders fmoe,fmoe-lru,pagecache --out results.jsonl --plot plot.png

    # the model's own routing against llama.cpp (tools/llama_cpp.py builds it and converts the model)
    python tools/bench_memlimit.py --model DIR --gguf model.gguf --llama-bench BIN --limits 12 \\
        --contenders fmoe,llama.cpp --prompt-tokens 64 --new-tokens 32

    # each fmoe run calibrated right before it (profile given to the run), then simulated on the
    # same tokens with that profile: rows get simulated_tokens_per_s and sim_over_live
    python tools/bench_memlimit.py --model DIR --limits 12,8 --contenders fmoe-lru,fmoe \\
        --routing-trace ../shared/data/traces/deepseek-v2-lite-puffin-dev.npz --sequences 12 \\
        --calibrate calibrations/ --out results.jsonl

    # show the cgroup steps without running anything
    python tools/bench_memlimit.py --model DIR --limits 8 --dry-run

Contenders: fmoe (expert_cache=auto, the default policy), fmoe-lru (auto, lru), pagecache (every
expert memory-mapped: expert_cache="mmap"), fmoe-host and fmoe-hybrid (auto, execution="host" /
"hybrid"), llama.cpp (llama-bench, mmap), llama.cpp-nommap, and
any `--extra NAME=ARGS` (fmoe bench arguments, e.g. "fmoe-pf=--expert-cache auto --policy-option
prefetch=true"). Needs root (cgroups). Rows are appended to --out as JSON lines as they finish.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fmoe.bench.cgroup import MemoryCgroup, cpu_times, drop_file_pages, steal_fraction

FMOE_CONTENDERS = {
    "fmoe": ["--expert-cache", "auto"],
    "fmoe-lru": ["--expert-cache", "auto", "--policy", "lru"],
    "pagecache": ["--expert-cache", "mmap"],
    "fmoe-host": ["--expert-cache", "auto", "--execution", "host"],
    "fmoe-hybrid": ["--expert-cache", "auto", "--execution", "hybrid"],
}
LLAMA_CONTENDERS = {"llama.cpp": ["-lm", "mmap"], "llama.cpp-nommap": ["-lm", "none"]}


def fmoe_command(args, extra: list[str]) -> list[str]:
    cmd = [args.python, "-m", "fmoe.serve.cli", "bench", str(args.model), "--json",
           "--threads", str(args.threads), "--sequences", str(args.sequences), "--seed", str(args.seed)]
    if args.routing_trace:
        cmd += ["--routing-trace", str(args.routing_trace)]
        if args.max_tokens:
            cmd += ["--max-tokens", str(args.max_tokens)]
    else:
        cmd += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    return cmd + extra


def llama_command(args, extra: list[str]) -> list[str]:
    if not args.gguf or not args.llama_bench:
        raise SystemExit("llama.cpp contenders need --gguf and --llama-bench (see tools/llama_cpp.py)")
    return [str(args.llama_bench), "-m", str(args.gguf), "-t", str(args.threads), "-p", str(args.prompt_tokens),
            "-n", str(args.new_tokens), "-r", "1", "-o", "jsonl"] + extra


def calibrates(name: str, cmd: list[str]) -> bool:
    """Whether `--calibrate` covers this contender: an fmoe run with a cache the simulator
    models (not llama.cpp, not the page cache)."""
    return name not in LLAMA_CONTENDERS and "mmap" not in cmd


def reads_profile(cmd: list[str]) -> bool:
    """Whether the fmoe run `cmd` reads a hardware profile (the fmoe policy decides prefetch
    from it, host and hybrid execution their miss rule; `fmoe bench` refuses it elsewhere). An
    LRU run is still calibrated: the simulator replays it with the profile."""
    def value(flag, default):
        return cmd[cmd.index(flag) + 1] if flag in cmd[:-1] else default
    return value("--policy", "fmoe") == "fmoe" or value("--execution", "load") != "load"


def calibrate_command(args, limit: float, path: Path) -> list[str]:
    """`fmoe calibrate` for a run at `limit` GiB (outside its cgroup: the calibration reads as
    the run will, by `--memory-limit`)."""
    return [args.python, "-m", "fmoe.serve.cli", "calibrate", str(args.model),
            "--memory-limit", f"{limit:g}GiB", "--out", str(path)]


def simulate_command(args, row: dict, cmd: list[str], profile: Path) -> list[str]:
    """`fmoe simulate` of a finished run: its policy (with the run's `--policy-option`s),
    capacity and execution, on the tokens it replayed (the trace's first tokens + sequences:
    the bench replays whole sequences from the first), with the calibration taken before it."""
    sim = [args.python, "-m", "fmoe.serve.cli", "simulate", "--trace", str(args.routing_trace),
           "--model-config", str(args.model), "--policy", str(row["policy"]),
           "--capacity", str(row["capacity"]), "--max-tokens", str(row["tokens"] + row["sequences"]),
           "--execution", str(row.get("execution") or "load"), "--hardware", str(profile),
           "--no-cache", "--json"]
    for i, a in enumerate(cmd):
        if a == "--policy-option":       # each value up to the next flag (one or several)
            for v in cmd[i + 1:]:
                if v.startswith("--"):
                    break
                sim += ["--policy-option", v]
    return sim


def parse_simulated(stdout: str) -> dict:
    res = json.loads(stdout.strip().splitlines()[-1])
    return {"simulated_tokens_per_s": 1e3 / res["tpot_ms"], "simulated_hit_rate": res["hit_rate"]}


def parse_fmoe(stdout: str) -> dict:
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def parse_llama(stdout: str) -> dict:
    out = {}
    for ln in stdout.strip().splitlines():
        if not ln.startswith("{"):
            continue
        row = json.loads(ln)
        if row.get("n_gen", 0) > 0:
            out["tokens_per_s"] = row["avg_ts"]
            out["tokens"] = row["n_gen"]
        elif row.get("n_prompt", 0) > 0:
            out["prefill_tokens_per_s"] = row["avg_ts"]
            out["ttft_s"] = row["n_prompt"] / row["avg_ts"]
        out.setdefault("build_commit", row.get("build_commit"))
    out["routing"] = "model"
    return out


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["contender"], r["limit_gib"], r.get("routing", "")), []).append(r)
    table = []
    for (name, limit, routing), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        rates = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")]
        table.append({
            "contender": name, "limit_gib": limit, "routing": routing, "runs": len(rs),
            "tokens": statistics.median([r["tokens"] for r in rs if r.get("tokens")] or [0]),
            "peak_rss_gib": max((r.get("peak_rss_bytes") or 0) for r in rs) / 2**30,
            "oom_kills": sum(bool(r.get("oom_killed")) for r in rs),
            "tokens_per_s": statistics.median(rates) if rates else None,
            "tokens_per_s_all": rates,
            "peak_gib": max((r["peak_bytes"] or 0) for r in rs) / 2**30,
            "ttft_s": statistics.median([r["ttft_s"] for r in rs if r.get("ttft_s")] or [float("nan")]),
            "load_s": statistics.median([r["load_seconds"] for r in rs if r.get("load_seconds")] or [float("nan")]),
            "hit_rate": statistics.median([r["hit_rate"] for r in rs if r.get("hit_rate") is not None]
                                          or [float("nan")]),
            "policy_share": statistics.median([r["policy_seconds"] / r["wall_seconds"] for r in rs
                                               if r.get("policy_seconds") is not None and r.get("wall_seconds")]
                                              or [float("nan")]),
            "capacity": rs[-1].get("capacity"),
            "steal_max": max((r.get("steal_fraction") or 0.0) for r in rs),
            "sim_over_live_all": [r["sim_over_live"] for r in rs if r.get("sim_over_live")],
            "output_sha256": sorted({r.get("output_sha256") for r in rs if r.get("output_sha256")}),
        })
    return table


def markdown(table: list[dict]) -> str:
    """The summary as a Markdown table (medians over runs)."""
    lines = ["| limit | contender | routing | runs | decode tokens/s (runs) | TTFT s | load s | hit rate | "
             "policy share | peak GiB | OOM kills | CPU steal (max) | simulated / live (runs) | output sha256 |",
             "|" + "---|" * 14]
    for t in table:
        rates = ", ".join(f"{r:.3f}" for r in t["tokens_per_s_all"])
        def f(x, fmt):
            return "n/a" if x is None or x != x else format(x, fmt)
        share = t["policy_share"] * 100 if t["policy_share"] == t["policy_share"] else None
        lines.append(f"| {t['limit_gib']:g} GiB | {t['contender']} | {t.get('routing', '')} | {t['runs']} | "
                     f"{f(t['tokens_per_s'], '.3f')} ({rates}) | {f(t['ttft_s'], '.2f')} | {f(t['load_s'], '.1f')} | "
                     f"{f(t['hit_rate'], '.3f')} | {f(share, '.2f')}% | "
                     f"{t['peak_gib']:.2f} | {t['oom_kills']} | {100 * t.get('steal_max', 0.0):.1f}% | "
                     f"{', '.join(f'{x:.2f}' for x in t.get('sim_over_live_all', [])) or 'n/a'} | "
                     f"{', '.join(h[:12] for h in t['output_sha256'])} |")
    return "\n".join(lines)


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, routing in sorted({(t["contender"], t.get("routing", "")) for t in table}):
        pts = sorted((t["limit_gib"], t["tokens_per_s"]) for t in table
                     if t["contender"] == name and t.get("routing", "") == routing and t["tokens_per_s"])
        label = name + (" (model routing)" if routing == "model" else "")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    linestyle="--" if routing == "model" else "-")
    ax.set_xlabel("memory limit (GiB, cgroup incl. page cache)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--report", type=Path, nargs="+", default=None, metavar="ROWS.jsonl",
                    help="run nothing: summarise (and --plot) rows written by earlier runs")
    ap.add_argument("--limits", default="8,12", help="memory limits in GiB, comma-separated")
    ap.add_argument("--contenders", default="fmoe,fmoe-lru,pagecache")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                    help="an extra fmoe contender: NAME=fmoe bench arguments")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--routing-trace", type=Path, default=None)
    ap.add_argument("--sequences", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--llama-bench", type=Path, default=None)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", type=Path, default=None, help="append each run as a JSON line here")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--cgroup-root", type=Path, default=Path("/sys/fs/cgroup"))
    ap.add_argument("--dry-run", action="store_true", help="print the cgroup steps; run nothing")
    ap.add_argument("--calibrate", type=Path, default=None, metavar="DIR",
                    help="before each fmoe run, `fmoe calibrate` at its limit (profile kept in DIR and "
                         "given to the run); after it, `fmoe simulate` of the same tokens with that "
                         "profile: the row gets simulated_tokens_per_s and sim_over_live")
    ap.add_argument("--realtime", type=int, default=0, metavar="PRIO",
                    help="run contenders under SCHED_FIFO at this priority (a shared machine: other "
                         "work then cannot stall their threads); 0 = off")
    args = ap.parse_args(argv)

    if args.report:
        rows = [json.loads(ln) for f in args.report for ln in f.read_text().splitlines() if ln.strip()]
        table = summarise(rows)
        print(markdown(table))
        if args.plot:
            plot(table, args.plot, "decode tokens/s inside a memory cgroup")
        return 0
    if args.model is None:
        raise SystemExit("--model is required (or --report)")
    limits = [float(x) for x in args.limits.split(",") if x]
    names = [n for n in args.contenders.split(",") if n]
    extras = {}
    for spec in args.extra:
        name, _, rest = spec.partition("=")
        extras[name] = shlex.split(rest)
        if name not in names:
            names.append(name)
    for n in names:
        if n not in FMOE_CONTENDERS and n not in LLAMA_CONTENDERS and n not in extras:
            raise SystemExit(f"unknown contender {n!r}; known: "
                             f"{', '.join(list(FMOE_CONTENDERS) + list(LLAMA_CONTENDERS))} or --extra NAME=ARGS")
    if args.calibrate is not None:
        if args.routing_trace is None:
            raise SystemExit("--calibrate needs --routing-trace (the simulator replays the run's tokens)")
        if args.max_tokens and args.sequences > 1:
            raise SystemExit("--calibrate simulates the trace's first tokens: use it without --max-tokens "
                             "or with one sequence")
        if not args.dry_run:
            args.calibrate.mkdir(parents=True, exist_ok=True)
    files = [args.model] + ([args.gguf] if args.gguf else [])
    rows = []
    for rnd in range(args.rounds):
        for limit in limits:
            order = names if rnd % 2 == 0 else names[::-1]      # alternate who goes first
            for name in order:
                if name in LLAMA_CONTENDERS:
                    cmd = llama_command(args, LLAMA_CONTENDERS[name])
                else:
                    cmd = fmoe_command(args, extras.get(name) or FMOE_CONTENDERS[name])
                profile = None
                if args.calibrate is not None and calibrates(name, cmd):
                    profile = args.calibrate / f"cal-{rnd + 1}-{limit:g}-{name}.json"
                    if "--hardware-profile" not in cmd and reads_profile(cmd):
                        cmd = cmd + ["--hardware-profile", str(profile)]
                group = MemoryCgroup(f"fmoe-bench-{os.getpid()}-{len(rows)}", int(limit * 2**30),
                                     root=args.cgroup_root, dry_run=args.dry_run)
                if args.dry_run:
                    with group:
                        group.run(cmd, realtime=args.realtime)
                    print(f"# {name} at {limit:g} GiB (round {rnd + 1})")
                    steps = [f"fadvise DONTNEED {', '.join(map(str, files))}"] + group.steps
                    if profile is not None:
                        steps = [shlex.join(calibrate_command(args, limit, profile))] + steps
                        steps.append("then: " + shlex.join(simulate_command(
                            args, {"policy": "POLICY", "capacity": "CAPACITY", "tokens": 0, "sequences": 0},
                            cmd, profile)).replace("--max-tokens 0", "--max-tokens TOKENS"))
                    print("\n".join(f"  {s}" for s in steps))
                    rows.append({})
                    continue
                if profile is not None:
                    print(f"[{time.strftime('%H:%M:%S')}] calibrating for {name} at {limit:g} GiB", flush=True)
                    subprocess.run(calibrate_command(args, limit, profile), check=True,
                                   stdout=subprocess.DEVNULL, timeout=args.timeout)
                dropped = drop_file_pages(files)
                print(f"[{time.strftime('%H:%M:%S')}] {name} at {limit:g} GiB, round {rnd + 1} "
                      f"({dropped / 2**30:.1f} GiB of file pages dropped)", flush=True)
                ticks = cpu_times()
                with group:
                    res = group.run(cmd, timeout=args.timeout, realtime=args.realtime)
                steal = steal_fraction(ticks, cpu_times())
                parsed = {}
                try:
                    parsed = parse_llama(res.stdout) if name in LLAMA_CONTENDERS else parse_fmoe(res.stdout)
                except (ValueError, KeyError) as e:
                    parsed = {"parse_error": str(e)}
                row = {"contender": name, "limit_gib": limit, "round": rnd, "returncode": res.returncode,
                       "oom_killed": res.oom_killed, "peak_bytes": res.peak_bytes,
                       "run_wall_seconds": res.wall_seconds, "steal_fraction": steal, "command": cmd,
                       **parsed}
                if res.returncode != 0:
                    row["stderr_tail"] = res.stderr[-2000:]
                if profile is not None and res.returncode == 0 and "capacity" in row:
                    sim = subprocess.run(simulate_command(args, row, cmd, profile), capture_output=True,
                                         text=True, timeout=args.timeout)
                    try:
                        row |= parse_simulated(sim.stdout)
                        row["sim_over_live"] = row["simulated_tokens_per_s"] / row["tokens_per_s"]
                    except (ValueError, KeyError, IndexError, ZeroDivisionError) as e:
                        row["simulate_error"] = f"{e}: {sim.stderr[-500:]}"
                    row["calibration"] = str(profile)
                rows.append(row)
                rate = row.get("tokens_per_s")
                print(f"  rc {res.returncode}{' OOM-KILLED' if res.oom_killed else ''}, peak "
                      f"{(res.peak_bytes or 0) / 2**30:.2f} GiB, {rate if rate is not None else 'n/a'} tokens/s, "
                      f"{res.wall_seconds:.0f} s, CPU steal {100 * (steal or 0):.1f}%", flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    if args.dry_run:
        return 0
    table = summarise(rows)
    print(json.dumps(table, indent=1))
    if args.plot:
        plot(table, args.plot, f"{args.model.name}: "
             f"{'routing replayed from ' + args.routing_trace.name if args.routing_trace else 'model routing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
