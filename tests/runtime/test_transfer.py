"""The copy engine under stress: overlapping demand and prefetch orders, random cancellations
and slot reassignments, checked by checksums of slot contents."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from fmoe.models.checkpoint import CheckpointIndex
from fmoe.models.loading import locate_experts
from fmoe.models.mixtral import MixtralConfig
from fmoe.models.synthetic import write_random_checkpoint
from fmoe.runtime.store import ExpertStore
from fmoe.runtime.transfer import DEMAND, PREFETCH, CopyEngine, parse_bandwidth

CFG = {"model_type": "mixtral", "vocab_size": 16, "hidden_size": 32, "intermediate_size": 24,
       "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
       "num_local_experts": 8, "num_experts_per_tok": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("ck"), CFG, dtype=torch.float32, seed=3)
    cfg = MixtralConfig.from_hf(CFG)
    layouts, _ = locate_experts(cfg, CheckpointIndex(path))
    return ExpertStore(layouts, 32, 24, torch.float32)


def checksum(w13, w2):
    return (float(w13.double().sum()), float(w2.double().pow(2).sum()))


@pytest.fixture(scope="module")
def expected(store):
    out = {}
    for key in range(24):
        a, b = store.new_staging()
        store.read_into(key, a, b)
        out[key] = checksum(a, b)
    assert len(set(out.values())) == 24           # distinct experts, so a wrong slot shows
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stress(store, expected, seed):
    rng = random.Random(seed)
    S = 5
    w13 = torch.zeros(S, 48, 32)
    w2 = torch.zeros(S, 32, 24)
    eng = CopyEngine(store, w13, w2)
    occupant = [None] * S
    try:
        for step in range(400):
            op = rng.random()
            slot = rng.randrange(S)
            if op < 0.45:
                key = rng.randrange(24)
                eng.assign(slot)
                occupant[slot] = key
                eng.load(key, slot, DEMAND if rng.random() < 0.3 else PREFETCH, rng.random())
            elif op < 0.55:
                eng.cancel_prefetches()
            elif occupant[slot] is not None:
                eng.demand(occupant[slot], slot)
                eng.wait(slot)
                assert eng.is_ready(slot)
                assert checksum(w13[slot], w2[slot]) == expected[occupant[slot]], (step, slot)
        for slot in range(S):
            if occupant[slot] is not None:
                eng.demand(occupant[slot], slot)
        eng.drain()
        for slot in range(S):
            if occupant[slot] is not None:
                assert eng.is_ready(slot)
                assert checksum(w13[slot], w2[slot]) == expected[occupant[slot]]
    finally:
        eng.close()
    assert eng.error is None


def test_many_waiters_no_deadlock(store, expected):
    S = 6
    w13, w2 = torch.zeros(S, 48, 32), torch.zeros(S, 32, 24)
    eng = CopyEngine(store, w13, w2, link_bandwidth=50e6)
    for s in range(S):
        eng.assign(s)
        eng.load(s + 10, s, PREFETCH, priority=s)
    errors = []

    def waiter(s):
        try:
            eng.wait(s)
            assert checksum(w13[s], w2[s]) == expected[s + 10]
        except BaseException as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=waiter, args=(s,)) for s in range(S)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    eng.close()
    assert not errors and not any(t.is_alive() for t in threads)


def test_wait_without_order_raises(store):
    eng = CopyEngine(store, torch.zeros(2, 48, 32), torch.zeros(2, 32, 24))
    eng.assign(0)
    with pytest.raises(RuntimeError, match="no load queued"):
        eng.wait(0)
    eng.close()


def test_parse_bandwidth():
    assert parse_bandwidth("25GB/s") == 25e9
    assert parse_bandwidth("1.5 MB/s") == 1.5e6
    assert parse_bandwidth("2GiB/s") == 2 * 2**30
    assert parse_bandwidth(None) is None
    with pytest.raises(ValueError):
        parse_bandwidth("fast")
    # a rate of zero emulated nothing, silently; a malformed number leaked float()'s message
    for bad, why in (("0GB/s", "positive"), (0, "positive"), (float("nan"), "positive"),
                     ("1.2.3GB/s", "cannot parse")):
        with pytest.raises(ValueError, match=f"--link-bandwidth.*{why}"):
            parse_bandwidth(bad)


def test_pinned_host_tier_counts_the_allocators_rounding(store):
    """Pinned entries come from torch's caching host allocator, which rounds each block up to a
    power of two: the tier's budget counts those bytes (w13 6,144 -> 8,192, w2 3,072 -> 4,096
    bytes here), or a 64 GiB host cache would pin ~1.5x that."""
    plain = ExpertStore(store.layouts, 32, 24, torch.float32, host_bytes=10 * 9216)
    pinned = ExpertStore(store.layouts, 32, 24, torch.float32, host_bytes=10 * 9216, pin=True)
    assert plain.host_entry_bytes() == 9216 and plain.host_capacity == 10
    assert pinned.host_entry_bytes() == 8192 + 4096 and pinned.host_capacity == 7


def test_a_host_tier_hit_is_not_overwritten_by_another_readers_keep(store, expected):
    """A hit in the host tier is copied out while no other reader can evict it: the tier
    reuses an evicted entry's memory in place, so a copy made after the lookup's lock was let go
    could get another expert's bytes. The other reader is run right when the lookup lets go
    of the lock (deterministic: in the same thread)."""
    tier = ExpertStore(store.layouts, 32, 24, torch.float32, host_bytes=9216)    # one entry
    assert tier.host_capacity == 1
    a13, a2 = tier.new_staging()
    tier.read_into(0, a13, a2)                     # from disk; kept in the tier
    inner = tier._lock

    class Lock:
        hook = None

        def __enter__(self):
            inner.acquire()

        def __exit__(self, *exc):
            inner.release()
            hook, Lock.hook = Lock.hook, None
            if hook is not None:
                hook()

    def other_reader():                            # reads expert 5: evicts 0, reuses its memory
        b13, b2 = tier.new_staging()
        tier.read_into(5, b13, b2)

    tier._lock = Lock()
    Lock.hook = other_reader
    tier.read_into(0, a13, a2)                     # a hit
    assert checksum(a13, a2) == expected[0]
