"""Benchmarks of the paged ZipCache kernels against bf16 SDPA on one GPU; writes JSON, Markdown and a plot.

    PYTHONPATH=. python benchmarks/bench_kernels.py --commit $(git rev-parse --short HEAD) --out benchmarks/results
    PYTHONPATH=. python benchmarks/bench_kernels.py --quick --out /tmp/bench   # b16/32k, b64/4k, b1/4k only
    PYTHONPATH=. python benchmarks/bench_kernels.py --quick --prefill-lengths 4096,16384 --chunked   # + 16k, chunked

``kernels/`` must be importable as ``zipcache_vllm.kernels`` (``pip install -e .``, or on a bare machine a link
``ln -s ../kernels zipcache_vllm/kernels``). Writes ``h200.json`` (all records), ``h200.md`` (tables) and
``h200_decode.png`` (decode speedups) under ``--out``; the last lines printed are the Markdown decode table.

Geometry: LLaMA3-8B attention (32 query heads, 8 KV heads, head size 128), one layer, block_size 128, 4/2 bits.

* decode, for both page-layout presets, ``vllm`` (keys 0.8 / values 0.2 salient: ``PageLayout(128, 128,
  salient_ratio=0.8, value_salient_ratio=0.2)``) and ``r0.6`` (``PageLayout(128, 128, salient_ratio=0.6)``),
  at batch 1/16/64 x context 4k/32k/128k. A sequence holds ``context`` compressed tokens (context / 128
  pages, scattered through the cache) plus a 64-token bf16 tail. Timed side by side in the same run:

  - ``v2``: ``kernels/decode_v2.decode_attention_v2`` with its own ``choose_num_splits`` and default chunking,
    writing bf16 ``out`` and the fp32 row log-sum-exp (as the serving path ``hf_paged_attention`` does);
  - ``v1``: ``kernels/decode_attention.decode_attention`` with its default split count and the launch options
    that were fastest in a sweep at batch 16 / 32k for that preset (``sweep`` / ``decode_config`` in the JSON);
  - bf16 SDPA on the same ``context + 64`` tokens (``enable_gqa``; the fastest of its backends), timed once per
    (batch, context) and shared by both presets and both variants;
  - the page-gather roofline (``benchmarks/page_gather.py``): a kernel that only streams the codes and
    parameters of the same pages through the same block table. It is timed at v2's ``choose_num_splits``, half
    and twice that, and the best of the three is the roofline (``roofline_num_splits`` says which), so a
    split count that happens to suit the gather badly does not lower the ceiling.

  Bytes read = what each must read at least: pages' codes and parameters + tail + q (ours), K + V + q (SDPA);
  ``achieved_gbps`` = bytes read / time, ``roofline_fraction`` = achieved / roofline GB/s. Bandwidths are also
  compared with a measured device copy (bytes read + written over time). v1 and v2 are checked against the
  torch twin (``paged.decode_attention``) at batch 2 / context 4k for both presets (``check`` in the JSON).
  A case that runs out of memory (or fails otherwise) is recorded with an ``error`` and the run goes on.
* prefill overhead (layout r0.6), batch 1, 4k and 16k tokens: block-rule probe scores of the complete blocks +
  their compress/store, relative to SDPA causal prefill. ``time_us``: the engine step's path on CUDA,
  ``block_probe_scores`` then ``compress_store`` given the scores, timed as SDPA is (a graph of calls on enough
  copies of the inputs to exceed 3x the L2, the mean per call; ``input_copies``); until 2026-12-06 it was
  ``probe_compress_one_graph_us``, one call in a graph on L2-resident inputs (still recorded, with
  ``empty_graph_us``, a graph of one tiny kernel timed the same way); ``probe_us`` / ``compress_us``: the two
  kernels apart; ``fused_us``: ``compress_store`` scoring the blocks by their probes itself, one launch (the
  step's path until 2026-12-06); ``added_to_sdpa_graph_us``: what the step's path adds to SDPA's time when it
  follows SDPA in one graph (one call), ``fused_added_to_sdpa_graph_us`` the same for the one launch);
  our own prefill attention (block rule: dequantize + flash kernel) too;
* chunked prefill (``vllm`` preset): 2048 queries over 30,720 compressed tokens through
  ``bench_prefill_step.chunked_case`` (record ``chunked_prefill``: ``time_us`` our attention, ``baseline_time_us``
  SDPA over as many bf16 keys, ``speedup``).
* compress/store throughput (layout r0.6) on 4096 blocks x 8 heads.

JSON: top level ``gpu, torch, triton, commit, date, command, reps, quick, model, layout`` (prefill/compress),
``presets`` (decode layouts), ``roofline_method``, ``copy_gbps``, ``check`` ({preset: {v1|v2: {max_abs_err,
rel_err}}}), ``sweep`` / ``decode_config`` (v1 launch options per preset), ``seconds``, ``records``. Decode
record, one per (preset, case, variant): ``kernel`` "decode", ``variant`` "v2" | "v1", ``preset`` "vllm" |
"r0.6", ``batch``, ``context``, ``time_us``, ``baseline_time_us`` (SDPA), ``baseline`` ("sdpa[<backend>]"),
``speedup`` (SDPA time / ours), ``bytes_read``, ``baseline_bytes_read``, ``achieved_gbps``, ``baseline_gbps``,
``roofline_gbps``, ``roofline_us``, ``roofline_num_splits``, ``roofline_bytes``, ``roofline_gbps_by_splits``,
``roofline_fraction`` (achieved / roofline), ``copy_gbps``, ``fraction_of_copy``, ``num_splits`` (the
variant's own), ``launch`` (v1 options / v2 chunking). When something fails, ``error`` (the variant),
``baseline_error`` (SDPA) or ``roofline_error`` says what, and the fields it prevented are absent.

Timing: CUDA-graph replays (launch overhead excluded), median of ``--reps``; small cases rotate over enough
copies of their buffers to exceed 3x the L2 cache, so every case reads HBM. The full run took 148 s on an
H200 (reps 30, compilation included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from zipcache_vllm.kernels import decode_v2
from zipcache_vllm.kernels.block_scores import block_probe_scores
from zipcache_vllm.kernels.compress_store import compress_store
from zipcache_vllm.kernels.decode_attention import choose_num_splits, decode_attention
from zipcache_vllm.kernels.prefill_attention import prefill_attention, prefill_plan

from benchmarks.bench_prefill_step import chunked_case
from benchmarks.page_gather import gather_bytes, page_gather
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.method import saliency
from zipcache_vllm.method.config import ZipCacheConfig

MODEL = {"name": "LLaMA3-8B", "num_heads": 32, "num_kv_heads": 8, "head_size": 128}
BLOCK = 128
TAIL = 64
DEV = torch.device("cuda")
PRESETS = {  # decode page layouts; prefill and compress use "r0.6"
    "vllm": PageLayout(BLOCK, MODEL["head_size"], salient_ratio=0.8, value_salient_ratio=0.2),
    "r0.6": PageLayout(BLOCK, MODEL["head_size"], salient_ratio=0.6),
}
DECODE_CASES = [(b, c) for b in (1, 16, 64) for c in (4096, 32768, 131072)]  # (batch, context)
QUICK_CASES = [(1, 4096), (16, 32768), (64, 4096)]
SWEEP_CASE = (16, 32768)  # where v1's launch options are chosen (the target case)
PREFILL_LENGTHS = [4096, 16384]
COMPRESS_BLOCKS = 4096
POOL_PAGES = 2048  # distinct real pages; large caches repeat them


# --------------------------------------------------------------------------------------------- timing
def graph_time(fns, reps: int) -> float:
    """Median microseconds per call of ``fns`` (one call each, captured in one CUDA graph)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        run = graph.replay
    except Exception as e:  # noqa: BLE001 (fall back to eager timing; reported)
        print(f"  (graph capture failed: {type(e).__name__}: {e}; eager timing)")

        def run():
            for f in fns:
                f()

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / len(fns))
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(DEV).L2_cache_size
    return max(1, min(64, math.ceil(3 * l2 / max(1, nbytes))))


