"""The CPU bf16 matrix-vector kernel against an fp64 loop, and the experts' paths that use it."""

import numpy as np
import pytest
import torch

from fmoe.kernels import fused_moe
from fmoe.kernels.cpu_gemv import GEMV_MAX_ROWS, expert_linear, linear
from fmoe.kernels.torch_moe import moe_gather


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.t() summed in fp64, one dot product at a time, then rounded to bf16 once."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    xd, wd = x.double(), w.double()
    for r in range(x.shape[0]):
        for n in range(w.shape[0]):
            out[r, n] = (xd[r] * wd[n]).sum()
    return out


@pytest.mark.parametrize("N,K,R", [(1, 1, 1), (3, 5, 1), (7, 33, 2), (64, 256, 1), (130, 96, 3)])
def test_linear_equals_the_fp64_product_to_bf16_rounding(N, K, R):
    """fp32 sums rounded once: within one bf16 step (2^-8 relative) of the exact product,
    plus the fp32 sum's own error bound (K * 2^-24 of the sum of |terms|). Rows of w beyond a
    multiple of four take the tail loop."""
    g = torch.Generator().manual_seed(N * 1000 + K)
    x = torch.randn(R, K, generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    got = linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (R, N)
    ref = reference(x, w)
    scale = (x.double().abs() @ w.double().abs().t())
    err = (got.double() - ref).abs()
    assert (err <= ref.abs() * 2.0 ** -8 + scale * K * 2.0 ** -24 + 1e-30).all()


def test_linear_rounds_to_nearest_even_and_keeps_nan():
    # w = [1, 2^-8]: x = [1, 1] sums to 1 + 2^-8, halfway between bf16 1 and 1 + 2^-7: even (1)
    w = torch.tensor([[1.0, 2.0 ** -8], [1.0, 3 * 2.0 ** -8], [float("nan"), 1.0],
                      [float("inf"), 1.0]]).to(torch.bfloat16)
    x = torch.ones(1, 2, dtype=torch.bfloat16)
    got = linear(x, w)[0].float()
    assert got[0] == 1.0                    # ties to even
    assert got[1] == 1.0 + 2.0 ** -6        # 1 + 3 * 2^-8: a tie too, to the even 1 + 4 * 2^-8
    assert torch.isnan(got[2]) and got[3] == float("inf")


def test_linear_refuses_other_dtypes_and_shapes():
    w = torch.zeros(4, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16"):
        linear(torch.zeros(1, 3), w)
    with pytest.raises(ValueError, match="shape"):
        linear(torch.zeros(1, 2, dtype=torch.bfloat16), w)


def test_expert_linear_uses_the_kernel_only_for_bf16_decode_rows():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 24, generator=g).to(torch.bfloat16)
    x = torch.randn(GEMV_MAX_ROWS + 1, 24, generator=g).to(torch.bfloat16)
    assert torch.equal(expert_linear(x[:GEMV_MAX_ROWS], w), linear(x[:GEMV_MAX_ROWS], w))
    assert torch.equal(expert_linear(x, w), x @ w.t())
    xf, wf = x.float(), w.float()
    assert torch.equal(expert_linear(xf[:1], wf), xf[:1] @ wf.t())


def test_decode_step_agrees_across_slot_numberings_and_the_per_expert_list():
    """One token through the experts in bf16 (the kernel's case): the resident numbering, a
    cache's slots and a per-expert list (the mapped checkpoint's form) give the same bits, and
    the result is within bf16 rounding of an fp64 loop."""
    g = torch.Generator().manual_seed(3)
    E, H, I, K = 8, 64, 48, 3
    w13 = (torch.randn(E, 2 * I, H, generator=g) / 8).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) / 8).to(torch.bfloat16)
    x = torch.randn(1, H, generator=g).to(torch.bfloat16)
    ids = torch.tensor([[5, 1, 6]])
    wts = torch.tensor([[0.5, 0.3, 0.2]]).to(torch.bfloat16)
    resident = fused_moe(x, w13, w2, wts, ids)
    perm = torch.randperm(E, generator=g)              # expert e sits in slot perm[e]
    s13, s2 = torch.empty_like(w13), torch.empty_like(w2)
    s13[perm], s2[perm] = w13, w2
    assert torch.equal(fused_moe(x, s13, s2, wts, perm[ids]), resident)

    class Listed(list):
        shape = property(lambda self: (len(self), *self[0].shape))
    assert torch.equal(moe_gather(x, Listed(w13.unbind()), Listed(w2.unbind()), wts, ids), resident)
    want = np.zeros(H)
    for k in range(K):
        e = int(ids[0, k])
        gu = w13[e].double() @ x[0].double()
        h = torch.nn.functional.silu(gu[:I]) * gu[I:]
        want += float(wts[0, k]) * (w2[e].double() @ h).numpy()
    assert np.allclose(resident[0].double().numpy(), want, rtol=0.05, atol=0.02)


