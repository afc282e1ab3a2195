"""Decode v2 spike (one device call): correctness at benchmark shapes and side-by-side times.

    PYTHONPATH=. python benchmarks/spike_decode_v2.py [--cases 16x32768,64x4096,1x4096] [--splits 0,8,16,32]
    PYTHONPATH=. python benchmarks/spike_decode_v2.py --variants two-maps,one-map,one-map-ring-r168 [--presets vllm]

``--variants``: page-loop schedules of ``VARIANTS`` side by side (each first checked against the twin), every
one at the split count its resident programs per SM call for (``decode_v2.resident_programs``).

v2 (Gluon) vs v1 (plain Triton) vs bf16 SDPA vs the page-gather roofline, LLaMA3-8B geometry, block 128,
presets vllm (keys 0.8 / values 0.2) and r0.6. Prints a table last.
"""

from __future__ import annotations

import argparse

import torch
from zipcache_vllm.kernels import decode_v2
from zipcache_vllm.kernels.decode_attention import decode_attention

from benchmarks.bench_kernels import (
    BLOCK,
    DEV,
    MODEL,
    copies_for,
    decode_bytes,
    decode_inputs,
    graph_time,
    page_pool,
    sdpa_inputs,
    time_sdpa,
)  # fmt: skip
from benchmarks.page_gather import gather_bytes, page_gather
from zipcache_vllm.engine import paged
from zipcache_vllm.engine.layout import PageLayout

PRESETS = {"vllm": (0.8, 0.2), "r0.6": (0.6, None)}
# what a variant does not name is off (every variant names maps, ring and maxnreg), so a variant means the same
# kernel whatever the module defaults are (DEFER_SUM is on since eb205d8)
OFF = {name: False for name in decode_v2.SCHEDULE if name not in ("maps", "ring", "maxnreg")}


def variant_options(name: str) -> dict:
    """The launch options of ``VARIANTS[name]``, the options it does not name off."""
    return {**OFF, **VARIANTS[name]}


VARIANTS = {  # launch options of decode_attention_v2
    "two-maps": {"maps": 2, "ring": False, "maxnreg": None},
    "one-map": {"maps": 1, "ring": False, "maxnreg": None},
    "two-maps-ring": {"maps": 2, "ring": True, "maxnreg": None},
    "one-map-ring": {"maps": 1, "ring": True, "maxnreg": None},
    "one-map-ring-r200": {"maps": 1, "ring": True, "maxnreg": 200},
    "one-map-ring-r184": {"maps": 1, "ring": True, "maxnreg": 184},
    "one-map-ring-r168": {"maps": 1, "ring": True, "maxnreg": 168},
    "two-maps-ring-r168": {"maps": 2, "ring": True, "maxnreg": 168},
    "one-map-tail-first": {"maps": 1, "ring": False, "maxnreg": None, "tail_first": True},
    "one-map-defer": {"maps": 1, "ring": False, "maxnreg": None, "defer_sum": True},
    "one-map-tail-first-defer": {"maps": 1, "ring": False, "maxnreg": None, "tail_first": True, "defer_sum": True},
    "one-map-defer-fold": {"maps": 1, "ring": False, "maxnreg": None, "defer_sum": True, "fold_tail": True},
    "one-map-defer-subnormal": {"maps": 1, "ring": False, "maxnreg": None, "defer_sum": True, "subnormal_values": True},
    "one-map-defer-pieces": {"maps": 1, "ring": False, "maxnreg": None, "defer_sum": True, "piece_buffers": True},
    "one-map-defer-subnormal-pieces": {"maps": 1, "ring": False, "maxnreg": None, "defer_sum": True,
                                       "subnormal_values": True, "piece_buffers": True},
    "one-map-defer-page-max": {"maps": 1, "ring": False, "maxnreg": None, "defer_sum": True, "page_max": True},
    "one-map-defer-subnormal-page-max": {"maps": 1, "ring": False, "maxnreg": None, "defer_sum": True,
                                         "subnormal_values": True, "page_max": True},
    "one-map-defer-subnormal-pieces-page-max": {"maps": 1, "ring": False, "maxnreg": None, "defer_sum": True,
                                                "subnormal_values": True, "piece_buffers": True, "page_max": True},
    "one-map-defer-subnormal-kv-pieces-page-max": {"maps": 1, "ring": False, "maxnreg": None, "defer_sum": True,
                                                   "subnormal_values": True, "piece_buffers": True, "page_max": True,
                                                   "subnormal_keys": True},
    "one-map-defer-subnormal-kv-pieces-page-max-tma": {"maps": 1, "ring": False, "maxnreg": None, "defer_sum": True,
                                                       "subnormal_values": True, "piece_buffers": True,
                                                       "page_max": True, "subnormal_keys": True, "tma_pages": True},
    "one-map-defer-subnormal-kv-pieces-page-max-tma-auto": {"maps": 1, "ring": False, "maxnreg": None,
                                                            "defer_sum": True, "subnormal_values": True,
                                                            "piece_buffers": True, "page_max": True,
                                                            "subnormal_keys": True, "tma_pages": "auto"},
}


