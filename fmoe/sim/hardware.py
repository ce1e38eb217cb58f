"""Hardware profiles for the timing model: host->device link, device memory, matmul rate.

Figures are vendor peak numbers (dense bf16 tensor rate, no sparsity) except the host links,
which are the achievable PCIe / NVLink-C2C rates the CONTRACT names. The timing model is a
roofline: every weight (or KV) read costs ``max(bytes / mem_bw, flops / matmul)``.

``host_bw`` is the rate at which the host computes a routed expert from host memory at batch one
(`execution="host"|"hybrid"`): memory-bound, so the achievable read bandwidth of the host's DRAM
with a GEMV kernel (a dual-channel desktop ~40 GB/s; a server socket more; `--host-gbps` overrides).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FmoeError


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    link_bw: float         # host -> device copy bandwidth, bytes/s (one copy engine)
    mem_bw: float          # device memory bandwidth, bytes/s
    matmul_flops: float    # dense bf16/fp16 tensor rate, flop/s
    memory_gib: float      # device memory (informative)
    description: str = ""
    host_bw: float = 40e9  # host compute of routed experts from host memory, bytes/s


HARDWARE: dict[str, HardwareProfile] = {
    p.name: p
    for p in [
        HardwareProfile("rtx3090-pcie4", 25e9, 936e9, 71e12, 24,
                        "GeForce RTX 3090 (GA102), PCIe 4.0 x16"),
        HardwareProfile("a5000-pcie4", 25e9, 768e9, 111e12, 24,
                        "RTX A5000 (GA102), PCIe 4.0 x16"),
        HardwareProfile("h100-pcie5", 50e9, 2.0e12, 756e12, 80,
                        "H100 PCIe 80 GB, PCIe 5.0 x16", host_bw=100e9),
        HardwareProfile("h200-pcie5", 50e9, 4.8e12, 835e12, 141,
                        "H200 NVL 141 GB, PCIe 5.0 x16", host_bw=100e9),
        HardwareProfile("gh200-c2c", 450e9, 4.0e12, 989e12, 96,
                        "GH200 Grace Hopper, NVLink-C2C host link", host_bw=300e9),
    ]
}


class UnknownHardwareError(FmoeError, ValueError):
    pass


@dataclass(frozen=True)
class CalibratedProfile(HardwareProfile):
    """A profile measured by `fmoe calibrate` on one machine with one model: it carries the
    measured per-part compute and read time, which replace the roofline of a built-in shape."""

    timing: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    def timing_model(self):
        from .timing import TimingModel

        t = self.timing
        return TimingModel(attn=_floats(t["attn"]), shared=_floats(t.get("shared", 0.0)),
                           expert=float(t["expert"]), copy=float(t["copy"]),
                           attn_ctx=_floats(t.get("attn_ctx", 0.0)),
                           token_pre=float(t.get("token_pre", 0.0)),
                           token_pre_ctx=float(t.get("token_pre_ctx", 0.0)),
                           token_post=float(t.get("token_post", 0.0)),
                           # on a CPU machine the host is the device: a host-computed expert costs
                           # what a resident one does (a profile may carry its own figure)
                           host=float(t.get("host", t["expert"])),
                           host_latency=float(t.get("host_latency", 0.0)),
                           expert_bytes=int(t["expert_bytes"]), lanes=int(t.get("lanes", 1)),
                           name=self.name,
                           details={"hardware": self.name, "calibrated": True, **self.model,
                                    "copy_ms": float(t["copy"]) * 1e3})


def _floats(x):
    import numpy as np

    return np.asarray(x, dtype=np.float64) if isinstance(x, list) else float(x)


def load_profile(path: str | Path) -> CalibratedProfile:
    """Read a profile written by `fmoe calibrate`."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise UnknownHardwareError(f"{p}: cannot read the hardware profile ({e.strerror})") from None
    except ValueError as e:
        raise UnknownHardwareError(f"{p}: not a JSON hardware profile ({e})") from None
    if not isinstance(data, dict) or data.get("format") != "fmoe-hardware-profile":
        raise UnknownHardwareError(f"{p}: not an fmoe hardware profile (written by fmoe calibrate)")
    t = data.get("timing")
    need = ("attn", "expert", "copy", "expert_bytes")
    if not isinstance(t, dict) or any(k not in t for k in need):
        raise UnknownHardwareError(f"{p}: the profile lacks timing fields ({', '.join(need)})")
    return CalibratedProfile(name=str(data.get("name", p.stem)), link_bw=float(data.get("link_bw", 0.0)),
                             mem_bw=0.0, matmul_flops=0.0, memory_gib=0.0,
                             description=str(data.get("description", "")), timing=t,
                             model=dict(data.get("model") or {}))


def get_hardware(name: str) -> HardwareProfile:
    """A built-in profile by name, or a calibrated one from a JSON file path."""
    if name in HARDWARE:
        return HARDWARE[name]
    if name.endswith(".json") or Path(name).is_file():
        return load_profile(name)
    raise UnknownHardwareError(
        f"unknown hardware profile {name!r}; choose one of {', '.join(HARDWARE)} or a profile "
        f"file from `fmoe calibrate`")
