#!/usr/bin/env bash
# Noise of the layout v2 comparison (scripts/accuracy_layout_v2.sh). Rounding the quotas changes which tokens
# are salient; so does the seed of the random probe rows (probe_seed). This runs the same four measures (same
# windows, tasks, prompts and flags) with probe_seed 1 and 2 for `zipcache-paged` and `zipcache-vllm`, at layout
# v1 (a temporary git worktree at V1, default 5dd56a4^ = the commit just before v2) and at v2 (this checkout),
# plus seed 0 at V1 (does the v1 table of docs/accuracy.md reproduce on the code just before v2?). Seed 0 at v2 is
# docs/results/layout_v2_*.json. Writes docs/results/layout_v2_noise_{v1,v2}_*.json and prints the table of
# docs/accuracy.md, "Layout v2", noise (also to docs/results/layout_v2_noise_table.md). About 25 min, 1 thread.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
V1=${V1:-5dd56a4^}
OUT=$ROOT/docs/results
SEEDS=zipcache-paged:probe_seed=1,zipcache-paged:probe_seed=2,zipcache-vllm:probe_seed=1,zipcache-vllm:probe_seed=2
TMP=$(mktemp -d)
git worktree add -q --detach "$TMP/v1" "$V1"
trap 'git -C "$ROOT" worktree remove --force "$TMP/v1"; rmdir "$TMP"' EXIT

measure() {  # directory, output tag, methods
  (
    cd "$1"  # python -m imports zipcache_vllm from the current directory: that checkout's code
    for corpus in prose code; do
      $PY -m zipcache_vllm.eval perplexity --threads 1 --text-file data/$corpus.txt --context-len 1024 \
          --continuation-len 256 --max-windows 6 --methods "$3" --output "$OUT/layout_v2_noise_$2_perplexity_$corpus.json"
    done
    $PY -m zipcache_vllm.eval retrieval --threads 1 --tasks-file data/retrieval_passkey_n12.jsonl --methods "$3" \
        --output "$OUT/layout_v2_noise_$2_retrieval_passkey.json"
    $PY -m zipcache_vllm.eval agreement --threads 1 --prompts-file data/agreement_prompts.jsonl \
        --min-prompt-tokens 256 --max-new-tokens 16 --methods "$3" --output "$OUT/layout_v2_noise_$2_agreement.json"
  )
}
measure "$TMP/v1" v1 "zipcache-paged,zipcache-vllm,$SEEDS"
measure "$ROOT" v2 "$SEEDS"

$PY - <<'PY' | tee "$OUT/layout_v2_noise_table.md"
import json
import statistics

KINDS = ("perplexity_prose", "perplexity_code", "retrieval_passkey", "agreement")


def load(prefix):
    data = {k: json.load(open(f"docs/results/{prefix}_{k}.json")) for k in KINDS}
    return {k: d["results"] for k, d in data.items()}, "/".join(sorted({d["git_commit"] for d in data.values()}))


def cells(r, m):
    p, c, t, a = (r[k][m] for k in KINDS)
    return {"prose": p["perplexity"], "code": c["perplexity"], "agreement": a["agreement"], "kl": a["kl"],
            "passkey": round(t["accuracy"] * t["tasks"])}


doc_v1, doc_commit = load("vllm_preset")  # the v1 table of docs/accuracy.md
v1, v1_commit = load("layout_v2_noise_v1")
v2s, v2s_commit = load("layout_v2_noise_v2")
v2, v2_commit = load("layout_v2")  # seed 0
FMT = {"prose": ".3f", "code": ".3f", "agreement": ".3f", "kl": ".4f", "passkey": "d"}


def line(m, label, x):
    return f"| `{m}` | {label} | " + " | ".join(format(x[k], FMT[k]) for k in FMT) + " |"


print("| method | layout, probe seed (commit) | prose ppl | code ppl | agreement | KL | passkey /12 |")
print("|---|---|---|---|---|---|---|")
summary = []
for m in ("zipcache-paged", "zipcache-vllm"):
    print(line(m, f"v1, 0 (docs table, {doc_commit})", cells(doc_v1, m)))
    runs = {"v1": [cells(v1, m)], "v2": [cells(v2, m)]}
    print(line(m, f"v1, 0 ({v1_commit})", runs["v1"][0]))
    for s in (1, 2):
        runs["v1"].append(cells(v1, f"{m}:probe_seed={s}"))
        print(line(m, f"v1, {s} ({v1_commit})", runs["v1"][-1]))
    print(line(m, f"v2, 0 ({v2_commit})", runs["v2"][0]))
    for s in (1, 2):
        runs["v2"].append(cells(v2s, f"{m}:probe_seed={s}"))
        print(line(m, f"v2, {s} ({v2s_commit})", runs["v2"][-1]))
    summary.append((m, runs))

print()
print("| method | measure | v1 seeds 0-2: mean (min..max) | v2 seeds 0-2: mean (min..max) | v2 - v1, mean | "
      "seed spread (max - min) v1 / v2 |")
print("|---|---|---|---|---|---|")
for m, runs in summary:
    for k in FMT:
        f = ".4f" if k == "kl" else ".3f" if k != "passkey" else ".2f"
        a, b = [x[k] for x in runs["v1"]], [x[k] for x in runs["v2"]]
        print(f"| `{m}` | {k} | {statistics.mean(a):{f}} ({min(a):{f}}..{max(a):{f}}) | "
              f"{statistics.mean(b):{f}} ({min(b):{f}}..{max(b):{f}}) | {statistics.mean(b) - statistics.mean(a):+{f}} | "
              f"{max(a) - min(a):{f}} / {max(b) - min(b):{f}} |")
PY
