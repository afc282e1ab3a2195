"""The adaptive-split tables of docs/accuracy.md from docs/results/adaptive_<model>_*.json (no typed numbers).

Usage: python scripts/accuracy_adaptive_table.py MODEL [RESULTS_DIR] [--before BEFORE_DIR]. RESULTS_DIR defaults
to docs/results (the block rule runs); docs/results/pre_block_rule holds the runs made before the block probe
rule and block attention, docs/results/pre_recalibration the block-rule runs with the split calibrated under the
old rule (and that calibration, adaptive.json). With --before, a before -> after table of the methods both
folders hold follows.
"""

import argparse
import json
from pathlib import Path

root = Path(__file__).resolve().parents[1]
ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default="smollm2-135m")
ap.add_argument("results", nargs="?", default=str(root / "docs" / "results"))
ap.add_argument("--before", help="a second results folder (e.g. docs/results/pre_block_rule) to compare with")
args = ap.parse_args()
model = args.model
KINDS = ("perplexity_prose", "perplexity_code", "agreement", "agreement_long", "retrieval_passkey")


def load_all(folder):
    out = {}
    for kind in KINDS:
        p = Path(folder) / f"adaptive_{model}_{kind}.json"
        out[kind] = json.loads(p.read_text())["results"] if p.exists() else None
    return out


R = load_all(args.results)
prose, code = R["perplexity_prose"], R["perplexity_code"]
agree, agree_long, passkey = R["agreement"], R["agreement_long"], R["retrieval_passkey"]
ROWS = {"bf16": "bf16", "zipcache-vllm": "128 (96/32) fixed", "zipcache-adaptive": "128 per layer",
        "zipcache-vllm:value_salient_ratio=0.125": "112 (96/16) fixed",
        "zipcache-vllm:salient_ratio=0.625": "112 (80/32) fixed",
        "zipcache-adaptive:value_salient_ratio=0.125": "112 per layer",
        "zipcache-vllm:param_bits=8": "128 (96/32) fixed, one-byte parameters",
        "zipcache-adaptive:param_bits=8": "128 per layer, one-byte parameters",
        "zipcache-adaptive:value_rotation=true": "128 per layer, values rotated",
        "zipcache-adaptive:param_bits=8,value_rotation=true": "128 per layer, one-byte parameters, values rotated "
                                                              "(`compact`)"}


def passkey_cell(pk, m):
    # a passkey run may cover only some of the methods (Qwen: bf16 and the two 128-row presets)
    k = pk.get(m) if pk else None
    return f"{round(k['accuracy'] * k['tasks'])}/{k['tasks']}" if k else "–"


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
    if m not in prose:  # a run of some of the methods (METHODS=... bash scripts/accuracy_adaptive.sh)
        continue
    p, c = prose[m], code[m]
    line = (f"| `{m}` | {label} | {p['perplexity']:.3f} ({p['perplexity'] / prose['bf16']['perplexity']:.3f}) | "
            f"{c['perplexity']:.3f} ({c['perplexity'] / code['bf16']['perplexity']:.3f}) |")
    for r in (agree, agree_long):
        if r:
            line += f" {r[m]['agreement']:.3f} / {r[m]['kl']:.4f} |" if m in r else " – |"
    if passkey:
        line += f" {passkey_cell(passkey, m)} |"
    line += f" {p['compression_ratio']:.2f}× |"
    print(line)

# the calibration behind the split (configs/calibration/adaptive.json; with --before, also the folder's own
# adaptive.json if it keeps one: the split its adaptive rows ran with)
cals = [("", root / "configs" / "calibration" / "adaptive.json")]
if args.before and (Path(args.before) / "adaptive.json").exists():
    cals = [("before: ", Path(args.before) / "adaptive.json"), ("after: ", cals[0][1])]
print()
print("| calibration | model shape | salient rows | key rows per layer (values: the rest) | attention-output error: "
      "fixed / per layer / per KV head | calibration windows |")
print("|---|---|---|---|---|---|")
for tag, path in cals:
    cal = json.loads(path.read_text())
    for shape, entry in cal["models"].items():
        if entry["model"] != model:
            continue
        for rows, b in sorted(entry["budgets"].items(), key=lambda kv: -int(kv[0])):
            wins = ", ".join(f"{w['file']} {w['window']}/{w['of']}" for w in b["windows"])
            print(f"| {tag}`{b.get('commit')}` | {shape} | {rows} | {' '.join(str(r) for r in b['key_rows'])} | "
                  f"{b['error_fixed']:.3f} ({b['fixed_key_rows']}/{int(rows) - b['fixed_key_rows']}) / "
                  f"{b['error_adaptive']:.3f} / {b['error_per_head']:.3f} | {wins} |")

if args.before:
    B = load_all(args.before)

    def ppl(res, kind, m):
        r = res[kind]
        return f"{r[m]['perplexity'] / r['bf16']['perplexity']:.3f}" if r and m in r else "–"

    def agr(res, kind, m):
        r = res[kind]
        return f"{r[m]['agreement']:.3f} / {r[m]['kl']:.4f}" if r and m in r else "–"

    cols = [("prose ppl × bf16", ppl, "perplexity_prose"), ("code ppl × bf16", ppl, "perplexity_code")]
    cols += [(f"agreement / KL ({name})", agr, kind) for name, kind in
             (("agreement", "agreement"), ("long prompts", "agreement_long")) if R[kind] or B[kind]]
    if R["retrieval_passkey"] or B["retrieval_passkey"]:
        cols.append(("passkey", lambda res, kind, m: passkey_cell(res[kind], m), "retrieval_passkey"))
    print()
    print("| method | " + " | ".join(f"{name}: before → after" for name, _, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for m in ROWS:
        if m == "bf16" or m not in prose:
            continue
        print(f"| `{m}` | " + " | ".join(f"{f(B, kind, m)} → {f(R, kind, m)}" for _, f, kind in cols) + " |")
