"""Tiny real-shape-family checkpoints for the benchmark facilities (synth, replay, calibrate)."""

from __future__ import annotations

import pytest

from bench_helpers import TINY_DEEPSEEK


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """`fmoe synth deepseek-v2-lite` shrunk: a float32 checkpoint with tokenizer and index."""
    import torch

    from fmoe.models.synthetic import synthesize

    dst = tmp_path_factory.mktemp("synth") / "dsv2"
    return synthesize("deepseek-v2-lite", dst, dtype=torch.float32, seed=0, progress=False,
                      shard_bytes=200_000, overrides=TINY_DEEPSEEK)
