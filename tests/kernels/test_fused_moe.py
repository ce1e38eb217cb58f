"""The PyTorch backends and the dispatcher of fmoe.kernels.fused_moe."""

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fmoe.kernels as kernels
from fmoe.kernels import fused_moe
from kernel_helpers import make_case, reference_moe, rel_err

# the module (the package attribute `fused_moe` is the function)
fused_moe_module = importlib.import_module("fmoe.kernels.fused_moe")
ROOT = Path(__file__).resolve().parents[2]

TORCH_BACKENDS = ["gather", "grouped_mm", "torch", None]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


# H, I chosen not powers of two; H*2 bytes and I*2 bytes are multiples of 16 (grouped_mm needs
# that) but H=40 fp16 rows are 80 bytes, not 64-aligned, so the grouped path pads slot groups.
@pytest.mark.parametrize("backend", ["gather", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H,inter,S,K", [(1, 40, 24, 3, 1), (7, 40, 24, 9, 2), (5, 72, 56, 11, 4),
                                           (9, 48, 40, 13, 6), (3, 56, 24, 12, 8)])
def test_torch_backends_match_fp64_reference(backend, dtype, T, H, inter, S, K):
    x, w13, w2, tw, ti = make_case(T, H, inter, S, K, dtype, seed=T + K,
                                   used_slots=range(1, S) if S > K + 1 else None)
    out = fused_moe(x, w13, w2, tw, ti, backend=backend)
    assert out.shape == (T, H) and out.dtype == dtype
    assert rel_err(out, reference_moe(x, w13, w2, tw, ti)) < TOL[dtype]


def _offload(w13, w2, ids, num_slots, seed):
    """The same experts placed in other slots of a bigger/smaller cache, ids remapped."""
    E = w13.shape[0]
    g = torch.Generator().manual_seed(seed)
    used = torch.unique(ids)
    slot_of = torch.full((E,), -1, dtype=torch.int64)
    slot_of[used] = torch.randperm(num_slots, generator=g)[:used.numel()]
    # unused slots hold junk (another expert's leftovers in a real cache)
    s13 = torch.randn(num_slots, *w13.shape[1:], generator=g).to(w13.dtype)
    s2 = torch.randn(num_slots, *w2.shape[1:], generator=g).to(w2.dtype)
    s13[slot_of[used]] = w13[used]
    s2[slot_of[used]] = w2[used]
    return s13, s2, slot_of[ids.long()].to(ids.dtype)


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,K,E,extra", [(1, 2, 8, -3), (6, 6, 16, 5), (64, 2, 8, 4), (40, 4, 12, -2)])
def test_torch_backends_are_slot_invariant(backend, dtype, T, K, E, extra):
    """Resident (ids = expert ids, S = E) and offloaded (ids = slots) runs: bitwise equal."""
    x, w13, w2, tw, ti = make_case(T, 64, 48, E, K, dtype, seed=E + T, id_dtype=torch.int32)
    num_slots = max(torch.unique(ti).numel(), E + extra)
    resident = fused_moe(x, w13, w2, tw, ti, backend=backend)
    s13, s2, sid = _offload(w13, w2, ti, num_slots, seed=T)
    offloaded = fused_moe(x, s13, s2, tw, sid, backend=backend)
    assert torch.equal(resident, offloaded)
    # and int64 ids give the same bits as int32
    assert torch.equal(offloaded, fused_moe(x, s13, s2, tw, sid.long(), backend=backend))


def test_output_dtype_follows_x_with_fp32_router_weights():
    x, w13, w2, tw, ti = make_case(4, 32, 16, 4, 2, torch.float16, seed=0)
    assert tw.dtype == torch.float32
    for backend in ("gather", "grouped_mm"):
        assert fused_moe(x, w13, w2, tw, ti, backend=backend).dtype == torch.float16


def test_empty_batch():
    x, w13, w2, tw, ti = make_case(3, 32, 16, 4, 2, torch.float32, seed=0)
    out = fused_moe(x[:0], w13, w2, tw[:0], ti[:0])
    assert out.shape == (0, 32)


def test_cpu_selection_rule():
    """backend=None on CPU: gather for decode-sized batches, grouped_mm from the threshold."""
    threshold = fused_moe_module._CPU_GROUPED_MM_MIN_TOKENS
    small = make_case(1, 32, 16, 4, 2, torch.float32, seed=0)
    assert kernels.select_backend(*small[:3]) == "gather"
    if threshold < 10_000:
        big = make_case(threshold, 32, 16, 4, 2, torch.float32, seed=0)
        assert kernels.select_backend(*big[:3]) == "grouped_mm"
        # shapes grouped_mm cannot take (fp16 rows of 12 bytes) fall back to gather
        odd = make_case(threshold, 6, 6, 4, 2, torch.float16, seed=0)
        assert kernels.select_backend(*odd[:3]) == "gather"
        assert rel_err(fused_moe(*odd), reference_moe(*odd)) < 2e-2


def test_grouped_mm_rejects_what_it_cannot_take():
    x, w13, w2, tw, ti = make_case(3, 6, 6, 4, 2, torch.float16, seed=0)
    with pytest.raises(ValueError, match="grouped_mm"):
        fused_moe(x, w13, w2, tw, ti, backend="grouped_mm")


def test_bad_arguments():
    x, w13, w2, tw, ti = make_case(3, 32, 16, 4, 2, torch.float32, seed=0)
    with pytest.raises(ValueError, match="unknown fused_moe backend"):
        fused_moe(x, w13, w2, tw, ti, backend="cuda")
    with pytest.raises(ValueError, match="int32 or int64"):
        fused_moe(x, w13, w2, tw, ti.to(torch.int16))
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_moe(x, w13, w2[:, :, :8], tw, ti)
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_moe(x.half(), w13, w2, tw, ti)


def test_triton_missing_falls_back(monkeypatch):
    """Without triton: the backend reports unavailable, backend=None still runs on torch."""
    monkeypatch.setattr(fused_moe_module, "_triton_import_error", lambda: "triton cannot be imported")
    assert "triton" not in kernels.available_backends("cpu")
    assert kernels.triton_unavailable_reason("cpu") == "triton cannot be imported"
    case = make_case(3, 32, 16, 4, 2, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="unavailable"):
        fused_moe(*case, backend="triton")
    assert rel_err(fused_moe(*case), reference_moe(*case)) < 1e-4


def test_package_imports_without_triton():
    """`import fmoe.kernels` must not need triton (a fresh interpreter with triton blocked)."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None          # any `import triton` now raises ImportError
        import torch
        import fmoe.kernels as k
        assert "triton" not in k.available_backends("cpu")
        x = torch.randn(2, 16); w13 = torch.randn(4, 16, 16); w2 = torch.randn(4, 16, 8)
        ids = torch.tensor([[0, 1], [2, 3]]); w = torch.rand(2, 2)
        assert k.fused_moe(x, w13, w2, w, ids).shape == (2, 16)
        print("ok", k.triton_unavailable_reason("cpu"))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok triton cannot be imported")
