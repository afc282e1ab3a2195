#!/usr/bin/env bash
# Regenerates every figure of docs/accuracy.md (JSON under docs/results/, the sweep plot under docs/).
# Run through `make accuracy` (which does the set-up first). About an hour on 2 CPU cores.
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
$PY -m zipcache_vllm.eval agreement --prompts-file data/agreement_prompts.jsonl --max-new-tokens 32 \
    --methods "$ALL" --output $OUT/agreement.json
for kind in passkey fact; do
  if [ -f data/retrieval_$kind.jsonl ]; then
    $PY -m zipcache_vllm.eval retrieval --tasks-file data/retrieval_$kind.jsonl --methods "$ALL" \
        --output $OUT/retrieval_$kind.json
  fi
done
# Ablations: key scheme and separate K/V salient ratios in the paged (vLLM) semantics.
$PY -m zipcache_vllm.eval perplexity --text-file data/prose.txt --max-windows 6 --output $OUT/ablation_prose.json \
    --methods "zipcache-paged,zipcache-paged:key_scheme=cst,zipcache-paged:salient_ratio=0.8,value_salient_ratio=0.2,zipcache-paged:normalizer=probe_nnz,zipcache:normalizer=probe_nnz,zipcache:probe_compat=true,zipcache-paged:block_size=16"
$PY -m zipcache_vllm.eval sweep --text-file data/prose.txt --max-windows 3 --plot docs/sweep.png \
    --output $OUT/sweep_prose.json
$PY scripts/accuracy_tables.py > docs/results/tables.md
echo "tables: docs/results/tables.md"
