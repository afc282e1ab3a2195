#!/usr/bin/env bash
# Issue 13 item 1: the accuracy of the block probe rule and of block attention, against the code before them.
# Runs the commands of scripts/accuracy_layout_v2.sh (6 windows per corpus, 12 passkey tasks, the 7 prompts of
# >= 256 tokens x 16 tokens, --threads 1) on the source of COMMIT (a `git archive` in a temporary folder, put
# first on PYTHONPATH; this checkout's .venv), writing docs/results/block_rule_<LABEL>_*.json:
#
#   bash scripts/accuracy_block_rule.sh 71fb25c before   # the chunk's probes over the whole prefix (old rule)
#   bash scripts/accuracy_block_rule.sh 42e84fc A        # block probe rule, prompt attended in bf16
#   bash scripts/accuracy_block_rule.sh d227ef5 B        # block probe rule + block attention (the plugin's)
#
# Extra methods via METHODS (default zipcache-paged,zipcache-vllm); run A also had
# zipcache-paged:normalizer=probe_nnz,zipcache-vllm:normalizer=probe_nnz. ~6 min per method on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMIT=${1:?commit}
LABEL=${2:?label}
PY=${PY:-$PWD/.venv/bin/python}
M=${METHODS:-zipcache-paged,zipcache-vllm}
OUT=$PWD/docs/results
SRC=$(mktemp -d)
git archive "$COMMIT" | tar -x -C "$SRC"
cd "$SRC"
export PYTHONPATH=$SRC
for corpus in prose code; do
  $PY -m zipcache_vllm.eval perplexity --threads 1 --text-file data/$corpus.txt --context-len 1024 \
      --continuation-len 256 --max-windows 6 --methods $M --output $OUT/block_rule_${LABEL}_perplexity_$corpus.json
done
$PY -m zipcache_vllm.eval retrieval --threads 1 --tasks-file data/retrieval_passkey_n12.jsonl --methods $M \
    --output $OUT/block_rule_${LABEL}_retrieval_passkey.json
$PY -m zipcache_vllm.eval agreement --threads 1 --prompts-file data/agreement_prompts.jsonl --min-prompt-tokens 256 \
    --max-new-tokens 16 --methods $M --output $OUT/block_rule_${LABEL}_agreement.json
rm -rf "$SRC"
