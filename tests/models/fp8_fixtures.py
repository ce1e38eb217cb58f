"""FP8 block-scaled checkpoints made from tiny random transformers models, the way DeepSeek-V3/R1
and Qwen3 -FP8 are published, and the dequantised checkpoint HF transformers runs as reference.

Every linear projection (``*_proj.weight``: attention, dense and shared MLPs, routed experts) is
quantised with the published block recipe (`fmoe.models.fp8.quantize`: e4m3 weights, float32
``weight_scale_inv`` per block); embeddings, norms, routers and lm_head stay unquantised. The
weights are first rounded to bf16, so the unquantised tensors are exact in the bf16 file too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fmoe.models.fp8 import dequantize, quantize

QUANTISED = re.compile(r".*_proj\.weight$")


def round_to_bf16(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return model


def _files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def make_fp8(src: Path, dst: Path, block: tuple[int, int], *, other_dtype=torch.bfloat16,
             extra: dict[str, torch.Tensor] | None = None) -> Path:
    """`src` (a saved fp32 checkpoint) -> an FP8 checkpoint in `dst`: quantised projections with
    their scales, other tensors in `other_dtype`, ``quantization_config`` in config.json.
    `extra` tensors (name -> fp32 tensor, e.g. MTP layers) are added, projections quantised."""
    dst.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    files = _files(src)
    for i, f in enumerate(files):
        tensors = load_file(f)
        if i == 0 and extra:
            tensors.update(extra)
        out = {}
        for name, w in tensors.items():
            if QUANTISED.match(name) and w.dim() == 2:
                q, s = quantize(w, block)
                out[name], out[name + "_scale_inv"] = q, s
            else:
                out[name] = w.to(other_dtype) if w.is_floating_point() else w
        save_file(out, dst / f.name, metadata={"format": "pt"})
        weight_map.update({n: f.name for n in out})
    index = src / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = weight_map
        (dst / index.name).write_text(json.dumps(data))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = str(other_dtype).replace("torch.", "")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def dequantised_copy(fp8: Path, dst: Path, block: tuple[int, int]) -> Path:
    """The FP8 checkpoint `fp8` dequantised (``weight * weight_scale_inv`` per block, in fp32)
    into an ordinary fp32 checkpoint that HF transformers loads."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in _files(fp8):
        tensors = load_file(f)
        out = {}
        for name, t in tensors.items():
            if name.endswith("_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                out[name] = dequantize(t, tensors[name + "_scale_inv"], block)
            else:
                out[name] = t.to(torch.float32)
        save_file(out, dst / f.name, metadata={"format": "pt"})
    index = fp8 / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.endswith("_scale_inv")}
        (dst / index.name).write_text(json.dumps(data))
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg.pop("quantization_config")
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst
