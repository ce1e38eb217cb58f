"""GPU check: a random model of DeepSeek-V2-Lite's real shape, offloaded with expert_cache=0.25,
must generate exactly the tokens of the fully resident run. Reports TPOT for both and the
achieved host->device bandwidth (a raw pinned copy and the copy engine's own rate).

    python tools/gpu_check.py                    # full shape, 27 layers (~31 GB in bf16)
    python tools/gpu_check.py --layers 6         # same per-layer shape, fewer layers
    python tools/gpu_check.py --out results.json

Needs a CUDA device; on a CPU-only machine it says so and exits 0 (nothing to check).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from fmoe.models.published import published_config

DEEPSEEK_V2_LITE = published_config("deepseek-v2-lite")


def tpot(model, prompt: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    """Seconds per output token of one n-token generation: the time from its first token to its
    last over n - 1 (the prefill left out; two runs subtracted would start from different cache
    states)."""
    stamps = []

    def stamp(_ids):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    out = model.generate(prompt, n, eos_token_id=[], on_token=stamp)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), out


def save(results: dict, out: Path | None) -> None:
    """Written after every run, whole or not at all: a later failure or time limit keeps it."""
    if out is not None:
        from fmoe.files import atomic_write

        atomic_write(out, lambda f: f.write(json.dumps(results, indent=2).encode()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=DEEPSEEK_V2_LITE["num_hidden_layers"])
    ap.add_argument("--tokens", type=int, default=32, help="tokens per generation (at least 2)")
    ap.add_argument("--expert-cache", default="0.25")
    ap.add_argument("--policies", default="lru,lfu,fmoe")
    ap.add_argument("--executions", default="host,hybrid",
                    help="also run fmoe with these executions (misses computed on the host); their "
                         "tokens are reported, not required equal (bf16 on the host rounds otherwise)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the random checkpoint")
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (TPOT is measured between the first and last token)")
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing checked")
        return 0

    import fmoe
    from fmoe.bench.calibrate import h2d_bandwidth
    from fmoe.models.synthetic import write_random_checkpoint

    cfg = dict(DEEPSEEK_V2_LITE, num_hidden_layers=args.layers)
    root = args.dir or Path(tempfile.mkdtemp(prefix="fmoe-gpu-check-"))
    t0 = time.perf_counter()
    path = write_random_checkpoint(root / "dsv2lite", cfg, dtype=torch.bfloat16, seed=0)
    print(f"checkpoint: {args.layers} layers written in {time.perf_counter() - t0:.0f} s", flush=True)

    results = {"device": torch.cuda.get_device_name(), "layers": args.layers, "tokens": args.tokens}
    expert_bytes = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 2
    results["h2d_GBps_raw"] = h2d_bandwidth(expert_bytes) / 1e9
    results["h2d_GBps_raw_256MB"] = h2d_bandwidth(256 * 2**20) / 1e9
    print(f"raw pinned H2D: one expert ({expert_bytes / 2**20:.1f} MiB) {results['h2d_GBps_raw']:.1f} GB/s, "
          f"256 MiB {results['h2d_GBps_raw_256MB']:.1f} GB/s", flush=True)
    save(results, args.out)

    prompt = torch.randint(0, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    res = fmoe.models.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    res.generate(prompt, 2, eos_token_id=[])
    results["resident_tpot_ms"], ref = (lambda r: (r[0] * 1e3, r[1]))(tpot(res, prompt, args.tokens))
    print(f"resident: TPOT {results['resident_tpot_ms']:.2f} ms", flush=True)
    save(results, args.out)
    del res
    torch.cuda.empty_cache()

    ok = True
    total_expert_bytes = expert_bytes * cfg["n_routed_experts"] * (args.layers - cfg["first_k_dense_replace"])
    runs = [(p, "load") for p in args.policies.split(",") if p]
    runs += [("fmoe", e) for e in args.executions.split(",") if e]
    for policy, execution in runs:
        name = policy if execution == "load" else f"{policy}-{execution}"
        try:
            m = fmoe.models.from_pretrained(path, device="cuda", dtype=torch.bfloat16,
                                            expert_cache=args.expert_cache, policy=policy,
                                            host_cache=total_expert_bytes, execution=execution)
        except ValueError as e:
            print(f"{name}: skipped ({e})")
            continue
        try:
            results[name] = measure(m, name, prompt, args.tokens, ref)
        except Exception as e:       # one failure must not lose the other runs' figures
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: failed ({type(e).__name__}: {e})", flush=True)
        finally:
            m.close()
        row = results[name]
        if execution == "load":
            ok &= bool(row.get("tokens_equal_resident"))
        save(results, args.out)
        del m
        torch.cuda.empty_cache()

    print(json.dumps(results, indent=2))
    return 0 if ok else 1


def measure(m, name: str, prompt: torch.Tensor, tokens: int, ref: torch.Tensor) -> dict:
    """One offloaded model's row: TPOT after a warm-up, tokens against the resident run's, its
    stats."""
    m.generate(prompt, tokens, eos_token_id=[])   # warm: experts now in the host tier
    m.reset_expert_stats()
    busy0, bytes0 = m.runtime.engine.busy_seconds, m.runtime.engine.bytes_loaded
    t, out = tpot(m, prompt, tokens)
    s = m.expert_stats()
    busy = m.runtime.engine.busy_seconds - busy0
    moved = m.runtime.engine.bytes_loaded - bytes0
    same = torch.equal(out.cpu(), ref.cpu())
    uses = s["hits"] + s["misses"] + s["host_computed"]
    # the copy engine's rate over its busy time: host reads, staging and queueing included,
    # not the link's own rate (h2d_GBps_raw is that)
    row = {"tpot_ms": t * 1e3, "tokens_equal_resident": same, "hit_rate": s["hits"] / max(uses, 1),
           "capacity": s["capacity"], "engine_busy_GBps": moved / busy / 1e9 if busy else None,
           "stall_ms_per_token": 1e3 * s["stall_seconds"] / tokens, **s}
    print(f"{name}: TPOT {row['tpot_ms']:.2f} ms, tokens equal resident: {same}, "
          f"hit rate {row['hit_rate']:.3f}, host-computed {s['host_computed']}, "
          f"copy engine (busy) {row['engine_busy_GBps'] or 0:.1f} GB/s", flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
