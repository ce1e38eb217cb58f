"""Bad checkpoints get one-line errors naming the file or tensor, from the API and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import fmoe
from fmoe.errors import CheckpointError, ConfigError, ModelNotFoundError


@pytest.fixture
def ckpt(tmp_path, mixtral_ckpt):
    dst = tmp_path / "ckpt"
    shutil.copytree(mixtral_ckpt[0], dst)
    return dst


def cli(*args, env=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "fmoe.serve.cli", *args], capture_output=True, text=True, env=e)


def assert_cli_error(path, *needles):
    r = cli("generate", str(path), "--prompt", "hi", "--max-new-tokens", "1")
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        fmoe.models.from_pretrained(tmp_path / "nope")
    assert_cli_error(tmp_path / "nope", "nope")


def test_missing_safetensors_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        fmoe.models.from_pretrained(ckpt)
    assert_cli_error(ckpt, "safetensors")


def test_missing_shard_named(tmp_path, mixtral_ckpt):
    mixtral_ckpt[1].save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        fmoe.models.from_pretrained(tmp_path)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        fmoe.models.from_pretrained(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama_moe_9000"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="llama_moe_9000"):
        fmoe.models.from_pretrained(ckpt)
    assert_cli_error(ckpt, "llama_moe_9000")


def test_wrong_tensor_shape(ckpt):
    t = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    t[name] = torch.zeros(7, 64)
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        fmoe.models.from_pretrained(ckpt)
    assert_cli_error(ckpt, name, "[7, 64]")


def test_wrong_expert_shape(ckpt):
    t = load_file(ckpt / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    t[name] = torch.zeros(64, 47)
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        fmoe.models.from_pretrained(ckpt)


def test_missing_and_unexpected_tensors_named(ckpt):
    t = load_file(ckpt / "model.safetensors")
    del t["model.norm.weight"]
    t["model.extra.weight"] = torch.zeros(2)
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.norm\.weight"):
        fmoe.models.from_pretrained(ckpt)
    t["model.norm.weight"] = torch.ones(64)
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.extra\.weight"):
        fmoe.models.from_pretrained(ckpt)


def test_missing_expert_named(ckpt):
    t = load_file(ckpt / "model.safetensors")
    del t["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.5\.w3"):
        fmoe.models.from_pretrained(ckpt)


@pytest.mark.parametrize("corrupt", ["length", "json", "short", "truncated"])
def test_corrupt_header(ckpt, corrupt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    if corrupt == "length":
        data = struct.pack("<Q", 10**15) + data[8:]
    elif corrupt == "json":
        n = struct.unpack("<Q", data[:8])[0]
        data = data[:8] + b"{" * n + data[8 + n:]
    elif corrupt == "short":
        data = data[:5]
    else:
        data = data[: len(data) // 2]
    f.write_bytes(data)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        fmoe.models.from_pretrained(ckpt)
    assert_cli_error(ckpt, "model.safetensors")


def test_hub_id_offline_not_cached(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
            fmoe.models.from_pretrained("someone/not-a-cached-model")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    r = cli("generate", "someone/not-a-cached-model", "--prompt", "x", env=env)
    assert r.returncode != 0 and "someone/not-a-cached-model" in r.stderr and "Traceback" not in r.stderr
