#!/usr/bin/env bash
# Runs Weir's whole test suite: unit, property, doc and end-to-end tests (which kill processes,
# corrupt checkpoints and change parallelism), then the dashboard's browser test. Installs
# whatever the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
# The S3 storage tests start their own moto server on loopback from this binary.
export WEIR_MOTO_SERVER="${WEIR_TEST_DEPS:-$HOME/.cache/weir-test-deps}/moto-venv/bin/moto_server"
# Vulkan loaders warn without a runtime dir; lavapipe needs nothing else.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
# Release: the end-to-end tests push millions of records through the engine.
cargo test --workspace --release --locked "$@"
# The web dashboard in headless Chromium against a real job (the binary the tests just built).
cargo build --release --locked -p weir-cli
WEIR_BIN="${CARGO_TARGET_DIR:-target}/release/weir" scripts/browser-test.sh
