"""``kernels/compress_store`` on one GPU: the compression of a prompt's complete blocks, with given scores and
with the blocks scored by their probes inside the kernel, per (rows per tile, ``num_warps``), against a copy of the
same bf16 keys and values (the memory floor), the standalone probe-score kernel and, optionally, an earlier
version of the kernel loaded from a file (and, with ``--programs 2``, each config also at 2 programs per block and
head: ``compress_store``'s ``programs``), side by side in one run.

    git show 79a671a:kernels/compress_store.py > kernels/_compress_store_base.py   # optional baseline
    git show 79a671a:kernels/block_scores.py > kernels/_block_scores_base.py       # (--baseline-scores)
    PYTHONPATH=. python benchmarks/bench_compress.py --baseline kernels/_compress_store_base.py \\
        --commit $(git rev-parse --short HEAD) --out benchmarks/results/h200_compress.json

LLaMA3-8B KV geometry (8 KV heads, head size 128), the ``vllm`` preset (block 128), a prompt of ``--contexts``
tokens: ``context / 128`` blocks x 8 heads pages. Times: median of CUDA-graph replays (``_timing.graph_time_us``).
``gbps`` counts the bf16 keys and values read plus the page bytes written.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import sys

import torch

from benchmarks._timing import graph_time_us
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.engine.ops import kernel_module
from zipcache_vllm.method import saliency
from zipcache_vllm.method.config import ZipCacheConfig

H, HQ, D = 8, 32, 128


def load_kernel_file(path: str, name: str = "_compress_store_base"):
    """The kernel file ``path`` (e.g. an earlier commit's) as module ``zipcache_vllm.kernels.<name>``, so that its
    relative imports resolve (also used by ``sass_compress.py``)."""
    spec = importlib.util.spec_from_file_location(f"zipcache_vllm.kernels.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prompt_inputs(context: int) -> tuple:
    """``(layout, key, value, probe_offsets, probe_query, block_ids, kv_cache)`` of a ``context``-token prompt's
    complete blocks: the ``vllm`` page, LLaMA3-8B heads, channels of different ranges, seeded."""
    layout = PageLayout.from_config(ZipCacheConfig.load("vllm", block_size=128), D)
    n = layout.block_size
    nb = context // n
    g = torch.Generator(device="cuda").manual_seed(0)
    k = (torch.randn(nb * n, H, D, device="cuda", generator=g) * torch.linspace(0.5, 3, D, device="cuda")).bfloat16()
    v = torch.randn(nb * n, H, D, device="cuda", generator=g).bfloat16()
    cfg = ZipCacheConfig(block_size=n)  # the presets' probe shares (5 % + 5 %)
    offsets = torch.stack([saliency.block_probe_offsets(cfg, n, i) for i in range(nb)]).int().cuda()
    pq = torch.randn(nb, offsets.shape[1], HQ, D, device="cuda", generator=g).bfloat16()
    ids = torch.arange(1, nb + 1, device="cuda", dtype=torch.int32)
    cache = torch.zeros(nb + 1, H, layout.page_bytes, dtype=torch.uint8, device="cuda")
    return layout, k, v, offsets, pq, ids, cache


def prompt_scorer(layout, k, pq, offsets, module=None):
    """The engine step's first launch for a prompt's blocks (``prompt_inputs``): ``(scores, score)``, where
    ``score(num_warps=None)`` runs ``block_probe_scores`` (of ``module``, default the package's kernel) into
    ``scores`` fp32 ``[num_blocks * block_size, num_kv_heads]``, the layout ``compress_store`` takes."""
    n, h, d = layout.block_size, k.shape[1], k.shape[2]
    nb = k.shape[0] // n
    scores = torch.empty(nb, n, h, device=k.device)
    src = torch.arange(nb, device=k.device, dtype=torch.int32)
    mod = module or kernel_module("block_scores")

    def score(num_warps=None):
        mod.block_probe_scores(k.view(nb, n, h, d), pq, offsets, src, scores, num_warps=num_warps)

    return scores.view(nb * n, h), score


def case(context: int, configs: list[tuple[int, int]], current, base, reps: int,  # noqa: PLR0915
         base_scores=None, programs=()) -> dict:
    """One prompt of ``context`` tokens: given scores and probe scoring in the kernel, per (rows per tile,
    num_warps) config, against the standalone probe-score kernel + the baseline compress (when given), and the
    probe-score kernel against a baseline one (``base_scores``, when given); ``programs``: each config also with
    that many programs per (block, KV head) (records ``programs_time_us`` / ``programs_fused_time_us`` by count;
    ``split_kv_time_us`` before 2026-12-06 was count 2; the joint passes of a5ee8d7 and the hand-off of 56b69e9
    were timed here too, and dropped: docs/performance.md).
    """
    layout, k, v, offsets, pq, ids, cache = prompt_inputs(context)
    n = layout.block_size
    nb = context // n
    moved = 2 * k.numel() * 2 + nb * H * layout.page_bytes
    rec = {"kernel": "compress_store", "context": context, "blocks": nb, "num_kv_heads": H, "num_heads": HQ,
           "head_size": D, "num_probes": offsets.shape[1], "page_bytes": layout.page_bytes, "bytes_moved": moved}
    rec["copy_us"] = graph_time_us(lambda: (k.clone(), v.clone()), reps)
    # the probe scores as the engine step computes them: a kernel of their own, before the compression
    scores, score = prompt_scorer(layout, k, pq, offsets)
    probe_warps = {w: graph_time_us(lambda w=w: score(w), reps) for w in (2, 4, 8)}
    rec["probe_scores_us_by_warps"] = probe_warps
    rec["probe_scores_us"] = probe_warps[4]  # the default
    if base_scores is not None:
        ref_scores, base_score = prompt_scorer(layout, k, pq, offsets, base_scores)
        rec["baseline_probe_scores_us"] = graph_time_us(base_score, reps)
        rec["baseline_probe_scores_max_rel_diff"] = float(((ref_scores - scores).abs() / ref_scores.abs().clamp_min(
            1e-6)).max())  # fmt: skip
        rec["probe_scores_speedup"] = rec["baseline_probe_scores_us"] / rec["probe_scores_us"]
    rec["configs"] = []
    ref = None
    for r, w in configs:
        t = graph_time_us(lambda r=r, w=w: current.compress_store(k, v, scores, ids, cache, layout, num_warps=w,
                                                                  rows_per_tile=r), reps)  # fmt: skip
        ref = cache.clone() if ref is None else ref
        assert torch.equal(cache, ref), "pages differ between configs"
        fused_scores = torch.empty_like(scores)
        tf = graph_time_us(lambda r=r, w=w: current.compress_store(
            k, v, None, ids, cache, layout, num_warps=w, rows_per_tile=r, probe_query=pq, probe_offsets=offsets),
            reps)  # fmt: skip
        fused_pages = cache.clone()
        current.compress_store(k, v, fused_scores, ids, cache, layout, num_warps=w, rows_per_tile=r,
                               probe_query=pq, probe_offsets=offsets)  # fmt: skip
        assert torch.equal(cache, fused_pages), "the fused kernel's pages depend on whether it reports scores"
        check = cache.clone()
        current.compress_store(k, v, fused_scores, ids, check, layout)
        assert torch.equal(check, fused_pages), "fused pages differ from compression under the fused scores"
        rec["configs"].append({"rows_per_tile": r, "num_warps": w, "time_us": t, "fused_time_us": tf,
                               "fused_scores_max_diff": float((fused_scores - scores).abs().max())})
        for m in programs:  # more programs per (block, KV head), given scores and scored in the kernel
            ts = graph_time_us(lambda r=r, w=w, m=m: current.compress_store(
                k, v, scores, ids, cache, layout, num_warps=w, rows_per_tile=r, programs=m), reps)  # fmt: skip
            assert torch.equal(cache, ref), f"pages differ at programs={m}"
            tsf = graph_time_us(lambda r=r, w=w, m=m: current.compress_store(
                k, v, None, ids, cache, layout, num_warps=w, rows_per_tile=r, probe_query=pq, probe_offsets=offsets,
                programs=m), reps)  # fmt: skip
            assert torch.equal(cache, fused_pages), f"programs={m}: pages differ from the fused kernel's"
            rec["configs"][-1].setdefault("programs_time_us", {})[m] = ts
            rec["configs"][-1].setdefault("programs_fused_time_us", {})[m] = tsf
    best = min(rec["configs"], key=lambda x: x["time_us"])
    best_f = min(rec["configs"], key=lambda x: x["fused_time_us"])
    rec["time_us"], rec["best_config"] = best["time_us"], (best["rows_per_tile"], best["num_warps"])
    rec["fused_time_us"], rec["best_fused_config"] = best_f["fused_time_us"], (best_f["rows_per_tile"],
                                                                              best_f["num_warps"])
    rec["gbps"] = moved / rec["time_us"] / 1e3
    if base is not None:
        cache.zero_()
        rec["baseline_time_us"] = graph_time_us(lambda: base.compress_store(k, v, scores, ids, cache, layout), reps)
        rec["baseline_pages_equal"] = bool(torch.equal(cache, ref))
        rec["speedup"] = rec["baseline_time_us"] / rec["time_us"]
        rec["fused_speedup"] = (rec["baseline_time_us"] + rec["probe_scores_us"]) / rec["fused_time_us"]
    print(json.dumps(rec), flush=True)
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--num-warps", default="2,4")
    ap.add_argument("--rows-per-tile", default="16,32")
    ap.add_argument("--configs", default=None, help="rows x warps pairs, e.g. 16x2,32x4 (instead of every pair of "
                    "--rows-per-tile and --num-warps)")
    ap.add_argument("--baseline", default=None, help="an earlier compress_store.py to time side by side")
    ap.add_argument("--baseline-scores", default=None, help="an earlier block_scores.py to time side by side")
    ap.add_argument("--programs", default="", help="also time these programs per (block, KV head): 2")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_compress.py needs a CUDA GPU")
    base = load_kernel_file(a.baseline) if a.baseline else None
    base_scores = load_kernel_file(a.baseline_scores, "_block_scores_base") if a.baseline_scores else None
    current = kernel_module("compress_store")
    configs = [(int(r), int(w)) for r in a.rows_per_tile.split(",") for w in a.num_warps.split(",")]
    if a.configs:
        configs = [tuple(int(x) for x in c.split("x")) for c in a.configs.split(",")]
    programs = [int(m) for m in a.programs.split(",") if m]
    records = [case(int(c), configs, current, base, a.reps, base_scores, programs) for c in a.contexts.split(",")]
    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": a.commit,
           "date": datetime.date.today().isoformat(), "command": "python " + " ".join(map(shlex.quote, sys.argv)),
           "records": records}  # fmt: skip
    print("\n| context | pages | copy us | rows/tile x warps: compress us (probes fused us) | probe scores us | "
          "baseline compress us | compress speedup | probes + compress speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        ts = ", ".join(f"{x['rows_per_tile']}x{x['num_warps']}: {x['time_us']:.1f} ({x['fused_time_us']:.1f})"
                       + "".join(f" programs {m}: {x['programs_time_us'][m]:.1f} ({x['programs_fused_time_us'][m]:.1f})"
                                 for m in programs)
                       for x in r["configs"])  # fmt: skip
        ps = f"{r['probe_scores_us']:.1f}" + (f" (baseline {r['baseline_probe_scores_us']:.1f})"
                                              if "baseline_probe_scores_us" in r else "")
        print(f"| {r['context']} | {r['blocks'] * H} | {r['copy_us']:.1f} | {ts} | {ps} | "
              f"{r.get('baseline_time_us', 0):.1f} | {r.get('speedup', 0):.2f}x | {r.get('fused_speedup', 0):.2f}x |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