@torch.no_grad()
def test_model_linear_runs_the_kernel_for_a_bf16_decode_row():
    """The models' `Linear`: the kernel for one bf16 row on the CPU (a bias added to its fp32
    sum), torch's product for more rows and other dtypes; same parameters as nn.Linear."""
    from fmoe.models.layers import Linear

    torch.manual_seed(0)
    plain = Linear(24, 40, bias=False).to(torch.bfloat16)
    x = torch.randn(1, 1, 24).to(torch.bfloat16)
    assert torch.equal(plain(x), linear(x[0], plain.weight).view(1, 1, 40))
    lin = Linear(24, 40, bias=True).to(torch.bfloat16)
    assert isinstance(lin, torch.nn.Linear) and set(lin.state_dict()) == {"weight", "bias"}
    assert torch.equal(lin(x), linear(x[0], lin.weight, lin.bias).view(1, 1, 40))
    xs = torch.randn(2, 3, 24).to(torch.bfloat16)
    assert torch.equal(lin(xs), torch.nn.functional.linear(xs, lin.weight, lin.bias))
    lin32 = lin.float()
    assert torch.equal(lin32(x.float()), torch.nn.functional.linear(x.float(), lin32.weight, lin32.bias))


def test_linear_uses_as_many_threads_as_torch():
    import numba

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        linear(torch.ones(1, 8, dtype=torch.bfloat16), torch.ones(4, 8, dtype=torch.bfloat16))
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _swiglu_fp64(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
    xd = x.double()[0]
    g, u = wg.double() @ xd, wu.double() @ xd
    return wd.double() @ (torch.nn.functional.silu(g) * u)


@pytest.mark.parametrize("inter", [48, 46])          # 46: the rows beyond a multiple of four
def test_swiglu_rows_equals_the_fp64_expert_and_each_expert_alone(inter):
    """Several experts in one call: each within bf16 rounding of an fp64 SwiGLU, and bit for bit
    what the same expert gives alone (a decode step's experts in one call, the host's one at a
    time)."""
    from fmoe.kernels.cpu_gemv import swiglu_rows

    g = torch.Generator().manual_seed(inter)
    S, H = 5, 64
    w13 = (torch.randn(S, 2 * inter, H, generator=g) / 8).to(torch.bfloat16)
    w2 = (torch.randn(S, H, inter, generator=g) / 8).to(torch.bfloat16)
    x = torch.randn(1, H, generator=g).to(torch.bfloat16)
    slots = torch.tensor([4, 0, 2, 4])
    y = swiglu_rows(x, w13, 0, w13, inter, w2, slots)
    assert y.dtype == torch.bfloat16 and y.shape == (4, H)
    for j, s in enumerate(slots.tolist()):
        alone = swiglu_rows(x, w13, 0, w13, inter, w2, torch.tensor([s]))
        assert torch.equal(alone[0], y[j])
        want = _swiglu_fp64(x, w13[s, :inter], w13[s, inter:], w2[s])
        assert torch.allclose(y[j].double(), want, rtol=0.03, atol=0.03 * want.abs().max().item())


def test_swiglu_rows_checks_slots_and_shapes():
    from fmoe.kernels.cpu_gemv import swiglu_rows

    w13 = torch.zeros(3, 8, 16, dtype=torch.bfloat16)
    w2 = torch.zeros(3, 16, 4, dtype=torch.bfloat16)
    x = torch.zeros(1, 16, dtype=torch.bfloat16)
    with pytest.raises(IndexError, match="slot is out of range"):
        swiglu_rows(x, w13, 0, w13, 4, w2, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="shape mismatch"):
        swiglu_rows(torch.zeros(2, 16, dtype=torch.bfloat16), w13, 0, w13, 4, w2, torch.tensor([0]))
    with pytest.raises(ValueError, match="bf16"):
        swiglu_rows(x.float(), w13, 0, w13, 4, w2, torch.tensor([0]))


def test_dense_swiglu_runs_the_kernel_for_a_bf16_decode_row():
    """The models' SwiGLU (dense layers, shared experts): one bf16 row in one kernel call, within
    bf16 rounding of torch's three products; more rows stay on torch."""
    from fmoe.kernels.cpu_gemv import swiglu_rows
    from fmoe.models.layers import SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(32, 20).to(torch.bfloat16)
    x = torch.randn(1, 1, 32).to(torch.bfloat16)
    got = mlp(x)
    p = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    assert torch.equal(got[0], swiglu_rows(x[0], p[0][None], 0, p[1][None], 0, p[2][None],
                                           torch.tensor([0])))
    want = _swiglu_fp64(x[0], *p)
    assert torch.allclose(got[0, 0].double(), want, rtol=0.03, atol=0.03 * want.abs().max().item())
    xs = torch.randn(2, 3, 32).to(torch.bfloat16)
    ref = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(xs)) * mlp.up_proj(xs))
    assert torch.equal(mlp(xs), ref)


