#!/usr/bin/env bash
# The vLLM plugin's default preset (`vllm`: keys 0.8 / values 0.2 salient) against `paged` (r = 0.6 for both) and
# bf16, on the same windows, tasks and prompts as docs/accuracy.md. Writes docs/results/vllm_preset_*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=docs/results
M=bf16,zipcache-paged,zipcache-vllm
for corpus in prose code; do
  $PY -m zipcache_vllm.eval perplexity --threads 1 --text-file data/$corpus.txt --context-len 1024 \
      --continuation-len 256 --max-windows 6 --methods $M --output $OUT/vllm_preset_perplexity_$corpus.json
done
$PY -m zipcache_vllm.eval retrieval --threads 1 --tasks-file data/retrieval_passkey_n12.jsonl --methods $M \
    --output $OUT/vllm_preset_retrieval_passkey.json
$PY -m zipcache_vllm.eval agreement --threads 1 --prompts-file data/agreement_prompts.jsonl --min-prompt-tokens 256 \
    --max-new-tokens 16 --methods $M --output $OUT/vllm_preset_agreement.json
# The table of docs/accuracy.md, "The plugin's preset"
$PY - <<'PY'
import json
r = {k: json.load(open(f"docs/results/vllm_preset_{k}.json"))["results"]
     for k in ("perplexity_prose", "perplexity_code", "retrieval_passkey", "agreement")}
print("| method | prose ppl (× bf16) | code ppl (× bf16) | agreement | KL | passkey | measured ratio |")
print("|---|---|---|---|---|---|---|")
for m in ("bf16", "zipcache-paged", "zipcache-vllm"):
    p, c = r["perplexity_prose"], r["perplexity_code"]
    a, t = r["agreement"][m], r["retrieval_passkey"][m]
    print(f"| `{m}` | {p[m]['perplexity']:.3f} ({p[m]['perplexity'] / p['bf16']['perplexity']:.3f}) | "
          f"{c[m]['perplexity']:.3f} ({c[m]['perplexity'] / c['bf16']['perplexity']:.3f}) | {a['agreement']:.3f} | "
          f"{a['kl']:.4f} | {round(t['accuracy'] * t['tasks'])}/{t['tasks']} | {p[m]['compression_ratio']:.2f}× |")
PY
