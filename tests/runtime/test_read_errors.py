"""A failed expert read fails the requests that needed it, carries its cause, and is retried on
the next need: the copy engine keeps serving other orders, `healthy` is False until the failed
expert reads again, and a repaired store serves as before."""

from __future__ import annotations

import shutil

import pytest
import torch

import fmoe
from fmoe.errors import CheckpointError, ExpertReadError
from fmoe.models.checkpoint import CheckpointIndex
from fmoe.models.loading import locate_experts
from fmoe.models.mixtral import MixtralConfig
from fmoe.models.synthetic import write_random_checkpoint
from fmoe.runtime.batching import Batcher, Sequence
from fmoe.runtime.engine import SamplingParams
from fmoe.runtime.store import ExpertStore
from fmoe.runtime.transfer import DEMAND, CopyEngine

CFG = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 24,
       "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
       "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 64}


class FlakyStore:
    """An ExpertStore whose reads of `broken` keys raise `error`."""

    def __init__(self, store):
        self.inner = store
        self.broken: set[int] = set()
        self.error = CheckpointError("experts.bin: checksum mismatch in expert 0/3 (the store is damaged)")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_into(self, key, w13, w2):
        if key in self.broken:
            raise self.error
        self.inner.read_into(key, w13, w2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("rd"), CFG, dtype=torch.float32, seed=5)


@pytest.fixture
def store(ckpt):
    cfg = MixtralConfig.from_hf(CFG)
    layouts, _ = locate_experts(cfg, CheckpointIndex(ckpt))
    return FlakyStore(ExpertStore(layouts, 32, 24, torch.float32))


def reference(store, key):
    a, b = store.inner.new_staging()
    store.inner.read_into(key, a, b)
    return a, b


def test_a_read_error_carries_its_cause_and_the_engine_goes_on(store):
    w13, w2 = torch.zeros(4, 48, 32), torch.zeros(4, 32, 24)
    eng = CopyEngine(store, w13, w2)
    try:
        store.broken = {3}
        eng.assign(0)
        eng.load(3, 0, DEMAND)
        with pytest.raises(ExpertReadError) as e:
            eng.wait(0)
        # the cause reaches the caller: the old engine said only "copy engine failed"
        assert "checksum mismatch" in str(e.value) and "expert 0/3" in str(e.value)
        assert not eng.healthy and "checksum mismatch" in str(eng.last_error)
        # other experts still load: the worker survived the failure
        eng.assign(1)
        eng.load(5, 1, DEMAND)
        eng.wait(1)
        assert torch.equal(w13[1], reference(store, 5)[0])
        assert not eng.healthy                # expert 3 has not read again yet
        # the next need retries the failed read; it works now
        store.broken = set()
        eng.demand(3, 0)
        eng.wait(0)
        a, b = reference(store, 3)
        assert torch.equal(w13[0], a) and torch.equal(w2[0], b)
        assert eng.healthy and eng.last_error is None
    finally:
        eng.close()


def test_a_still_broken_expert_fails_again_on_its_next_need(store):
    eng = CopyEngine(store, torch.zeros(2, 48, 32), torch.zeros(2, 32, 24))
    try:
        store.broken = {2}
        eng.assign(0)
        eng.load(2, 0, DEMAND)
        for _ in range(3):
            with pytest.raises(ExpertReadError):
                eng.wait(0)
            eng.demand(2, 0)
        assert eng.read_errors >= 3
    finally:
        eng.close()


def test_probe_restores_health_without_traffic(store):
    eng = CopyEngine(store, torch.zeros(2, 48, 32), torch.zeros(2, 32, 24))
    try:
        store.broken = {7}
        eng.assign(1)
        eng.load(7, 1, DEMAND)
        with pytest.raises(ExpertReadError):
            eng.wait(1)
        assert eng.probe() is False and not eng.healthy
        store.broken = set()
        assert eng.probe() is True and eng.healthy
    finally:
        eng.close()


def _copy_to_break(ckpt, tmp_path):
    """A copy of the checkpoint to damage: (its path, the resident model, an offloaded one with
    two slots, {file: its bytes})."""
    path = tmp_path / "ck"
    shutil.copytree(ckpt, path)
    files = sorted(path.glob("*.safetensors"))
    return (path, fmoe.models.from_pretrained(path),
            fmoe.models.from_pretrained(path, expert_cache=2, policy="lru"),
            {f: f.read_bytes() for f in files})


def test_a_truncated_store_fails_requests_then_recovers(ckpt, tmp_path):
    """End to end: truncate the checkpoint while serving, then restore it in place."""
    path, resident, model, saved = _copy_to_break(ckpt, tmp_path)
    files = list(saved)
    prompt = [5, 6, 7, 8]
    ref = resident.generate(torch.tensor([prompt]), 6, eos_token_id=[])[0, 4:].tolist()
    b = Batcher(model, max_batch=4)
    try:
        for f in files:      # keep the header (and the resident weights already read): drop the rest
            with open(f, "r+b") as fh:
                n = int.from_bytes(saved[f][:8], "little") + 8
                fh.truncate(n + 64)
        broken = Sequence(prompt, SamplingParams(max_new_tokens=6, eos_token_id=[]))
        b.submit(broken)
        b.run_until_idle()
        assert broken.finish_reason == "error"
        assert "end of file" in broken.error, broken.error
        assert ".safetensors" in broken.error
        assert not model.runtime.engine.healthy
        assert not model.runtime.engine._pending   # no load of the failed step runs on
        for f in files:      # repaired in place (same inode)
            with open(f, "r+b") as fh:
                fh.write(saved[f])
        ok = Sequence(prompt, SamplingParams(max_new_tokens=6, eos_token_id=[]))
        b.submit(ok)
        b.run_until_idle()
        assert ok.finish_reason == "length" and ok.output == ref
        assert model.runtime.engine.probe()
    finally:
        b.close()
        model.close()