def test_mla_decode_equals_the_fp64_latent_attention():
    """All heads of one query row in one call, masked keys ignored: within the bf16 roundings
    (latent query, attention output, result) of an fp64 computation."""
    from fmoe.kernels.cpu_gemv import mla_decode

    g = torch.Generator().manual_seed(7)
    h, r, nope, rope, v, S = 4, 32, 16, 8, 12, 9
    q_nope = torch.randn(h, nope, generator=g).to(torch.bfloat16)
    q_pe = torch.randn(h, rope, generator=g).to(torch.bfloat16)
    w_uk_t = (torch.randn(h, r, nope, generator=g) / 4).to(torch.bfloat16)
    w_uv = (torch.randn(h, v, r, generator=g) / 4).to(torch.bfloat16)
    latent = torch.randn(S, r, generator=g).to(torch.bfloat16)
    k_pe = torch.randn(S, rope, generator=g).to(torch.bfloat16)
    keep = torch.tensor([True, False, True, True, False, True, True, True, True])
    got = mla_decode(q_nope, q_pe, w_uk_t, latent, k_pe, keep, w_uv, 0.2).double()
    q_lat = torch.einsum("hrn,hn->hr", w_uk_t.double(), q_nope.double())
    scores = (q_lat @ latent.double().T + q_pe.double() @ k_pe.double().T) * 0.2
    scores[:, ~keep] = float("-inf")
    ctx = scores.softmax(-1) @ latent.double()
    want = torch.einsum("hvr,hr->hv", w_uv.double(), ctx)
    assert torch.allclose(got, want, rtol=0.03, atol=0.03 * want.abs().max().item())
    # a masked key changes nothing
    latent2 = latent.clone()
    latent2[1] = 100
    assert torch.equal(mla_decode(q_nope, q_pe, w_uk_t, latent2, k_pe, keep, w_uv, 0.2).double(), got)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_rows_gives_torchs_bits(interleaved):
    """The decode row's rotary embedding equals `deinterleave` + `apply_rotary` bit for bit."""
    from fmoe.kernels.cpu_gemv import rope_rows
    from fmoe.models.deepseek_v2 import deinterleave
    from fmoe.models.layers import apply_rotary

    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 16, generator=g).to(torch.bfloat16)
    cos = torch.randn(16, generator=g).to(torch.bfloat16)
    sin = torch.randn(16, generator=g).to(torch.bfloat16)
    xr = deinterleave(x) if interleaved else x
    want = apply_rotary(xr[None, None], cos[None, None], sin[None, None])[0, 0]
    assert torch.equal(rope_rows(x, cos, sin, interleaved), want)
    with pytest.raises(ValueError, match="shape mismatch"):
        rope_rows(x, cos[:8], sin[:8], interleaved)


