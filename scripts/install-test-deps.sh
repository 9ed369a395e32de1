#!/usr/bin/env bash
# Installs the system packages the tests need (Debian): Mesa's software Vulkan driver (lavapipe)
# and the Vulkan loader, so that the GPU kernels run for real on a machine without a GPU; libclang
# for the bindings of the bundled RocksDB (state backend).
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