def input_copies(tensors: tuple, other_bytes: int = 0) -> list[tuple]:
    """``tensors`` and random copies of them (same shapes and dtypes), enough sets that with ``other_bytes`` more
    per call (outputs shared by the calls) they exceed 3x the L2 (:func:`copies_for`): timed over these, each call
    reads HBM, as SDPA's calls do in :func:`time_sdpa`."""
    nbytes = other_bytes + sum(x.numel() * x.element_size() for x in tensors)
    return [tuple(tensors)] + [tuple(torch.randn_like(x) for x in tensors) for _ in range(copies_for(nbytes) - 1)]


def copy_bandwidth(reps: int) -> float:
    n = 4 << 30
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    us = graph_time([lambda: b.copy_(a)], reps)
    return 2 * n / us / 1e3  # GB/s, read + write


# --------------------------------------------------------------------------------------------- data
def page_pool(layout: PageLayout, num_pages: int) -> torch.Tensor:
    """Real compressed pages (K with outlier channels, random saliency) to tile large caches from."""
    h, d = MODEL["num_kv_heads"], MODEL["head_size"]
    k = torch.randn(num_pages * BLOCK, h, d, device=DEV)
    k[..., : d // 8] *= 8.0
    v = torch.randn(num_pages * BLOCK, h, d, device=DEV)
    pool = torch.empty(num_pages, h, layout.page_bytes, dtype=torch.uint8, device=DEV)
    compress_store(
        k.bfloat16(),
        v.bfloat16(),
        torch.rand(num_pages * BLOCK, h, device=DEV),
        torch.arange(num_pages, device=DEV, dtype=torch.int32),
        pool,
        layout,
    )
    return pool


def decode_inputs(layout, pool, batch, ctx):
    h, hq, d = MODEL["num_kv_heads"], MODEL["num_heads"], MODEL["head_size"]
    pages = ctx // BLOCK
    total = batch * pages
    cache = torch.empty(total, h, layout.page_bytes, dtype=torch.uint8, device=DEV)
    for s in range(0, total, pool.shape[0]):
        e = min(total, s + pool.shape[0])
        cache[s:e] = pool[: e - s]
    block_table = torch.randperm(total, device=DEV, dtype=torch.int32).view(batch, pages)
    tail_key = torch.randn(batch, BLOCK, h, d, device=DEV, dtype=torch.bfloat16)
    tail_value = torch.randn(batch, BLOCK, h, d, device=DEV, dtype=torch.bfloat16)
    i32 = {"device": DEV, "dtype": torch.int32}
    return {
        "query": torch.randn(batch, hq, d, device=DEV, dtype=torch.bfloat16),
        "kv_cache": cache,
        "layout": layout,
        "block_table": block_table,
        "seq_lens": torch.full((batch,), ctx + TAIL, **i32),
        "tail_key": tail_key,
        "tail_value": tail_value,
        "tail_slots": torch.arange(batch, **i32),
        "tail_lens": torch.full((batch,), TAIL, **i32),
    }


def decode_bytes(layout, batch, ctx) -> int:
    h, hq, d = MODEL["num_kv_heads"], MODEL["num_heads"], MODEL["head_size"]
    bd = layout.breakdown()
    page_read = bd["codes"] + bd["params"]  # the bitmaps and padding are never read
    return batch * h * (ctx // BLOCK) * page_read + batch * TAIL * h * d * 4 + batch * hq * d * 4 + batch * 4 * 4


def sdpa_inputs(batch, ctx):
    h, hq, d = MODEL["num_kv_heads"], MODEL["num_heads"], MODEL["head_size"]
    n = ctx + TAIL
    return (
        torch.randn(batch, hq, 1, d, device=DEV, dtype=torch.bfloat16),
        torch.randn(batch, h, n, d, device=DEV, dtype=torch.bfloat16),
        torch.randn(batch, h, n, d, device=DEV, dtype=torch.bfloat16),
    )


def sdpa_backends():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return [
        ("default", None),
        ("flash", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
        ("cudnn", lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])),
        ("efficient", lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])),
    ]


