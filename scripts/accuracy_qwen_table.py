"""Render docs/accuracy.md's Qwen2.5-Coder-1.5B baseline tables from the JSON that scripts/accuracy_qwen.sh writes.

Usage: python scripts/accuracy_qwen_table.py [FOLDER]   (default docs/results/qwen_baselines); prints Markdown.
Every number comes from the JSON files; a missing file or method prints as "–".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FILES = {
    "prose": "perplexity_prose",
    "code": "perplexity_code",
    "agreement": "agreement_long",
    "pk1": "retrieval_passkey_1024",
    "pk2": "retrieval_passkey_2048",
}


def load(d: Path, name: str) -> dict:
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else {}


def fmt(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def passkey(r: dict | None) -> str:
    if not r:
        return "–"
    return f"{round(r['accuracy'] * r['tasks'])}/{r['tasks']}"


def sample_line(data: dict[str, dict]) -> str:
    """What was run: windows, prompts, tasks, commits, seconds, all from the JSON."""
    parts = []
    for key, label in (("prose", "prose"), ("code", "code")):
        j = data[key]
        if j:
            r = next(iter(j["results"].values()))
            parts.append(f"{label}: {j['settings']['max_windows']} windows ({r['tokens_scored']} scored tokens)")
    j = data["agreement"]
    if j:
        r = next(iter(j["results"].values()))
        n = j["settings"]["max_new_tokens"]
        parts.append(f"agreement: {r['tokens_compared'] // n} prompts x {n} tokens")
    for key, label in (("pk1", "passkey ~1k"), ("pk2", "passkey ~2k")):
        j = data[key]
        if j:
            r = next(iter(j["results"].values()))
            parts.append(f"{label}: {r['tasks']} tasks")
    commits = sorted({j["git_commit"] for j in data.values() if j})
    secs = sum(j.get("seconds", 0) for j in data.values() if j)
    return "; ".join(parts) + f". JSON commits: {', '.join(f'`{c}`' for c in commits)}; {secs / 60:.0f} min of runs."


def main_table(data: dict[str, dict]) -> str:
    res = {k: (j or {}).get("results", {}) for k, j in data.items()}
    methods = list(dict.fromkeys([*res["prose"], *res["code"], *res["agreement"], *res["pk1"], *res["pk2"]]))
    base = {c: (res[c].get("bf16") or {}).get("perplexity") for c in ("prose", "code")}
    head = ("| method | ppl prose (× bf16) | ppl code (× bf16) | top-1 agreement | KL | passkey ~1k | passkey ~2k | "
            "bytes/token | bits/value | measured ratio |")
    rows = [head, "|" + "---|" * 10]
    for m in methods:
        cells = [f"`{m}`"]
        for c in ("prose", "code"):
            r = res[c].get(m)
            cells.append(f"{r['perplexity']:.3f} ({r['perplexity'] / base[c]:.3f})" if r and base[c] else "–")
        a = res["agreement"].get(m, {})
        cells += [fmt(a.get("agreement")), fmt(a.get("kl"), ".4f"), passkey(res["pk1"].get(m)),
                  passkey(res["pk2"].get(m))]
        r = res["prose"].get(m) or res["code"].get(m) or {}
        cells += [fmt(r.get("bytes_per_token"), ".0f"), fmt(r.get("bits_per_value"), ".2f"),
                  fmt(r.get("compression_ratio"), ".2f") + ("×" if r else "")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ratio_table(data: dict[str, dict]) -> str:
    """Measured ratio per run: shorter prompts keep their incomplete last block / residual in bf16."""
    res = {k: (j or {}).get("results", {}) for k, j in data.items()}
    methods = list(dict.fromkeys([*res["prose"], *res["agreement"], *res["pk1"], *res["pk2"]]))
    cols = (("prose", "perplexity prose (1024-token contexts)"), ("code", "perplexity code"),
            ("agreement", "agreement prompts"), ("pk1", "passkey ~1k"), ("pk2", "passkey ~2k"))
    rows = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for m in methods:
        cells = []
        for k, _ in cols:
            r = res[k].get(m)
            cells.append(f"{r['compression_ratio']:.2f}× ({r['bytes_per_token']:.0f} B)" if r else "–")
        rows.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    d = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/qwen_baselines")
    data = {k: load(d, name) for k, name in FILES.items()}
    print(sample_line(data) + "\n")
    print(main_table(data))
    print("\nMeasured ratio (bytes per token) in each run:\n")
    print(ratio_table(data))


if __name__ == "__main__":
    main()
