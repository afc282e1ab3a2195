"""The adaptive-split table of docs/accuracy.md from docs/results/adaptive_<model>_*.json (no typed numbers).

Usage: python scripts/accuracy_adaptive_table.py MODEL [RESULTS_DIR]. RESULTS_DIR defaults to docs/results (the
block rule runs); docs/results/pre_block_rule holds the runs made before the block probe rule and block attention.
"""

import json
import sys
from pathlib import Path

model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
root = Path(__file__).resolve().parents[1]
res = Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else root / "docs" / "results"


def load(kind):
    p = res / f"adaptive_{model}_{kind}.json"
    return json.loads(p.read_text())["results"] if p.exists() else None


prose, code = load("perplexity_prose"), load("perplexity_code")
agree, agree_long, passkey = load("agreement"), load("agreement_long"), load("retrieval_passkey")
ROWS = {"bf16": "bf16", "zipcache-vllm": "128 (96/32) fixed", "zipcache-adaptive": "128 per layer",
        "zipcache-vllm:value_salient_ratio=0.125": "112 (96/16) fixed",
        "zipcache-vllm:salient_ratio=0.625": "112 (80/32) fixed",
        "zipcache-adaptive:value_salient_ratio=0.125": "112 per layer"}
head = "| method | salient rows (K/V) | prose ppl (× bf16) | code ppl (× bf16) |"
sep = "|---|---|---|---|"
for name, r in (("agreement", agree), ("long prompts", agree_long)):
    if r:
        head += f" agreement / KL ({name}) |"
        sep += "---|"
if passkey:
    head += " passkey |"
    sep += "---|"
head += " measured ratio |"
sep += "---|"
print(head)
print(sep)
for m, label in ROWS.items():
    p, c = prose[m], code[m]
    line = (f"| `{m}` | {label} | {p['perplexity']:.3f} ({p['perplexity'] / prose['bf16']['perplexity']:.3f}) | "
            f"{c['perplexity']:.3f} ({c['perplexity'] / code['bf16']['perplexity']:.3f}) |")
    for r in (agree, agree_long):
        if r:
            line += f" {r[m]['agreement']:.3f} / {r[m]['kl']:.4f} |"
    if passkey:  # a passkey run may cover only some of the methods (Qwen: bf16 and the two 128-row presets)
        k = passkey.get(m)
        line += f" {round(k['accuracy'] * k['tasks'])}/{k['tasks']} |" if k else " – |"
    line += f" {p['compression_ratio']:.2f}× |"
    print(line)

# the calibration behind the split (configs/calibration/adaptive.json)
cal = json.loads((root / "configs" / "calibration" / "adaptive.json").read_text())
print()
print("| model shape | salient rows | key rows per layer (values: the rest) | attention-output error: fixed / "
      "per layer / per KV head | calibration windows |")
print("|---|---|---|---|---|")
for shape, entry in cal["models"].items():
    if entry["model"] != model:
        continue
    for rows, b in sorted(entry["budgets"].items(), key=lambda kv: -int(kv[0])):
        wins = ", ".join(f"{w['file']} {w['window']}/{w['of']}" for w in b["windows"])
        print(f"| {shape} | {rows} | {' '.join(str(r) for r in b['key_rows'])} | {b['error_fixed']:.3f} "
              f"({b['fixed_key_rows']}/{int(rows) - b['fixed_key_rows']}) / {b['error_adaptive']:.3f} / "
              f"{b['error_per_head']:.3f} | {wins} |")
