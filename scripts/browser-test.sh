#!/usr/bin/env bash
# The web dashboard in a real browser: runs scripts/browser-test-job.yaml with the REST API on a
# free port, opens the dashboard in headless Chromium (driven by playwright-core, which never
# downloads a browser here), waits for completed checkpoints in its history table and every vertex
# in its job graph, and takes a savepoint with its button (scripts/browser-test.mjs). Saves a
# screenshot to $SCREENSHOT (default: dashboard.png in the target directory, so a test run leaves
# the clone as it was; SCREENSHOT=docs/dashboard.png refreshes the README's) and to $OUT_DIR if
# set. Installs Debian's chromium and playwright-core if missing.
#   scripts/browser-test.sh                 # uses $CARGO_TARGET_DIR/release/weir
#   WEIR_BIN=path/to/weir scripts/browser-test.sh
#   SCREENSHOT=docs/dashboard.png scripts/browser-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! dpkg -s chromium >/dev/null 2>&1; then
  echo "installing chromium" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
# playwright-core in a cache outside the clone, shared by every clone and CI run on this machine.
deps="${WEIR_TEST_DEPS:-$HOME/.cache/weir-test-deps}/browser"
if [ ! -f "$deps/node_modules/playwright-core/package.json" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "installing nodejs and npm" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
  fi
  echo "installing playwright-core into $deps" >&2
  mkdir -p "$deps"
  [ -f "$deps/package.json" ] || echo '{"private": true}' >"$deps/package.json"
  # No browser download: the test drives Debian's /usr/bin/chromium.
  (cd "$deps" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --silent playwright-core@1 >/dev/null)
fi

weir="${WEIR_BIN:-${CARGO_TARGET_DIR:-target}/release/weir}"
if [ ! -x "$weir" ]; then
  echo "browser test: no weir binary at $weir (cargo build --release -p weir-cli, or set WEIR_BIN)" >&2
  exit 1
fi

tmp="$(mktemp -d)"
job_pid=""
cleanup() {
  if [ -n "$job_pid" ] && kill -0 "$job_pid" 2>/dev/null; then
    kill -KILL "$job_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
"$weir" run scripts/browser-test-job.yaml --rest-port 0 \
  -D "execution.checkpointing.dir=$tmp/checkpoints" -D "execution.checkpointing.savepoint-dir=$tmp/savepoints" \
  --set "sink.path=$tmp/out" >"$tmp/weir.log" 2>&1 &
job_pid=$!

# The job prints where it serves the REST API as it starts.
url=""
for _ in $(seq 1 600); do
  url="$(grep -o 'REST API and dashboard at http://[][0-9A-Za-z.:-]*' "$tmp/weir.log" | head -n1 | sed 's/.* at //; s:/*$::' || true)"
  [ -n "$url" ] && break
  if ! kill -0 "$job_pid" 2>/dev/null; then
    echo "browser test: the job ended before serving its REST API; its log:" >&2
    cat "$tmp/weir.log" >&2
    exit 1
  fi
  sleep 0.1
done
if [ -z "$url" ]; then
  echo "browser test: no 'REST API and dashboard at' line from the job within 60 s; its log:" >&2
  cat "$tmp/weir.log" >&2
  exit 1
fi
echo "browser test: dashboard at $url/" >&2

status=0
SCREENSHOT="${SCREENSHOT:-${CARGO_TARGET_DIR:-target}/dashboard.png}" WEIR_BROWSER_DEPS="$deps" WEIR_JOB_PID="$job_pid" node scripts/browser-test.mjs "$url/" || status=$?

# The .mjs SIGTERMs the job; SIGTERM cancels it (exit status 130). Anything else is a failure,
# as is a job that does not end.
job_status=0
for _ in $(seq 1 300); do
  kill -0 "$job_pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$job_pid" 2>/dev/null; then
  echo "browser test: the job did not end within 30 s of SIGTERM; its log:" >&2
  tail -n 40 "$tmp/weir.log" >&2
  exit 1
fi
wait "$job_pid" || job_status=$?
job_pid=""
if [ "$status" -ne 0 ] || { [ "$job_status" -ne 0 ] && [ "$job_status" -ne 130 ]; }; then
  echo "browser test: failed (browser: $status, job: exit status $job_status); the job's log:" >&2
  tail -n 40 "$tmp/weir.log" >&2
  exit 1
fi
