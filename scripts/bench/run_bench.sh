#!/usr/bin/env bash
# The side-by-side benchmark: sd-cuda (FP8 and BF16) next to diffusers (eager and
# torch.compile) on one accelerator, in one device call.
#
#   scripts/bench/run_bench.sh              # here: build bench + gpu_tests (x86-64, release),
#                                           # strip them into .carry/, check .whl/ and .peer/
#   scripts/bench/run_bench.sh --device     # on the accelerator (carry .carry .whl .peer)
#
# The binaries are taken from $SD_BIN (default .carry), the repository root is $SD_ROOT
# (default: two levels above this script) and the helper scripts are this script's
# neighbours, so a copy of scripts/bench/ carried elsewhere runs the same way.
#
# Device-side knobs (environment):
#   STAGES   which stages, in order (default "medium peer-medium large peer-large tests")
#            medium / large:       sd-cuda bench of that model (FP8 + BF16; medium also
#                                  runs the attention microbenchmark and the VAE decode)
#            before-medium / before-large: the same with $SD_BIN/bench-before (a build of
#                                  the engine before a change), for before/after figures
#                                  from one call
#            medium-nofuse / large-nofuse: the engine with SD_CUDA_FUSED_EPILOGUE=0 (linear
#                                  layers through the epilogue kernel instead of
#                                  cuBLASLt's epilogue), to attribute that change
#            medium-pertensor / large-pertensor: FP8 with one weight scale per tensor
#                                  (the default plan, like calibration's, has one per
#                                  output channel and the adaLN layers weight-only FP8)
#            medium-fp8adaln / large-fp8adaln: FP8 with the adaLN modulation layers in FP8
#                                  (weights and input: `--adaln fp8`)
#            pipeline:             sd-cuda whole SD3.5-medium pipeline: text encoders and
#                                  a full 28-step image
#            peer-medium / peer-large: ../shared/peer/sd35_peer.py for that model
#            peer-e2e:             ../shared/peer/sd35_e2e.py (diffusers' whole pipeline)
#            peer-text:            peer_text.py (diffusers' text encoders per stage)
#            tests:                the per-op GPU tests + tiny-model images (gpu_tests)
#            tests-flash:          the attention tests with the other flash tilings
#                                  (FLASH_TEST_VARIANTS, default "0 1 2 3 5 6 7 8 9 10 11")
#            tests-fastacc:        the same with SD_CUDA_FP8_GEMM=fast-accum
#            tests-nhwc:           the same with SD_CUDA_CONV=nhwc (every convolution and
#                                  the tiny models' VAE decodes on channels-last cuDNN)
#            tests-before:         gpu_tests from $SD_BIN/gpu_tests-before (same machine)
#            tests-shapes:         the tests on models/tiny-sd35m-shapes with the real
#                                  calibration cache $SD_GPU_TEST_CALIBRATION (if set)
#   PEER_COMPILE_MEDIUM=1 / PEER_COMPILE_LARGE=1   add torch.compile to that peer run
#   BENCH_ITERS (12)
# Results in $OUT (at most 8 files come back from the device tool): raw.tgz (the raw
# figures of every stage that ran: bench-*.json, peer-*.jsonl, nvidia-smi.csv, date.txt;
# what make_table.py merges, also across calls), run.log, gpu_tests*.txt, and from
# make_table.py: results.json, table.md, profile.md.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "${SD_ROOT:-$HERE/../..}"
BIN=${SD_BIN:-.carry}

