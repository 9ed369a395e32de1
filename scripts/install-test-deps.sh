#!/usr/bin/env bash
# Installs the system packages the tests need (Debian): Mesa's software Vulkan driver (lavapipe)
# and the Vulkan loader, so that the GPU kernels run for real on a machine without a GPU; libclang
# for the bindings of the bundled RocksDB (state backend); moto (an S3 server, from PyPI) in a venv.
# Idempotent; quiet when all is present.
set -euo pipefail
need=()
for pkg in mesa-vulkan-drivers libvulkan1 libclang-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
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