def _preset(name: str) -> tuple:
    """``(layout, page pool, small check case, its twin output)`` of a preset."""
    r, rv = PRESETS[name]
    layout = PageLayout(BLOCK, MODEL["head_size"], salient_ratio=r, value_salient_ratio=rv)
    pool = page_pool(layout, 1024)
    args = decode_inputs(layout, pool, 2, 4096)
    return layout, pool, args, paged.decode_attention(**args)


def _rel_err(args: dict, ref: torch.Tensor, **kw) -> float:
    out = decode_v2.decode_attention_v2(**args, out=torch.empty(args["query"].shape, device=DEV), **kw)
    return ((out - ref).norm() / ref.norm()).item()


def _case(layout, pool, batch: int, ctx: int, reps: int) -> tuple:
    """``(bytes v2 reads, SDPA us, SDPA backend, input sets)`` of one timed case (enough sets to read HBM)."""
    nbytes = decode_bytes(layout, batch, ctx)
    base_bytes = batch * (ctx + 64) * MODEL["num_kv_heads"] * MODEL["head_size"] * 4
    base_us, backend = time_sdpa(lambda: sdpa_inputs(batch, ctx), base_bytes, reps)
    return nbytes, base_us, backend, [decode_inputs(layout, pool, batch, ctx) for _ in range(copies_for(nbytes))]


