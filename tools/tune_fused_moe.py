#!/usr/bin/env python
"""Tune the Triton fused MoE tiles for one model shape on this GPU; write a config JSON.

    python tools/tune_fused_moe.py --model deepseek-v2-lite --dtype bfloat16
    python tools/tune_fused_moe.py --hidden 4096 --inter 14336 --experts 8 --top-k 2 --quick

For each token count T it times every config of the search space (``triton.testing.do_bench``,
median) on random inputs routed by a softmax top-k over all E experts, keeps the fastest one
that also matches the torch gather path, and writes
``fmoe/kernels/configs/E=..,N=..,K=..,device_name=..,dtype=..,triton=...json`` (see
``fmoe/kernels/tile_config.py``), which ``fused_moe`` then picks up by nearest T.
Needs a CUDA device; ``--help`` works anywhere.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fmoe.kernels import tile_config
from fmoe.kernels.torch_moe import moe_gather

MODELS = {
    "mixtral-8x7b": dict(hidden=4096, inter=14336, experts=8, top_k=2),
    "deepseek-v2-lite": dict(hidden=2048, inter=1408, experts=64, top_k=6),
    "qwen1.5-moe-a2.7b": dict(hidden=2048, inter=1408, experts=60, top_k=4),
}
DEFAULT_TOKENS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def search_space(num_tokens: int, top_k: int, quick: bool = False) -> list[dict]:
    """Candidate configs for one T. Rows per slot are about T*K/E, so decode never needs tall
    M tiles: BLOCK_M is capped by the number of (token, k) pairs."""
    pairs = num_tokens * top_k
    block_m = [m for m in (16, 32, 64, 128) if m <= max(16, pairs)]
    if quick:
        grid = itertools.product(block_m, (64, 128), (64, 128), (1, 8), (4, 8), (3, 4))
    else:
        grid = itertools.product(block_m, (32, 64, 128, 256), (32, 64, 128, 256), (1, 8, 16), (4, 8),
                                 (2, 3, 4, 5))
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    return [dict(zip(keys, values)) for values in grid]


def fits_shared_memory(config: dict, element_size: int, limit_bytes: int) -> bool:
    """Pipelined A and B tiles must fit in shared memory (skip before compiling)."""
    tile = (config["BLOCK_M"] * config["BLOCK_K"] + config["BLOCK_K"] * config["BLOCK_N"]) * element_size
    return tile * config["num_stages"] <= limit_bytes


def cpu_timer(fn) -> float:
    """Median ms of a few calls (only for exercising the tuner without a GPU)."""
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_weights(hidden: int, inter: int, experts: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Random experts, scaled so activations stay O(1): w13 [E, 2I, H], w2 [E, H, I]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype).to(device)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype).to(device)
    return w13, w2


def make_tokens(T: int, hidden: int, experts: int, top_k: int, dtype: torch.dtype, device: str, seed: int):
    """x [T, H] and a softmax top-k routing over all experts."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, hidden, generator=g).to(dtype).to(device)
    weights, ids = torch.softmax(torch.randn(T, experts, generator=g), -1).topk(top_k, dim=-1)
    return x, weights.to(device), ids.to(device)


def tune(hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype, device: str,
         tokens: list[int], space_fn=search_space, timer=None, smem_limit: int | None = None,
         verbose: bool = True) -> dict[int, dict]:
    """Fastest correct config per T: {T: config}. Correct = within 1e-4 (fp32) / 2e-2 relative
    of the torch gather path run in fp32."""
    from fmoe.kernels.triton_moe import fused_moe_triton
    if timer is None:
        from triton.testing import do_bench
        def timer(fn):
            return do_bench(fn, warmup=5, rep=25, return_mode="median")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    w13, w2 = make_weights(hidden, inter, experts, dtype, device)
    w13_ref, w2_ref = w13.float(), w2.float()
    table = {}
    for T in tokens:
        x, tw, ti = make_tokens(T, hidden, experts, top_k, dtype, device, seed=T)
        ref = moe_gather(x.float(), w13_ref, w2_ref, tw, ti)
        best = None
        for config in space_fn(T, top_k):
            if smem_limit is not None and not fits_shared_memory(config, x.element_size(), smem_limit):
                continue
            try:
                out = fused_moe_triton(x, w13, w2, tw, ti, config=config)   # compiles
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if not err < tol:
                    print(f"T={T} {config}: wrong result (rel err {err:.2e}), skipped", file=sys.stderr)
                    continue
                ms = timer(lambda x=x, tw=tw, ti=ti, config=config:
                           fused_moe_triton(x, w13, w2, tw, ti, config=config))
            except Exception as e:  # out of resources, invalid tile for this GPU: not a candidate
                if verbose:
                    print(f"T={T} {config}: {type(e).__name__}, skipped", file=sys.stderr)
                continue
            if best is None or ms < best[0]:
                best = (ms, config)
        if best is None:
            raise RuntimeError(f"no config ran for T={T}")
        table[T] = best[1]
        if verbose:
            print(f"T={T:5d}: {best[0]:.4f} ms  {best[1]}", flush=True)
    return table


def write_config(table: dict[int, dict], out_dir: Path, experts: int, inter: int, hidden: int,
                 device_name: str, dtype: torch.dtype) -> Path:
    """Write {T: config} under the name tile_config looks up."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / tile_config.config_file_name(experts, inter, hidden, device_name, dtype,
                                                  tile_config.triton_version())
    with open(path, "w") as f:
        json.dump({str(t): table[t] for t in sorted(table)}, f, indent=2)
        f.write("\n")
    tile_config.clear_cache()
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), help="take the shape of a known model")
    p.add_argument("--hidden", type=int, help="H (hidden size)")
    p.add_argument("--inter", type=int, help="I (intermediate size per expert)")
    p.add_argument("--experts", type=int, help="E (routed experts; the file's E key)")
    p.add_argument("--top-k", type=int, help="K (experts per token)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--tokens", nargs="+", type=int, default=DEFAULT_TOKENS, help="token counts T to tune")
    p.add_argument("--quick", action="store_true", help="a small search space (minutes, not hours)")
    p.add_argument("--out-dir", type=Path,
                   default=Path(os.environ.get(tile_config.CONFIG_DIR_ENV) or tile_config.CONFIG_DIR),
                   help=f"where the table goes (default: ${tile_config.CONFIG_DIR_ENV} if set, "
                        "else the package's own configs)")
    args = p.parse_args(argv)

    shape = dict(MODELS[args.model]) if args.model else {}
    for key in ("hidden", "inter", "experts", "top_k"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    missing = [k for k in ("hidden", "inter", "experts", "top_k") if k not in shape]
    if missing:
        p.error(f"give --model or all of --hidden --inter --experts --top-k (missing {missing})")
    if not torch.cuda.is_available():
        print("tune_fused_moe: needs a CUDA device (tiles tuned elsewhere would not mean anything)",
              file=sys.stderr)
        return 1

    dtype = DTYPES[args.dtype]
    props = torch.cuda.get_device_properties(0)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024
    device_name = tile_config.device_name("cuda")
    print(f"tuning on {device_name}, triton {tile_config.triton_version()}, {shape}, {args.dtype}")
    space = (lambda T, K: search_space(T, K, quick=True)) if args.quick else search_space
    table = tune(**shape, dtype=dtype, device="cuda", tokens=args.tokens, space_fn=space, smem_limit=smem)
    path = write_config(table, args.out_dir, shape["experts"], shape["inter"], shape["hidden"],
                        device_name, dtype)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
