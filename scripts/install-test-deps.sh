#!/usr/bin/env bash
# Installs the system packages the tests need (Debian): Mesa's software Vulkan driver (lavapipe)
# and the Vulkan loader, so that the GPU kernels run for real on a machine without a GPU; libclang
# for the bindings of the bundled RocksDB (state backend); moto (an S3 server, from PyPI) in a venv.
# Idempotent; quiet when all is present.
set -euo pipefail
need=()
for pkg in mesa-vulkan-drivers libvulkan1 libclang-dev chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# Any node and npm will do (Debian's, or NodeSource's, which conflicts with Debian's npm).
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
if [ "${#need[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# A real S3-compatible server for the S3 checkpoint-storage tests: moto in server mode, in a venv
# outside the clone (reused by every clone and CI run on this machine).
deps="${WEIR_TEST_DEPS:-$HOME/.cache/weir-test-deps}"
if [ ! -x "$deps/moto-venv/bin/moto_server" ]; then
  echo "installing moto[server] into $deps/moto-venv" >&2
  mkdir -p "$deps"
  # Debian's own python3 needs python3-venv for ensurepip.
  if ! python3 -m venv --clear "$deps/moto-venv" >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv --clear "$deps/moto-venv"
  fi
  "$deps/moto-venv/bin/pip" install -q --disable-pip-version-check 'moto[server]==5.2.5'
fi
# playwright-core drives Debian's chromium (scripts/browser-test.sh); it never downloads a browser.
if [ ! -f "$deps/browser/node_modules/playwright-core/package.json" ]; then
  echo "installing playwright-core into $deps/browser" >&2
  mkdir -p "$deps/browser"
  [ -f "$deps/browser/package.json" ] || echo '{"private": true}' >"$deps/browser/package.json"
  (cd "$deps/browser" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --silent playwright-core@1 >/dev/null)
fi
