#!/usr/bin/env bash
# Builds the sd-cuda per-op GPU test suite here (x86-64), puts it in .carry/, and prints
# the command to run on the accelerator (device tool: carry [".carry"]).
#
#   scripts/gpu/run_gpu_tests.sh            # build + carry + print the device command
#   scripts/gpu/run_gpu_tests.sh --device   # (on the GPU machine) run it
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ "${1:-}" == "--device" ]]; then
    source scripts/gpu/cuda_env.sh
    OUT=${OUT:-/tmp/sd-cuda-out}
    mkdir -p "$OUT"
    nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv >"$OUT/nvidia-smi.csv" 2>&1 || true
    set +e
    ./.carry/gpu_tests models/tiny-sd35m "$OUT" 2>&1 | tee "$OUT/log.txt"
    exit "${PIPESTATUS[0]}"
fi

[[ "$(uname -m)" == "x86_64" ]] || { echo "build on x86-64: the GPU machine is x86-64" >&2; exit 1; }
grep -qx '/.carry/' .git/info/exclude || echo '/.carry/' >>.git/info/exclude
cargo build --release -p sd-cuda --example gpu_tests
mkdir -p .carry
strip -o .carry/gpu_tests target/release/examples/gpu_tests

echo "built .carry/gpu_tests ($(du -h .carry/gpu_tests | cut -f1)); models/tiny-sd35m travels with the tree."
echo "On the accelerator (device tool run, carry [\".carry\"]):"
echo "    bash scripts/gpu/run_gpu_tests.sh --device"
