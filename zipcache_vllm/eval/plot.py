"""Plots of the evaluation harness (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_sweep(results: dict, path: str, title: str = "") -> None:
    """Perplexity vs measured compression ratio: one line per ZipCache family, one point per baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    families: dict[str, list] = {}
    for spec, r in results.items():
        name = spec.split(":")[0]
        if name.startswith("zipcache"):
            ratio = r["settings"].get("salient_ratio")
            families.setdefault(name, []).append((r["compression_ratio"], r["perplexity"], ratio))
    for name, pts in families.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} (labels: salient_ratio)")
        for x, y, r in pts:
            ax.annotate(f"{r:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for spec, r in results.items():
        if not spec.startswith("zipcache"):
            ax.scatter([r["compression_ratio"]], [r["perplexity"]], marker="s", zorder=3)
            ax.annotate(spec, (r["compression_ratio"], r["perplexity"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=8)
    bf16 = next((r["perplexity"] for s, r in results.items() if s == "bf16"), None)
    if bf16:
        ax.axhline(bf16, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("measured compression ratio vs bf16 (stored bytes)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