def test_a_checksum_mismatch_reaches_the_request_with_its_cause(ckpt, tmp_path, monkeypatch):
    """FMOE_VERIFY_READS=1 on a converted store with one damaged expert: the request that needs
    it fails naming the checksum mismatch (the old engine said only "copy engine failed")."""
    import json

    from fmoe.models.convert import convert

    store = tmp_path / "store"
    convert(ckpt, store, progress=False)
    index = json.loads((store / "fmoe-store.json").read_text())
    entry = next(e for e in index["entries"] if e["moe_layer"] == 0 and e["expert"] == 3)
    blob = store / "experts.bin"
    with open(blob, "r+b") as f:                       # flip one byte of expert 0/3
        f.seek(entry["offset"] + 5)
        b = f.read(1)
        f.seek(entry["offset"] + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    monkeypatch.setenv("FMOE_VERIFY_READS", "1")
    model = fmoe.models.from_pretrained(store, expert_cache=CFG["num_local_experts"], policy="lru")
    b = Batcher(model, max_batch=4)
    try:
        seqs = [Sequence([t, t + 1, t + 2], SamplingParams(max_new_tokens=8, eos_token_id=[]))
                for t in range(3, 40, 4)]
        b.submit(seqs)                                  # enough routing to need expert 0/3
        b.run_until_idle()
        failed = [s for s in seqs if s.finish_reason == "error"]
        assert failed, "no request needed the damaged expert"
        assert all("checksum mismatch" in s.error and "expert 0/3" in s.error for s in failed)
        assert "checksum mismatch" in str(model.runtime.engine.last_error)
    finally:
        b.close()
        model.close()


def test_a_failed_step_leaves_no_load_running(ckpt):
    """The step that sees a read fail returns only once its other loads have ended: a load it
    queued cannot run on into the next step and fail there (a read started before a repair).
    The step's second read is held until the test lets it go (or a second has passed): before
    the fix the step returned while that read was still queued."""
    import threading

    model = fmoe.models.from_pretrained(ckpt, expert_cache=2, policy="lru")
    engine = model.runtime.engine
    inner, calls, gate = engine.store.read_into, [], threading.Event()

    def read_into(key, w13, w2):
        calls.append(key)
        if len(calls) == 1:
            raise CheckpointError("model.safetensors: unexpected end of file")
        if len(calls) == 2:
            gate.wait(1.0)
            raise CheckpointError("model.safetensors: unexpected end of file")
        inner(key, w13, w2)

    engine.store.read_into = read_into
    try:
        with pytest.raises(ExpertReadError, match="end of file"):
            model.generate(torch.tensor([[5, 6, 7, 8]]), 2, eos_token_id=[])
        pending = dict(engine._pending)
        gate.set()
        assert len(calls) == 2 and not pending          # both reads ended with the step
        assert len(engine._failed) == 1                 # the second's failure waits for its need
        engine.store.read_into = inner                  # repaired: the next need reads again
        out = model.generate(torch.tensor([[5, 6, 7, 8]]), 2, eos_token_id=[])
        assert out.shape == (1, 6)
    finally:
        model.close()


def test_a_store_restored_by_rename_is_read_again(ckpt, tmp_path):
    """A file replaced under its name (a re-download, mv, rsync: a new inode) serves after a
    read failed: the reader opens the path again instead of rereading the old, truncated file."""
    import os

    path, resident, model, saved = _copy_to_break(ckpt, tmp_path)
    files = list(saved)
    prompt = torch.tensor([[5, 6, 7, 8]])
    ref = resident.generate(prompt, 6, eos_token_id=[])
    try:
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(int.from_bytes(saved[f][:8], "little") + 8 + 64)
        with pytest.raises(ExpertReadError, match="end of file"):
            model.generate(prompt, 6, eos_token_id=[])
        for f in files:          # restored as a new file renamed over the old name
            tmp = f.with_suffix(".new")
            tmp.write_bytes(saved[f])
            os.replace(tmp, f)
        assert torch.equal(model.generate(prompt, 6, eos_token_id=[]), ref)
        assert model.runtime.engine.probe()
    finally:
        model.close()


def test_retries_of_a_file_still_damaged_cost_no_descriptors(ckpt, tmp_path):
    """Only a file replaced on disk is opened again; retries of one still damaged (a /health
    probe every few seconds) reuse its handle."""
    import os

    path, _, model, saved = _copy_to_break(ckpt, tmp_path)
    try:
        info = next(i for i in CheckpointIndex(path).tensors.values() if "experts" in i.name)
        f = next(iter(saved))
        with open(f, "r+b") as fh:
            fh.truncate(int.from_bytes(saved[f][:8], "little") + 8 + 64)
        reader = model.runtime.store.reader
        held = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            with pytest.raises(CheckpointError):
                reader.read(info)
        assert len(os.listdir("/proc/self/fd")) <= held + 1
    finally:
        model.close()
