"""Routing trace format v1: writer, reader and the validator's errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fmoe.sim.trace import TraceError, load_trace, texts_path, write_trace
from sim_helpers import synthetic_ids

T, L, K, E = 12, 3, 2, 8


def arrays(**over):
    ids = synthetic_ids(T, L, E, K, seed=3)
    d = {
        "expert_ids": ids,
        "seq_offsets": np.array([0, 5, 12], dtype=np.int64),
        "num_experts": np.array(E, dtype=np.int64),
        "model": np.array("org/some-moe", dtype=np.str_),
    }
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


def save(path, **over):
    np.savez(path, **arrays(**over))
    return path


def test_roundtrip_all_keys(tmp_path):
    rng = np.random.default_rng(0)
    ids = synthetic_ids(T, L, E, K, seed=1)
    probs = rng.random((T, L, E)).astype(np.float32)
    p = write_trace(tmp_path / "t.npz", expert_ids=ids.astype(np.int64), seq_offsets=[0, 4, 12],
                    num_experts=E, model="org/m", moe_layers=[1, 2, 3],
                    weights=rng.random((T, L, K)), gate_probs=probs,
                    phase=[0] * 4 + [1] * 8, token_ids=list(range(T)), texts=["a", "é\nb"])
    assert sorted(os.listdir(tmp_path)) == ["t.npz", "t.texts.jsonl"]   # no temp files left
    t = load_trace(p)
    assert t.expert_ids.dtype == np.int16 and np.array_equal(t.expert_ids, ids)
    assert t.seq_offsets.dtype == np.int64 and list(t.seq_offsets) == [0, 4, 12]
    assert t.num_experts == E and t.model == "org/m"
    assert t.moe_layers.dtype == np.int16 and list(t.moe_layers) == [1, 2, 3]
    assert t.weights.dtype == np.float32 and t.weights.shape == (T, L, K)
    assert t.gate_probs.dtype == np.float32 and np.array_equal(t.gate_probs, probs)
    assert t.phase.dtype == np.uint8 and t.token_ids.dtype == np.int32
    assert t.texts == ["a", "é\nb"]
    assert (t.num_tokens, t.num_layers, t.top_k, t.num_sequences) == (T, L, K, 2)
    with np.load(p, allow_pickle=False) as z:           # plain arrays only
        assert set(z.files) == {"expert_ids", "seq_offsets", "num_experts", "model", "moe_layers",
                                "weights", "gate_probs", "phase", "token_ids"}
    lines = texts_path(p).read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["text"] for x in lines] == ["a", "é\nb"]


def test_write_is_atomic_on_invalid_input(tmp_path):
    p = tmp_path / "t.npz"
    write_trace(p, expert_ids=synthetic_ids(T, L, E, K), seq_offsets=[0, T], num_experts=E,
                model="m")
    before = p.read_bytes()
    with pytest.raises(TraceError, match="num_experts"):
        write_trace(p, expert_ids=synthetic_ids(T, L, E, K), seq_offsets=[0, T], num_experts=4,
                    model="m")
    assert p.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["t.npz"]
    with pytest.raises(TraceError, match="2 texts for 1 sequences"):
        write_trace(p, expert_ids=synthetic_ids(T, L, E, K), seq_offsets=[0, T], num_experts=E,
                    model="m", texts=["a", "b"])
    with pytest.raises(TraceError, match=r"\.npz"):
        write_trace(tmp_path / "t.bin", expert_ids=synthetic_ids(T, L, E, K), seq_offsets=[0, T],
                    num_experts=E, model="m")


def test_float16_probs_kept_and_minus_one_allowed(tmp_path):
    ids = synthetic_ids(T, L, E, K, missing=0.2, seed=2)
    assert (ids == -1).any()
    p = write_trace(tmp_path / "t.npz", expert_ids=ids, seq_offsets=[0, T], num_experts=E,
                    model="m", gate_probs=np.full((T, L, E), 1 / E, dtype=np.float16))
    t = load_trace(p)
    assert t.gate_probs.dtype == np.float16 and (t.expert_ids == -1).sum() == (ids == -1).sum()


@pytest.mark.parametrize("over,match", [
    ({"seq_offsets": None}, r"missing required key\(s\) 'seq_offsets'"),
    ({"model": None}, r"missing required key\(s\) 'model'"),
    ({"expert_id": np.zeros((T, L, K), np.int16)}, "unknown key"),
    ({"expert_ids": synthetic_ids(T, L, E, K).astype(np.int32)}, "'expert_ids' has dtype int32, expected int16"),
    ({"expert_ids": synthetic_ids(T, L, E, K)[:, :, 0]}, r"'expert_ids' has shape \[12, 3\], expected \[T, L, K\]"),
    ({"seq_offsets": np.array([0, 5, 12], dtype=np.int32)}, "'seq_offsets' has dtype int32"),
    ({"seq_offsets": np.array([0, 5, 11], dtype=np.int64)}, "must start at 0 and end at T=12"),
    ({"seq_offsets": np.array([0, 7, 5, 12], dtype=np.int64)}, "decreases"),
    ({"num_experts": np.array([E], dtype=np.int64)}, "'num_experts' has shape"),
    ({"num_experts": np.array(E, dtype=np.int32)}, "'num_experts' has dtype int32"),
    ({"num_experts": np.array(4, dtype=np.int64)}, r"expert id \d+ at token \d+, layer \d+ is >= num_experts=4"),
    ({"model": np.array(b"m")}, "'model' has dtype"),
    ({"weights": np.zeros((T, L, K + 1), np.float32)}, r"'weights' has shape \[12, 3, 3\], expected \[T, L, K\]"),
    ({"weights": np.zeros((T, L, K), np.float64)}, "'weights' has dtype float64"),
    ({"gate_probs": np.zeros((T, L, E - 1), np.float32)}, "'gate_probs' has shape"),
    ({"phase": np.full(T, 2, np.uint8)}, "'phase' holds 2"),
    ({"token_ids": np.zeros(T + 1, np.int32)}, "'token_ids' has shape"),
    ({"moe_layers": np.zeros(L, np.int64)}, "'moe_layers' has dtype int64"),
])
def test_validation_errors(tmp_path, over, match):
    p = save(tmp_path / "bad.npz", **over)
    with pytest.raises(TraceError, match=match) as e:
        load_trace(p)
    assert str(p) in str(e.value)


def test_ids_out_of_range_and_duplicates(tmp_path):
    ids = synthetic_ids(T, L, E, K)
    bad = ids.copy()
    bad[7, 1, 0] = E
    with pytest.raises(TraceError, match=f"expert id {E} at token 7, layer 1 is >= num_experts={E}"):
        load_trace(save(tmp_path / "a.npz", expert_ids=bad))
    bad = ids.copy()
    bad[3, 2, 1] = -5
    with pytest.raises(TraceError, match="token 3, layer 2 is negative"):
        load_trace(save(tmp_path / "b.npz", expert_ids=bad))
    bad = ids.copy()
    bad[4, 0, 1] = bad[4, 0, 0]
    with pytest.raises(TraceError, match=f"token 4, layer 0 lists expert {bad[4, 0, 0]} twice"):
        load_trace(save(tmp_path / "c.npz", expert_ids=bad))


def test_pickled_content_refused(tmp_path):
    p = tmp_path / "pickled.npz"
    d = arrays()
    d["model"] = np.array(["org/m", None], dtype=object)
    np.savez(p, **d)
    with pytest.raises(TraceError, match="pickled"):
        load_trace(p)
    q = tmp_path / "obj.npy"
    np.save(q, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TraceError, match="pickled"):
        load_trace(q)


def test_unreadable_files(tmp_path):
    with pytest.raises(TraceError, match="no such file"):
        load_trace(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(TraceError, match="not a readable .npz"):
        load_trace(junk)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(TraceError, match="single array"):
        load_trace(single)
    with pytest.raises(TraceError, match="directory"):
        load_trace(tmp_path)


def test_texts_sidecar_must_match(tmp_path):
    p = save(tmp_path / "t.npz")
    texts_path(p).write_text('{"text": "one"}\n')
    with pytest.raises(TraceError, match="1 prompts for 2 sequences"):
        load_trace(p)
    texts_path(p).write_text('{"text": "one"}\n[1, 2]\n')
    with pytest.raises(TraceError, match="line 2"):
        load_trace(p)
    assert load_trace(p, texts=False).texts is None


def test_head_cuts_sequences(tmp_path):
    p = write_trace(tmp_path / "t.npz", expert_ids=synthetic_ids(T, L, E, K),
                    seq_offsets=[0, 5, 12], num_experts=E, model="m", phase=np.zeros(T),
                    texts=["a", "b"])
    t = load_trace(p)
    h = t.head(7)
    assert h.num_tokens == 7 and list(h.seq_offsets) == [0, 5, 7] and h.texts == ["a", "b"]
    assert h.phase.shape == (7,)
    h = t.head(5)
    assert list(h.seq_offsets) == [0, 5] and h.texts == ["a"]
    assert t.head(100) is t
    assert h.fingerprint() != t.fingerprint()


def test_skipping_gate_probs_still_validates_them(tmp_path):
    p = save(tmp_path / "g.npz", gate_probs=np.zeros((T, L, E - 1), np.float32))
    with pytest.raises(TraceError, match="'gate_probs' has shape"):
        load_trace(p, gate_probs=False)
    p = save(tmp_path / "h.npz", gate_probs=np.full((T, L, E), 1 / E, np.float32))
    assert load_trace(p, gate_probs=False).gate_probs is None
    assert load_trace(p).gate_probs.shape == (T, L, E)
    p = save(tmp_path / "o.npz", gate_probs=np.array([None] * 3, dtype=object))
    with pytest.raises(TraceError, match="pickled"):
        load_trace(p, gate_probs=False)


# -- bounded loading: a small file cannot make the loader allocate much ----------------------
def _bomb(path, T, L=4, K=2, E=8):
    """A valid trace whose arrays are mostly zeros: it compresses to almost nothing."""
    ids = np.zeros((T, L, K), dtype=np.int16)
    ids[:, :, 1] = 1
    np.savez_compressed(path, expert_ids=ids, seq_offsets=np.array([0, T], dtype=np.int64),
                        num_experts=np.array(E, dtype=np.int64), model=np.array("org/m", dtype=np.str_),
                        gate_probs=np.zeros((T, L, E), dtype=np.float32))
    return path


def _peak(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            fn()
        except TraceError as e:
            err = e
        else:
            err = None
        return tracemalloc.get_traced_memory()[1], err
    finally:
        tracemalloc.stop()


def test_a_zip_bomb_is_refused_before_its_data_is_read(tmp_path, monkeypatch):
    p = _bomb(tmp_path / "bomb.npz", T=1 << 20)           # 16 MiB ids + 128 MiB probs, ~150 KB on disk
    assert p.stat().st_size < 1 << 20
    monkeypatch.setenv("FMOE_TRACE_MAX_BYTES", str(32 << 20))
    peak, err = _peak(lambda: load_trace(p))
    assert err is not None and "more than the limit" in str(err) and "FMOE_TRACE_MAX_BYTES" in str(err)
    assert peak < 4 << 20, peak                           # nothing of the 144 MiB was allocated
    # without the router softmax the rest fits: loaded
    assert load_trace(p, gate_probs=False).num_tokens == 1 << 20
    assert load_trace(p, max_bytes=1 << 30).gate_probs.shape == (1 << 20, 4, 8)


def test_a_forged_shape_is_refused_without_allocating(tmp_path):
    import zipfile

    p = tmp_path / "forged.npz"
    good = arrays()
    with zipfile.ZipFile(p, "w") as z:
        for k, v in good.items():
            with z.open(k + ".npy", "w") as f:
                if k == "expert_ids":       # declares 10^9 tokens (about 12 GB), holds a few bytes
                    np.lib.format.write_array_header_1_0(
                        f, {"descr": "<i2", "fortran_order": False, "shape": (10 ** 9, L, K)})
                    f.write(b"\0" * 64)
                else:
                    np.lib.format.write_array(f, v)
    peak, err = _peak(lambda: load_trace(p, max_bytes=1 << 40))
    assert err is not None and "truncated or forged" in str(err)
    assert peak < 4 << 20, peak


def test_member_shapes_are_checked_against_expert_ids_first(tmp_path):
    p = save(tmp_path / "t.npz", weights=np.zeros((T + 1, L, K), np.float32))
    with pytest.raises(TraceError, match="'weights' has shape"):
        load_trace(p)


def test_validation_streams(tmp_path):
    """Validating a valid trace costs little beyond its own arrays (the old validator made
    temporaries of several times the ids' size)."""
    Tn, Ln, Kn, En = 1 << 20, 4, 4, 16
    t = np.arange(Tn, dtype=np.int64)[:, None, None]
    ids = ((t + np.arange(Ln)[None, :, None] + 3 * np.arange(Kn)[None, None, :]) % En).astype(np.int16)
    p = tmp_path / "big.npz"
    np.savez(p, expert_ids=ids, seq_offsets=np.array([0, Tn], dtype=np.int64),
             num_experts=np.array(En, dtype=np.int64), model=np.array("org/m", dtype=np.str_))
    del ids, t
    peak, err = _peak(lambda: load_trace(p))
    assert err is None
    size = Tn * Ln * Kn * 2                                # 32 MiB
    assert peak < size + (8 << 20), (peak, size)          # 37 MiB here; the old validator: 48


# -- a trace names its model, never a local path ----------------------------------------------------
def test_a_local_checkpoint_path_is_not_stored(tmp_path):
    ck = tmp_path / "secret" / "My-MoE-1B"
    ck.mkdir(parents=True)
    cfg = {"model_type": "mixtral", "num_hidden_layers": L, "num_local_experts": E}
    (ck / "config.json").write_text(json.dumps(cfg))
    p = write_trace(tmp_path / "t.npz", expert_ids=synthetic_ids(T, L, E, K, seed=2),
                    seq_offsets=[0, T], num_experts=E, model=str(ck))
    t = load_trace(p)
    assert t.model == "My-MoE-1B" and t.model_config == cfg
    import zipfile

    with zipfile.ZipFile(p) as z:                          # no member holds the local path
        blob = b"".join(z.read(n) for n in z.namelist())
    assert str(tmp_path).encode() not in blob and "secret".encode("utf-32-le") not in blob
    assert load_trace(p).head(3).model_config == cfg


def test_hub_ids_stay_and_model_config_is_validated(tmp_path):
    p = write_trace(tmp_path / "t.npz", expert_ids=synthetic_ids(T, L, E, K, seed=2),
                    seq_offsets=[0, T], num_experts=E, model="org/some-moe", model_config={"a": 1})
    t = load_trace(p)
    assert t.model == "org/some-moe" and t.model_config == {"a": 1}
    bad = save(tmp_path / "bad.npz", model_config=np.array("[1, 2]", dtype=np.str_))
    with pytest.raises(TraceError, match="'model_config' is not a JSON object"):
        load_trace(bad)


def test_a_live_recording_carries_the_config_not_the_path(tmp_path):
    import torch

    import fmoe
    from fmoe.models.synthetic import write_random_checkpoint

    cfg = {"model_type": "mixtral", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 8,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64}
    ck = write_random_checkpoint(tmp_path / "local-moe", cfg, dtype=torch.float32, seed=0)
    out = tmp_path / "rec.npz"
    m = fmoe.models.from_pretrained(ck, expert_cache=1.0, policy="lru", trace_path=out)
    m.generate(torch.tensor([[3, 4, 5]]), 4)
    m.close()
    t = load_trace(out)
    assert t.model == "local-moe" and str(tmp_path) not in t.model
    assert t.model_config["num_local_experts"] == 4 and t.model_config["model_type"] == "mixtral"
