"""tools/bench_kernels.py and tools/tune_fused_moe.py on a CPU: smoke runs and --help."""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from fmoe.kernels import tile_config

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_cpu_smoke(capsys):
    bench = _load("bench_kernels")
    assert bench.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("| model |"):]
    from fmoe.kernels.fused_moe import available_backends

    # triton runs interpreted on a CPU machine; on one with a GPU the smoke run stays on the CPU,
    # where the interpreter is off
    expected = ["gather", "grouped_mm"] + (["triton"] if "triton" in available_backends("cpu") else [])
    for backend in expected:
        assert f"| {backend} |" in table
    assert table.strip().splitlines()[-1].startswith("| smoke-b | 5 |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_gpu_says_so_and_exits_0(capsys):
    assert _load("bench_kernels").main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_bench_traffic_and_flops():
    bench = _load("bench_kernels")
    x, w13, w2, tw, ti = bench.make_inputs(3, 16, 8, 4, 2, torch.float32, "cpu")
    distinct = torch.unique(ti).numel()
    assert bench.traffic_bytes(x, w13, w2, ti) == distinct * 3 * 16 * 8 * 4 + 2 * 3 * 16 * 4
    assert bench.flops(3, 16, 8, 2) == 2 * 3 * 2 * 3 * 16 * 8


def test_tune_help_runs_on_cpu(capsys):
    tune = _load("tune_fused_moe")
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--quick" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tune_without_gpu_fails_clearly(capsys):
    assert _load("tune_fused_moe").main(["--model", "deepseek-v2-lite"]) == 1
    assert "needs a CUDA device" in capsys.readouterr().err


def test_tune_writes_a_config_the_lookup_reads(tmp_path, monkeypatch):
    """The tuner's loop and file writing, on the interpreter with a two-config space."""
    if torch.cuda.is_available():
        pytest.skip("exercised for real by running the tuner on the GPU")
    tune = _load("tune_fused_moe")
    def space(T, K):
        return [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1) for n in (32, 64)]
    def one_call_ms(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    table = tune.tune(hidden=40, inter=24, experts=5, top_k=2, dtype=torch.float32, device="cpu",
                      tokens=[1, 3], space_fn=space, timer=one_call_ms, verbose=False)
    assert set(table) == {1, 3} and all(c["BLOCK_N"] in (32, 64) for c in table.values())
    path = tune.write_config(table, tmp_path, 5, 24, 40, "cpu", torch.float32)
    assert json.loads(path.read_text()) == {str(t): c for t, c in table.items()}
    monkeypatch.setenv(tile_config.CONFIG_DIR_ENV, str(tmp_path))
    tile_config.clear_cache()
    try:
        assert tile_config.get_config(3, 2, 5, 24, 40, torch.float32, "cpu") == table[3]
    finally:
        tile_config.clear_cache()
