"""Offloading is lossless for every family: expert_cache in {minimum, 0.25, 0.5, 1.0} x policy
in {lru, lfu} gives the resident model's logits (bit for bit) and greedy tokens."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
import fmoe  # noqa: E402
from fmoe.runtime.offload import min_capacity  # noqa: E402


@pytest.mark.parametrize("cache", ["min", 0.25, 0.5, 1.0])
def test_lossless_every_family(family, cache):
    path, resident, ids, ref_logits, ref_tokens = family
    shp = resident.config.experts
    cap = min_capacity(shp.top_k) if cache == "min" else cache
    for policy in ("lru", "lfu"):
        model = fmoe.models.from_pretrained(path, expert_cache=cap, policy=policy)
        try:
            assert torch.equal(model(ids), ref_logits)
            assert torch.equal(model.generate(ids, 16, eos_token_id=[]), ref_tokens)
            s = model.expert_stats()
            assert s["resident_peak"] <= s["capacity"]
            if s["capacity"] < shp.num_layers * shp.num_experts:
                assert s["misses"] > 0
        finally:
            model.close()