def variants(a) -> None:
    """Every variant of ``--variants`` against the twin (small case), then timed per case next to SDPA."""
    cases = [tuple(map(int, c.split("x"))) for c in a.cases.split(",")]
    names = a.variants.split(",")
    rows = []
    h = MODEL["num_kv_heads"]
    for preset in a.presets.split(","):
        layout, pool, args, ref = _preset(preset)
        for name in names:
            print(f"{preset} {name}: rel_err {_rel_err(args, ref, **variant_options(name)):.2e}", flush=True)
        for batch, ctx in cases:
            nbytes, base_us, _, sets = _case(layout, pool, batch, ctx, a.reps)
            first = None
            for name in names:
                kw = variant_options(name)
                pps = decode_v2.split_programs(layout, True, kw["ring"], kw["maxnreg"])
                sp = decode_v2.choose_num_splits(batch, h, ctx // BLOCK, DEV, pps)
                if kw.get("fold_tail") and sp > 1:  # the same page splits, the tail taken by the last of them
                    sp -= 1
                lses = [torch.empty(s["query"].shape[:2], device=DEV) for s in sets]
                us = graph_time([lambda s=s, ls=ls, kw=kw, sp=sp: decode_v2.decode_attention_v2(
                    **s, lse=ls, num_splits=sp, **kw) for s, ls in zip(sets, lses, strict=True)], a.reps)
                first = first or us
                row = (preset, batch, ctx, name, pps, sp, us, base_us, base_us / us, first / us, nbytes / us / 1e3)
                rows.append(row)
                print(row, flush=True)
            del sets
            torch.cuda.empty_cache()
    print("\n| preset | batch | ctx | variant | programs/SM | splits | us | sdpa us | speedup | vs first | GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p, b, c, n, pps, sp, us, bu, spd, rel, gbs in rows:
        print(f"| {p} | {b} | {c} | {n} | {pps} | {sp} | {us:.1f} | {bu:.1f} | {spd:.2f}x | {rel:.3f}x | {gbs:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="16x32768,64x4096,1x4096")
    ap.add_argument("--splits", default="0")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--presets", default="vllm,r0.6")
    ap.add_argument("--chunks", default="64")
    ap.add_argument("--prefetch", default="0")
    ap.add_argument("--stage", default="0,1", help="1: pages staged in shared memory (cp.async), 0: not")
    ap.add_argument("--lse", default="0", help="1: v2 also writes the row log-sum-exp (as the engine and "
                    "bench_kernels.py do), 0: not")
    ap.add_argument("--variants", default="", help=f"comma-separated names of {sorted(VARIANTS)}")
    a = ap.parse_args()
    if a.variants:
        variants(a)
        return
    cases = [tuple(map(int, c.split("x"))) for c in a.cases.split(",")]
    rows = []
    h = MODEL["num_kv_heads"]
    for name in a.presets.split(","):
        layout, pool, args, ref = _preset(name)
        for st in (False, True):
            print(f"{name}: page_bytes {layout.page_bytes} chunks {decode_v2.chunks(layout)} stage {st} "
                  f"rel_err v2 {_rel_err(args, ref, stage=st):.2e}")
        for batch, ctx in cases:
            nbytes, base_us, backend, sets = _case(layout, pool, batch, ctx, a.reps)
            v1_us = graph_time([lambda s=s: decode_attention(**s) for s in sets], a.reps)
            auto = decode_v2.choose_num_splits(batch, h, ctx // BLOCK, DEV)
            for sp in [int(x) or auto for x in a.splits.split(",")]:
                g_us = graph_time([lambda s=s, sp=sp, lay=layout, n=ctx // BLOCK: page_gather(
                    s["kv_cache"], lay, s["block_table"], n, sp) for s in sets], a.reps)
                gb = gather_bytes(layout, batch, h, ctx // BLOCK)
                for mc, pf, st, wl in [(int(m), int(f), bool(int(t)), int(w)) for m in a.chunks.split(",")
                                       for f in a.prefetch.split(",") for t in a.stage.split(",")
                                       for w in a.lse.split(",")]:
                    lses = [torch.empty(s["query"].shape[:2], device=DEV) if wl else None for s in sets]
                    opts = {"num_splits": sp, "max_chunk": mc, "prefetch": pf, "stage": st}
                    v2_us = graph_time([lambda s=s, ls=ls, opts=opts: decode_v2.decode_attention_v2(**s, lse=ls, **opts)
                                        for s, ls in zip(sets, lses, strict=True)], a.reps)  # fmt: skip
                    row = (name, batch, ctx, f"{sp}/{mc}/{pf}/{int(st)}/lse{wl}", v2_us, v1_us, base_us, backend,
                           nbytes / v2_us / 1e3, gb / g_us / 1e3)
                    rows.append(row)
                    print(row, flush=True)
            del sets
            torch.cuda.empty_cache()
    print("\n| preset | batch | ctx | splits/chunk/prefetch/stage/lse | v2 us | v1 us | sdpa us "
          "| v2/sdpa speedup | v2 GB/s | gather GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, b, c, sp, v2u, v1u, bu, be, gbs, ggb in rows:
        print(f"| {n} | {b} | {c} | {sp} | {v2u:.1f} | {v1u:.1f} | {bu:.1f} ({be}) | {bu / v2u:.2f}x | {gbs:.0f} "
              f"| {ggb:.0f} |")


if __name__ == "__main__":
    main()
