"""The trace recorder: its path is checked when recording starts, and a run that recorded no
token writes no trace (format v1 needs T >= 1) but says so."""

from __future__ import annotations

import os

import pytest
import torch

from fmoe.runtime.recorder import TraceRecorder
from fmoe.trace import load_trace

L, E, K = 2, 8, 2


def record_one(rec: TraceRecorder, ids: list[int]) -> None:
    rec.begin_step(torch.tensor([ids]), None)
    for layer in range(L):
        rec.record(layer, torch.tensor([[0, 1]] * len(ids)), None)
    rec.end_step()


def test_nothing_recorded_writes_nothing_and_says_so(tmp_path, capsys):
    path = tmp_path / "empty.npz"
    rec = TraceRecorder(path, L, E, K, model="m")
    assert rec.close() is None
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []          # no temp file left either
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "no trace written" in err[0]


def test_a_request_of_no_tokens_is_nothing_recorded(tmp_path, capsys):
    path = tmp_path / "empty.npz"
    rec = TraceRecorder(path, L, E, K, model="m")
    rec.begin_step(torch.tensor([[5, 6]]), torch.tensor([[False, False]]))   # padding only
    rec.end_step()
    assert rec.close() is None and not path.exists()
    assert str(path) in capsys.readouterr().err


def test_recorded_tokens_are_written(tmp_path, capsys):
    path = tmp_path / "sub" / "dir" / "t.npz"      # missing directories are made at write
    rec = TraceRecorder(path, L, E, K, model="m")
    record_one(rec, [3, 4, 5])
    record_one(rec, [6])
    assert rec.close() == path
    t = load_trace(path)
    assert t.num_tokens == 4 and t.num_sequences == 1
    assert t.phase.tolist() == [0, 0, 0, 1] and t.token_ids.tolist() == [3, 4, 5, 6]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name, needle", [
    ("trace.txt", "must end with .npz"),
    ("trace", "must end with .npz"),
    ("file/t.npz", "is not a directory"),          # `file` is a regular file
    ("file/deeper/t.npz", "is not a directory"),
    ("dir.npz", "is a directory"),
])
def test_an_unwritable_path_is_refused_at_construction(tmp_path, name, needle):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.npz").mkdir()
    path = tmp_path / name
    with pytest.raises(ValueError) as e:
        TraceRecorder(path, L, E, K)
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "--trace-out" in msg and "\n" not in msg


def test_a_read_only_directory_is_refused_at_construction(tmp_path, monkeypatch):
    # a directory that takes no new entry: root (as in CI) may write anywhere but in /proc, so a
    # refused create stands in for it
    import tempfile

    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if str(dir) == str(ro):
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(ValueError, match="cannot write in") as e:
        TraceRecorder(ro / "t.npz", L, E, K)
    assert str(ro / "t.npz") in str(e.value)
    with pytest.raises(ValueError, match="cannot write in"):
        TraceRecorder(ro / "new" / "t.npz", L, E, K)    # would be made inside `ro`
    if os.path.isdir("/proc/self"):
        with pytest.raises(ValueError, match="cannot write in '/proc'"):
            TraceRecorder("/proc/t.npz", L, E, K)


def test_an_existing_file_is_replaced_only_when_it_is_a_trace(tmp_path):
    """A file that is not a routing trace is never overwritten; a trace is replaced, and the
    prompts beside the old one (its ``.texts.jsonl``) go with it: they would be read as the new
    trace's (a count mismatch that made it unreadable)."""
    from fmoe.trace import texts_path, write_trace

    mine = tmp_path / "notes.npz"
    mine.write_text("precious")
    with pytest.raises(ValueError, match="not a routing trace"):
        TraceRecorder(mine, L, E, K)
    assert mine.read_text() == "precious"

    old = tmp_path / "t.npz"
    import numpy as np

    write_trace(old, expert_ids=np.tile(np.arange(K, dtype=np.int16), (3, L, 1)), seq_offsets=np.array([0, 2, 3]),
                num_experts=E, model="m", texts=["a", "b"])
    assert texts_path(old).exists()
    rec = TraceRecorder(old, L, E, K, model="m")
    record_one(rec, [3, 4])
    rec.close()
    assert not texts_path(old).exists()
    t = load_trace(old)
    assert t.num_sequences == 1 and t.token_ids.tolist() == [3, 4]
