"""Random checkpoints in the hub layout, for the demo, benchmarks and GPU checks.

Any registered family: the tensor names come from the family's own module and expert key map,
so a synthetic checkpoint exercises exactly the loader a real one does. Written shard by shard
(each shard to a temporary name, then renamed), so memory stays bounded by one shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .registry import family_for


def _init(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or "layernorm" in name or name.endswith("_norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    fan_in = shape[-1] if len(shape) > 1 else 1
    std = 1.0 / fan_in ** 0.5
    if name.endswith("gate.weight") and len(shape) == 2:
        std *= 4.0   # a peaked router, as trained models have, so routing varies by token
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def write_random_checkpoint(path: str | os.PathLike, config: dict, dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0, shard_bytes: int = 2 * 2**30) -> Path:
    """Write config.json and random ``*.safetensors`` (per-expert keys) for `config`
    (an HF config dict with ``model_type``). Returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_cls, model_cls = family_for(config.get("model_type")).load()
    cfg = config_cls.from_hf(config)
    with torch.device("meta"):
        module = model_cls(cfg)
    shapes: dict[str, tuple[int, ...]] = {n: tuple(p.shape) for n, p in module.named_parameters()}
    if getattr(cfg, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    shp = cfg.experts
    for layer in range(shp.num_layers):
        for e in range(shp.num_experts):
            g, u, d = cfg.expert_keys(layer, e)
            shapes[g] = shapes[u] = (shp.inter, shp.hidden)
            shapes[d] = (shp.hidden, shp.inter)

    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = dtype.itemsize
        for s in shape:
            n *= s
        if size and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map = {}
    for i, names in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _init(n, shapes[n], dtype, gen) for n in names}
        tmp = path / (fname + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / fname)
        weight_map.update({n: fname for n in names})
        del tensors
    if len(shards) > 1:
        _write_json(path / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    out = dict(config)
    out.setdefault("torch_dtype", str(dtype).replace("torch.", ""))
    _write_json(path / "config.json", out)
    return path


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
