#!/usr/bin/env bash
# Installs the system packages the tests need (Debian). Idempotent; quiet when all is present.
set -euo pipefail
need=()
# Nothing beyond Rust is needed yet; GPU tests will add mesa-vulkan-drivers here.
for pkg in "${WEIR_EXTRA_TEST_PACKAGES[@]:-}"; do
  [ -n "$pkg" ] || continue
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