def time_sdpa(make_args, nbytes, reps, causal=False):
    """Fastest SDPA backend: (us, backend name)."""
    sets = [make_args() for _ in range(copies_for(nbytes))]
    best = (math.inf, "none")
    for name, ctxm in sdpa_backends():

        def call(a, ctxm=ctxm):
            if ctxm is None:
                return F.scaled_dot_product_attention(*a, is_causal=causal, enable_gqa=True)
            with ctxm():
                return F.scaled_dot_product_attention(*a, is_causal=causal, enable_gqa=True)

        try:
            with warnings.catch_warnings():  # backends that decline the case say so at every call
                warnings.simplefilter("ignore", UserWarning)
                us = graph_time([lambda a=a: call(a) for a in sets], reps)
        except Exception as e:  # noqa: BLE001 (a backend that does not support the case)
            print(f"  sdpa {name}: unavailable ({type(e).__name__})")
            continue
        if us < best[0]:
            best = (us, name)
    return best


# --------------------------------------------------------------------------------------------- cases
def _err(e: BaseException) -> str:
    kind = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
    return f"{kind}: {e}"[:300]


def _rel(out, ref) -> dict:
    out = out.float()
    return {
        "max_abs_err": (out - ref).abs().max().item(),
        "rel_err": ((out - ref).norm() / ref.norm()).item(),
    }


def check_decode(layout, pool) -> dict:
    """v1 and v2 vs the torch twin at a benchmark-like shape (batch 2, context 4k): max abs and relative L2."""
    from zipcache_vllm.engine import paged

    args = decode_inputs(layout, pool, 2, 4096)
    ref = paged.decode_attention(**args)
    res = {}
    try:
        res["v1"] = _rel(decode_attention(**args, out=torch.empty(args["query"].shape, device=DEV)), ref)
    except Exception as e:  # noqa: BLE001 (recorded; the benchmark goes on)
        res["v1"] = {"error": _err(e)}
    try:
        res["v2"] = _rel(decode_v2.decode_attention_v2(**args, out=torch.empty(args["query"].shape, device=DEV)), ref)
    except Exception as e:  # noqa: BLE001
        res["v2"] = {"error": _err(e)}
    for v, r in res.items():
        if r.get("rel_err", math.inf) > 1e-2:
            print(f"  WARNING: {v} vs twin: {r}")
    return res


