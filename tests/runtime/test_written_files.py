"""Files written atomically (a mkstemp / mkdtemp path, then a rename) end with the mode a plain
open() or mkdir() gives under the umask, not the temp path's owner-only 0600 / 0700."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from fmoe.runtime.expert_maps import MapStore
from fmoe.runtime.recorder import TraceRecorder
from fmoe.serve import demo
from fmoe.sim import diskcache
from fmoe.trace import texts_path, write_trace

MASK = 0o027          # neither the default 0o022 nor owner-only: the mode must follow the umask
FILE, DIR = 0o666 & ~MASK, 0o777 & ~MASK


@pytest.fixture(autouse=True)
def umask():
    old = os.umask(MASK)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_trace_and_its_texts(tmp_path):
    p = write_trace(tmp_path / "t.npz", expert_ids=np.tile([0, 1], (3, 2, 1)), seq_offsets=[0, 3],
                    num_experts=4, model="org/m", texts=["hi"])
    assert mode(p) == FILE and mode(texts_path(p)) == FILE


def test_recorded_trace(tmp_path):
    rec = TraceRecorder(tmp_path / "live.npz", 1, 4, 2)
    rec.begin_step(torch.tensor([[1, 2]]), None)
    rec.record(0, torch.tensor([[0, 1], [2, 3]]), None)
    rec.end_step()
    assert mode(rec.close()) == FILE


def test_sim_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FMOE_SIM_CACHE", str(tmp_path / "sim"))
    diskcache.save(np.arange(4), "probe", "written-files")
    [f] = (tmp_path / "sim").iterdir()
    assert mode(f) == FILE
    assert diskcache.load("probe", "written-files").tolist() == [0, 1, 2, 3]


def test_map_store(tmp_path):
    store = MapStore(4, 2, 8, 16)
    store.add(np.full((2, 8), 1 / 8, np.float32), np.ones(16, np.float32))
    store.save(tmp_path / "maps.npz")
    assert mode(tmp_path / "maps.npz") == FILE
    assert [p.name for p in tmp_path.iterdir()] == ["maps.npz"]


def test_demo_checkpoint_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("FMOE_CACHE", str(tmp_path))
    # a smaller model of the demo's kind: the modes, not the weights, are under test
    monkeypatch.setattr(demo, "DEMO_CONFIG", dict(demo.DEMO_CONFIG, hidden_size=32, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=4,
                                                  num_key_value_heads=2))
    path = demo.demo_checkpoint()
    assert mode(path) == DIR
    files = list(path.iterdir())
    assert any(f.suffix == ".safetensors" for f in files)     # safetensors writes 0600 itself
    assert {f.name: mode(f) for f in files} == {f.name: FILE for f in files}



def test_random_checkpoint_and_its_conversion(tmp_path):
    from fmoe.models.convert import convert
    from fmoe.models.synthetic import write_random_checkpoint
    from fmoe.serve.demo import DEMO_CONFIG

    src = write_random_checkpoint(tmp_path / "src", DEMO_CONFIG, dtype=torch.float32)
    assert {mode(f) for f in src.iterdir()} == {FILE}          # safetensors alone writes 0600
    convert(src, tmp_path / "dst", progress=False)
    dst = tmp_path / "dst"
    assert mode(dst) == DIR and {mode(f) for f in dst.iterdir()} == {FILE}
