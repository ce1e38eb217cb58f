"""Hub ids resolved from a local hub cache with ``HF_HUB_OFFLINE=1``: the cache is laid out by
hand as huggingface_hub writes it (``models--owner--name/{blobs,refs,snapshots}``, snapshot
files as relative links to content-addressed blobs), here with an FP8 checkpoint."""

import hashlib
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fp8_fixtures import make_fp8, round_to_bf16  # noqa: E402

import fmoe  # noqa: E402
from fmoe.errors import ModelNotFoundError  # noqa: E402
from hf_fixtures import prompt, save, tiny_hf  # noqa: E402

REPO = "tiny-org/tiny-qwen3-fp8"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
QWEN3 = dict(hidden_size=40, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=True)


def hub_cache(root, repo: str, files: dict, commit: str = COMMIT):
    """Lay out `files` (name -> source path) as huggingface_hub's cache of `repo` at `commit`,
    with refs/main pointing there. Returns the snapshot directory."""
    owner, name = repo.split("/")
    base = root / f"models--{owner}--{name}"
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for fname, src in files.items():
        data = src.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        shutil.copyfile(src, base / "blobs" / blob)
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / fname)
    return snap


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A sharded FP8 checkpoint directory (several safetensors files and the index)."""
    tmp = tmp_path_factory.mktemp("hub-src")
    hf = round_to_bf16(tiny_hf(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, **QWEN3))
    src = save(hf, tmp / "fp32", max_shard_size="40KB")
    fp8 = make_fp8(src, tmp / "fp8", (16, 16))
    assert len(list(fp8.glob("*.safetensors"))) > 1 and (fp8 / "model.safetensors.index.json").exists()
    return fp8


@pytest.fixture
def offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_from_the_local_cache(checkpoint, offline):
    files = {f.name: f for f in checkpoint.iterdir()}
    hub_cache(offline, REPO, files)
    model = fmoe.models.from_pretrained(REPO, dtype=torch.float32)
    local = fmoe.models.from_pretrained(checkpoint, dtype=torch.float32)
    ids = prompt(vocab=128)
    assert torch.equal(model(ids), local(ids))
    assert str(model.path).startswith(str(offline))        # served from the cache, not the source
    offloaded = fmoe.models.from_pretrained(REPO, dtype=torch.float32, expert_cache=0.5)
    assert torch.equal(offloaded(ids), local(ids))
    offloaded.close()


def test_convert_from_the_local_cache(checkpoint, offline, tmp_path):
    from fmoe.models.convert import convert

    hub_cache(offline, REPO, {f.name: f for f in checkpoint.iterdir()})
    dst = convert(REPO, tmp_path / "store", progress=False)["path"]
    ids = prompt(vocab=128)
    assert torch.equal(fmoe.models.from_pretrained(dst, dtype=torch.float32)(ids),
                       fmoe.models.from_pretrained(checkpoint, dtype=torch.float32)(ids))


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_shard_is_named(checkpoint, offline):
    shards = sorted(f.name for f in checkpoint.glob("*.safetensors"))
    files = {f.name: f for f in checkpoint.iterdir() if f.name != shards[-1]}
    hub_cache(offline, REPO, files)               # a download that stopped before the last shard
    with pytest.raises(ModelNotFoundError) as err:
        fmoe.models.from_pretrained(REPO)
    msg = _one_line(err)
    assert msg.startswith(f"{REPO}: the hub cache snapshot") and f"{shards[-1]} is missing" in msg
    assert "HF_HUB_OFFLINE is set" in msg


def test_snapshot_link_to_a_missing_blob_is_named(checkpoint, offline):
    snap = hub_cache(offline, REPO, {f.name: f for f in checkpoint.iterdir()})
    shard = sorted(checkpoint.glob("*.safetensors"))[0].name
    os.unlink(os.path.realpath(snap / shard))     # the link stays, its blob is gone
    assert os.path.islink(snap / shard)
    with pytest.raises(ModelNotFoundError) as err:
        fmoe.models.from_pretrained(REPO)
    assert f"{shard} is missing" in _one_line(err)


def test_missing_config_is_named(checkpoint, offline):
    hub_cache(offline, REPO, {f.name: f for f in checkpoint.iterdir() if f.name != "config.json"})
    with pytest.raises(ModelNotFoundError) as err:
        fmoe.models.from_pretrained(REPO)
    assert "config.json is missing" in _one_line(err)


def test_repo_not_in_the_cache(offline):
    with pytest.raises(ModelNotFoundError) as err:
        fmoe.models.from_pretrained("tiny-org/not-downloaded")
    msg = _one_line(err)
    assert "not in the local hub cache" in msg and str(offline) in msg and "HF_HUB_OFFLINE is set" in msg