def sweep_decode(layout, pool, reps, quick=False) -> tuple[dict, list]:
    """v1 launch options at SWEEP_CASE (batch 16, context 32k); returns the fastest and all rows. ``quick``:
    only 2 warps with the PTX unpack, tiles split or not (the winners so far), to save compilation time."""
    args = decode_inputs(layout, pool, *SWEEP_CASE)
    base = choose_num_splits(SWEEP_CASE[0], MODEL["num_kv_heads"], args["block_table"].shape[1], DEV)
    rows = []
    variants = [
        {"num_warps": w, "max_tile_rows": 128, "asm_unpack": asm, "split_tiles": sp}
        for w in (2, 4)
        for asm in (True, False)
        for sp in (True, False)
    ]
    variants += [{"num_warps": 1, "max_tile_rows": 128, "asm_unpack": True, "split_tiles": False}]
    variants += [{"num_warps": 2, "max_tile_rows": 32, "asm_unpack": True, "split_tiles": True}]
    for kw in variants[:2] if quick else variants:
        kw.setdefault("num_splits", base)
        try:
            us = graph_time([lambda kw=kw: decode_attention(**args, **kw)], reps)
        except Exception as e:  # noqa: BLE001
            print(f"  decode {kw}: failed ({type(e).__name__}: {e})")
            continue
        rows.append({**kw, "time_us": us})
        print(f"  sweep {kw}: {us:.1f} us")
    if not rows:
        return {}, rows
    best = min(rows, key=lambda r: r["time_us"])
    return {k: best[k] for k in ("num_warps", "max_tile_rows", "asm_unpack", "split_tiles")}, rows


def sdpa_case(batch, ctx, reps) -> dict:
    """bf16 SDPA over ``ctx + TAIL`` tokens (fastest backend), once per (batch, context)."""
    h, hq, d = MODEL["num_kv_heads"], MODEL["num_heads"], MODEL["head_size"]
    nbytes = batch * (ctx + TAIL) * h * d * 4 + batch * hq * d * 4
    res = {"baseline_bytes_read": nbytes}
    torch.cuda.empty_cache()
    try:
        us, backend = time_sdpa(lambda: sdpa_inputs(batch, ctx), nbytes, reps)
        if math.isfinite(us):
            res.update(baseline_time_us=us, baseline=f"sdpa[{backend}]", baseline_gbps=nbytes / us / 1e3)
        else:
            res["baseline_error"] = "no SDPA backend ran this case"
    except Exception as e:  # noqa: BLE001 (out of memory above all)
        res["baseline_error"] = _err(e)
    torch.cuda.empty_cache()
    return res


