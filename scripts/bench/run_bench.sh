#!/usr/bin/env bash
# The side-by-side benchmark: sd-cuda (FP8 and BF16) next to diffusers (eager and
# torch.compile) on one accelerator, in one device call.
#
#   scripts/bench/run_bench.sh              # here: build bench + gpu_tests (x86-64, release),
#                                           # strip them into .carry/, check .whl/ and .peer/
#   scripts/bench/run_bench.sh --device     # on the accelerator (carry .carry .whl .peer)
#
# Device-side knobs (environment):
#   STAGES   which stages, in order (default "medium peer-medium large peer-large tests")
#            medium / large:       sd-cuda bench of that model (FP8 + BF16; medium also
#                                  runs the attention microbenchmark and the VAE decode)
#            peer-medium / peer-large: ../shared/peer/sd35_peer.py for that model
#            tests:                the per-op GPU tests + tiny-model images (gpu_tests)
#   PEER_COMPILE_MEDIUM=1 / PEER_COMPILE_LARGE=1   add torch.compile to that peer run
#   BENCH_ITERS (12)
# Results in $OUT: bench-medium.json, bench-large.json (raw sd-cuda figures), run.log,
# gpu_tests.txt, and from scripts/bench/make_table.py: results.json (everything merged,
# peer figures included), table.md, profile.md.
set -uo pipefail
cd "$(dirname "$0")/../.."

if [[ "${1:-}" == "--device" ]]; then
    OUT=${OUT:-/tmp/sd-bench-out}
    W=/tmp/sd-bench-work   # intermediate files ($OUT takes at most 8 files back)
    mkdir -p "$OUT" "$W"
    exec > >(tee -a "$OUT/run.log") 2>&1
    SP=$(python3 -c 'import site;print(site.getsitepackages()[0])')
    export LD_LIBRARY_PATH=$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}
    if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda-13.0/include ]]; then
        export CUDA_HOME=/usr/local/cuda-13.0
    fi
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader \
        | tee "$W/nvidia-smi.csv"
    date -u +"%Y-%m-%dT%H:%M:%SZ" >"$W/date.txt"
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    fi
    ITERS=${BENCH_ITERS:-12}
    # Every stage runs under what is left of BUDGET seconds (default 560, inside the
    # device tool's 600 s), so the table is always written.
    START=$(date +%s); BUDGET=${BUDGET:-560}
    left() { echo $(( BUDGET - ($(date +%s) - START) )); }
    for stage in ${STAGES:-medium peer-medium large peer-large tests}; do
        echo "=== stage $stage ($(date -u +%H:%M:%S))"
        t0=$(date +%s)
        T=$(left)
        if (( T < 30 )); then echo "=== skipped $stage: budget spent"; continue; fi
        TO="timeout $T"
        case $stage in
            medium) $TO ./.carry/bench "$W/medium" --models sd3.5-medium --iters "$ITERS" ${BENCH_ARGS:-};
                    echo "bench exit $?"; cp "$W/medium/bench.json" "$OUT/bench-medium.json" ;;
            large) $TO ./.carry/bench "$W/large" --models sd3.5-large --iters "$ITERS" \
                        --no-vae --no-attention --no-exact ${BENCH_ARGS:-};
                   echo "bench exit $?"; cp "$W/large/bench.json" "$OUT/bench-large.json" ;;
            peer-medium) COMPILE=${PEER_COMPILE_MEDIUM:-} PYTHONUNBUFFERED=1 \
                        $TO python3 .peer/sd35_peer.py sd3.5-medium | tee "$W/peer-medium.jsonl" ;;
            peer-large) COMPILE=${PEER_COMPILE_LARGE:-} PYTHONUNBUFFERED=1 \
                        $TO python3 .peer/sd35_peer.py sd3.5-large | tee "$W/peer-large.jsonl" ;;
            tests) mkdir -p /tmp/gt && $TO ./.carry/gpu_tests models/tiny-sd35m /tmp/gt >/tmp/gt/log.txt 2>&1;
                   echo "gpu_tests exit $?"; cp /tmp/gt/gpu_tests.txt "$OUT/gpu_tests.txt";
                   grep -E "^(FAIL|PASS)" /tmp/gt/gpu_tests.txt | cut -c1-150;
                   # The other flash-attention tilings against the CPU too (attention lines).
                   for fv in 1 2; do
                       SD_CUDA_FLASH_VARIANT=$fv $TO ./.carry/gpu_tests models/tiny-sd35m /tmp/gt$fv >/dev/null 2>&1;
                       grep -E "attention" /tmp/gt$fv/gpu_tests.txt | sed "s/^/flash variant $fv: /" | cut -c1-170;
                   done ;;
            *) echo "unknown stage $stage" ;;
        esac
        echo "=== stage $stage took $(( $(date +%s) - t0 )) s"
    done
    cp "$OUT"/bench-*.json "$W/" 2>/dev/null
    python3 scripts/bench/make_table.py "$W" "$OUT" || true
    exit 0
fi

[[ "$(uname -m)" == "x86_64" ]] || { echo "build on x86-64: the GPU machine is x86-64" >&2; exit 1; }
for d in /.carry/ /.whl/ /.peer/; do grep -qx "$d" .git/info/exclude || echo "$d" >>.git/info/exclude; done
cargo build --release -p sd-cuda --example bench --example gpu_tests
mkdir -p .carry
strip -o .carry/bench target/release/examples/bench
strip -o .carry/gpu_tests target/release/examples/gpu_tests
[[ -f .peer/sd35_peer.py ]] || { mkdir -p .peer && cp ../shared/peer/sd35_peer.py .peer/; }
ls .whl/diffusers-*.whl >/dev/null 2>&1 || echo "warning: no diffusers wheel in .whl/ (see ../shared/peer/README.md)" >&2
du -shc .carry .whl .peer
echo 'On the accelerator (device run, carry [".carry", ".whl", ".peer"]):'
echo '    bash scripts/bench/run_bench.sh --device'
