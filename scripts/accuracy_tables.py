"""Render the tables of docs/accuracy.md from the JSON files that scripts/accuracy.sh writes.

Usage: python scripts/accuracy_tables.py [RESULTS_DIR]   (default docs/results); prints Markdown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(d: Path, name: str) -> dict:
    p = d / f"{name}.json"
    return json.loads(p.read_text())["results"] if p.exists() else {}


def fmt(v, spec=".3f") -> str:
    return "–" if v is None else format(v, spec)


def main_table(d: Path) -> str:
    ppl = {c: load(d, f"perplexity_{c}") for c in ("prose", "code")}
    agr = load(d, "agreement")
    ret = {k: load(d, f"retrieval_{k}") for k in ("passkey",)}
    methods = list(ppl["prose"] or ppl["code"] or agr)
    base = {c: (ppl[c].get("bf16") or {}).get("perplexity") for c in ppl}
    head = ("| method | ppl prose (× bf16) | ppl code (× bf16) | top-1 agreement | KL | passkey acc | "
            "bytes/token | bits/value | measured ratio | ZC-4 ratio |")
    rows = [head, "|" + "---|" * 10]
    for m in methods:
        cells = [f"`{m}`"]
        for c in ("prose", "code"):
            r = ppl[c].get(m)
            if r and base[c]:
                cells.append(f"{r['perplexity']:.3f} ({r['perplexity'] / base[c]:.3f})")
            else:
                cells.append("–")
        a = agr.get(m, {})
        cells += [fmt(a.get("agreement")), fmt(a.get("kl"), ".4f")]
        cells += [fmt(ret[k].get(m, {}).get("accuracy"), ".2f") for k in ("passkey",)]
        r = ppl["prose"].get(m) or {}
        cells += [fmt(r.get("bytes_per_token"), ".0f"), fmt(r.get("bits_per_value"), ".2f"),
                  fmt(r.get("compression_ratio"), ".2f") + "×", fmt(r.get("paper_ratio"), ".2f")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def bytes_table(d: Path) -> str:
    """Where the bytes go (prose run, context of 1024 tokens)."""
    res = load(d, "perplexity_prose")
    rows = ["| method | compressed B/token | bf16 window B/token | saliency scores B/token | total |",
            "|---|---|---|---|---|"]
    for m, r in res.items():
        b = r.get("bytes_breakdown_per_token", {})
        rows.append(f"| `{m}` | {b.get('compressed', 0):.0f} | {b.get('window', 0):.0f} | "
                    f"{b.get('saliency', 0):.0f} | {b.get('total', 0):.0f} |")
    return "\n".join(rows)


def simple_table(d: Path, name: str, base: float | None = None) -> str:
    res = load(d, name)
    if not res:
        return f"(no {name}.json)"
    base = base or (res.get("bf16") or {}).get("perplexity")
    rows = ["| method | perplexity | × bf16 | bits/value | measured ratio |", "|---|---|---|---|---|"]
    for m, r in res.items():
        rel = f"{r['perplexity'] / base:.3f}" if base else "–"
        rows.append(f"| `{m}` | {r['perplexity']:.3f} | {rel} | {r['bits_per_value']:.2f} | "
                    f"{r['compression_ratio']:.2f}× |")
    return "\n".join(rows)


def main() -> None:
    d = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results")
    print("## Main table\n")
    print(main_table(d))
    print("\n## Bytes per token (prose, 1,024-token context)\n")
    print(bytes_table(d))
    print("\n## Ablations (prose; × bf16 uses the sweep's bf16 row, the same 2 windows)\n")
    print(simple_table(d, "ablation_prose", base=(load(d, "sweep_prose").get("bf16") or {}).get("perplexity")))
    print("\n## Sweep (prose)\n")
    print(simple_table(d, "sweep_prose"))


if __name__ == "__main__":
    main()
