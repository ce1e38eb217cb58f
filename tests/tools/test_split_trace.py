"""tools/split_trace.py: every optional key survives a split (per-token ones sliced); bad input is
one line and a non-zero exit, checked before anything is created; both outputs appear together."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fmoe.sim.trace import OPTIONAL, load_trace, texts_path, write_trace
from tests.conftest import SIM_CONFIG, load_tool

ROOT = Path(__file__).resolve().parents[2]
CONFIG = SIM_CONFIG
PER_TOKEN = ("weights", "gate_probs", "phase", "token_ids")
WHOLE = ("moe_layers", "model_config")


def _recorded(tmp_path, offsets=(0, 10, 25, 40), texts=True) -> Path:
    """A trace as the runtime records it from a local checkpoint: every optional key, a model
    name no built-in shape knows, and the checkpoint's config.json."""
    T = offsets[-1]
    rng = np.random.default_rng(0)
    ids = np.stack([[rng.permutation(8)[:2] for _ in range(3)] for _ in range(T)])
    probs = rng.random((T, 3, 8)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    return write_trace(tmp_path / "rec.npz", expert_ids=ids, seq_offsets=list(offsets),
                       num_experts=8, model="my-local-ckpt", moe_layers=[1, 2, 3],
                       weights=rng.random((T, 3, 2)), gate_probs=probs,
                       phase=(np.arange(T) % 3 > 0), token_ids=np.arange(T) + 5,
                       model_config=CONFIG,
                       texts=[f"p{i}" for i in range(len(offsets) - 1)] if texts else None)


def run_tool(capsys, *argv):
    code = load_tool("split_trace").main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_optional_key_survives(capsys, tmp_path):
    """model_config was dropped: a split trace of a recorded run could not be simulated
    without --model."""
    assert set(OPTIONAL) == set(PER_TOKEN + WHOLE)     # a new key needs a decision here
    src = _recorded(tmp_path)
    code, out, err = run_tool(capsys, src, "--fraction", "0.5", "--out-dir", tmp_path / "out")
    assert code == 0, err
    full = load_trace(src)
    hist = load_trace(tmp_path / "out" / "rec.history.npz")
    rep = load_trace(tmp_path / "out" / "rec.replay.npz")
    assert (hist.num_sequences, rep.num_sequences) == (1, 2)
    for part, lo, hi in ((hist, 0, 10), (rep, 10, 40)):
        np.testing.assert_array_equal(part.expert_ids, full.expert_ids[lo:hi])
        for k in PER_TOKEN:
            np.testing.assert_array_equal(getattr(part, k), getattr(full, k)[lo:hi])
        np.testing.assert_array_equal(part.moe_layers, full.moe_layers)
        assert part.model_config == full.model_config == CONFIG
        assert part.model == full.model
    assert (hist.texts, rep.texts) == (["p0"], ["p1", "p2"])

    from fmoe.sim.__main__ import main

    code = main(["--trace", str(tmp_path / "out" / "rec.replay.npz"), "--policy", "lru",
                 "--cache-fraction", "0.5", "--json"])
    got = capsys.readouterr()
    assert code == 0, got.err
    assert json.loads(got.out.strip().splitlines()[-1])["tokens"] == 30


def test_missing_input_is_one_line(capsys, tmp_path):
    code, out, err = run_tool(capsys, tmp_path / "nope.npz", "--out-dir", tmp_path / "out")
    assert code == 2
    assert err.count("\n") == 1 and "nope.npz: no such file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("offsets,fraction", [((0, 40), 0.5), ((0, 40), 0.99),
                                              ((0, 10, 25, 40), 0.2)])
def test_empty_side_refused_before_anything_is_created(capsys, tmp_path, offsets, fraction):
    """One sequence, or a fraction that leaves one side empty, raised from write_trace after
    the output directory had been created."""
    src = _recorded(tmp_path, offsets)
    out_dir = tmp_path / "a" / "out"
    code, out, err = run_tool(capsys, src, "--fraction", fraction, "--out-dir", out_dir)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{len(offsets) - 1} sequence" in err and "at least one" in err
    assert not (tmp_path / "a").exists()


def test_outputs_renamed_only_when_both_written(capsys, tmp_path, monkeypatch):
    """The history trace was complete on disk while the replay trace was still being written
    (or had failed): a failed split left one output of the two."""
    src = _recorded(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    tool = load_tool("split_trace")
    real = tool.write_trace
    calls = []

    def failing(path, **kw):
        calls.append(Path(path))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, **kw)
    monkeypatch.setattr(tool, "write_trace", failing)
    code = tool.main([str(src), "--fraction", "0.5", "--out-dir", str(out_dir)])
    err = capsys.readouterr().err
    assert code != 0 and "No space left on device" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []               # nothing left: no output, no temporary
    assert all(p.parent != out_dir for p in calls)      # written to temporary paths first

    monkeypatch.setattr(tool, "write_trace", real)
    assert tool.main([str(src), "--fraction", "0.5", "--out-dir", str(out_dir)]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "rec.history.npz", "rec.history.texts.jsonl", "rec.replay.npz", "rec.replay.texts.jsonl"]


def test_stale_sidecar_removed(capsys, tmp_path):
    """A trace without prompts split into a directory holding an earlier split's sidecars would
    pair the new trace with the old prompts."""
    src = _recorded(tmp_path)
    out_dir = tmp_path / "out"
    assert load_tool("split_trace").main([str(src), "--fraction", "0.5", "--out-dir", str(out_dir)]) == 0
    os.unlink(texts_path(src))
    assert load_tool("split_trace").main([str(src), "--fraction", "0.7", "--out-dir", str(out_dir)]) == 0
    capsys.readouterr()
    assert not texts_path(out_dir / "rec.history.npz").exists()
    assert load_trace(out_dir / "rec.replay.npz").texts is None


def test_failed_split_removes_the_directories_it_made(capsys, tmp_path, monkeypatch):
    src = _recorded(tmp_path)
    tool = load_tool("split_trace")

    def failing(path, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tool, "write_trace", failing)
    assert tool.main([str(src), "--fraction", "0.5", "--out-dir", str(tmp_path / "a" / "b")]) == 2
    capsys.readouterr()
    assert not (tmp_path / "a").exists()