def roofline(layout, sets, batch, ctx, splits, reps) -> dict:
    """Page-gather bandwidth over the same pages: best of ``splits`` // 2, ``splits``, 2 ``splits``."""
    h, pages = MODEL["num_kv_heads"], ctx // BLOCK
    nbytes = gather_bytes(layout, batch, h, pages)
    outs = [torch.empty(batch * h * 2 * splits, dtype=torch.int32, device=DEV) for _ in sets]
    by = {}
    for sp in sorted({max(1, splits // 2), splits, 2 * splits}):
        fns = [lambda s=s, o=o, sp=sp: page_gather(s["kv_cache"], layout, s["block_table"], pages, sp, out=o)
               for s, o in zip(sets, outs, strict=True)]  # fmt: skip
        by[sp] = graph_time(fns, reps)
    sp = min(by, key=by.get)
    return {
        "roofline_us": by[sp],
        "roofline_num_splits": sp,
        "roofline_bytes": nbytes,
        "roofline_gbps": nbytes / by[sp] / 1e3,
        "roofline_gbps_by_splits": {str(k): nbytes / v / 1e3 for k, v in by.items()},
    }


def decode_case(preset, layout, pool, v1_cfg, batch, ctx, base, copy_gbps, reps) -> list[dict]:
    """v2, v1 and the roofline for one preset and case; one record per variant (``base``: :func:`sdpa_case`)."""
    h, pages = MODEL["num_kv_heads"], ctx // BLOCK
    nbytes = decode_bytes(layout, batch, ctx)
    v2_splits = decode_v2.choose_num_splits(batch, h, pages, DEV, decode_v2.split_programs(layout))
    splits = {"v2": v2_splits, "v1": choose_num_splits(batch, h, pages, DEV)}
    launch = {"v2": {"max_chunk": decode_v2.MAX_CHUNK, "writes_lse": True, **decode_v2.schedule_defaults()},
              "v1": v1_cfg}
    recs = {
        v: {"kernel": "decode", "variant": v, "preset": preset, "batch": batch, "context": ctx, "bytes_read": nbytes,
            "copy_gbps": copy_gbps, "num_splits": splits[v], "launch": launch[v], **base}
        for v in ("v2", "v1")
    }  # fmt: skip
    torch.cuda.empty_cache()
    try:
        sets = [decode_inputs(layout, pool, batch, ctx) for _ in range(copies_for(nbytes))]
    except Exception as e:  # noqa: BLE001 (out of memory above all)
        for r in recs.values():
            r["error"] = _err(e)
        return list(recs.values())
    try:
        roof = roofline(layout, sets, batch, ctx, v2_splits, reps)
    except Exception as e:  # noqa: BLE001
        roof = {"roofline_error": _err(e)}
    outs = [(torch.empty_like(s["query"]), torch.empty(s["query"].shape[:2], device=DEV)) for s in sets]
    calls = {
        "v2": [lambda s=s, o=o: decode_v2.decode_attention_v2(**s, out=o[0], lse=o[1])
               for s, o in zip(sets, outs, strict=True)],
        "v1": [lambda s=s, o=o: decode_attention(**s, out=o[0], **v1_cfg) for s, o in zip(sets, outs, strict=True)],
    }  # fmt: skip
    for v, r in recs.items():
        r.update(roof)
        try:
            us = graph_time(calls[v], reps)
        except Exception as e:  # noqa: BLE001
            r["error"] = _err(e)
            continue
        r.update(time_us=us, achieved_gbps=nbytes / us / 1e3)
        r["fraction_of_copy"] = r["achieved_gbps"] / copy_gbps
        if "baseline_time_us" in r:
            r["speedup"] = r["baseline_time_us"] / us
        if "roofline_gbps" in r:
            r["roofline_fraction"] = r["achieved_gbps"] / r["roofline_gbps"]
    del sets, outs, calls
    torch.cuda.empty_cache()
    return list(recs.values())


def bench_decode(presets: dict, copy_gbps, reps, cases) -> list[dict]:
    """``presets``: name -> (layout, page pool, v1 launch options). SDPA once per case, then every preset."""
    records = []
    for batch, ctx in cases:
        base = sdpa_case(batch, ctx, reps)
        print(f"  decode b={batch} ctx={ctx}: sdpa {_us(base.get('baseline_time_us'))} ({base.get('baseline')})")
        for name, (layout, pool, cfg) in presets.items():
            recs = decode_case(name, layout, pool, cfg, batch, ctx, base, copy_gbps, reps)
            for r in recs:
                print(
                    f"    {name:5s} {r['variant']}: {_us(r.get('time_us'))} us, splits {r['num_splits']}, "
                    f"{_x(r.get('speedup'))} vs sdpa, {_f(r.get('achieved_gbps'))} GB/s of roofline "
                    f"{_f(r.get('roofline_gbps'))} GB/s" + (f"  [{r['error']}]" if "error" in r else "")
                )
            records += recs
    return records


def prefill_case(layout, reps, n_tok):
    """One prompt of ``n_tok`` tokens in one chunk: SDPA causal vs our attention, block probe scores, compress."""
    h, hq, d = MODEL["num_kv_heads"], MODEL["num_heads"], MODEL["head_size"]
    i32 = {"device": DEV, "dtype": torch.int32}
    q = torch.randn(n_tok, hq, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(n_tok, h, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(n_tok, h, d, device=DEV, dtype=torch.bfloat16)
    nb = n_tok // BLOCK
    cache = torch.zeros(nb, h, layout.page_bytes, dtype=torch.uint8, device=DEV)
    tails = torch.zeros(1, BLOCK, h, d, device=DEV, dtype=torch.bfloat16)
    qsl, seq_lens = torch.tensor([0, n_tok], **i32), torch.tensor([n_tok], **i32)
    zero = torch.zeros(1, **i32)
    cfg = ZipCacheConfig(block_size=BLOCK)  # the presets' probe shares (5 % + 5 %)
    offsets = torch.stack([saliency.block_probe_offsets(cfg, BLOCK, i) for i in range(nb)]).to(**i32)
    pq = torch.randn(nb, offsets.shape[1], hq, d, device=DEV, dtype=torch.bfloat16)
    ids = torch.arange(nb, **i32)
    sdpa_args = tuple(x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    sdpa_us, backend = time_sdpa(lambda: sdpa_args, sum(x.numel() * 2 for x in sdpa_args), reps, causal=True)

    plan = prefill_plan([n_tok], BLOCK, DEV)  # host values: no copy inside the captured graph

    def attn():
        return prefill_attention(
            q, k, v, cache, layout, ids.view(1, nb), qsl, seq_lens, tails, tails, zero, zero, max_query_len=n_tok,
            plan=plan,
        )

    block_scores = torch.empty(nb, BLOCK, h, device=DEV)

    def probe():
        return block_probe_scores(k.view(nb, BLOCK, h, d), pq, offsets, ids, block_scores)

    probe()
    scores = block_scores.view(-1, h)

    def compress():
        compress_store(k, v, scores, ids, cache, layout)

    def fused():  # one launch: the blocks scored by their probes inside compress_store (the step's path before)
        compress_store(k, v, None, ids, cache, layout, probe_query=pq, probe_offsets=offsets)

    attn_us, probe_us, comp_us, fused_us = (graph_time([f], reps) for f in (attn, probe, compress, fused))
    # back to back in one graph, one call (the record's time until 2026-12-06: its inputs stay in L2 between
    # replays); empty_graph_us: a graph of one tiny kernel, timed the same way (10-18 us on an H100, f7e9ea9)
    one_call_us = 2 * graph_time([probe, compress], reps)
    empty = torch.zeros(1, device=DEV)
    empty_us = graph_time([lambda: empty.add_(1)], reps)

    def sdpa():
        return F.scaled_dot_product_attention(*sdpa_args, is_causal=True, enable_gqa=True)

    sdpa_graph_us = graph_time([sdpa], reps)
    added_us = 3 * graph_time([sdpa, probe, compress], reps) - sdpa_graph_us
    added_fused_us = 2 * graph_time([sdpa, fused], reps) - sdpa_graph_us
    # the record: the step's path timed as SDPA is (time_sdpa): a graph of calls on enough copies of the inputs to
    # exceed 3x the L2 cache, so that each reads HBM as SDPA does, the mean per call (the same figure as one call
    # within 0.1 us on an H100 in one run, 2.6 us above it in another: h100_prefill_timing_f7e9ea9.log,
    # h100_spike_value_prefetch_f7e9ea9.log). (A graph of (SDPA, step) per copy, less SDPA's graph, gave 5.7,
    # 12.1 and -38.6 us for what the step adds: the difference of two long graphs, noise, so not recorded.)
    sets = input_copies((k, v, pq), sum(x.numel() * x.element_size() for x in (block_scores, cache)))
    steps = []
    for kc, vc, pqc in sets:
        sc = torch.empty_like(block_scores)

        def step(kc=kc, vc=vc, pqc=pqc, sc=sc):
            block_probe_scores(kc.view(nb, BLOCK, h, d), pqc, offsets, ids, sc)
            compress_store(kc, vc, sc.view(-1, h), ids, cache, layout)

        steps.append(step)
    step_us = graph_time(steps, reps)
    print(
        f"  prefill {n_tok}: sdpa {sdpa_us:.0f} us, ours attn {attn_us:.0f}, probes {probe_us:.0f}, "
        f"compress {comp_us:.0f} us; the step's path (both) {step_us:.1f} us over {len(sets)} input copies "
        f"({100 * step_us / sdpa_us:.1f} % of SDPA); one call in a graph {one_call_us:.1f} us (an empty graph "
        f"{empty_us:.1f} us), added after SDPA in one graph {added_us:.1f}; "
        f"scored in compress {fused_us:.0f} us, added after SDPA {added_fused_us:.0f} us"
    )
    return {
        "kernel": "prefill",
        "batch": 1,
        "context": n_tok,
        "num_probes": offsets.numel(),
        "baseline": f"sdpa[{backend}] causal",
        "baseline_time_us": sdpa_us,
        "attention_us": attn_us,
        "probe_us": probe_us,
        "compress_us": comp_us,
        "probe_plus_compress_us": probe_us + comp_us,
        "input_copies": len(sets),
        "probe_compress_one_graph_us": one_call_us,
        "empty_graph_us": empty_us,
        "fused_us": fused_us,
        "fused_added_to_sdpa_graph_us": added_fused_us,
        "time_us": step_us,
        "overhead_fraction": step_us / sdpa_us,
        "overhead_fraction_one_call": one_call_us / sdpa_us,
        "added_to_sdpa_graph_us": added_us,
        "overhead_fraction_in_step": added_us / sdpa_us,
        "full_path_vs_sdpa": (attn_us + step_us) / sdpa_us,
    }


def bench_compress(layout, reps, num_blocks):
    """compress_store on ``num_blocks`` blocks x 8 heads, the default launch and 4 warps; the faster is kept."""
    h, d = MODEL["num_kv_heads"], MODEL["head_size"]
    k = torch.randn(num_blocks * BLOCK, h, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(num_blocks * BLOCK, h, d, device=DEV, dtype=torch.bfloat16)
    s = torch.rand(num_blocks * BLOCK, h, device=DEV)
    ids = torch.randperm(num_blocks, device=DEV, dtype=torch.int32)
    cache = torch.empty(num_blocks, h, layout.page_bytes, dtype=torch.uint8, device=DEV)
    times = {w: graph_time([lambda w=w: compress_store(k, v, s, ids, cache, layout, num_warps=w)], reps)
             for w in (2, 4)}  # fmt: skip
    w = min(times, key=times.get)
    us = times[w]
    moved = k.numel() * 2 * 2 + s.numel() * 4 + num_blocks * h * layout.page_bytes
    return {
        "kernel": "compress_store", "batch": num_blocks, "context": BLOCK, "time_us": us, "num_warps": w,
        "time_us_by_warps": times, "tokens_per_s": num_blocks * BLOCK / us * 1e6, "bytes_moved": moved,
        "achieved_gbps": moved / us / 1e3,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------- report
def _f(x, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def _us(x) -> str:
    return _f(x, ".1f")


def _x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def decode_table(res) -> str:
    """One row per (preset, batch, context): v2, v1 and SDPA times, speedups, v2 bandwidth vs the roofline."""
    lines = [
        (
            "| preset | batch | context | v2 (us) | v1 (us) | SDPA (us) | v2 speedup | v1 speedup | v2 GB/s | "
            "roofline GB/s | % of roofline |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows: dict = {}
    errors = []
    for r in res["records"]:
        if r["kernel"] == "decode":
            rows.setdefault((r["preset"], r["batch"], r["context"]), {})[r["variant"]] = r
    order = list(PRESETS)
    for (preset, batch, ctx), by in sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]), *kv[0][1:])):
        v2, v1 = by.get("v2", {}), by.get("v1", {})
        base = v2 or v1
        sdpa = base.get("baseline_time_us")
        sdpa_s = f"{sdpa:.1f} ({base['baseline'][5:-1]})" if sdpa is not None else "-"
        if sdpa is None and "baseline_error" in base:
            errors.append(f"b{batch} {ctx} sdpa: {base['baseline_error'][:150]}")
        errors += [f"{preset} b{batch} {ctx} {v}: {r['error'][:150]}" for v, r in by.items() if "error" in r]
        lines.append(
            f"| {preset} | {batch} | {ctx} | {_us(v2.get('time_us'))} | {_us(v1.get('time_us'))} | {sdpa_s} | "
            f"{_x(v2.get('speedup'))} | {_x(v1.get('speedup'))} | {_f(v2.get('achieved_gbps'))} | "
            f"{_f(v2.get('roofline_gbps'))} | {_pct(v2.get('roofline_fraction'))} |"
        )
    if errors:
        lines += ["", "Failed: " + "; ".join(dict.fromkeys(errors))]
    return "\n".join(lines)


def header(res) -> str:
    checks = "; ".join(
        f"{p} {v} {c['rel_err']:.1e}" if "rel_err" in c else f"{p} {v} FAILED"
        for p, by in res["check"].items()
        for v, c in by.items()
    )
    cfgs = "; ".join(f"{p} {c}" for p, c in res["decode_config"].items())
    return "\n".join([
        (
            f"GPU: {res['gpu']}; torch {res['torch']}, triton {res['triton']}; commit {res['commit']}; "
            f"{res['date']}; copy bandwidth {res['copy_gbps']:.0f} GB/s (read + write)"
        ),
        "",
        (
            "Decode, LLaMA3-8B attention (32/8/128), one layer, block 128, 4/2 bits, presets vllm (K 0.8 / V 0.2 "
            "salient) and r0.6; context + 64-token bf16 tail. v2 = decode_v2 (own split count, writes lse); "
            "v1 = decode_attention (best swept launch options); SDPA = bf16, fastest backend; roofline = page "
            "gather of the same pages (best of v2's split count, half, double). "
            f"Relative L2 error vs the torch twin (batch 2, 4k): {checks}. v1 options: {cfgs}."
        ),
    ])  # fmt: skip


def other_tables(res) -> str:
    lines = [
        (
            "| prefill tokens | SDPA causal (us) | ours attention (us) | probe scores (us) | compress (us) | "
            "the step's path, both (us) | one call in a graph (us) | scored in compress, one launch (us) | "
            "overhead (step's path) / SDPA | added to SDPA in one graph / SDPA | full path / SDPA |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["records"]:
        if r["kernel"] == "prefill":
            lines.append(
                f"| {r['context']} | {r['baseline_time_us']:.0f} | {r['attention_us']:.0f} | "
                f"{r['probe_us']:.0f} | {r['compress_us']:.0f} | {r['time_us']:.1f} | "
                f"{r.get('probe_compress_one_graph_us', math.nan):.1f} | "
                f"{r.get('fused_us', math.nan):.0f} | {100 * r['overhead_fraction']:.1f} % | "
                f"{100 * r.get('overhead_fraction_in_step', math.nan):.1f} % | {r['full_path_vs_sdpa']:.2f}x |"
            )
    for r in res["records"]:
        if r["kernel"] == "chunked_prefill":
            lines += ["", (f"chunked prefill: {r['chunk']} queries over {r['context']} compressed tokens: ours "
                           f"{r['time_us']:.0f} us, SDPA over bf16 {r['baseline_time_us']:.0f} us: "
                           f"{r['speedup']:.2f}x")]
    for r in res["records"]:
        if r["kernel"] == "compress_store":
            lines += [
                "",
                (
                    f"compress/store: {r['batch']} blocks x 128 tokens x 8 heads in {r['time_us']:.0f} us = "
                    f"{r['tokens_per_s'] / 1e6:.1f} M tokens/s, {r['achieved_gbps']:.0f} GB/s moved"
                ),
            ]
    return "\n".join(lines)


def markdown(res) -> str:
    return "\n\n".join([header(res), decode_table(res), other_tables(res)])


def plot(res, path: Path) -> None:
    """Speedup vs bf16 SDPA of v2 and v1 per case, one panel per preset, a line at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = [r for r in res["records"] if r["kernel"] == "decode"]
    cases = sorted({(r["batch"], r["context"]) for r in dec})
    presets = [p for p in PRESETS if any(r["preset"] == p for r in dec)]
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4), sharey=True, squeeze=False)
    for ax, preset in zip(axes[0], presets, strict=True):
        x = range(len(cases))
        for off, variant, color in ((-0.2, "v2", "C0"), (0.2, "v1", "C1")):
            by = {(r["batch"], r["context"]): r.get("speedup") for r in dec
                  if r["preset"] == preset and r["variant"] == variant}  # fmt: skip
            ys = [by.get(c) or 0.0 for c in cases]
            bars = ax.bar([i + off for i in x], ys, 0.4, label=variant, color=color)
            ax.bar_label(bars, labels=[f"{y:.2f}" if y else "-" for y in ys], fontsize=7)
        ax.axhline(1.0, color="k", ls="--", lw=1, label="bf16 SDPA")
        ax.set_xticks(list(x), [f"b{b}\n{c // 1024}k" for b, c in cases])
        ax.set_title(f"preset {preset}")
        ax.set_ylabel("speedup vs bf16 SDPA")
        ax.legend(loc="upper left", ncol=3, fontsize=8)
    top = max([r["speedup"] for r in dec if r.get("speedup")] + [1.0])
    axes[0][0].set_ylim(0, 1.25 * top)
    fig.suptitle(f"{res['gpu']}: decode attention, LLaMA3-8B (32/8/128), one layer, commit {res['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument(
        "--quick", action="store_true", help="decode b16/32k, b64/4k, b1/4k only, 2 v1 launch options; prefill 4k only"
    )
    ap.add_argument("--prefill-lengths", default=None,
                    help="prefill records at these prompt lengths (default: 4096 with --quick, else 4096,16384)")
    ap.add_argument("--chunked", action="store_true", help="the chunked-prefill record with --quick too")
    args = ap.parse_args()
    prefill_lengths = ([int(x) for x in args.prefill_lengths.split(",")] if args.prefill_lengths
                       else PREFILL_LENGTHS[:1] if args.quick else PREFILL_LENGTHS)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    layout = PRESETS["r0.6"]
    res = {
        "gpu": torch.cuda.get_device_name(DEV),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "commit": args.commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", *sys.argv]),
        "reps": args.reps,
        "quick": args.quick,
        "model": MODEL,
        "layout": {  # prefill and compress
            "preset": "r0.6",
            "block_size": BLOCK,
            "head_size": MODEL["head_size"],
            "bits": [4, 2],
            "salient_ratio": 0.6,
            "page_bytes": layout.page_bytes,
            "capacity_vs_bf16": layout.capacity_vs_bf16,
        },
        "presets": {
            name: {
                "salient_ratio": lay.salient_ratio,
                "value_salient_ratio": lay.v_salient_ratio,
                "num_salient_k": lay.num_salient_k,
                "num_salient_v": lay.num_salient_v,
                "bits": [lay.bits_high, lay.bits_low],
                "page_bytes": lay.page_bytes,
                "bytes_read_per_page": lay.breakdown()["codes"] + lay.breakdown()["params"],
                "capacity_vs_bf16": lay.capacity_vs_bf16,
                "v2_supported": decode_v2.supported(lay),
            }
            for name, lay in PRESETS.items()
        },
        "roofline_method": "page_gather at v2's choose_num_splits, half and double; the fastest",
    }
    res["copy_gbps"] = copy_bandwidth(args.reps)
    print(f"copy bandwidth {res['copy_gbps']:.0f} GB/s")
    res["check"], res["sweep"], res["decode_config"] = {}, {}, {}
    presets = {}
    for name, lay in PRESETS.items():
        pool = page_pool(lay, POOL_PAGES)
        res["check"][name] = check_decode(lay, pool)
        print(f"{name}: decode vs twin at batch 2, 4k: {res['check'][name]}")
        cfg, res["sweep"][name] = sweep_decode(lay, pool, args.reps, args.quick)
        res["decode_config"][name] = cfg
        print(f"{name}: v1 config {cfg}")
        presets[name] = (lay, pool, cfg)
    cases = QUICK_CASES if args.quick else DECODE_CASES
    res["records"] = bench_decode(presets, res["copy_gbps"], args.reps, cases)
    del presets, pool
    for n_tok in prefill_lengths:
        torch.cuda.empty_cache()
        res["records"].append(prefill_case(layout, args.reps, n_tok))
    if args.chunked or not args.quick:
        res["records"].append(chunked_case(30720, 2048, args.reps))
    res["records"].append(bench_compress(layout, args.reps, COMPRESS_BLOCKS))
    res["seconds"] = time.time() - t0
    (out / "h200.json").write_text(json.dumps(res, indent=1))
    (out / "h200.md").write_text(markdown(res) + "\n")
    try:
        plot(res, out / "h200_decode.png")
    except Exception as e:  # noqa: BLE001 (the table matters more than the plot)
        print(f"plot failed: {e}")
    print(f"\n{header(res)}\n\n{other_tables(res)}\n\ntotal {res['seconds']:.0f} s\n")
    print(decode_table(res))


if __name__ == "__main__":
    main()
