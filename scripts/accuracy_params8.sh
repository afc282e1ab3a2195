#!/usr/bin/env bash
# One-byte quantization parameters (method/params8.py, ZipCacheConfig.param_bits = 8), measured in the harness
# against the fp16 parameters of the same presets, on the bundled SmolLM2 (the windows of docs/accuracy.md's
# preset tables). Writes docs/results/params8_smollm2-135m_perplexity_{prose,code}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
M="bf16,zipcache-vllm,zipcache-vllm:param_bits=8,zipcache-adaptive:param_bits=8"
M="$M,zipcache-adaptive:value_salient_ratio=0.125,param_bits=8"
for corpus in prose code; do
  $PY -m zipcache_vllm.eval perplexity --threads 1 --text-file data/$corpus.txt --context-len 1024 \
      --continuation-len 256 --max-windows "${WINDOWS:-6}" --methods "$M" \
      --output docs/results/params8_smollm2-135m_perplexity_$corpus.json
done
$PY - <<'PY'
import json
r = {c: json.load(open(f"docs/results/params8_smollm2-135m_perplexity_{c}.json"))["results"] for c in ("prose", "code")}
print("| method | prose ppl (× bf16) | code ppl (× bf16) | bytes/token | measured ratio |")
print("|---|---|---|---|---|")
for m in r["prose"]:
    p, c = r["prose"][m], r["code"][m]
    bp, bc = r["prose"]["bf16"]["perplexity"], r["code"]["bf16"]["perplexity"]
    print(f"| `{m}` | {p['perplexity']:.3f} ({p['perplexity'] / bp:.3f}) | {c['perplexity']:.3f} "
          f"({c['perplexity'] / bc:.3f}) | {p['bytes_per_token']:.0f} | {p['compression_ratio']:.2f}× |")
PY
