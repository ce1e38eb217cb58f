"""Host and hybrid execution: every family's greedy tokens equal the resident model's (fp32),
logits within rounding; a layer's split and merge equal the all-device result; the host pool's
errors reach the caller and its shutdown is clean."""

from __future__ import annotations

import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")
import fmoe  # noqa: E402
from fmoe.kernels import fused_moe  # noqa: E402
from fmoe.runtime.host import HostExecutor, expert_terms  # noqa: E402
from fmoe.runtime.offload import min_capacity  # noqa: E402


@pytest.mark.parametrize("execution", ["host", "hybrid"])
@pytest.mark.parametrize("policy", ["lru", "fmoe", "moe-infinity"])   # the last one prefetches
def test_host_and_hybrid_equal_resident(family, execution, policy):
    path, resident, ids, ref_logits, ref_tokens = family
    shp = resident.config.experts
    total = shp.num_layers * shp.num_experts
    for cache in (min_capacity(shp.top_k), 0.25):
        model = fmoe.models.from_pretrained(path, expert_cache=cache, policy=policy,
                                            execution=execution)
        try:
            torch.testing.assert_close(model(ids), ref_logits, rtol=1e-5, atol=1e-5)
            assert torch.equal(model.generate(ids, 16, eos_token_id=[]), ref_tokens)
            s = model.expert_stats()
            assert s["resident_peak"] <= s["capacity"] < total
            # every routed use is a hit, a miss (loaded) or computed on the host
            assert s["host_computed"] > 0
            if execution == "host":
                # nothing is evicted for a miss: loads only fill free slots once
                assert s["bytes_loaded"] <= s["capacity"] * 3 * shp.hidden * shp.inter * 4
        finally:
            model.close()


def test_load_mode_reports_no_host_work(family):
    path, resident, ids, ref_logits, _ = family
    model = fmoe.models.from_pretrained(path, expert_cache=0.25, policy="lru")
    try:
        assert torch.equal(model(ids), ref_logits)
        assert model.expert_stats()["host_computed"] == 0
    finally:
        model.close()


def test_unknown_execution_is_refused(family):
    path = family[0]
    with pytest.raises(ValueError, match="execution must be one of"):
        fmoe.models.from_pretrained(path, expert_cache=0.25, execution="gpu")


# -- the split and merge of one layer ------------------------------------------------------------

def _layer(T=5, H=16, inter=12, E=6, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w13 = torch.randn(E, 2 * inter, H, generator=g, dtype=torch.float64) / H ** 0.5
    w2 = torch.randn(E, H, inter, generator=g, dtype=torch.float64) / inter ** 0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    return x, w13, w2, ids, w


def _reference(x, w13, w2, ids, w):
    """The MoE layer as a plain loop (fp64)."""
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gu = w13[e] @ x[t]
            out[t] += w[t, k] * (w2[e] @ (torch.nn.functional.silu(gu[:inter]) * gu[inter:]))
    return out


def test_split_and_merge_equal_all_device():
    x, w13, w2, ids, w = _layer()
    host = [1, 4]                    # experts the host computes; the rest run on "the device"
    device = [e for e in range(w13.shape[0]) if e not in host]
    # the device's pairs over slots: host experts point at an all-zero slot
    zero = w13.shape[0]
    w13z = torch.cat([w13, torch.zeros_like(w13[:1])])
    w2z = torch.cat([w2, torch.zeros_like(w2[:1])])
    slot_ids = torch.where(torch.isin(ids, torch.tensor(host)), torch.full_like(ids, zero), ids)
    part = fused_moe(x, w13z, w2z, w, slot_ids, backend="torch", reduce=False)
    terms = expert_terms(x, w, ids, host, lambda e: (w13[e], w2[e]))
    merged = (part + terms).sum(dim=1)
    everything = fused_moe(x, w13, w2, w, ids, backend="torch")
    torch.testing.assert_close(merged, _reference(x, w13, w2, ids, w), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged, everything, rtol=1e-12, atol=1e-12)
    # the host's terms are zero exactly on the device's pairs, and the reverse
    on_host = torch.isin(ids, torch.tensor(host))
    assert torch.all(terms[~on_host] == 0) and torch.all(part[on_host] == 0)
    assert device


def test_expert_terms_skips_unrouted_experts():
    x, w13, w2, ids, w = _layer()
    used = set(ids.flatten().tolist())
    unused = [e for e in range(w13.shape[0]) if e not in used] or [99]
    calls = []

    def weights(e):
        calls.append(e)
        return w13[e], w2[e]

    terms = expert_terms(x, w, ids, unused, weights)
    assert torch.all(terms == 0) and calls == []


# -- the host pool -------------------------------------------------------------------------------

class _Weights:
    """Host weights of a tiny layer; `fail` makes one expert's read raise."""

    def __init__(self, w13, w2, fail=None):
        self.w13, self.w2, self.fail = w13, w2, fail

    def get(self, key):
        if key == self.fail:
            raise OSError(f"read error on expert {key}")
        return self.w13[key], self.w2[key]


def test_host_pool_computes_and_shuts_down():
    x, w13, w2, ids, w = _layer()
    pool = HostExecutor(_Weights(w13, w2), workers=2)
    job = pool.submit(0, w13.shape[0], x, w, ids, [0, 2, 3])
    terms, seconds = job.result()
    assert seconds >= 0
    torch.testing.assert_close(terms, expert_terms(x, w, ids, [0, 2, 3], lambda e: (w13[e], w2[e])))
    pool.close()
    pool.close()                     # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(0, w13.shape[0], x, w, ids, [0])
    assert not any(t.name.startswith("fmoe-host") for t in threading.enumerate())


def test_host_pool_error_reaches_the_caller():
    x, w13, w2, ids, w = _layer()
    failing = int(ids[0, 0])
    pool = HostExecutor(_Weights(w13, w2, fail=failing))
    try:
        job = pool.submit(0, w13.shape[0], x, w, ids, [failing])
        with pytest.raises(OSError, match=f"read error on expert {failing}"):
            job.result()
        # the pool still serves the next job
        other = next(e for e in range(w13.shape[0]) if e != failing)
        job = pool.submit(0, w13.shape[0], x, w, ids, [other])
        job.result()
    finally:
        pool.close()


def test_host_pool_refuses_zero_workers():
    with pytest.raises(ValueError, match="workers"):
        HostExecutor(_Weights(None, None), workers=0)


def test_host_reads_mixtral_experts_mapped_and_names_a_failed_read(tmp_path, mixtral_ckpt):
    """Mixtral's gate and up lie apart in its files: the host computes from two mapped views
    (no copy); and a read the host cannot make is an ExpertReadError naming the expert, as the
    copy engine's."""
    from fmoe.errors import CheckpointError, ExpertReadError
    from fmoe.kernels.torch_moe import GateUp
    from fmoe.runtime.host import HostWeights

    path, _ = mixtral_ckpt
    model = fmoe.models.from_pretrained(path, expert_cache=2, policy="lru", execution="host")
    try:
        assert isinstance(model.runtime.host.weights.get(3)[0], GateUp)

        class Broken:
            num_experts = model.runtime.store.num_experts
            hidden, inter = model.runtime.store.hidden, model.runtime.store.inter

            def layout(self, key):
                return model.runtime.store.layout(key)

            def new_staging(self):
                return model.runtime.store.new_staging()

            def read_into(self, key, a, b):
                raise CheckpointError("model-00001.safetensors: unexpected end of file")

        bad = HostWeights(Broken(), torch.float32, mmap=False)
        with pytest.raises(ExpertReadError, match="expert 0/5"):
            bad.get(5)
    finally:
        model.close()