if [[ "${1:-}" == "--device" ]]; then
    OUT=${OUT:-/tmp/sd-bench-out}
    W=/tmp/sd-bench-raw   # packed into $OUT/raw.tgz at the end
    rm -rf "$W"; mkdir -p "$OUT" "$W"
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
    # One gpu_tests run: suite NAME BINARY MODEL_DIR [PATTERN]. Its report goes to
    # $OUT/gpu_tests$NAME.txt; its PASS/FAIL lines (those matching PATTERN) are printed.
    suite() {
        local d=/tmp/gt$1
        mkdir -p "$d"
        $TO "$2" "$3" "$d" >"$d/log.txt" 2>&1
        echo "gpu_tests$1 exit $?"
        cp "$d/gpu_tests.txt" "$OUT/gpu_tests$1.txt"
        grep -E "^(FAIL|PASS)${4:-}" "$d/gpu_tests.txt" | cut -c1-150
    }
    for stage in ${STAGES:-tests medium before-medium pipeline peer-medium peer-e2e peer-text large before-large peer-large tests-flash}; do
        echo "=== stage $stage ($(date -u +%H:%M:%S))"
        t0=$(date +%s)
        T=$(left)
        if (( T < 30 )); then echo "=== skipped $stage: budget spent"; continue; fi
        TO="timeout $T"
        case $stage in
            medium) $TO "$BIN/bench" /tmp/b-medium --models sd3.5-medium --iters "$ITERS" \
                        --no-pipeline ${BENCH_ARGS:-};
                    echo "bench exit $?"; cp /tmp/b-medium/bench.json "$W/bench-medium.json" ;;
            large) $TO "$BIN/bench" /tmp/b-large --models sd3.5-large --iters "$ITERS" \
                        --no-vae --no-attention --no-exact --no-pipeline ${BENCH_ARGS:-};
                   echo "bench exit $?"; cp /tmp/b-large/bench.json "$W/bench-large.json" ;;
            before-medium|before-large)
                   m=${stage#before-}
                   if [[ -x "$BIN/bench-before" ]]; then
                       $TO "$BIN/bench-before" /tmp/b-$stage --models sd3.5-$m --iters "$ITERS" \
                           --no-vae --no-attention --no-exact;
                       echo "bench-before exit $?"; cp /tmp/b-$stage/bench.json "$W/bench-$stage.json"
                   else echo "no $BIN/bench-before"; fi ;;
            medium-nofuse|large-nofuse)
                   m=${stage%-nofuse}
                   SD_CUDA_FUSED_EPILOGUE=0 $TO "$BIN/bench" /tmp/b-$stage --models sd3.5-$m --iters "$ITERS" \
                       --no-vae --no-attention --no-exact --no-pipeline \
                       --label "linear epilogue kernel (SD_CUDA_FUSED_EPILOGUE=0)";
                   echo "bench exit $?"; cp /tmp/b-$stage/bench.json "$W/bench-variant-$m.json" ;;
            medium-pertensor|large-pertensor)
                   m=${stage%-pertensor}
                   $TO "$BIN/bench" /tmp/b-$stage --models sd3.5-$m --iters "$ITERS" --precisions fp8 \
                       --no-vae --no-attention --no-exact --no-pipeline --per-tensor \
                       --label "one FP8 weight scale per tensor";
                   echo "bench exit $?"; cp /tmp/b-$stage/bench.json "$W/bench-variant2-$m.json" ;;
            medium-fp8adaln|large-fp8adaln)
                   m=${stage%-fp8adaln}
                   $TO "$BIN/bench" /tmp/b-$stage --models sd3.5-$m --iters "$ITERS" --precisions fp8 \
                       --no-vae --no-attention --no-exact --no-pipeline --adaln fp8 \
                       --label "adaLN modulation layers in FP8 (weights and input)";
                   echo "bench exit $?"; cp /tmp/b-$stage/bench.json "$W/bench-variant3-$m.json" ;;
            pipeline) $TO "$BIN/bench" /tmp/b-pipe --models "" --iters "$ITERS" --no-vae \
                        --no-attention --tokenizers models/tiny-sd35m;
                      echo "bench exit $?"; cp /tmp/b-pipe/bench.json "$W/bench-pipeline.json" ;;
            peer-e2e) PYTHONUNBUFFERED=1 $TO python3 .peer/sd35_e2e.py models/tiny-sd35m \
                        | tee "$W/peer-e2e.jsonl" ;;
            peer-text) PYTHONUNBUFFERED=1 $TO python3 "$HERE/peer_text.py" | tee "$W/peer-text.jsonl" ;;
            peer-medium) COMPILE=${PEER_COMPILE_MEDIUM:-} PYTHONUNBUFFERED=1 \
                        $TO python3 .peer/sd35_peer.py sd3.5-medium | tee "$W/peer-medium.jsonl" ;;
            peer-large) COMPILE=${PEER_COMPILE_LARGE:-} PYTHONUNBUFFERED=1 \
                        $TO python3 .peer/sd35_peer.py sd3.5-large | tee "$W/peer-large.jsonl" ;;
            tests) suite "" "$BIN/gpu_tests" models/tiny-sd35m ;;
            tests-fastacc)
                   # The suite with FP8 GEMMs in fast accumulation (the engine images' bounds).
                   SD_CUDA_FP8_GEMM=fast-accum suite -fastacc "$BIN/gpu_tests" models/tiny-sd35m ;;
            tests-nhwc)
                   # The suite with channels-last cuDNN convolutions as every backend's path.
                   SD_CUDA_CONV=nhwc suite -nhwc "$BIN/gpu_tests" models/tiny-sd35m ;;
            tests-before)
                   # The same suite built from the engine before a change, same machine.
                   if [[ -x "$BIN/gpu_tests-before" ]]; then
                       suite -before "$BIN/gpu_tests-before" models/tiny-sd35m " pipeline"
                   else echo "no $BIN/gpu_tests-before"; fi ;;
            tests-shapes)
                   if [[ -n "${SD_GPU_TEST_CALIBRATION:-}" ]]; then
                       suite -shapes "$BIN/gpu_tests" models/tiny-sd35m-shapes
                   else echo "SD_GPU_TEST_CALIBRATION not set"; fi ;;
            tests-flash)
                   # The other flash-attention tilings against the CPU too (attention lines).
                   for fv in ${FLASH_TEST_VARIANTS:-0 1 2 3 5 6 7 8 9 10 11}; do
                       SD_CUDA_FLASH_VARIANT=$fv $TO "$BIN/gpu_tests" models/tiny-sd35m /tmp/gt$fv --ops-only >/dev/null 2>&1;
                       grep -E "attention" /tmp/gt$fv/gpu_tests.txt | sed "s/^/flash variant $fv: /" | cut -c1-170;
                   done ;;
            *) echo "unknown stage $stage" ;;
        esac
        echo "=== stage $stage took $(( $(date +%s) - t0 )) s"
    done
    tar czf "$OUT/raw.tgz" -C "$W" .
    python3 "$HERE/make_table.py" "$W" "$OUT" || true
    exit 0
fi

[[ "$(uname -m)" == "x86_64" ]] || { echo "build on x86-64: the GPU machine is x86-64" >&2; exit 1; }
for d in /.carry/ /.whl/ /.peer/; do grep -qx "$d" .git/info/exclude || echo "$d" >>.git/info/exclude; done
cargo build --release -p sd-cuda --example bench --example gpu_tests
mkdir -p .carry
T=${CARGO_TARGET_DIR:-target}
strip -o .carry/bench "$T/release/examples/bench"
strip -o .carry/gpu_tests "$T/release/examples/gpu_tests"
for f in sd35_peer.py sd35_e2e.py; do [[ -f .peer/$f ]] || { mkdir -p .peer && cp ../shared/peer/$f .peer/; }; done
ls .whl/diffusers-*.whl >/dev/null 2>&1 || echo "warning: no diffusers wheel in .whl/ (see ../shared/peer/README.md)" >&2
du -shc .carry .whl .peer
echo 'On the accelerator (device run, carry [".carry", ".whl", ".peer"]):'
echo '    bash scripts/bench/run_bench.sh --device'
