#!/usr/bin/env bash
# Runs every test of the project. Sets up, in .venv, the Python tools some tests drive
# (grpcio as a foreign gRPC client, NVRTC + CUDA headers for the kernel compile check,
# ...): each scripts/ci/requirements-*.txt lists what one part needs.
set -euo pipefail
cd "$(dirname "$0")/.."

reqs=(scripts/ci/requirements-*.txt)
if [ -e "${reqs[0]}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  args=()
  for r in "${reqs[@]}"; do args+=(-r "$r"); done
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir "${args[@]}"
  export SD_TEST_PYTHON="$PWD/.venv/bin/python"
fi

cargo test --workspace --locked "$@"
