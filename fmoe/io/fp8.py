"""FP8 block-scaled weights, as DeepSeek-V3/R1, the Kimi-K2 checkpoints and Qwen3's ``-FP8``
releases publish them.

A quantised linear weight ``W`` [R, C] is stored as ``weight`` (float8 e4m3, [R, C]) plus
``weight_scale_inv`` (float32, [ceil(R / b0), ceil(C / b1)]): one scale per b0 x b1 block,
``W[r, c] = weight[r, c] * weight_scale_inv[r // b0, c // b1]``. The block size comes from
``config.json``::

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                            "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

Edge blocks are partial when R or C is not a multiple of the block. fmoe dequantises resident
weights once at load; routed experts stay FP8 (plus scales) on disk, in the host tier and over
the link, and are dequantised into their cache slot (`dequantize_expert`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"
# largest finite magnitude of each format: the quantiser maps a block's amax onto it
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def scale_name(weight_name: str) -> str:
    """``...proj.weight`` -> ``...proj.weight_scale_inv`` (the published naming)."""
    return weight_name + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scale grid of a [R, C] weight: (ceil(R / b0), ceil(C / b1))."""
    r, c = shape
    return math.ceil(r / block[0]), math.ceil(c / block[1])


@dataclass(frozen=True)
class Fp8Config:
    """The ``quantization_config`` of an FP8 block-scaled checkpoint."""

    block: tuple[int, int]          # (rows, columns) covered by one scale
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"

    def to_json(self) -> dict:
        return {"quant_method": "fp8", "fmt": self.fmt, "activation_scheme": self.activation_scheme,
                "weight_block_size": list(self.block)}


def read_quant_config(raw: dict, where: str) -> Fp8Config | None:
    """The FP8 settings of a ``config.json`` dict, None when it declares no quantisation. Other
    quantisation methods (GPTQ, AWQ, bitsandbytes, compressed-tensors...) are refused in one line
    naming the method."""
    q = raw.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: field 'quantization_config' is not an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"{where}: quantization_config.quant_method {method!r} is not supported; "
                              f"fmoe reads FP8 block-scaled checkpoints (quant_method 'fp8') and "
                              f"unquantised ones")
    fmt = str(q.get("fmt", "e4m3"))
    if fmt not in ("e4m3", "e5m2"):
        raise CheckpointError(f"{where}: quantization_config.fmt {fmt!r} is not supported (e4m3, e5m2)")
    scheme = str(q.get("activation_scheme", "dynamic"))
    if scheme != "dynamic":
        # static activation scales (``input_scale`` tensors) would quantise activations too:
        # dequantised weights alone would not compute the published model
        raise CheckpointError(f"{where}: quantization_config.activation_scheme {scheme!r} is not "
                              f"supported (only 'dynamic', as DeepSeek-V3 and Qwen3 publish)")
    block = q.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size is {block!r}; expected "
                              f"two integers >= 1 such as [128, 128] (per-tensor FP8 is not supported)")
    return Fp8Config((int(block[0]), int(block[1])), fmt, scheme)


def _scale_grid(scale_inv: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """The float32 scale of every element of a [R, C] weight (edge blocks cut to fit)."""
    r, c = shape
    s = scale_inv.to(torch.float32)
    return s.repeat_interleave(block[0], 0)[:r].repeat_interleave(block[1], 1)[:, :c]


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """``q`` [R, C] float8 and ``scale_inv`` [ceil(R/b0), ceil(C/b1)] -> the weight [R, C].

    The product is taken in float32 (exact for e4m3 x float32 up to one rounding) and then cast to
    `dtype` (or into `out`, on the device of `q`): resident weights, slots filled on CPU and
    slots filled on a GPU all get the same values, which keeps offloading lossless."""
    if q.dim() != 2:
        raise ValueError(f"dequantize expects a 2-D weight, got shape {list(q.shape)}")
    r, c = q.shape
    b0, b1 = block
    if scale_inv.shape != scale_shape((r, c), block):
        raise ValueError(f"scale shape {list(scale_inv.shape)} does not fit a {[r, c]} weight in "
                         f"{b0}x{b1} blocks (expected {list(scale_shape((r, c), block))})")
    s = scale_inv.to(device=q.device, dtype=torch.float32)
    if r % b0 == 0 and c % b1 == 0:
        # whole blocks: broadcast the scale over a blocked view, no [R, C] scale grid
        w = (q.to(torch.float32).view(r // b0, b0, c // b1, b1) * s[:, None, :, None]).view(r, c)
    else:
        w = q.to(torch.float32) * _scale_grid(s, (r, c), block)
    if out is not None:
        out.copy_(w)
        return out
    return w.to(dtype)


def quantize(w: torch.Tensor, block: tuple[int, int],
             dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """The published recipe: per b0 x b1 block, ``scale = amax / FP8_MAX`` and
    ``q = w / scale`` rounded to `dtype`. Returns (q [R, C], scale_inv float32 [ceil(R/b0),
    ceil(C/b1)]); ``dequantize(q, scale_inv, block)`` gives back w up to FP8 rounding. Used by
    the tests to make FP8 checkpoints from random weights."""
    r, c = w.shape
    b0, b1 = block
    gr, gc = scale_shape((r, c), block)
    padded = torch.zeros(gr * b0, gc * b1, dtype=torch.float32)
    padded[:r, :c] = w.to(torch.float32)
    blocks = padded.view(gr, b0, gc, b1)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX[dtype], torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
    return q.view(gr * b0, gc * b1)[:r, :c].contiguous(), scale.contiguous()


def dequantize_expert(q13: torch.Tensor, q2: torch.Tensor, s13: torch.Tensor, s2: torch.Tensor,
                      block: tuple[int, int], w13: torch.Tensor, w2: torch.Tensor) -> None:
    """One routed expert into its cache slot. q13 [2I, H] (gate rows, then up rows) and q2 [H, I]
    float8; s13 [2, ceil(I/b0), ceil(H/b1)] (gate's scales, then up's: each tensor has its own
    grid, so a partial last block of the gate does not run into the up rows); s2 [ceil(H/b0),
    ceil(I/b1)]. Writes w13 [2I, H] and w2 [H, I] in their own dtype and device."""
    i = q13.shape[0] // 2
    dequantize(q13[:i], s13[0], block, out=w13[:i])
    dequantize(q13[i:], s13[1], block, out=w13[i:])
    dequantize(q2, s2, block, out=w2)


def expert_scale_shapes(hidden: int, inter: int, block: tuple[int, int]) -> tuple[tuple, tuple]:
    """Shapes of one expert's scale buffers: (s13 [2, ceil(I/b0), ceil(H/b1)], s2 [ceil(H/b0), ceil(I/b1)])."""
    return (2, *scale_shape((inter, hidden), block)), scale_shape((hidden, inter), block)
