#!/usr/bin/env bash
# The real-GPU figures of docs/BENCHMARKS.md (issue 11) in one run, for a GPU host prepared with
# ../shared/device/prepare.sh (`weir` on the PATH, no toolchain needed):
#   bash .device/run-on-device.sh 'bash scripts/gpu-figures.sh'
# or on any machine with a built weir on the PATH. About 3–5 minutes on a discrete GPU; on
# lavapipe (a CPU) far longer: use it there only to check that it runs (GPU_FIGURES_QUICK=1).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
# The tuning of this run, not one cached on the machine before.
export XDG_CACHE_HOME="$out/weir-cache" WEIR_LOG=${WEIR_LOG:-warn}
rm -rf "$XDG_CACHE_HOME" "$out/weir-figures"
mkdir -p "$XDG_CACHE_HOME" "$out/weir-figures"
quick=${GPU_FIGURES_QUICK:-0}
step() { echo; echo "== $* ($(date -u +%T))"; }

step weir gpu info
weir gpu info
step weir gpu tune
if [ "$quick" = 1 ]; then weir gpu tune --sizes 64,128 --reps 1; else weir gpu tune --sizes 64,128,256,512,1024,2048; fi
step weir bench gpu
if [ "$quick" = 1 ]; then weir bench gpu --sizes quick; else weir bench gpu --sizes full; fi
# The README's main job (20 M points) on the GPU and on the CPU path, twice each, interleaved.
points=20000000
[ "$quick" = 1 ] && points=200000
for run in 1 2; do
  for gpu in true false; do
    step "main job, weir.gpu.enabled=$gpu, run $run"
    start=$(date +%s.%N)
    weir run examples/kmeans.yaml --no-rest -D weir.gpu.enabled=$gpu --set source.count=$points \
      -D execution.checkpointing.dir="$out/weir-figures/ck-$gpu-$run" --set sink.path="$out/weir-figures/out-$gpu-$run" 2>&1 | tail -3
    end=$(date +%s.%N)
    awk -v s="$start" -v e="$end" -v n=$points -v g=$gpu 'BEGIN { printf "main job gpu=%s: %.2f s, %.2f M points/s\n", g, e - s, n / (e - s) / 1e6 }'
  done
done
step weir bench gpu-state
if [ "$quick" = 1 ]; then
  weir bench gpu-state --points 200000 --model-keys 100 --state-keys 1000 --dir "$out/weir-figures/bench"
else
  weir bench gpu-state --state-keys 1000000 --points 32000000 --gpu-memory '40 gb' --dir "$out/weir-figures/bench"
fi
rm -rf "$out/weir-figures"
