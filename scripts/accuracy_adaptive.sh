#!/usr/bin/env bash
# Issue 12 item 2: the per-layer salient split (preset `adaptive`, method `zipcache-adaptive`) against the fixed
# split at equal bytes, on one model. Usage: bash scripts/accuracy_adaptive.sh smollm2-135m|qwen2.5-coder-1.5b
# Writes docs/results/adaptive_<model>_*.json ($OUT/... if OUT is set). Two budgets: 128 salient rows per block
# (the `vllm` preset's 96 + 32) and 112 (96 + 16, or 80 + 32), the second for >= 4.5x measured bytes. METHODS
# replaces the method list, PK_METHODS Qwen's passkey list (the `compact` preset: zipcache-adaptive:param_bits=8).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${1:-smollm2-135m}
OUT=${OUT:-docs/results}
mkdir -p "$OUT"
M="bf16,zipcache-vllm,zipcache-adaptive,zipcache-vllm:value_salient_ratio=0.125,zipcache-vllm:salient_ratio=0.625"
M="$M,zipcache-adaptive:value_salient_ratio=0.125"
M=${METHODS:-$M}  # e.g. METHODS=bf16,zipcache-adaptive,zipcache-adaptive:param_bits=8 (bf16 first: the ratios' base)
PK_METHODS=${PK_METHODS:-bf16,zipcache-vllm,zipcache-adaptive}  # Qwen's passkey run: the 128-row presets
if [ "$MODEL" = smollm2-135m ]; then
  # the windows, prompts and tasks of docs/accuracy.md's preset tables (fp32 compute)
  ARGS="--model $MODEL --threads 1"
  for corpus in prose code; do
    $PY -m zipcache_vllm.eval perplexity $ARGS --text-file data/$corpus.txt --context-len 1024 \
        --continuation-len 256 --max-windows 6 --methods "$M" --output $OUT/adaptive_${MODEL}_perplexity_$corpus.json
  done
  $PY -m zipcache_vllm.eval agreement $ARGS --prompts-file data/agreement_prompts.jsonl --min-prompt-tokens 256 \
      --max-new-tokens 16 --methods "$M" --output $OUT/adaptive_${MODEL}_agreement.json
  $PY -m zipcache_vllm.eval agreement $ARGS --prompts-file data/agreement_long.jsonl --max-new-tokens 16 \
      --methods "$M" --output $OUT/adaptive_${MODEL}_agreement_long.json
  $PY -m zipcache_vllm.eval retrieval $ARGS --tasks-file data/retrieval_passkey_n12.jsonl --methods "$M" \
      --output $OUT/adaptive_${MODEL}_retrieval_passkey.json
else
  # a 1.5B model on 2 shared CPU cores (~6-20 s per window and method): bf16 compute, WINDOWS (default 2)
  # windows of 1024 + 128 per corpus, PROMPTS (default 2) long prompts x 16 tokens
  ARGS="--model $MODEL --dtype bfloat16 --threads ${THREADS:-2}"
  for corpus in prose code; do
    $PY -m zipcache_vllm.eval perplexity $ARGS --text-file data/$corpus.txt --context-len 1024 \
        --continuation-len 128 --max-windows "${WINDOWS:-2}" --methods "$M" \
        --output $OUT/adaptive_${MODEL}_perplexity_$corpus.json
  done
  $PY -m zipcache_vllm.eval agreement $ARGS --prompts-file data/agreement_long.jsonl --max-prompts "${PROMPTS:-2}" \
      --max-new-tokens 16 --methods "$M" --output $OUT/adaptive_${MODEL}_agreement_long.json
  # passkey: the task file and count of docs/accuracy.md's first Qwen passkey run, the 128-row presets only
  $PY -m zipcache_vllm.eval retrieval $ARGS --tasks-file data/retrieval_passkey.jsonl --max-tasks 10 \
      --methods "$PK_METHODS" --output $OUT/adaptive_${MODEL}_retrieval_passkey.json
fi
$PY scripts/accuracy_adaptive_table.py "$MODEL" "$OUT"
