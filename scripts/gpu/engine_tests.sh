#!/usr/bin/env bash
# Engine bundles on the GPU: cuda FP8/BF16 bundles of every tiny model compiled on the
# accelerator, their images against the cpu engine / CPU pipeline (examples/engine_tests.rs),
# then the command-line path: `sd-build compile --target cuda`, `inspect`, `generate
# --engine`, and `sd-serve` serving the cuda bundle to `sd-client` (GPU memory metric,
# batched vs alone), eagerly and with the step as a CUDA graph (same images).
#
#   scripts/gpu/engine_tests.sh            # here: calibrate the tiny models (target cuda),
#                                          # build x86-64 release binaries, pack both into
#                                          # .carry/engine.tar.xz (the device tool carries
#                                          # 64 MiB with the tree; xz keeps it well under)
#   scripts/gpu/engine_tests.sh --device   # on the accelerator (carry [".carry/engine.tar.xz"])
set -uo pipefail
cd "$(dirname "$0")/../.."
MODELS="tiny-sd3 tiny-sd35m tiny-sd35l-no-t5 tiny-sd35m-shapes"

if [[ "${1:-}" == "--device" ]]; then
    source scripts/gpu/cuda_env.sh
    OUT=${OUT:-/tmp/sd-engine-out}
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/log.txt") 2>&1
    [[ -f .carry/engine.tar.xz ]] && tar -C .carry -xJf .carry/engine.tar.xz
    B=./.carry/bin
    nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
    status=0
    specs=()
    for m in $MODELS; do specs+=("models/$m=.carry/cal/$m.yaml"); done
    echo "=== engine_tests"
    $B/engine_tests "$OUT" "${specs[@]}" || status=1

    echo "=== command line: compile --target cuda, inspect, generate --engine"
    W=/tmp/sd-engine-cli; rm -rf "$W"; mkdir -p "$W"
    M=models/tiny-sd35m-shapes
    if $B/sd-build compile --model $M --target cuda --precision fp8 --out "$W/e" 2>"$W/err"; then
        echo "FAIL fp8 without calibration was accepted"; status=1
    else
        echo "PASS fp8 without calibration refused: $(cat "$W/err")"
    fi
    $B/sd-build compile --model $M --calibration .carry/cal/tiny-sd35m-shapes.yaml \
        --target cuda --precision fp8 --out "$W/e" || status=1
    $B/sd-build inspect "$W/e" | head -n 30
    P="a red circle on the left, a small blue square, green background"
    $B/sd-build generate --engine "$W/e" --model $M --prompt "$P" --guidance 5 --seed 1 \
        --out "$OUT/cuda-fp8-engine.png" || status=1

    # Waits until the server on port $1 (process $2) answers health, or has exited.
    wait_healthy() {
        for _ in $(seq 1 300); do
            $B/sd-client --server 127.0.0.1:$1 health >/dev/null 2>&1 && return 0
            kill -0 $2 2>/dev/null || { echo "FAIL sd-serve on port $1 exited"; return 1; }
            sleep 0.2
        done
        echo "FAIL sd-serve on port $1 not healthy after 60 s"; return 1
    }

    echo "=== sd-serve with the cuda bundle"
    $B/sd-serve --listen 127.0.0.1:50551 --metrics-listen 127.0.0.1:9551 --model "shapes=$W/e" \
        --max-batch-size 4 --max-queue-delay-ms 50 &
    srv=$!
    wait_healthy 50551 $srv || status=1
    $B/sd-client --server 127.0.0.1:50551 models
    gen() { $B/sd-client --server 127.0.0.1:50551 generate --prompt "$P" --guidance-scale 5 \
        --steps 28 --seed "$1" -o "$2" >/dev/null; }
    gen 1 "$W/alone.png" || status=1
    for s in 1 2 3 4; do gen $s "$W/batched-$s.png" & done
    wait $(jobs -p | grep -v "^$srv$") 2>/dev/null
    if cmp -s "$W/alone.png" "$W/batched-1.png"; then
        echo "PASS cuda: seed 1 alone and in a batch of 4 give identical PNGs"
    else
        echo "INFO cuda: seed 1 alone vs in a batch of 4 differ (one GEMM over all rows)"
        python3 - "$W/alone.png" "$W/batched-1.png" <<'EOF' || true
