"""Compile the Triton kernels for NVIDIA targets without a GPU (run as a script by
test_triton_moe.py, in a process where TRITON_INTERPRET is unset).

The interpreter accepts code the real compiler rejects; this runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin via the ptxas bundled with triton) for sm_90 and sm_80
with the specialisations a real launch gets (unit inner strides, 16-divisible pointers and
sizes), and checks that the bf16 main loop is software-pipelined on sm_90.
Prints one line per kernel and "ok" at the end.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fmoe.kernels import triton_moe  # noqa: E402


def compile_gemm(arch: int, dtype: str, mul_weight: bool, a_row_div: int):
    fn = triton_moe._moe_grouped_gemm_kernel
    signature = {
        "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "topk_weights_ptr": "*fp32",
        "sorted_token_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "num_tokens_post_padded_ptr": "*i32",
        "N": "i32", "K": "i32", "num_pairs": "i32", "num_sorted": "i32",
        "stride_am": "i32", "stride_ak": "constexpr", "stride_bs": "i64", "stride_bn": "i32",
        "stride_bk": "constexpr", "stride_cm": "i32", "stride_cn": "constexpr",
    }
    constexprs = {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1, "A_ROW_DIV": a_row_div,
                  "MUL_ROUTED_WEIGHT": mul_weight, "FP32_IEEE": dtype == "fp32",
                  "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
    for name in constexprs:
        signature[name] = "constexpr"
    aligned = ("a_ptr", "b_ptr", "c_ptr", "topk_weights_ptr", "sorted_token_ids_ptr", "expert_ids_ptr",
               "N", "K", "stride_am", "stride_bs", "stride_bn", "stride_cm")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8, "num_stages": 3})


def compile_silu(arch: int):
    fn = triton_moe._silu_and_mul_kernel
    signature = {"gu_ptr": "*bf16", "h_ptr": "*bf16", "num_rows": "i32", "inter": "i32",
                 "stride_gm": "i32", "stride_hm": "i32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    src = ASTSource(fn, signature, constexprs={"BLOCK_R": 1, "BLOCK_C": 1024})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


if __name__ == "__main__":
    assert not triton_moe.is_interpreted()
    k = compile_gemm(90, "bf16", mul_weight=True, a_row_div=1)
    assert k.asm.get("cubin"), "no cubin for sm_90"
    assert "async_copy_global_to_local" in k.asm["ttgir"], "bf16 main loop not pipelined on sm_90"
    print("sm_90 bf16 gemm (weights in epilogue): ok, shared", k.metadata.shared)
    k = compile_gemm(80, "fp16", mul_weight=False, a_row_div=2)
    assert k.asm.get("cubin"), "no cubin for sm_80"
    print("sm_80 fp16 gemm (rows gathered by pair // 2): ok, shared", k.metadata.shared)
    assert compile_silu(90).asm.get("cubin")
    print("sm_90 silu_and_mul: ok")
    print("ok")
    sys.exit(0)
