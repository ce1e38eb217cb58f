#!/bin/bash
# Every CUDA check and timing of fmoe in one command, for a machine with an NVIDIA GPU:
#
#     bash tools/gpu_round.sh [RESULTS_DIR]        # default ./gpu-round
#
# 1. the environment (GPU, driver, torch / triton / numba versions);
# 2. the kernel tests, which run the Triton kernel and the CUDA paths against an fp64 torch
#    loop when a GPU is there (tests/kernels: the Triton kernel's files first, then the rest);
# 3. the fused-MoE kernel benchmark (tools/bench_kernels.py: triton, grouped_mm and gather at
#    DeepSeek-V2-Lite and Mixtral shapes, against the device's copy and matmul ceilings);
# 4. the end-to-end check (tools/gpu_check.py): a random DeepSeek-V2-Lite-shaped model of
#    GPU_CHECK_LAYERS layers (default 3), offloaded at expert_cache=0.25 with every policy,
#    must give the resident run's tokens; TPOT and the link's measured rate (its JSON is
#    rewritten after every run, so a time limit keeps what was measured).
#
# Each step has its own time limit (STEP_SECONDS, default 90; the environment 30 s at most, the
# end-to-end check twice STEP_SECONDS and 30 s), so one that hangs cannot take the others' time;
# with the defaults the whole round ends within 8.5 minutes. Everything goes to RESULTS_DIR (a log
# per step, gpu_check.json); a summary of the steps' exit codes is printed last. Runs from the
# repository root with the python that has torch (PYTHON, default python3), the package taken
# from the checkout.
set -u
out=${1:-gpu-round}
mkdir -p "$out"
py=${PYTHON:-python3}
step=${STEP_SECONDS:-90}
layers=${GPU_CHECK_LAYERS:-3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
declare -a summary

run() {    # run NAME SECONDS COMMAND...: log to $out/NAME.log, keep the tail on screen
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    summary+=("$name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (time limit)')")
}

run env "$((step < 30 ? step : 30))" bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; \
    $py -c 'import sys, torch, numba; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), \"numba\", numba.__version__)'; \
    $py -c 'import triton; print(\"triton\", triton.__version__)'; \
    $py -c 'import fmoe; print(\"fmoe from\", fmoe.__file__)'"
# the Triton kernel on the GPU first, then the rest (no -x: one failure must not hide the others)
run triton-tests "$step" "$py" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_moe.py \
    tests/kernels/test_moe_align.py
run kernel-tests "$step" "$py" -m pytest -q -p no:cacheprovider tests/kernels \
    --deselect tests/kernels/test_triton_moe.py --deselect tests/kernels/test_moe_align.py
run bench-kernels "$step" "$py" tools/bench_kernels.py --tokens 1 8 64 512 4096
run gpu-check "$((2 * step + 30))" "$py" tools/gpu_check.py --layers "$layers" --tokens 16 \
    --out "$out/gpu_check.json"

echo "== summary (logs in $out)"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