import sys, numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(p), dtype=np.float64) / 255 for p in sys.argv[1:3])
mse = ((a - b) ** 2).mean()
print(f"INFO alone vs batched PSNR {10 * np.log10(1 / mse):.2f} dB" if mse else "INFO identical pixels")
EOF
    fi
    $B/sd-client --server 127.0.0.1:50551 bench --requests 16 --concurrency 4 --steps 28 \
        --prompt "$P" 2>&1 | tail -n 8 || true
    curl -s 127.0.0.1:9551/metrics | grep -E "^sd_device_memory_bytes|^sd_images_total" || \
        { echo "FAIL no GPU memory metric"; status=1; }
    kill -TERM $srv; wait $srv
    cp "$W/alone.png" "$OUT/served-alone.png" 2>/dev/null

    echo "=== sd-serve with the cuda bundle, the step as a CUDA graph (SD_CUDA_GRAPHS=1)"
    SD_CUDA_GRAPHS=1 $B/sd-serve --listen 127.0.0.1:50552 --model "shapes=$W/e" \
        --max-batch-size 4 --max-queue-delay-ms 50 2>"$W/serve-graphs.err" &
    srv=$!
    wait_healthy 50552 $srv || status=1
    gen2() { $B/sd-client --server 127.0.0.1:50552 generate --prompt "$P" --guidance-scale 5 \
        --steps 28 --seed "$1" -o "$2" >/dev/null; }
    # The first image records the graph (step 2), the second replays it at every step.
    gen2 1 "$W/graph-alone-1.png" || status=1
    gen2 1 "$W/graph-alone-2.png" || status=1
    for s in 1 2 3 4; do gen2 $s "$W/graph-batched-$s.png" & done
    wait $(jobs -p | grep -v "^$srv$") 2>/dev/null
    for f in graph-alone-1 graph-alone-2; do
        if cmp -s "$W/alone.png" "$W/$f.png"; then
            echo "PASS cuda graphs: $f identical to the eager server's image"
        else
            echo "FAIL cuda graphs: $f differs from the eager server's image"; status=1
        fi
    done
    n=$(ls "$W"/graph-batched-*.png 2>/dev/null | wc -l)
    [[ $n == 4 ]] && echo "PASS cuda graphs: 4 batched requests served" || \
        { echo "FAIL cuda graphs: $n of 4 batched requests served"; status=1; }
    if grep -q "capture failed" "$W/serve-graphs.err"; then
        echo "FAIL cuda graphs: a capture failed:"; grep "capture failed" "$W/serve-graphs.err"; status=1
    fi
    n=$(grep -c "CUDA graph recorded" "$W/serve-graphs.err")
    [[ $n -ge 1 ]] && echo "PASS cuda graphs: $n graph(s) recorded by the server" || \
        { echo "FAIL cuda graphs: the server recorded no graph"; status=1; }
    kill -TERM $srv; wait $srv
    echo "=== exit $status"
    exit $status
fi

[[ "$(uname -m)" == "x86_64" ]] || { echo "build on x86-64: the GPU machine is x86-64" >&2; exit 1; }
grep -qx '/.carry/' .git/info/exclude || echo '/.carry/' >>.git/info/exclude
set -e
cargo build --release --locked -p sd-build -p sd-serve -p sd-client
cargo build --release --locked -p sd-cuda --example engine_tests
mkdir -p .carry/bin .carry/cal
for b in sd-build sd-serve sd-client; do strip -o .carry/bin/$b target/release/$b; done
strip -o .carry/bin/engine_tests target/release/examples/engine_tests
for m in $MODELS; do
    [[ -f .carry/cal/$m.yaml ]] && continue
    target/release/sd-build calibrate --model models/$m --out .carry/cal/$m.yaml --target cuda \
        --samples 16 --steps 12 --guidance 5 >/dev/null
done
tar -C .carry -cJf .carry/engine.tar.xz bin cal
echo "built .carry/engine.tar.xz ($(du -h .carry/engine.tar.xz | cut -f1)). On the accelerator:"
echo "    bash scripts/gpu/engine_tests.sh --device      (device tool, carry [\".carry/engine.tar.xz\"])"
