"""Pareto plot of docs/accuracy.md: perplexity (× bf16) against measured compression, both models, both corpora.

Usage: python scripts/pareto_plot.py [--output docs/images/pareto_accuracy.png]

Every point is read from the perplexity JSON files below (none is typed in); a file that is missing is skipped.
Each file's rows are divided by the same file's ``bf16`` row (same windows). Per panel, the *primary* files
share one window sample and their points form the Pareto front (no other point has both a higher measured
ratio and a lower perplexity); files of another sample (``extra``: the 6-window Qwen run) are drawn hollow and
left out of the front. A method already plotted from an earlier file of the same sample is not drawn twice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

R = Path("docs/results")
SOURCES = {
    "SmolLM2-135M (hd 64, 6 windows of 1024 + 256, fp32)": {
        "primary": [R / "perplexity_{c}.json", R / "adaptive_smollm2-135m_perplexity_{c}.json",
                    R / "compact/adaptive_smollm2-135m_perplexity_{c}.json"],
        "extra": [],
    },
    "Qwen2.5-Coder-1.5B (hd 128, 2 windows of 1024 + 128, bf16)": {
        "primary": [R / "qwen_baselines/perplexity_{c}.json", R / "adaptive_qwen2.5-coder-1.5b_perplexity_{c}.json"],
        "extra": [R / "qwen_6windows_v2/adaptive_qwen2.5-coder-1.5b_perplexity_{c}.json",
                  R / "compact/adaptive_qwen2.5-coder-1.5b_perplexity_{c}.json"],
    },
}
CORPORA = ("prose", "code")
COLLAPSED = 1.5


def family(method: str) -> str:
    m = method.split(":")[0]
    if "value_rotation=true" in method:
        return "zipcache, values rotated"
    if m == "bf16":
        return "bf16"
    if m.startswith(("int", "quanto")):
        return "per-token int / quanto"
    if m.startswith("kivi"):
        return "KIVI"
    if m in ("zipcache-vllm", "zipcache-adaptive"):
        return m
    return "zipcache (harness variants)"


COLORS = {"bf16": "black", "per-token int / quanto": "tab:gray", "KIVI": "tab:blue",
          "zipcache (harness variants)": "tab:orange", "zipcache-vllm": "tab:red", "zipcache-adaptive": "tab:green",
          "zipcache, values rotated": "tab:brown"}


def points(files: list[Path], corpus: str) -> list[dict]:
    out, seen = [], set()
    for pattern in files:
        p = Path(str(pattern).format(c=corpus))
        if not p.exists():
            continue
        j = json.loads(p.read_text())
        res = j["results"]
        base = (res.get("bf16") or {}).get("perplexity")
        if not base:
            continue
        w = j["settings"].get("max_windows")
        for m, r in res.items():
            if m in seen:
                continue
            seen.add(m)
            out.append({"method": m, "ratio": r["compression_ratio"], "rel": r["perplexity"] / base,
                        "windows": w, "file": p.name})
    return out


def pareto(pts: list[dict]) -> list[dict]:
    """Points not dominated (another point at >= ratio and <= perplexity, one of them strictly)."""
    front = [p for p in pts if not any(
        q["ratio"] >= p["ratio"] and q["rel"] <= p["rel"] and (q["ratio"] > p["ratio"] or q["rel"] < p["rel"])
        for q in pts)]
    return sorted(front, key=lambda p: p["ratio"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default="docs/images/pareto_accuracy.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SOURCES), len(CORPORA), figsize=(14, 11), squeeze=False)
    for row, (model, src) in enumerate(SOURCES.items()):
        for col, corpus in enumerate(CORPORA):
            ax = axes[row][col]
            prim, extra = points(src["primary"], corpus), points(src["extra"], corpus)
            front = pareto(prim)
            # collapsed methods (>= COLLAPSED x bf16) are drawn at the top edge with their value, so that the
            # axis resolves the rest
            kept = [p["rel"] for p in prim + extra if p["rel"] < COLLAPSED] or [1.0]
            top = max(kept) + 0.15 * (max(kept) - min(kept) + 0.01)
            if front:
                ax.step([p["ratio"] for p in front], [min(p["rel"], top) for p in front], where="pre",
                        color="tab:purple", alpha=0.35, lw=4, label="Pareto front")
            off = 0  # staggers the labels of off-scale points
            for pts, hollow in ((prim, False), (extra, True)):
                for p in pts:
                    if hollow and p["method"] == "bf16":
                        continue  # (1, 1) by definition; would hide the primary bf16 point
                    c = COLORS[family(p["method"])]
                    y = min(p["rel"], top)
                    ax.scatter(p["ratio"], y, s=36, marker=("^" if p["rel"] >= COLLAPSED else "s" if hollow else "o"),
                               facecolors="none" if hollow else c, edgecolors=c, zorder=3, clip_on=False)
                    label = p["method"].replace("value_salient_ratio", "vsr").replace("salient_ratio", "sr")
                    if hollow:
                        label += f" ({p['windows']} w)"
                    dy = 2
                    if p["rel"] >= COLLAPSED:
                        label += f" ×{p['rel']:.1f} (off scale)"
                        off += 1
                        dy = -8 * off
                    ax.annotate(label, (p["ratio"], y), fontsize=6, xytext=(3, dy),
                                textcoords="offset points", color=c)
            ax.set_ylim(top=top * 1.002)
            ax.set_title(f"{model}\n{corpus}", fontsize=9)
            ax.set_xlabel("measured compression vs bf16 cache (×, stored bytes per token)")
            ax.set_ylabel(f"perplexity × bf16 (▲: ≥ {COLLAPSED} × bf16, off scale)")
            ax.grid(True, which="both", alpha=0.3)
            if not prim:
                ax.text(0.5, 0.5, "no JSON", transform=ax.transAxes, ha="center")
            for f, c in COLORS.items():
                ax.scatter([], [], color=c, label=f)
            if extra:
                ax.scatter([], [], marker="s", facecolors="none", edgecolors="gray",
                           label=f"other window sample ({extra[0]['windows']} w), not in front")
            ax.legend(fontsize=6, loc="upper left")
            print(f"{model} / {corpus}: front = " + ", ".join(f"{p['method']} ({p['ratio']:.2f}×, {p['rel']:.3f})"
                                                            for p in front))
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=130)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
