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
    with pytest.raises(ConfigError, match="config.json: unknown model_type 'llama_moe_9000'"):
        fmoe.models.from_pretrained(ckpt)
    assert_cli_error(ckpt, "llama_moe_9000", "config.json")
    del cfg["model_type"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json: no model_type; supported"):
        fmoe.models.from_pretrained(ckpt)


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


# -- config.json values: checked at load, the error names the file and the field ------------------
BAD_VALUES = [
    ("num_experts_per_tok", 0), ("hidden_size", "256"), ("rms_norm_eps", None),
    ("rope_theta", "big"), ("max_position_embeddings", 0), ("num_hidden_layers", True),
    ("vocab_size", -5), ("num_attention_heads", 2.5), ("rms_norm_eps", float("nan")),
    ("rms_norm_eps", -1e-5), ("num_local_experts", "8"), ("num_experts_per_tok", 9),
    ("num_key_value_heads", 3), ("tie_word_embeddings", "yes"), ("eos_token_id", -2),
    ("rope_scaling", "linear"), ("intermediate_size", None), ("head_dim", 0),
]


@pytest.mark.parametrize("field, value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_config_values_name_file_and_field(ckpt, field, value):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))      # NaN is written as the JSON extension NaN
    with pytest.raises(ConfigError) as e:
        fmoe.models.from_pretrained(ckpt)
    msg = str(e.value)
    assert str(ckpt / "config.json") in msg
    named = {"num_local_experts": "num_local_experts", "num_key_value_heads": "num_attention_heads"}
    assert repr(named.get(field, field)) in msg or field in msg, msg
    assert "\n" not in msg


def test_bad_config_value_from_the_cli(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_experts_per_tok"] = 0
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_cli_error(ckpt, "config.json", "num_experts_per_tok")


def test_overlapping_tensor_byte_ranges_are_refused(ckpt):
    """Two tensors that share bytes: a forged or corrupt header that used to load silently."""
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    names = [k for k, v in header.items() if k != "__metadata__" and v["shape"] == [64, 64]][:2]
    a, b = header[names[0]], header[names[1]]
    b["data_offsets"] = list(a["data_offsets"])                # same bytes, same size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    assert len(raw) == n
    f.write_bytes(data[:8] + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match="overlap"):
        fmoe.models.from_pretrained(ckpt)
    assert_cli_error(ckpt, "model.safetensors", "overlap")


@pytest.mark.parametrize("cache", [None, 0.5])
def test_unknown_policy_named_with_or_without_a_cache(ckpt, cache):
    with pytest.raises(ValueError, match="unknown policy 'bogus'.*lru"):
        fmoe.models.from_pretrained(ckpt, expert_cache=cache, policy="bogus")


def test_errors_are_the_builtin_kinds_hf_users_catch(tmp_path, ckpt):
    # `except OSError` / `except ValueError` around from_pretrained catch them, as with HF
    with pytest.raises(OSError):
        fmoe.models.from_pretrained(tmp_path / "nope")
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(ValueError):
        fmoe.models.from_pretrained(ckpt)


def test_index_whose_weight_map_is_not_an_object(tmp_path, mixtral_ckpt):
    from tests.conftest import save_hf

    path = save_hf(mixtral_ckpt[1], tmp_path / "sharded", max_shard_size="20KB")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": 3}))
    with pytest.raises(CheckpointError, match="weight_map"):
        fmoe.models.from_pretrained(path)


def test_malformed_generation_config_is_reported_and_left_out(ckpt, caplog):
    """As transformers: the model loads (and generates with config.json's ids), with a warning
    naming the file."""
    (ckpt / "generation_config.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="fmoe"):
        model = fmoe.models.from_pretrained(ckpt)
    assert model.generation_config == {}
    assert any("generation_config.json" in r.getMessage() for r in caplog.records)
    assert model.generate(torch.tensor([[5, 6, 7]]), 2).shape == (1, 5)


def test_tensors_without_the_model_prefix_are_named_as_such(ckpt):
    t = load_file(ckpt / "model.safetensors")
    t = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in t.items()}
    save_file(t, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="without the 'model.' prefix"):
        fmoe.models.from_pretrained(ckpt)
