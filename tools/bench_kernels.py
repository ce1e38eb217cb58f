#!/usr/bin/env python
"""Benchmark the fused MoE backends: triton vs grouped_mm vs gather.

On a CUDA device (the real benchmark)::

    python tools/bench_kernels.py [--models mixtral-8x7b deepseek-v2-lite] [--tokens 1 8 64 512 4096]

times each backend with ``triton.testing.do_bench`` (median) in bf16 and reports time, achieved
TB/s (bytes of the distinct experts' weights touched + activations in and out) and TFLOP/s,
next to the device's measured copy bandwidth (a large device-to-device copy) and matmul rate
(a large bf16 matmul). The last thing printed is a markdown table.

On a CPU it prints that the benchmark needs CUDA and exits 0, unless asked for:

- ``--cpu-smoke``: tiny shapes through the same code (tested in tests/kernels);
- ``--cpu-compare``: the measurement behind the CPU rule in ``fmoe/kernels/fused_moe.py``
  (gather vs grouped_mm for decode and prefill shapes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fmoe.kernels import fused_moe
from fmoe.kernels.torch_moe import grouped_mm_unsupported_reason

MODELS = {
    # name: hidden H, intermediate I per expert, routed experts E, top-k K
    "mixtral-8x7b": dict(H=4096, I=14336, E=8, K=2),
    "deepseek-v2-lite": dict(H=2048, I=1408, E=64, K=6),
}
SMOKE_MODELS = {"smoke-a": dict(H=64, I=32, E=8, K=2), "smoke-b": dict(H=32, I=48, E=6, K=3)}
COMPARE_MODELS = {
    "tiny (H=512, I=256, E=8, K=2)": dict(H=512, I=256, E=8, K=2),
    "small (H=1024, I=2816, E=16, K=4)": dict(H=1024, I=2816, E=16, K=4),
    "deepseek-v2-lite": MODELS["deepseek-v2-lite"],
    "mixtral-8x7b": MODELS["mixtral-8x7b"],
}
BACKENDS = ("triton", "grouped_mm", "gather")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def make_inputs(T: int, H: int, I: int, E: int, K: int, dtype: torch.dtype, device: str,
                seed: int = 0, weights: tuple | None = None):
    """Random experts (scaled so activations stay O(1)) and softmax top-k routing, made on
    ``device`` (generating Mixtral-sized weights on the host would take longer than the run)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if weights is None:
        w13 = (torch.randn(E, 2 * I, H, generator=g, device=device, dtype=dtype) / H ** 0.5).to(dtype)
        w2 = (torch.randn(E, H, I, generator=g, device=device, dtype=dtype) / I ** 0.5).to(dtype)
    else:
        w13, w2 = weights
    x = torch.randn(T, H, generator=g, device=device, dtype=dtype)
    logits = torch.randn(T, E, generator=g, device=device)
    topk_weights, topk_ids = torch.softmax(logits, -1).topk(K, dim=-1)
    return x, w13, w2, topk_weights, topk_ids


def traffic_bytes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor) -> int:
    """Bytes the layer must move at least: the distinct experts' weights + x in + out."""
    distinct = torch.unique(topk_ids).numel()
    per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    return distinct * per_expert + 2 * x.numel() * x.element_size()


def flops(T: int, H: int, I: int, K: int) -> int:
    """Multiply-adds x2 of the two GEMMs for T*K pairs: [H -> 2I] and [I -> H]."""
    return 2 * T * K * (2 * I * H + I * H)


