"""Kernel tests run the Triton kernels through Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is created, i.e. before
``fmoe.kernels.triton_moe`` is imported (``fmoe.kernels`` itself never imports triton). This
conftest is imported before the test modules of this directory, so setting it here at import
time is early enough; test_triton_moe.py asserts that the kernel really is the interpreted one.

On a machine with CUDA the kernels are compiled and the Triton tests run on the GPU instead
(set FMOE_TEST_TRITON_INTERPRET=1 to force the interpreter there too).
"""

import os

import torch

if not torch.cuda.is_available() or os.environ.get("FMOE_TEST_TRITON_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "1"