def test_rms_norm_of_a_decode_row_is_within_one_bf16_step_of_torchs():
    """The models' RMSNorm on one bf16 row (the kernel) against its torch form on two rows: the
    mean of squares is summed in another order, so an element may differ by one bf16 step."""
    from fmoe.models.layers import RMSNorm

    g = torch.Generator().manual_seed(12)
    norm = RMSNorm(256).to(torch.bfloat16)
    norm.weight.data = torch.randn(256, generator=g).to(torch.bfloat16)
    x = (3 * torch.randn(2, 256, generator=g)).to(torch.bfloat16)
    one, two = norm(x[:1]), norm(x)
    assert one.shape == (1, 256) and one.dtype == torch.bfloat16
    assert torch.allclose(one.float(), two[:1].float(), rtol=2.0 ** -7, atol=0)
    xd = x[0].double()
    want = norm.weight.double() * xd / (xd.pow(2).mean() + norm.eps).sqrt()
    assert torch.allclose(one[0].double(), want, rtol=2.0 ** -7, atol=1e-6)


@torch.no_grad()
def test_a_biased_decode_row_rounds_once_as_torch():
    """The bias joins the fp32 sum before the one rounding (as torch's product adds it): every
    output is the exact x . w + b rounded to the nearest bf16 (within the fp32 sum's error),
    where adding the bias to a rounded product would round twice (up to ~1.8 bf16 steps off)."""
    from fmoe.models.layers import Linear

    torch.manual_seed(1)
    lin = Linear(100, 37, bias=True).to(torch.bfloat16)
    lin.bias.copy_(torch.randn(37) * 4)
    worst = 0.0
    for _ in range(40):
        x = torch.randn(1, 100).to(torch.bfloat16)
        exact = reference(x, lin.weight)[0] + lin.bias.double()
        got = lin(x)[0].double()
        step = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 7)       # one bf16 step at |exact|
        # |exact| >= 1: the fp32 sum's error (< 100 * 2^-24 * sum|terms| ~ 1e-3) stays far
        # below half a step there
        big = exact.abs() >= 1
        worst = max(worst, float(((got - exact).abs() / step)[big].max()))
    assert worst <= 0.6, worst


@pytest.mark.parametrize("inter", [1, 3, 5, 9])
def test_a_nan_propagates_through_every_kernel_row(inter):
    """A NaN reaching a gate row past the last multiple of four (or an RMSNorm with eps 0 on a
    zero row) gives NaN/inf as torch does, not a ZeroDivisionError from the compiled division."""
    from fmoe.kernels.cpu_gemv import rms_norm_row, swiglu_rows

    w13 = torch.randn(1, 2 * inter, 8).to(torch.bfloat16)
    w2 = torch.randn(1, 8, inter).to(torch.bfloat16)
    x = torch.full((8,), float("nan")).to(torch.bfloat16)
    out = swiglu_rows(x[None], w13, 0, w13, inter, w2)
    assert torch.isnan(out.float()).all()
    zero = torch.zeros(8, dtype=torch.bfloat16)
    assert not torch.isfinite(rms_norm_row(zero, torch.ones(8, dtype=torch.bfloat16), 0.0).float()).all()


def test_a_forward_that_records_gradients_stays_in_torch():
    from fmoe.models.layers import Linear

    lin = Linear(8, 4, bias=False).to(torch.bfloat16)
    x = torch.randn(1, 8).to(torch.bfloat16)
    y = lin(x)                        # the weight requires grad: torch's product, differentiable
    assert y.requires_grad
    y.float().sum().backward()
    assert lin.weight.grad is not None


def test_kernels_are_serialised_under_numbas_workqueue_layer():
    """Where numba finds neither OpenMP nor TBB it runs parallel kernels on its "workqueue"
    layer, which aborts the process on concurrent calls (host workers beside the forward):
    the kernels then run one at a time. Forced here with NUMBA_THREADING_LAYER."""
    import os
    import subprocess
    import sys

    code = """
import threading, torch
from fmoe.kernels import cpu_gemv
x = torch.randn(1, 256).to(torch.bfloat16); w = torch.randn(512, 256).to(torch.bfloat16)
want = cpu_gemv.linear(x, w)
bad = []
def run():
    for _ in range(40):
        if not torch.equal(cpu_gemv.linear(x, w), want):
            bad.append(1)
ts = [threading.Thread(target=run) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
import numba
print(numba.threading_layer(), cpu_gemv._serial is not None, len(bad))
"""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["workqueue", "True", "0"]
