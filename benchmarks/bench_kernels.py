"""Benchmarks of the paged ZipCache kernels against bf16 SDPA on one GPU; writes JSON, Markdown and a plot.

    PYTHONPATH=. python benchmarks/bench_kernels.py --commit $(git rev-parse --short HEAD) --out benchmarks/results

Cases (LLaMA3-8B attention geometry: 32 query heads, 8 KV heads, head size 128; one layer; page layout
block_size 128, r = 0.6, 4/2 bits):

* decode: batch 1/16/64 x context 4k/32k/128k. A sequence holds ``context`` compressed tokens (context / 128
  pages, scattered through the cache) plus a 64-token bf16 tail; SDPA gets the same ``context + 64`` tokens in
  bf16 (``enable_gqa``; the fastest of its backends). Bytes read = what each must read at least: pages' codes
  and parameters + tail + q (ours), K + V + q (SDPA). Bandwidth is compared with a measured device copy
  (bytes read + written over time).
* prefill overhead, batch 1, 4k and 16k tokens: probe scores (5 % recent + 5 % random probes) + compress/store
  of the complete blocks, relative to SDPA causal prefill; our own prefill attention is listed too.
* compress/store throughput on 4096 blocks x 8 heads.

Timing: CUDA-graph replays (launch overhead excluded), median of ``--reps``; small cases rotate over enough
copies of their buffers to exceed 3x the L2 cache, so every case reads HBM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from zipcache_vllm.kernels.compress_store import compress_store
from zipcache_vllm.kernels.decode_attention import choose_num_splits, decode_attention
from zipcache_vllm.kernels.prefill_attention import prefill_attention
from zipcache_vllm.kernels.probe_scores import probe_scores

from zipcache_vllm import saliency
from zipcache_vllm.layout import PageLayout

MODEL = {"name": "LLaMA3-8B", "num_heads": 32, "num_kv_heads": 8, "head_size": 128}
BLOCK = 128
TAIL = 64
DEV = torch.device("cuda")
DECODE_CASES = [(b, c) for b in (1, 16, 64) for c in (4096, 32768, 131072)]  # (batch, context)
SWEEP_CASE = (16, 32768)  # where the launch options are chosen (the target case)
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
            us = graph_time([lambda a=a: call(a) for a in sets], reps)
        except Exception as e:  # noqa: BLE001 (a backend that does not support the case)
            print(f"  sdpa {name}: unavailable ({type(e).__name__})")
            continue
        if us < best[0]:
            best = (us, name)
    return best


# --------------------------------------------------------------------------------------------- cases
def check_decode(layout, pool) -> dict:
    """GPU result vs the torch twin at a benchmark-like shape (batch 2, context 4k)."""
    from zipcache_vllm import paged

    args = decode_inputs(layout, pool, 2, 4096)
    out = decode_attention(**args, out=torch.empty(args["query"].shape, device=DEV))
    ref = paged.decode_attention(**args)
    err = (out - ref).abs().max().item()
    rel = ((out - ref).norm() / ref.norm()).item()
    return {"max_abs_err": err, "rel_err": rel}


def sweep_decode(layout, pool, reps) -> tuple[dict, list]:
    """Launch options at SWEEP_CASE (batch 16, context 32k); returns the fastest and all rows."""
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
    for kw in variants:
        kw.setdefault("num_splits", base)
        try:
            us = graph_time([lambda kw=kw: decode_attention(**args, **kw)], reps)
        except Exception as e:  # noqa: BLE001
            print(f"  decode {kw}: failed ({type(e).__name__}: {e})")
            continue
        rows.append({**kw, "time_us": us})
        print(f"  sweep {kw}: {us:.1f} us")
    best = min(rows, key=lambda r: r["time_us"])
    return {k: best[k] for k in ("num_warps", "max_tile_rows", "asm_unpack", "split_tiles")}, rows


def bench_decode(layout, pool, cfg, copy_gbps, reps, cases):
    records = []
    for batch, ctx in cases:
        torch.cuda.empty_cache()
        ours_bytes = decode_bytes(layout, batch, ctx)
        h, hq, d = MODEL["num_kv_heads"], MODEL["num_heads"], MODEL["head_size"]
        base_bytes = batch * (ctx + TAIL) * h * d * 4 + batch * hq * d * 4
        rec = {
            "kernel": "decode",
            "batch": batch,
            "context": ctx,
            "bytes_read": ours_bytes,
            "baseline_bytes_read": base_bytes,
            "copy_gbps": copy_gbps,
        }
        try:
            base_us, backend = time_sdpa(lambda b=batch, c=ctx: sdpa_inputs(b, c), base_bytes, reps)
            torch.cuda.empty_cache()
            sets = [decode_inputs(layout, pool, batch, ctx) for _ in range(copies_for(ours_bytes))]
            us = graph_time([lambda a=a: decode_attention(**a, **cfg) for a in sets], reps)
            del sets
            rec.update(
                time_us=us,
                baseline_time_us=base_us,
                baseline=f"sdpa[{backend}]",
                speedup=base_us / us,
                achieved_gbps=ours_bytes / us / 1e3,
                baseline_gbps=base_bytes / base_us / 1e3,
                num_splits=choose_num_splits(batch, h, ctx // BLOCK, DEV),
            )
            rec["fraction_of_copy"] = rec["achieved_gbps"] / copy_gbps
        except torch.cuda.OutOfMemoryError as e:
            rec["error"] = f"out of memory: {e}"[:200]
        print(
            f"  decode b={batch} ctx={ctx}: {rec.get('time_us', float('nan')):.1f} us vs "
            f"{rec.get('baseline_time_us', float('nan')):.1f} us"
        )
        records.append(rec)
        torch.cuda.empty_cache()
    return records


def prefill_case(layout, reps, n_tok):
    """One prompt of ``n_tok`` tokens in one chunk: SDPA causal vs our attention, probe scores, compress."""
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
    probes = saliency.probe_positions(n_tok, generator=torch.Generator().manual_seed(0)).to(**i32)
    psl = torch.tensor([0, probes.numel()], **i32)
    ids = torch.arange(nb, **i32)
    sdpa_args = tuple(x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    sdpa_us, backend = time_sdpa(lambda: sdpa_args, sum(x.numel() * 2 for x in sdpa_args), reps, causal=True)

    def attn():
        return prefill_attention(
            q, k, v, cache, layout, ids.view(1, nb), qsl, seq_lens, tails, tails, zero, zero, max_query_len=n_tok
        )

    lse = attn()[1]

    def probe():
        return probe_scores(q, lse, k, tails, qsl, seq_lens, zero, zero, probes, psl, n_tok)

    scores = probe()[0]

    def compress():
        compress_store(k, v, scores, ids, cache, layout)

    attn_us, probe_us, comp_us = (graph_time([f], reps) for f in (attn, probe, compress))
    print(
        f"  prefill {n_tok}: sdpa {sdpa_us:.0f} us, ours attn {attn_us:.0f}, probes {probe_us:.0f}, "
        f"compress {comp_us:.0f} us"
    )
    return {
        "kernel": "prefill",
        "batch": 1,
        "context": n_tok,
        "num_probes": probes.numel(),
        "baseline": f"sdpa[{backend}] causal",
        "baseline_time_us": sdpa_us,
        "attention_us": attn_us,
        "probe_us": probe_us,
        "compress_us": comp_us,
        "time_us": probe_us + comp_us,
        "overhead_fraction": (probe_us + comp_us) / sdpa_us,
        "full_path_vs_sdpa": (attn_us + probe_us + comp_us) / sdpa_us,
    }


def bench_compress(layout, reps, num_blocks):
    """compress_store on ``num_blocks`` blocks x 8 heads, for 8 and 16 warps per program; the faster is kept."""
    h, d = MODEL["num_kv_heads"], MODEL["head_size"]
    k = torch.randn(num_blocks * BLOCK, h, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(num_blocks * BLOCK, h, d, device=DEV, dtype=torch.bfloat16)
    s = torch.rand(num_blocks * BLOCK, h, device=DEV)
    ids = torch.randperm(num_blocks, device=DEV, dtype=torch.int32)
    cache = torch.empty(num_blocks, h, layout.page_bytes, dtype=torch.uint8, device=DEV)
    times = {w: graph_time([lambda w=w: compress_store(k, v, s, ids, cache, layout, num_warps=w)], reps)
             for w in (8, 16)}  # fmt: skip
    w = min(times, key=times.get)
    us = times[w]
    moved = k.numel() * 2 * 2 + s.numel() * 4 + num_blocks * h * layout.page_bytes
    return {
        "kernel": "compress_store", "batch": num_blocks, "context": BLOCK, "time_us": us, "num_warps": w,
        "time_us_by_warps": times, "tokens_per_s": num_blocks * BLOCK / us * 1e6, "bytes_moved": moved,
        "achieved_gbps": moved / us / 1e3,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------- report
def markdown(res) -> str:
    lines = [
        (
            f"GPU: {res['gpu']}; torch {res['torch']}, triton {res['triton']}; commit {res['commit']}; "
            f"{res['date']}; copy bandwidth {res['copy_gbps']:.0f} GB/s (read + write)"
        ),
        "",
        (
            "| kernel | batch | context | ours (us) | SDPA (us) | speedup | bytes read ours / SDPA (MB) | "
            "ours GB/s (% of copy) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["records"]:
        if r["kernel"] != "decode":
            continue
        if "time_us" not in r:
            lines.append(f"| decode | {r['batch']} | {r['context']} | - | - | - | - | {r.get('error', '')} |")
            continue
        lines.append(
            f"| decode | {r['batch']} | {r['context']} | {r['time_us']:.1f} | {r['baseline_time_us']:.1f} | "
            f"{r['speedup']:.2f}x | {r['bytes_read'] / 1e6:.1f} / {r['baseline_bytes_read'] / 1e6:.1f} | "
            f"{r['achieved_gbps']:.0f} ({100 * r['fraction_of_copy']:.0f} %) |"
        )
    lines += [
        "",
        (
            "| prefill tokens | SDPA causal (us) | ours attention (us) | probe scores (us) | compress (us) | "
            "overhead (probes + compress) / SDPA | full path / SDPA |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["records"]:
        if r["kernel"] == "prefill":
            lines.append(
                f"| {r['context']} | {r['baseline_time_us']:.0f} | {r['attention_us']:.0f} | "
                f"{r['probe_us']:.0f} | {r['compress_us']:.0f} | {100 * r['overhead_fraction']:.1f} % | "
                f"{r['full_path_vs_sdpa']:.2f}x |"
            )
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


def plot(res, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = [r for r in res["records"] if r["kernel"] == "decode" and "time_us" in r]
    labels = [f"b{r['batch']}\n{r['context'] // 1024}k" for r in dec]
    x = range(len(dec))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.bar([i - 0.2 for i in x], [r["baseline_time_us"] for r in dec], 0.4, label="bf16 SDPA")
    a.bar([i + 0.2 for i in x], [r["time_us"] for r in dec], 0.4, label="ZipCache pages")
    a.set_yscale("log")
    a.set_ylabel("decode attention, us")
    a.set_xticks(list(x), labels)
    a.legend()
    b.bar([i - 0.2 for i in x], [r["baseline_gbps"] for r in dec], 0.4, label="bf16 SDPA")
    b.bar([i + 0.2 for i in x], [r["achieved_gbps"] for r in dec], 0.4, label="ZipCache pages")
    b.axhline(res["copy_gbps"], color="k", ls="--", label="device copy")
    b.set_ylabel("GB/s of bytes read")
    b.set_xticks(list(x), labels)
    b.legend()
    fig.suptitle(f"{res['gpu']}: decode, LLaMA3-8B attention (32/8/128), one layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="a few small cases only")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    layout = PageLayout(BLOCK, MODEL["head_size"])
    res = {
        "gpu": torch.cuda.get_device_name(DEV),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "commit": args.commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": MODEL,
        "layout": {
            "block_size": BLOCK,
            "head_size": MODEL["head_size"],
            "bits": [4, 2],
            "salient_ratio": 0.6,
            "page_bytes": layout.page_bytes,
            "capacity_vs_bf16": layout.capacity_vs_bf16,
        },
    }
    res["copy_gbps"] = copy_bandwidth(args.reps)
    print(f"copy bandwidth {res['copy_gbps']:.0f} GB/s")
    pool = page_pool(layout, POOL_PAGES)
    res["check"] = check_decode(layout, pool)
    print(f"decode vs twin at batch 2, 4k: {res['check']}")
    cfg, res["sweep"] = sweep_decode(layout, pool, args.reps)
    res["decode_config"] = cfg
    print(f"decode config: {cfg}")
    cases = [(1, 4096), (16, 32768)] if args.quick else DECODE_CASES
    res["records"] = bench_decode(layout, pool, cfg, res["copy_gbps"], args.reps, cases)
    del pool
    for n_tok in PREFILL_LENGTHS[:1] if args.quick else PREFILL_LENGTHS:
        torch.cuda.empty_cache()
        res["records"].append(prefill_case(layout, args.reps, n_tok))
    res["records"].append(bench_compress(layout, args.reps, COMPRESS_BLOCKS))
    res["seconds"] = time.time() - t0
    (out / "h200.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "h200.md").write_text(md + "\n")
    try:
        plot(res, out / "h200_decode.png")
    except Exception as e:  # noqa: BLE001 (the table matters more than the plot)
        print(f"plot failed: {e}")
    print(md)


if __name__ == "__main__":
    main()
