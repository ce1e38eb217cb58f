"""Batch-1 decode throughput: fmoe (resident and offloaded) against HF transformers eager, side by
side in one run, on the same random Mixtral-shaped checkpoint (CPU by default).

    python tools/bench_decode.py                      # default shape, writes a markdown table
    python tools/bench_decode.py --quick              # a small shape, for a smoke run

Rows: HF eager; fmoe resident; fmoe with expert_cache 1.0 / 0.5 / 0.25 (LRU) on the plain CPU
"device" and with an emulated 25 GB/s host->device link (labelled emulated: the CPU copy is
slowed to what a PCIe 4.0 x16 transfer would take). Peak RSS of loading with
expert_cache=0.25 is measured in a child process against the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    # ~1.3 GB in bf16: big enough that expert reads are real I/O, small enough for 2 CPU cores
    "default": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=4096),
    "quick": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                  num_experts_per_tok=2, max_position_embeddings=1024),
}

# one mid-sized random model per family (`--family`), run with the same rows
FAMILY_CONFIGS = {
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                      moe_intermediate_size=704, shared_expert_intermediate_size=2816,
                      num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                      num_experts=32, num_experts_per_tok=4, norm_topk_prob=False,
                      max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6),
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                      moe_intermediate_size=768, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=8,
                      norm_topk_prob=True, max_position_embeddings=4096, rope_theta=1e6,
                      rms_norm_eps=1e-6),
    "deepseek_v2": dict(model_type="deepseek_v2", vocab_size=32000, hidden_size=1024,
                        intermediate_size=2816, moe_intermediate_size=704, num_hidden_layers=8,
                        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
                        n_routed_experts=32, num_experts_per_tok=6, routed_scaling_factor=1.0,
                        kv_lora_rank=256, q_lora_rank=None, qk_rope_head_dim=32, v_head_dim=64,
                        qk_nope_head_dim=64, topk_method="greedy", n_group=1, topk_group=1,
                        first_k_dense_replace=1, norm_topk_prob=False, scoring_func="softmax",
                        max_position_embeddings=4096, rope_theta=10000, rms_norm_eps=1e-6),
}


def checkpoint(shape: str, root: Path, family: str = "mixtral") -> Path:
    from fmoe.models.synthetic import write_random_checkpoint

    if family == "mixtral":
        path = root / f"bench-mixtral-{shape}"
        cfg = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], rms_norm_eps=1e-5,
                   rope_theta=1e6, bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    else:
        path = root / f"bench-{family}"
        cfg = dict(FAMILY_CONFIGS[family], bos_token_id=1, eos_token_id=2)
    if not (path / "config.json").exists():
        write_random_checkpoint(path, cfg, dtype=torch.bfloat16, seed=0)
    return path


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def time_decode(generate, prompt, new_tokens: int, repeats: int) -> float:
    """Median decode tokens/s: (time of prompt + n tokens - time of prompt + 1 token) / (n - 1)."""
    generate(prompt, 2)   # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(prompt, 1)
        t1 = time.perf_counter()
        generate(prompt, new_tokens)
        t2 = time.perf_counter()
        rates.append((new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
    return statistics.median(rates)


def peak_rss_child(path: Path | None, expert_cache) -> int:
    """VmHWM of a child that loads `path` and generates 4 tokens (`path` None: imports only)."""
    run = "" if path is None else f"""
m = fmoe.models.from_pretrained({str(path)!r}, dtype=torch.float32, expert_cache={expert_cache!r}, policy="lru")
m.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4)
m.close()"""
    code = f"""
