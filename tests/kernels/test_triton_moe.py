"""The Triton fused MoE against fp64 torch: under TRITON_INTERPRET=1 on a CPU (conftest.py),
compiled on a GPU when there is one.

Tiles are big and shapes small: the interpreter's cost grows with the number of programs.
bf16 is computed wrongly by the interpreter, so it is tested only on a CUDA device. Tiles are
at least 16 wide so every config here is also valid for a compiled tl.dot.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmoe.kernels import fused_moe, moe_align_block_size
from kernel_helpers import TRITON_DEVICE as DEV
from kernel_helpers import make_case, reference_moe, rel_err

triton = pytest.importorskip("triton")
triton_moe = pytest.importorskip("fmoe.kernels.triton_moe")

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
BIG_TILES = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1)


@pytest.mark.skipif(DEV != "cpu", reason="compiled kernels on a GPU")
def test_kernels_are_interpreted():
    """Fails if TRITON_INTERPRET was not set before the kernels were created."""
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(triton_moe._moe_grouped_gemm_kernel, InterpretedFunction)
    assert isinstance(triton_moe._silu_and_mul_kernel, InterpretedFunction)
    assert triton_moe.is_interpreted()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H,inter,S,K", [
    (1, 40, 24, 3, 1),        # T = 1, K = 1
    (6, 100, 36, 7, 2),       # nothing a power of two
    (5, 72, 56, 11, 4),       # slot 0 never used (see used_slots)
    (7, 48, 20, 9, 6),
    (3, 136, 40, 12, 8),      # H > BLOCK_K: the K loop runs twice with a ragged tail
])
def test_triton_matches_fp64_reference(dtype, T, H, inter, S, K):
    id_dtype = torch.int32 if K % 4 else torch.int64
    x, w13, w2, tw, ti = make_case(T, H, inter, S, K, dtype, seed=10 * T + K, id_dtype=id_dtype,
                                   used_slots=range(1, S) if S > K + 1 else None, device=DEV)
    out = fused_moe(x, w13, w2, tw, ti, backend="triton")
    assert out.shape == (T, H) and out.dtype == dtype
    assert rel_err(out, reference_moe(x, w13, w2, tw, ti)) < TOL[dtype]


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("config", [
    BIG_TILES,
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2),  # many tiles, swizzle
])
def test_triton_tile_configs_and_id_dtypes(id_dtype, config):
    x, w13, w2, tw, ti = make_case(9, 52, 44, 10, 3, torch.float32, seed=3, id_dtype=id_dtype, device=DEV)
    out = triton_moe.fused_moe_triton(x, w13, w2, tw, ti, config=config)
    assert rel_err(out, reference_moe(x, w13, w2, tw, ti)) < 1e-4


def test_triton_reads_strided_views_in_place():
    """x a column slice of a wider buffer, w13/w2 slot slices with padded rows: strides honoured."""
    T, H, inter, S, K = 5, 40, 24, 6, 2
    x, w13, w2, tw, ti = make_case(T, H, inter, S, K, torch.float32, seed=4, device=DEV)
    xb = torch.randn(T, H + 7, device=DEV)
    xb[:, 3:3 + H] = x
    w13b = torch.randn(S + 2, 2 * inter, H + 5, device=DEV)
    w13b[1:1 + S, :, :H] = w13
    w2b = torch.randn(S, H, inter + 3, device=DEV)
    w2b[..., :inter] = w2
    out = fused_moe(xb[:, 3:3 + H], w13b[1:1 + S, :, :H], w2b[..., :inter], tw, ti, backend="triton")
    assert rel_err(out, reference_moe(x, w13, w2, tw, ti)) < 1e-4


@pytest.mark.parametrize("mul_weight", [False, True])
def test_grouped_gemm_writes_only_its_rows(mul_weight):
    """Output is a view inside a NaN-poisoned buffer with spare rows and columns on every side."""
    T, K, S, N, Kd = 6, 3, 7, 50, 36
    g = torch.Generator().manual_seed(5)
    a = torch.randn(T, Kd, generator=g)
    b = torch.randn(S, N, Kd, generator=g)
    ids = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T * K, generator=g)
    P, pad = T * K, 5
    big = torch.full((P + 2 * pad, N + 2 * pad), float("nan"), device=DEV)
    c = big[pad:pad + P, pad:pad + N]
    aligned = moe_align_block_size(ids.to(DEV), 16, S)
    a, b, w = a.to(DEV), b.to(DEV), w.to(DEV)
    # the bound (as on CUDA): the early exit of programs past the end is exercised too
    triton_moe.grouped_gemm(a, b, c, w, aligned, aligned.sorted_token_ids.numel(), K, mul_weight, BIG_TILES)

    rows_a = a.cpu().double()[torch.arange(P) // K]
    ref = torch.einsum("pk,pnk->pn", rows_a, b.cpu().double()[ids.reshape(-1)])
    if mul_weight:
        ref = ref * w.cpu().double()[:, None]
    assert rel_err(c, ref) < 1e-5
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[pad:pad + P, pad:pad + N] = False
    assert big[outside].isnan().all(), "the kernel wrote outside its output rows/columns"


def test_silu_and_mul_writes_only_its_rows():
    R, inter, pad = 21, 37, 3
    gu = torch.randn(R, 2 * inter, device=DEV)
    big = torch.full((R + 2 * pad, inter + 2 * pad), 1e30, device=DEV)
    h = big[pad:pad + R, pad:pad + inter]
    triton_moe.silu_and_mul(gu, h)
    gu = gu.cpu().double()
    ref = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
    assert rel_err(h, ref) < 1e-6
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[pad:pad + R, pad:pad + inter] = False
    assert (big[outside] == 1e30).all()


def test_triton_tuned_config_file_is_used(tmp_path, monkeypatch):
    """A config file for this shape is read, and its (odd) tiles still give the right answer."""
    from fmoe.kernels import tile_config
    T, H, inter, S, K = 4, 40, 24, 5, 2
    device = tile_config.device_name(DEV)
    name = tile_config.config_file_name(S, inter, H, device, torch.float32, triton.__version__)
    (tmp_path / name).write_text('{"4": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}}')
    monkeypatch.setenv(tile_config.CONFIG_DIR_ENV, str(tmp_path))
    tile_config.clear_cache()
    try:
        cfg = tile_config.get_config(T, K, S, inter, H, torch.float32, DEV, interpret=DEV == "cpu")
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["GROUP_M"]) == (32, 64, 32, 4)
        x, w13, w2, tw, ti = make_case(T, H, inter, S, K, torch.float32, seed=6, device=DEV)
        out = fused_moe(x, w13, w2, tw, ti, backend="triton")
        assert rel_err(out, reference_moe(x, w13, w2, tw, ti)) < 1e-4
    finally:
        tile_config.clear_cache()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (the interpreter gets it wrong)")
@pytest.mark.skipif(DEV != "cuda", reason="kernels are interpreted (FMOE_TEST_TRITON_INTERPRET=1)")
@pytest.mark.parametrize("T,H,inter,S,K", [(1, 256, 128, 8, 2), (37, 200, 72, 10, 6), (300, 512, 352, 64, 6)])
def test_triton_bf16_on_cuda(T, H, inter, S, K):
    x, w13, w2, tw, ti = make_case(T, H, inter, S, K, torch.bfloat16, seed=T, device="cuda")
    out = fused_moe(x, w13, w2, tw, ti, backend="triton")
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference_moe(x, w13, w2, tw, ti)) < TOL[torch.bfloat16]


@pytest.mark.skipif(DEV != "cuda", reason="needs compiled kernels on a GPU")
def test_cuda_default_backend_is_triton_and_slot_invariant():
    """On a GPU backend=None runs Triton; resident vs offloaded (slots permuted) are bitwise equal."""
    from fmoe.kernels import select_backend
    x, w13, w2, tw, ti = make_case(33, 256, 192, 8, 2, torch.bfloat16, seed=7, device="cuda")
    assert select_backend(x, w13, w2) == "triton"
    perm = torch.randperm(8, device="cuda")               # slot of expert e is perm[e]
    s13, s2 = torch.empty_like(w13), torch.empty_like(w2)
    s13[perm], s2[perm] = w13, w2
    assert torch.equal(fused_moe(x, w13, w2, tw, ti), fused_moe(x, s13, s2, tw, perm[ti]))


def test_kernels_compile_for_nvidia_targets():
    """The real compiler (not the interpreter) accepts the kernels for sm_90 and sm_80, no GPU needed."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_for_gpu.py"))],
                         capture_output=True, text=True, timeout=300, cwd=root, env=env)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