def cpu_median_ms(fn, min_reps: int = 3, min_seconds: float = 0.3, max_reps: int = 50) -> float:
    """Median wall time (ms) on the CPU; one warm-up call first."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_peaks(dtype: torch.dtype) -> tuple[float, float]:
    """Measured copy bandwidth (TB/s, read + write of a 2 GiB buffer) and dtype matmul TFLOP/s."""
    from triton.testing import do_bench
    n = (1 << 30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    copy_ms = do_bench(lambda a=a, b=b: b.copy_(a), return_mode="median")
    del a, b
    m = 8192
    p = torch.randn(m, m, dtype=dtype, device="cuda")
    q = torch.randn(m, m, dtype=dtype, device="cuda")
    mm_ms = do_bench(lambda: p @ q, return_mode="median")
    return 2 * n * 2 / (copy_ms * 1e-3) / 1e12, 2 * m ** 3 / (mm_ms * 1e-3) / 1e12


def run_bench(models: dict, tokens: list[int], backends: list[str], dtype: torch.dtype, device: str,
              timer) -> list[dict]:
    rows = []
    for name, shape in models.items():
        H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
        weights = None
        for T in tokens:
            x, w13, w2, tw, ti = make_inputs(T, H, I, E, K, dtype, device, seed=T, weights=weights)
            weights = (w13, w2)
            nbytes, nflops = traffic_bytes(x, w13, w2, ti), flops(T, H, I, K)
            for backend in backends:
                if backend == "grouped_mm" and grouped_mm_unsupported_reason(x, w13, w2):
                    continue
                ms = timer(lambda x=x, w13=w13, w2=w2, tw=tw, ti=ti, backend=backend:
                           fused_moe(x, w13, w2, tw, ti, backend=backend))
                rows.append(dict(model=name, T=T, backend=backend, ms=ms,
                                 tbps=nbytes / (ms * 1e-3) / 1e12, tflops=nflops / (ms * 1e-3) / 1e12))
                print(f"{name:>18} T={T:<5} {backend:<10} {ms:9.3f} ms", flush=True)
        del weights
    return rows


def markdown_table(rows: list[dict], copy_tbps: float | None = None, mm_tflops: float | None = None) -> str:
    head = "| model | T | backend | time (ms) | TB/s | TFLOP/s |"
    if copy_tbps:
        head += " % of copy BW | % of matmul |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['model']} | {r['T']} | {r['backend']} | {r['ms']:.3f} | {r['tbps']:.3f} "
                f"| {r['tflops']:.2f} |")
        if copy_tbps:
            line += f" {100 * r['tbps'] / copy_tbps:.0f}% | {100 * r['tflops'] / mm_tflops:.0f}% |"
        lines.append(line)
    return "\n".join(lines)


def cpu_compare(dtypes: list[torch.dtype], threads: int = 1, min_seconds: float = 0.5,
                models: dict | None = None, tokens: tuple[int, ...] = (1, 2, 4, 8, 64, 128, 256, 512)) -> str:
    """gather vs grouped_mm on this CPU; returns a markdown table.

    Both paths run the same per-slot GEMMs; they differ in overhead (a Python loop over the
    used slots vs. a sort plus one C++ loop over all slots). The two run alternately, so
    background load hits both alike, until each has ``min_seconds`` of samples (at least 3).
    Reported: minimum wall time and minimum process CPU time (with ``threads=1`` the CPU time
    is the work done, unaffected by other processes taking the cores).
    """
    torch.set_num_threads(threads)
    out = ["| shape | dtype | T | gather wall / cpu (ms) | grouped_mm wall / cpu (ms) | faster (cpu) |",
           "|---|---|---|---|---|---|"]
    for name, s in (models or COMPARE_MODELS).items():
        for dtype in dtypes:
            weights = None
            for T in tokens:
                x, w13, w2, tw, ti = make_inputs(T, s["H"], s["I"], s["E"], s["K"], dtype, "cpu",
                                                 seed=T, weights=weights)
                weights = (w13, w2)
                fns = {b: (lambda b=b, x=x, w13=w13, w2=w2, tw=tw, ti=ti: fused_moe(x, w13, w2, tw, ti, backend=b))
                       for b in ("gather", "grouped_mm")}
                wall = {b: [] for b in fns}
                cpu = {b: [] for b in fns}
                for fn in fns.values():
                    fn()                                   # warm-up
                while (min(len(t) for t in wall.values()) < 3
                       or min(sum(t) for t in wall.values()) < min_seconds * 1e3):
                    for b, fn in fns.items():
                        t0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        wall[b].append((time.perf_counter() - t0) * 1e3)
                        cpu[b].append((time.process_time() - c0) * 1e3)
                g, m = min(cpu["gather"]), min(cpu["grouped_mm"])
                line = (f"| {name} | {str(dtype)[6:]} | {T} | {min(wall['gather']):.3f} / {g:.3f} | "
                        f"{min(wall['grouped_mm']):.3f} / {m:.3f} | {'gather' if g <= m else 'grouped_mm'} "
                        f"({max(g, m) / min(g, m):.2f}x) |")
                print(line, flush=True)
                out.append(line)
            del weights, w13, w2
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 512, 4096])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (a test of this script)")
    p.add_argument("--cpu-compare", action="store_true",
                   help="measure gather vs grouped_mm on the CPU (the backend=None rule)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for --cpu-compare")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]

    if args.cpu_compare:
        print(cpu_compare([torch.float32, torch.bfloat16], threads=args.threads))
        return 0
    if args.cpu_smoke:
        from fmoe.kernels import available_backends
        backends = [b for b in args.backends if b in available_backends("cpu")]
        rows = run_bench(SMOKE_MODELS, [1, 5], backends, torch.float32, "cpu",
                         lambda fn: cpu_median_ms(fn, min_reps=1, min_seconds=0.0, max_reps=1))
        print(markdown_table(rows))
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, nothing to benchmark (GPU figures need a CUDA run). "
              "Use --cpu-smoke to exercise the script, --cpu-compare for the CPU backend rule.")
        return 0

    from triton.testing import do_bench
    torch.cuda.manual_seed(0)
    copy_tbps, mm_tflops = device_peaks(dtype)
    name = torch.cuda.get_device_name()
    print(f"{name}: copy {copy_tbps:.2f} TB/s, {args.dtype} matmul {mm_tflops:.1f} TFLOP/s", flush=True)
    rows = run_bench({m: MODELS[m] for m in args.models}, args.tokens, args.backends, dtype, "cuda",
                     lambda fn: do_bench(fn, return_mode="median"))
    print(f"\n{name}, {args.dtype}; copy {copy_tbps:.2f} TB/s, matmul {mm_tflops:.1f} TFLOP/s\n")
    print(markdown_table(rows, copy_tbps, mm_tflops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
