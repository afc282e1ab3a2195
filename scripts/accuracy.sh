#!/usr/bin/env bash
# Regenerates every figure of docs/accuracy.md (JSON under docs/results/, the sweep plot under docs/).
# Run through `make accuracy` (which does the set-up first). Roughly 30 min on 2 idle CPU cores.
# The documented run used OMP_NUM_THREADS=1 and --threads 1 (the machine was shared); results are the same
# up to float32 summation order.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=docs/results
mkdir -p "$OUT"
ALL=bf16,int8,int4,int2,kivi4,kivi2,zipcache,zipcache-accum,zipcache-random,zipcache-quota,zipcache-paged,quanto-int4,quanto-int2

for corpus in prose code; do
  $PY -m zipcache_vllm.eval perplexity --text-file data/$corpus.txt --context-len 1024 --continuation-len 256 \
      --max-windows 6 --methods "$ALL" --output $OUT/perplexity_$corpus.json
done
# 12 passkey tasks at 512 tokens, needle depth spread 0..100 % (made by: python -m zipcache_vllm.eval.tasks
# passkey --n 12 --context-tokens 512 --seed 1 --output data/retrieval_passkey_n12.jsonl)
$PY -m zipcache_vllm.eval retrieval --tasks-file data/retrieval_passkey_n12.jsonl --methods "$ALL" \
    --output $OUT/retrieval_passkey.json
# the 7 prompts of >= 256 tokens (350-564): shorter prompts stay entirely in KIVI's / paged ZipCache's bf16 window
$PY -m zipcache_vllm.eval agreement --prompts-file data/agreement_prompts.jsonl --min-prompt-tokens 256 \
    --max-new-tokens 16 --methods "$ALL" --output $OUT/agreement.json
$PY -m zipcache_vllm.eval sweep --text-file data/prose.txt --max-windows 2 --ratios 0.2,0.6,1.0 \
    --families zipcache,zipcache-paged --baselines bf16,int4,int2,kivi2 --plot docs/sweep.png \
    --output $OUT/sweep_prose.json
# Ablations in the paged (vLLM) semantics and of the probe rules.
$PY -m zipcache_vllm.eval perplexity --text-file data/prose.txt --max-windows 2 --output $OUT/ablation_prose.json \
    --methods "zipcache-paged,zipcache-paged:key_scheme=cst,zipcache-paged:salient_ratio=0.8,value_salient_ratio=0.2,zipcache-paged:normalizer=probe_nnz,zipcache:normalizer=probe_nnz,zipcache-paged:block_size=16"
$PY scripts/accuracy_tables.py > $OUT/tables.md
echo "tables: $OUT/tables.md"
