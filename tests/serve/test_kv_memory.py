"""`fmoe serve --kv-cache-memory`: the KV budget in positions from a size, 'auto' (half of what
is free after loading) or 'none'; the context it leaves; and a --max-model-len it cannot hold
refused by name."""

from __future__ import annotations

import pytest
import torch

import fmoe
from fmoe.models.synthetic import write_random_checkpoint
from fmoe.runtime.memory import MemoryLimit
from fmoe.serve import server
from tests.runtime.test_batching import FAMILIES


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("kv") / "m", FAMILIES["mixtral"],
                                   dtype=torch.float32, seed=1)
    return fmoe.models.from_pretrained(path)


def per_position(model):
    # mixtral tiny: 2 layers x (K + V) x 2 kv heads x 16 dims, float32
    assert model.module.kv_bytes_per_position() == 2 * 2 * 2 * 16 * 4
    return 512


def test_a_size_gives_positions(model):
    per = per_position(model)
    ctx, budget, line = server.context_and_budget(model, None, "64KiB")
    assert budget == 65536 // per == 128
    assert ctx == 128                            # the model's 256 would not fit: capped
    assert "128 positions" in line and "context 128" in line
    ctx, budget, _ = server.context_and_budget(model, 100, "64KiB")
    assert (ctx, budget) == (100, 128)
    ctx, budget, line = server.context_and_budget(model, None, "1MiB")
    assert (ctx, budget) == (256, 2048) and "context" not in line


def test_none_is_unbounded(model):
    ctx, budget, line = server.context_and_budget(model, None, "none")
    assert (ctx, budget) == (256, None) and "no bound" in line


def test_auto_takes_half_of_what_is_free(model, monkeypatch):
    monkeypatch.setattr("fmoe.runtime.memory.device_memory",
                        lambda *a, **k: MemoryLimit(None, 100 * 512, "MemAvailable"))
    ctx, budget, line = server.context_and_budget(model, None, "auto")
    assert (ctx, budget) == (50, 50) and "auto" in line


def test_refusals_name_the_flags(model, monkeypatch):
    with pytest.raises(ValueError, match="--max-model-len 200 needs 200 KV cache positions; "
                                         "--kv-cache-memory 64KiB holds 128"):
        server.context_and_budget(model, 200, "64KiB")
    with pytest.raises(ValueError, match="--kv-cache-memory 512b: 512 bytes hold no KV cache positions"):
        server.context_and_budget(model, None, "512b")
    with pytest.raises(ValueError, match="cannot parse byte size"):
        server.context_and_budget(model, None, "lots")
    monkeypatch.setattr("fmoe.runtime.memory.device_memory",
                        lambda *a, **k: MemoryLimit(None, 1000, "MemAvailable"))
    with pytest.raises(ValueError, match="too little memory free"):
        server.context_and_budget(model, None, "auto")


def test_auto_leaves_the_expert_caches_untouched_slots_alone(model, tmp_path, monkeypatch):
    """An offloaded model's slots are not in RSS until experts are read into them (anonymous
    memory on CPU): 'auto' does not count them as free."""
    path = write_random_checkpoint(tmp_path / "m", FAMILIES["mixtral"], dtype=torch.float32, seed=1)
    offloaded = fmoe.models.from_pretrained(path, expert_cache=4, policy="lru")
    try:
        slots = offloaded.runtime.uncommitted_bytes()
        # 4 slots and the zero slot, w13 [2I, H] and w2 [H, I] of 48 x 64 float32
        assert slots == 5 * 3 * 48 * 64 * 4
        monkeypatch.setattr("fmoe.runtime.memory.device_memory",
                            lambda *a, **k: MemoryLimit(None, slots + 100 * 512, "MemAvailable"))
        _, budget, _ = server.context_and_budget(offloaded, None, "auto")
        assert budget == 50
        offloaded.generate(torch.tensor([[5, 6, 7]]), 2)
        assert offloaded.runtime.uncommitted_bytes() < slots
    finally:
        offloaded.close()
