#!/usr/bin/env bash
# One device call that re-checks the GPU side at a commit: the decode variants still to be decided (side by side),
# the kernel records, the served decode step and the GPU test suite (last: the longest; a cut run still shows how
# far it got).
#
#   bash benchmarks/gpu_checkup.sh [OUT_DIR [COMMIT]]   # on the H200 (device tool: run from the repository root)
#   STAGES="spike bench_kernels compress serving_gpu" bash benchmarks/gpu_checkup.sh ...   # then STAGES=gpu_suite
#   STAGES="compress spike bench_kernels prefill_tests" bash benchmarks/gpu_checkup.sh ...   # one call (~560 s)
#   STAGES="spike bench_kernels compress_ways prefill_tests" bash benchmarks/gpu_checkup.sh ...   # one call (~320 s)
#   STAGES="bench_kernels gpu_suite" bash benchmarks/gpu_checkup.sh ...   # issues 9 and 11's records + suite (~420 s)
#   STAGES="trace prefill_tests" bash benchmarks/gpu_checkup.sh ...   # a compress_store change vs the base (~250 s)
#   STAGES="bench_kernels prefill_tests e2e" bash benchmarks/gpu_checkup.sh ...   # issue 11's four targets + tests
#
# COMMIT labels the records (the device's copy of the repository may not know the commit; default: its HEAD).
# Every stage appends to OUT_DIR/checkup.log (default $OUT, else benchmarks/results/checkup) as it finishes, in
# the order of their worth, each under its own time limit, so that a call cut short still returns the stages that
# ran. Seven files in all (checkup.log, h200.json, h200.md, h200_decode.png, compress.json, serving_gpu.json,
# h200_e2e_prefill32k.json): the device tool returns at most 8. The default stages take up to ~1240 s, more than one
# command may run (600 s): run them as two
# calls with STAGES (the machine stays warm between calls that follow within 30 s). Needs a CUDA device, torch and
# triton; no vLLM (the kernels, the engine step and the benchmarks that drive them).
set -uo pipefail
out=${1:-${OUT:-benchmarks/results/checkup}}
commit=${2:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
stages=${STAGES:-spike bench_kernels compress compress_ways serving_gpu gpu_suite}
mkdir -p "$out"
log="$out/checkup.log"
ln -sfn ../kernels zipcache_vllm/kernels  # the package's kernels/ as installed (pip install puts it there)
export PYTHONPATH=.
stage() {  # name, seconds, command...: if STAGES names it, run under a time limit, append the output, record
  local name=$1 limit=$2  # status and seconds
  shift 2
  [[ " $stages " == *" $name "* ]] || return 0
  local t0=$SECONDS
  echo "== $name ($commit): $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "== $name: rc $?, $((SECONDS - t0)) s" | tee -a "$log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$log"
# the decode default (TMA staging for long page splits since 9d2e0da) against the one before it (cp.async staging),
# interleaved twice (run-to-run spread)
P=one-map-defer-subnormal-kv-pieces-page-max
D=$P-tma-auto
stage spike 110 python benchmarks/spike_decode_v2.py --variants $D,$P,$D,$P --presets vllm \
  --cases 16x32768,64x4096,1x4096,16x4096
stage bench_kernels 240 python benchmarks/bench_kernels.py --quick --prefill-lengths 4096,16384 --chunked --commit "$commit" \
  --out "$out"
# compress_store against an earlier version, side by side, when one was put in kernels/ before the call, e.g.
# git show 9dded8a:kernels/compress_store.py > kernels/_compress_store_base.py (untracked files travel; 9dded8a:
# the last kernel timed, before page-row tiles), at 2 and 4 warps (16 / 32 rows: 32 tile elements per thread)
# (and git show 9dded8a:kernels/block_scores.py > kernels/_block_scores_base.py: the probe-score kernel too)
base=()
[[ -f kernels/_compress_store_base.py ]] && base=(--baseline kernels/_compress_store_base.py)
[[ -f kernels/_block_scores_base.py ]] && base+=(--baseline-scores kernels/_block_scores_base.py)
# (16 x 2, also at 2 programs per (block, KV head), the default's launch at one wave: 3 and 4 were slower at every
# size, h100_checkup_b4645a5.log; 32 x 4, no faster anywhere in h100_checkup_653aee4.log, is left out)
stage compress 200 python benchmarks/bench_compress.py --configs 16x2 --programs 2 \
  ${base[@]+"${base[@]}"} --commit "$commit" --out "$out/compress.json"
# the default launch of the fused compress (2 programs at one wave) against fixed launches, and the step's path (the
# probe-score kernel, then compress given the scores), printed as they come
stage compress_ways 120 python -u benchmarks/spike_compress_ways.py --contexts 4096,8192,16384 --two-kernels
# the step's timeline at 4k and 16k, program by program (trace_compress.py; with the base kernel file when one was
# put in kernels/, both side by side): not in the default stages, STAGES="trace ..." (first run as a stage at 3dd7028,
# 37 s, h100_checkup_3dd7028.log; trace_compress.py takes --baseline more than once when run by itself)
trace_base=()
[[ -f kernels/_compress_store_base.py ]] && trace_base=(--baseline kernels/_compress_store_base.py)
stage trace 150 python -u benchmarks/trace_compress.py ${trace_base[@]+"${trace_base[@]}"}
stage serving_gpu 130 python benchmarks/bench_serving_gpu.py --commit "$commit" --out "$out/serving_gpu.json"
# issue 11's end-to-end target: the transformers paged cache's 32k prompt against DynamicCache (32 layers of LLaMA3-8B
# shape, random weights; not in the default stages; ~50 s on an H100: an unmeasured pass of each cache, then the rounds)
stage e2e 200 python benchmarks/bench_e2e.py --layers 32 --batch 1 --contexts 32768 --caches dynamic zipcache \
  --steps 5 --warmup 2 --rounds 2 --ref-contexts --commit "$commit" --out "$out/h200_e2e_prefill32k.json"
# the GPU tests of what the prefill side changed since the last complete suite (compress, probe scores, the engine
# step): to go with the stages above in one call when a second call for gpu_suite may not come
stage prefill_tests 120 python -m pytest -n 14 -q -p no:cacheprovider tests/kernels/test_compress_store.py \
  tests/kernels/test_decode_step_kernels.py tests/engine/test_step.py -k "not numba"
stage gpu_suite 330 python -m pytest -n 14 -q -p no:cacheprovider tests/kernels tests/hf/test_hf_paged.py \
  tests/engine tests/plugin/test_cuda_builder_api.py -k "not numba"
rm -f zipcache_vllm/kernels
