#!/usr/bin/env bash
# The GPU checks in one run, for a borrowed GPU machine (the device tool: its image's python3
# has torch with CUDA but not pydantic), from the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#       pydantic pydantic-core annotated-types typing-inspection typing-extensions
#   (the device tool) run: bash bench/gpu_check.sh   carry: [".whl"]
#
# Sets weightmix up on PYTHONPATH (C loops built in place), then runs, printing everything to
# $OUT/log as well:
# - the CUDA tests;
# - the SD1.5 benchmark on the GPU and on the CPU in the same run;
# - the copy/compute overlap profile (bench/profile_cuda.py);
# - the research methods once each on both;
# - SDXL on the GPU, when started before $SDXL_BEFORE seconds (stopped at $END_BY).
# About 7 minutes on an H200 machine. REPEAT (3) and DEVICE (cuda) can be set to try it here.
set -u
OUT=${OUT:-/tmp/weightmix-gpu-check}
REPEAT=${REPEAT:-3}
DEVICE=${DEVICE:-cuda}
SDXL_BEFORE=${SDXL_BEFORE:-200}
END_BY=${END_BY:-470}  # seconds: SDXL is stopped then
SCRATCH=${SCRATCH:-/tmp/weightmix-bench}
mkdir -p "$OUT"
step() { echo; echo "== +${SECONDS}s $*"; }

{
    step setup
    if ! python3 -c "import pydantic" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
    python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1
    python3 -c "import weightmix.kernels as k; print('C loops built:', k.enabled())"
    python3 -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    echo "cores $(nproc)"; free -g | head -2; df -h "$(dirname "$SCRATCH")" | tail -1

    step tests
    python3 -m pytest -p no:cacheprovider -q -rs tests/test_cuda.py tests/test_device_chunks.py \
        "tests/test_engine.py::test_cuda_device_matches_the_formula_when_a_gpu_is_present"

    step "SD1.5 on $DEVICE, then on the CPU"
    python3 bench/bench_merge.py --arch sd1 --repeat "$REPEAT" --device "$DEVICE" --scratch "$SCRATCH"
    python3 bench/bench_merge.py --arch sd1 --repeat "$REPEAT" --scratch "$SCRATCH"

    step "copies against kernels"
    if [ "$DEVICE" = cuda ]; then
        sd1=$SCRATCH/sd1
        python3 bench/profile_cuda.py "$sd1/A.safetensors" "$sd1/B.safetensors"
        python3 bench/profile_cuda.py "$sd1/A.safetensors" "$sd1/B.safetensors" "$sd1/C.safetensors" \
            -m add_difference --alpha 1.0
    fi

    step "research methods (whole tensors on the GPU) on $DEVICE, then on the CPU"
    python3 bench/bench_merge.py --arch sd1 --repeat 1 --research --device "$DEVICE" \
        --scratch "$SCRATCH"
    python3 bench/bench_merge.py --arch sd1 --repeat 1 --research --scratch "$SCRATCH"

    if [ "$SECONDS" -lt "$SDXL_BEFORE" ]; then
        step "SDXL on $DEVICE"
        rm -rf "$SCRATCH/sd1"
        timeout $((END_BY - SECONDS)) \
            python3 bench/bench_merge.py --arch sdxl --repeat 1 --device "$DEVICE" --scratch "$SCRATCH"
    fi
    step done
} 2>&1 | tee "$OUT/log"
