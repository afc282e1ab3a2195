"""A prompt's first chunk through the vLLM backend's step on one GPU: the cost beyond plain causal attention.

    PYTHONPATH=. python benchmarks/bench_prefill_step.py --commit $(git rev-parse --short HEAD) \\
        --out benchmarks/results/h200_prefill_step.json

One layer of LLaMA3-8B attention geometry (32 query / 8 KV heads, head size 128), batch 1, a prompt of
``--contexts`` tokens arriving as one chunk, the ``vllm`` preset (block 128). Timed side by side over ``--reps``
repetitions of the same step (it only writes pages and staging, which a repetition overwrites with the same
values):

* ``step``: :func:`zipcache_vllm.engine.step.zipcache_attention` as the backend runs it on CUDA: the complete
  blocks scored by their own probes (``kernels/block_scores``, the block rule) and compressed
  (``kernels/compress_store``) first, then the chunk attended by ``kernels/prefill_attention`` (its pages
  dequantized to a bf16 scratch, then one flash-attention launch under the block rule); the rest staged;
* ``attention``: that ``prefill_attention`` call alone (dequantization + flash kernel);
* ``sdpa``: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` on the bf16 chunk, the baseline.

Times: GPU time per call (the kernels' device time summed by the torch profiler, ``*_gpu_us``) and eager wall
time with a sync per call (``*_wall_us``: the step's Python included; prefill runs eagerly in vLLM).
``overhead`` = step / sdpa - 1 on GPU time (issue 11's target: <= 10 %); ``probe_compress_gpu_us`` = step -
attention (probe scores, compression, staging copies). ``--sweep`` also times the attention kernel for each
tile configuration of ``SWEEP`` and each kernel variant of ``VARIANTS`` (``--sweep variants``: the default tile
and the variants).

Also a later chunk (issue 11's ``chunked_prefill`` record): ``--chunk`` queries over a ``--prefix`` of compressed
pages, the attention kernel alone (``time_us``) and the whole step, against SDPA over as many bf16 keys
(``baseline_time_us``, lower-right causal), ``speedup`` = SDPA / ours.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time

import torch

from zipcache_vllm.engine.block_manager import BlockManager
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.engine.ops import kernel_ops
from zipcache_vllm.engine.staging import Staging
from zipcache_vllm.engine.step import prepare_step, zipcache_attention
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.method.saliency import num_block_probes

H, HQ, D = 8, 32, 128


def timed(fn, reps: int, breakdown: dict | None = None, burst: dict | None = None) -> tuple[float, float]:
    """(GPU us, wall us) per call: the sum of the kernels' device time (torch profiler) and the eager wall
    time with a sync per call (host work included: prefill steps run eagerly in vLLM). ``breakdown``: filled
    with the GPU us per call of each kernel (the 10 longest). ``burst``: ``{"burst_us": ...}``, the wall time
    per call of ``reps`` calls issued back to back with one sync at the end, as the layers of an eager
    prefill are: it equals the GPU time when the host runs ahead (no synchronisation inside a call), the host
    time when the host is the slower side."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    gpu = sum(e.self_device_time_total for e in events) / reps
    if breakdown is not None:
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:10]:
            breakdown[e.key[:80]] = e.self_device_time_total / reps
    walls = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        walls.append(e0.elapsed_time(e1) * 1e3)
    if burst is not None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        burst["burst_us"] = (time.perf_counter() - t0) / reps * 1e6
    return gpu, statistics.median(walls)