import torch, fmoe
{run}
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        print(int(line.split()[1]) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default")
    ap.add_argument("--quick", action="store_true", help="same as --shape quick --tokens 8 --repeats 1")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--link", default="25GB/s", help="emulated link bandwidth for the stall rows")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers row")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--family", default="mixtral", choices=["mixtral", *FAMILY_CONFIGS],
                    help="model family of the random checkpoint (non-Mixtral: a fixed mid-sized shape)")
    ap.add_argument("--resident-only", action="store_true", help="only the HF and fmoe resident rows")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("FMOE_CACHE", Path.home() / ".cache" / "fmoe")))
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.tokens, args.repeats = "quick", 8, 1

    import fmoe

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    path = checkpoint(args.shape, args.cache_dir, args.family)
    prompt = torch.tensor([[5, 17, 230, 41, 99, 7, 300, 12]])
    rows = []

    def add(name, rate, stats=None, note=""):
        row = {"config": name, "tokens_per_s": rate, "note": note}
        if stats:
            per_tok = max(args.tokens, 1)
            uses = stats["hits"] + stats["misses"]
            row.update(hit_rate=stats["hits"] / max(uses, 1),
                       stall_ms_per_token=1e3 * stats["stall_seconds"] / per_tok,
                       mib_loaded_per_token=stats["bytes_loaded"] / 2**20 / per_tok)
        rows.append(row)
        print(json.dumps(row), flush=True)

    res = fmoe.models.from_pretrained(path, dtype=torch.float32)
    def res_gen(p, n, res=res):
        return res.generate(p, n, eos_token_id=[])
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        def hf_gen(p, n):
            with torch.no_grad():
                return hf.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        # interleaved pairs, so that drift in the machine's load hits both sides alike
        pairs = [(time_decode(hf_gen, prompt, args.tokens, 1), time_decode(res_gen, prompt, args.tokens, 1))
                 for _ in range(args.repeats)]
        add("HF transformers eager", statistics.median(h for h, _ in pairs))
        add("fmoe resident", statistics.median(f for _, f in pairs),
            note=f"median of paired ratios {statistics.median(f / h for h, f in pairs):.3f}")
        del hf
    else:
        add("fmoe resident", time_decode(res_gen, prompt, args.tokens, args.repeats))
    del res

    for link in (() if args.resident_only else (None, args.link)):
        for cache in (1.0, 0.5, 0.25):
            m = fmoe.models.from_pretrained(path, dtype=torch.float32, expert_cache=cache, policy="lru",
                                            link_bandwidth=link)
            def gen(p, n, m=m):
                return m.generate(p, n, eos_token_id=[])
            gen(prompt, 2)
            m.reset_expert_stats()
            rate = time_decode(gen, prompt, args.tokens, args.repeats)
            m.reset_expert_stats()
            gen(prompt, args.tokens)
            name = f"fmoe expert_cache={cache} lru" + (f", emulated {link} link" if link else "")
            add(name, rate, m.expert_stats(), note="emulated" if link else "")
            m.close()

    size = dir_bytes(path)
    if args.resident_only:
        _table(rows)
        return 0
    rss = peak_rss_child(path, 0.25)
    rss_full = peak_rss_child(path, 1.0)
    base_rss = peak_rss_child(None, None)
    def mib(b):
        return f"{b / 2**20:.0f} MiB"
    print(f"\ncheckpoint {path.name}: {mib(size)} on disk (bf16), run in float32 ({mib(2 * size)} as fp32)")
    print(f"peak RSS of load + 4 tokens: expert_cache=0.25 {mib(rss)}, expert_cache=1.0 {mib(rss_full)}; "
          f"python + torch + fmoe imported alone {mib(base_rss)}")
    print(f"above the import baseline: 0.25 -> {mib(rss - base_rss)} ({(rss - base_rss) / size:.2f}x the "
          f"checkpoint), 1.0 -> {mib(rss_full - base_rss)} ({(rss_full - base_rss) / size:.2f}x)\n")
    _table(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "checkpoint_bytes": size, "peak_rss_0.25": rss,
                                         "peak_rss_1.0": rss_full, "peak_rss_imports": base_rss}, indent=2))
    return 0


def _table(rows) -> None:
    base = next((r["tokens_per_s"] for r in rows if r["config"].startswith("HF")), None)
    print("| configuration | decode tokens/s | vs HF eager | hit rate | stall ms/token | MiB loaded/token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        if r.get("note", "").startswith("median of paired"):
            ratio += f" (paired: {r['note'].rsplit(' ', 1)[-1]}x)"
        extra = (f"{r['hit_rate']:.3f} | {r['stall_ms_per_token']:.2f} | {r['mib_loaded_per_token']:.1f}"
                 if "hit_rate" in r else "- | - | -")
        print(f"| {r['config']} | {r['tokens_per_s']:.2f} | {ratio} | {extra} |")


if __name__ == "__main__":
    sys.exit(main())
