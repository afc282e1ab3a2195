#!/usr/bin/env bash
# One device call that re-checks the GPU side at a commit: the GPU test suite, the kernel records, the open
# question of decode v2 at batch 1 / 4k (row lse written or not, side by side) and the served decode step.
#
#   bash benchmarks/gpu_checkup.sh [OUT_DIR]      # on the H200 (device tool: run from the repository root)
#
# Each stage writes its log under OUT_DIR (default $OUT, else benchmarks/results/checkup) as it finishes, in the
# order of their worth, so that a call cut short by its time limit still returns the stages that ran. Needs a
# CUDA device, torch and triton; no vLLM (the kernels, the engine step and the benchmarks that drive them).
set -uo pipefail
out=${1:-${OUT:-benchmarks/results/checkup}}
mkdir -p "$out"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
ln -sfn ../kernels zipcache_vllm/kernels  # the package's kernels/ as installed (pip install puts it there)
export PYTHONPATH=.
stage() {  # name, command...: run, tee the log, record the exit status and the seconds it took
  local name=$1
  shift
  local t0=$SECONDS
  echo "== $name ($commit): $*" | tee "$out/$name.log"
  "$@" 2>&1 | tee -a "$out/$name.log"
  echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$out/$name.log" "$out/summary.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.log"
stage gpu_suite python -m pytest -n 12 -q tests/kernels tests/hf/test_hf_paged.py tests/engine \
  tests/plugin/test_cuda_builder_api.py -k "not numba" -p no:cacheprovider
stage bench_kernels python benchmarks/bench_kernels.py --quick --commit "$commit" --out "$out"
stage spike_lse python benchmarks/spike_decode_v2.py --cases 1x4096,16x32768,64x4096 --presets vllm --stage 1 \
  --lse 0,1
stage serving_gpu python benchmarks/bench_serving_gpu.py --commit "$commit" --out "$out/serving_gpu.json" \
  --plot "$out/serving_gpu.png"
rm -f zipcache_vllm/kernels
