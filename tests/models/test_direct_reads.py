"""O_DIRECT reads of unaligned tensors (HF files) through the bounce buffer equal buffered reads."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmoe.models.checkpoint import CheckpointIndex, FileReader


def test_unaligned_direct_reads_equal_the_file(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g),                       # small: memoryview copy
               "b": torch.randn(700, 513, generator=g).to(torch.bfloat16),  # > 1 MiB: torch copy
               "c": torch.randn(1025, 300, generator=g)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    index = CheckpointIndex(tmp_path)
    assert any(info.offset % 4096 for info in index.tensors.values())      # really unaligned
    monkeypatch.setenv("FMOE_DIRECT_IO", "1")
    reader = FileReader()
    assert reader.use_direct(tmp_path / "model.safetensors", large=True)
    ref = load_file(str(tmp_path / "model.safetensors"))
    for name, info in index.tensors.items():
        got = reader.read(info)
        assert torch.equal(got, ref[name]), name
    reader.close()


def test_each_resident_tensors_pages_are_dropped_as_it_is_read(mixtral_ckpt, monkeypatch):
    """Loading drops a tensor's cached pages right after reading it (its byte range), not only
    the whole files at the end: under a memory cgroup the load's page cache filled the limit."""
    import fmoe

    path, _ = mixtral_ckpt
    calls, real = [], os.posix_fadvise

    def record(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            calls.append((offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    model = fmoe.models.from_pretrained(path, expert_cache=4, policy="lru")
    model.close()
    index = CheckpointIndex(path)
    ranges = {(i.offset, i.nbytes) for name, i in index.tensors.items() if ".experts." not in name}
    assert ranges and ranges <= set(calls)
    first_whole = calls.index((0, 0))                        # the files, once at the end
    assert ranges <= set(calls[:first_whole])
