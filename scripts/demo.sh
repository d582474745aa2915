#!/usr/bin/env bash
# The whole flow on the embedded default, in one command:
#   calibrate FP8 -> compile a cpu engine -> start sd-serve on loopback -> sd-client
#   generate -> a PNG, whose path is printed last.
# Environment overrides: MODEL, PROMPT, WORK (output folder), PORT.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/tiny-sd35m-shapes}
PROMPT=${PROMPT:-"a large yellow circle on the left, a small purple triangle on the right, black background"}
WORK=${WORK:-engines/demo}
PORT=${PORT:-50151}
GUIDANCE=${GUIDANCE:-5}
# Where cargo puts the binaries (CARGO_TARGET_DIR when set).
BIN=${CARGO_TARGET_DIR:-target}/release

cargo build --release --locked -p sd-build -p sd-serve -p sd-client
mkdir -p "$WORK"

echo "== calibrating FP8 formats and scales for $MODEL"
"$BIN/sd-build" calibrate --model "$MODEL" --out "$WORK/calibration.yaml" --target cpu \
  --samples 16 --steps 12 --width 128 --height 128 --guidance "$GUIDANCE"

echo "== compiling a cpu FP8 engine"
"$BIN/sd-build" compile --model "$MODEL" --calibration "$WORK/calibration.yaml" \
  --target cpu --precision fp8 --out "$WORK/engine" --force
"$BIN/sd-build" inspect "$WORK/engine" > "$WORK/inspect.txt"
head -n 24 "$WORK/inspect.txt"

echo "== serving it on 127.0.0.1:$PORT"
"$BIN/sd-serve" --listen "127.0.0.1:$PORT" --model "shapes=$WORK/engine" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  if "$BIN/sd-client" --server "127.0.0.1:$PORT" health >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then echo "sd-serve exited" >&2; exit 1; fi
  sleep 0.2
done

echo "== generating through gRPC"
"$BIN/sd-client" --server "127.0.0.1:$PORT" generate --prompt "$PROMPT" \
  --width 128 --height 128 --steps 28 --guidance-scale "$GUIDANCE" --seed 1 -o "$WORK/out.png"
kill -TERM "$server"
wait "$server" || true
trap - EXIT
echo "image: $(realpath "$WORK/out.png")"