def prompt_calls(context: int) -> tuple[dict, callable]:
    """The calls timed for a prompt of ``context`` tokens as one chunk: ``{"step", "attention", "sdpa"}``, and
    ``attend(config)``, the attention kernel alone with one ``_config`` variant (pages written once here)."""
    cfg = ZipCacheConfig.load("vllm", block_size=128)
    layout = PageLayout.from_config(cfg, D)
    n = layout.block_size
    blocks = -(-context // n)
    dev = "cuda"
    q = torch.randn(context, HQ, D, device=dev).bfloat16()
    k = (torch.randn(context, H, D, device=dev) * torch.linspace(0.5, 3, D, device=dev)).bfloat16()
    v = torch.randn(context, H, D, device=dev).bfloat16()
    kv = torch.zeros(blocks + 1, H, layout.page_bytes, dtype=torch.uint8, device=dev)
    staging = Staging.allocate(4, n, H, D, HQ, num_block_probes(cfg, n), device=dev)
    table = list(range(1, blocks + 1))
    bt = torch.tensor([table], dtype=torch.int32, device=dev)
    qsl = torch.tensor([0, context], dtype=torch.int32)
    seq_lens = torch.tensor([context], dtype=torch.int32)
    slots = torch.tensor([table[p // n] * n + p % n for p in range(context)], device=dev)
    out = torch.empty_like(q)
    plan = BlockManager(3, n).plan([table], [0], [context])
    step = prepare_step(plan, qsl, seq_lens, device=torch.device(dev))
    ops = kernel_ops("triton")

    seq_lens_d, qsl_d = seq_lens.to(dev), qsl.to(dev)  # vLLM's metadata: on the device already

    def run():
        return zipcache_attention(q, k, v, kv, bt, seq_lens_d, qsl_d, slots, staging, step, layout, cfg,
                                  layer_idx=0, out=out, kernels=ops)

    run()  # writes every page the attention reads
    meta = dict(kv_cache=kv, layout=layout, block_table=bt, query_start_loc=qsl.to(dev), seq_lens=seq_lens.to(dev),
                tail_key=staging.key, tail_value=staging.value, tail_slots=torch.zeros(1, dtype=torch.int32,
                device=dev), tail_lens=torch.zeros(1, dtype=torch.int32, device=dev), scale=D**-0.5)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    variants = {
        "step": run,
        "attention": lambda: ops.prefill_attention(q, k, v, context, **meta),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                                                         enable_gqa=True),
    }
    return variants, lambda c: ops_prefill(q, k, v, context, meta, c)


def case(context: int, reps: int, sweep: str | None = None) -> dict:
    variants, attend = prompt_calls(context)
    res = {"kernel": "prefill_step", "context": context, "batch": 1}
    res["step_kernels_us"] = {}
    for name, fn in variants.items():
        b = {}
        res[f"{name}_gpu_us"], res[f"{name}_wall_us"] = timed(fn, reps, res["step_kernels_us"] if name == "step"
                                                              else None, b)  # fmt: skip
        res[f"{name}_burst_us"] = b["burst_us"]
    res["overhead"] = res["step_gpu_us"] / res["sdpa_gpu_us"] - 1
    res["attention_vs_sdpa"] = res["attention_gpu_us"] / res["sdpa_gpu_us"]
    res["probe_compress_gpu_us"] = res["step_gpu_us"] - res["attention_gpu_us"]  # + staging copies
    res["overhead_wall"] = res["step_wall_us"] / res["sdpa_wall_us"] - 1
    if sweep:
        res["sweep"] = sweep_configs(attend, reps, sweep)
    return res


SWEEP = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages) of kernels/prefill_attention (sass_prefill.py: no spills)
    (128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3),
]
VARIANTS = [  # (name, tile or None for the default one, _config keys) timed after SWEEP by --sweep
    ("pointer loads", None, {"TMA": False, "STAGES_A": None}),
    ("tma", None, {"TMA": True, "STAGES_A": None}),
    ("tma", (128, 64, 8, 3), {"TMA": True, "STAGES_A": None}),
    ("tma+a3, 1 stage elsewhere", (128, 128, 8, 1), {"TMA": True, "STAGES_A": 3}),
    ("tma+a3", (128, 64, 8, 2), {"TMA": True, "STAGES_A": 3}),
]


def sweep_entries(which: str = "all") -> list[tuple[str, dict]]:
    """``(label, config)`` for each tile of ``SWEEP`` and each of ``VARIANTS`` (config: the keys of
    ``prefill_attention._config`` it sets; the rest stay at their defaults). ``which="variants"``: the first
    (default) tile of ``SWEEP`` alone, then ``VARIANTS``."""
    out = []
    for bm, bn, w, st in SWEEP[:1] if which == "variants" else SWEEP:
        out.append((f"{bm}x{bn} w{w} s{st}", {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}))
    for name, tile, opts in VARIANTS:
        bm, bn, w, st = tile or SWEEP[0]
        out.append((f"{bm}x{bn} w{w} s{st} {name}",
                    {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, **opts}))
    return out


def ops_prefill(q, k, v, max_query_len, meta, config):
    from zipcache_vllm.engine.ops import kernel_module

    return kernel_module("prefill_attention").prefill_attention(q, k, v, max_query_len=max_query_len,
                                                                config=config, **meta)


def sweep_configs(fn, reps: int, which: str = "all") -> list[dict]:
    """GPU time of the attention kernel for each entry of ``sweep_entries(which)`` (a failing one is noted)."""
    rows = []
    for label, c in sweep_entries(which):
        try:
            rows.append({"label": label, **c, "gpu_us": timed(lambda c=c: fn(c), reps)[0]})
        except Exception as e:  # noqa: BLE001 (out of shared memory or registers: recorded, not fatal)
            rows.append({"label": label, **c, "error": f"{type(e).__name__}: {str(e)[:120]}"})
        print(f"    sweep {label}: {rows[-1].get('gpu_us', rows[-1].get('error'))}", flush=True)
    return rows


def chunked_case(prefix: int, chunk: int, reps: int, sweep: str | None = None) -> dict:
    """A later chunk: ``chunk`` queries over a ``prefix`` of compressed pages (written directly,
    engine/synthetic) plus themselves, through the step (``kernels/prefill_attention``, probe scores, compression
    of the chunk's complete blocks) and the attention kernel alone, against SDPA over the same number of bf16
    keys (lower-right causal)."""
    from torch.nn.attention.bias import causal_lower_right

    from zipcache_vllm.engine.synthetic import admit, template_pages

    cfg = ZipCacheConfig.load("vllm", block_size=128)
    layout = PageLayout.from_config(cfg, D)
    n, dev = layout.block_size, "cuda"
    total = prefix + chunk
    blocks = -(-total // n)
    kv = torch.zeros(blocks + 1, H, layout.page_bytes, dtype=torch.uint8, device=dev)
    staging = Staging.allocate(4, n, H, D, HQ, num_block_probes(cfg, n), device=dev)
    table = list(range(1, blocks + 1))
    bm = BlockManager(3, n)
    admit(bm, table, prefix, [kv], [staging], [template_pages(32, H, layout, dev)], seed=0)
    q = torch.randn(chunk, HQ, D, device=dev).bfloat16()
    k = (torch.randn(chunk, H, D, device=dev) * torch.linspace(0.5, 3, D, device=dev)).bfloat16()
    v = torch.randn(chunk, H, D, device=dev).bfloat16()
    bt = torch.tensor([table], dtype=torch.int32, device=dev)
    qsl = torch.tensor([0, chunk], dtype=torch.int32)
    seq_lens = torch.tensor([total], dtype=torch.int32)
    slots = torch.tensor([table[p // n] * n + p % n for p in range(prefix, total)], device=dev)
    step = prepare_step(bm.plan([table], [prefix], [chunk]), qsl, seq_lens, device=torch.device(dev))
    ops = kernel_ops("triton")
    out = torch.empty_like(q)
    kb = torch.randn(1, H, total, D, device=dev).bfloat16()
    vb = torch.randn_like(kb)
    qb = q.transpose(0, 1).unsqueeze(0)
    bias = causal_lower_right(chunk, total)
    seq_lens_d, qsl_d = seq_lens.to(dev), qsl.to(dev)  # vLLM's metadata: on the device already
    meta = dict(kv_cache=kv, layout=layout, block_table=bt, query_start_loc=qsl.to(dev), seq_lens=seq_lens.to(dev),
                tail_key=staging.key, tail_value=staging.value, tail_slots=torch.zeros(1, dtype=torch.int32,
                device=dev), tail_lens=torch.zeros(1, dtype=torch.int32, device=dev), scale=D**-0.5)
    variants = {
        "step": lambda: zipcache_attention(q, k, v, kv, bt, seq_lens_d, qsl_d, slots, staging, step, layout, cfg,
                                           layer_idx=0, out=out, kernels=ops),
        "attention": lambda: ops.prefill_attention(q, k, v, chunk, **meta),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias,
                                                                         enable_gqa=True),
    }
    res = {"kernel": "chunked_prefill", "context": prefix, "chunk": chunk, "batch": 1}
    res["step_kernels_us"] = {}
    for name, fn in variants.items():
        res[f"{name}_gpu_us"], res[f"{name}_wall_us"] = timed(fn, reps, res["step_kernels_us"] if name == "step"
                                                              else None)
    res["time_us"], res["baseline_time_us"] = res["attention_gpu_us"], res["sdpa_gpu_us"]
    res["speedup"] = res["sdpa_gpu_us"] / res["attention_gpu_us"]
    if sweep:
        res["sweep"] = sweep_configs(lambda c: ops_prefill(q, k, v, chunk, meta, c), reps, sweep)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--prefix", type=int, default=30720, help="compressed prefix of the chunked case")
    ap.add_argument("--chunk", type=int, default=2048, help="chunk of the chunked case (0: skip it)")
    ap.add_argument("--sweep", nargs="?", const="all", choices=["all", "variants"],
                    help="also time the attention kernel's tile configurations and variants (variants: the default "
                    "tile and VARIANTS only)")  # fmt: skip
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_prefill_step.py needs a CUDA GPU")
    records = [case(int(c), args.reps, args.sweep) for c in args.contexts.split(",")]
    chunked = [chunked_case(args.prefix, args.chunk, args.reps, args.sweep)] if args.chunk else []
    results = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": args.commit,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "records": records + chunked,
    }  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print("| context | step GPU us (wall; back to back) | attention alone | probes + compress + staging | SDPA causal "
          "(wall; back to back) | overhead |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['context']} | {r['step_gpu_us']:.0f} ({r['step_wall_us']:.0f}; {r['step_burst_us']:.0f}) | "
              f"{r['attention_gpu_us']:.0f} ({r['attention_vs_sdpa']:.2f}x SDPA) | {r['probe_compress_gpu_us']:.0f} | "
              f"{r['sdpa_gpu_us']:.0f} ({r['sdpa_wall_us']:.0f}; {r['sdpa_burst_us']:.0f}) | {r['overhead']:+.0%} |")
    for r in records + chunked:
        print(f"step kernels at {r['context']} (GPU us per call): "
              + ", ".join(f"{k} {v:.0f}" for k, v in r["step_kernels_us"].items()))
    if args.sweep:  # attention GPU us per sweep entry and case (dequantization included), and vs SDPA
        cases = records + chunked
        print("| config | " + " | ".join(f"{r['context']}" + (f" + {r['chunk']}" if "chunk" in r else "")
                                        for r in cases) + " |")  # fmt: skip
        print("|---" * (len(cases) + 1) + "|")
        for j, row in enumerate(cases[0]["sweep"]):
            cells = []
            for r in cases:
                x = r["sweep"][j]
                cells.append(f"{x['gpu_us']:.0f} ({x['gpu_us'] / r['sdpa_gpu_us']:.2f}x SDPA)" if "gpu_us" in x
                             else "error")  # fmt: skip
            print(f"| {row['label']} | " + " | ".join(cells) + " |")
    for r in chunked:
        print(f"chunked prefill: {r['chunk']} queries over {r['context']} compressed tokens: attention "
              f"{r['attention_gpu_us']:.0f} us, step {r['step_gpu_us']:.0f} us ({r['step_wall_us']:.0f} wall), SDPA "
              f"over bf16 {r['sdpa_gpu_us']:.0f} us: speedup {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
