"""Memory-mapped experts (`expert_cache="mmap"`): every expert is a view into the checkpoint file,
even where a file stores an expert's gate and up weights apart (Mixtral's w1, w2, w3 order), and
the model computes what the resident model computes."""

from __future__ import annotations

import copy

import torch

import fmoe
from fmoe.kernels.torch_moe import GateUp
from tests.conftest import save_hf


def test_mixtral_gate_and_up_apart_stay_mapped(tmp_path, mixtral_ckpt):
    path, hf = mixtral_ckpt
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    resident = fmoe.models.from_pretrained(path)
    mapped = fmoe.models.from_pretrained(path, expert_cache="mmap")
    experts = mapped.module.moe_blocks()[0].experts
    assert all(isinstance(w, GateUp) for w in experts.w13.tensors)      # two views, no copy
    assert torch.equal(mapped.generate(ids, 12, eos_token_id=[]), resident.generate(ids, 12, eos_token_id=[]))

    bf = save_hf(copy.deepcopy(hf).to(torch.bfloat16), tmp_path / "bf16")   # the shared fixture stays fp32
    a = fmoe.models.from_pretrained(bf, dtype=torch.bfloat16)
    b = fmoe.models.from_pretrained(bf, expert_cache="mmap")
    assert isinstance(b.module.moe_blocks()[0].experts.w13.tensors[0], GateUp)
    # bf16 decode rows take the compiled kernel on both: bit for bit
    assert torch.equal(b.generate(ids, 12, eos_token_id=[]), a.generate(ids, 12, eos_token_id=[]))
