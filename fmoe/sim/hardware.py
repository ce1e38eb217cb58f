"""Hardware profiles for the timing model: host->device link, device memory, matmul rate.

Figures are vendor peak numbers (dense bf16 tensor rate, no sparsity) except the host links,
which are the achievable PCIe / NVLink-C2C rates the CONTRACT names. The timing model is a
roofline: every weight (or KV) read costs ``max(bytes / mem_bw, flops / matmul)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FmoeError


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    link_bw: float         # host -> device copy bandwidth, bytes/s (one copy engine)
    mem_bw: float          # device memory bandwidth, bytes/s
    matmul_flops: float    # dense bf16/fp16 tensor rate, flop/s
    memory_gib: float      # device memory (informative)
    description: str = ""


HARDWARE: dict[str, HardwareProfile] = {
    p.name: p
    for p in [
        HardwareProfile("rtx3090-pcie4", 25e9, 936e9, 71e12, 24,
                        "GeForce RTX 3090 (GA102), PCIe 4.0 x16"),
        HardwareProfile("a5000-pcie4", 25e9, 768e9, 111e12, 24,
                        "RTX A5000 (GA102), PCIe 4.0 x16"),
        HardwareProfile("h100-pcie5", 50e9, 2.0e12, 756e12, 80,
                        "H100 PCIe 80 GB, PCIe 5.0 x16"),
        HardwareProfile("h200-pcie5", 50e9, 4.8e12, 835e12, 141,
                        "H200 NVL 141 GB, PCIe 5.0 x16"),
        HardwareProfile("gh200-c2c", 450e9, 4.0e12, 989e12, 96,
                        "GH200 Grace Hopper, NVLink-C2C host link"),
    ]
}


class UnknownHardwareError(FmoeError, ValueError):
    pass


def get_hardware(name: str) -> HardwareProfile:
    try:
        return HARDWARE[name]
    except KeyError:
        raise UnknownHardwareError(
            f"unknown hardware profile {name!r}; choose one of {', '.join(HARDWARE)}") from None
