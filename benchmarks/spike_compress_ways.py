"""Spike: ``compress_store`` with the blocks scored inside it, at the default launch and at fixed launches (rows
per tile x warps, 1 or 2 programs per (block, KV head)), and with ``--two-kernels`` the engine step's path (the
probe-score kernel, then ``compress_store`` given the scores), printing each time as it comes (a hang shows where
it is). The hand-off variants of 56b69e9, timed here, were dropped (docs/performance.md).

    PYTHONPATH=. python -u benchmarks/spike_compress_ways.py [--contexts 4096,8192] [--two-kernels]

The prompt of ``bench_compress.prompt_inputs`` (LLaMA3-8B KV geometry, ``vllm`` preset page), CUDA-graph replays
(``_timing.graph_time_us``); every variant's pages are checked against the default's first.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._timing import graph_time_us
from benchmarks.bench_compress import prompt_inputs, prompt_scorer
from zipcache_vllm.engine.ops import kernel_module

cs = kernel_module("compress_store")  # the module (the package exports its function under the same name)
VARIANTS = {
    "default": {},
    "16x2": {"num_warps": 2, "rows_per_tile": 16},
    "32x4": {"num_warps": 4, "rows_per_tile": 32},
    "2 programs 16x2": {"num_warps": 2, "rows_per_tile": 16, "programs": 2},
    "2 programs 32x4": {"num_warps": 4, "rows_per_tile": 32, "programs": 2},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,8192")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--two-kernels", action="store_true",
                    help="also block_probe_scores (2, 4, 8 warps) then compress_store given the scores (default "
                    "launch)")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    for ctx in map(int, a.contexts.split(",")):
        layout, k, v, off, pq, ids, cache = prompt_inputs(ctx)
        kw = {"probe_query": pq, "probe_offsets": off}
        cs.compress_store(k, v, None, ids, cache, layout, **kw)
        ref = cache.clone()
        for name, extra in VARIANTS.items():
            t0 = time.time()

            def run(extra=extra, layout=layout, k=k, v=v, ids=ids, cache=cache, kw=kw):
                cs.compress_store(k, v, None, ids, cache, layout, **kw, **extra)

            _time(f"{ctx} scored in compress, {name}", run, cache, ref, a.reps, t0)
        if a.two_kernels:
            _two_kernels(ctx, layout, k, v, off, pq, ids, cache, a.reps)


def _two_kernels(ctx, layout, k, v, off, pq, ids, cache, reps) -> None:
    """The scores by ``block_probe_scores`` then ``compress_store`` given them (default launch); pages checked
    against the 4-warp pair's (the scores' rounding differs from the fused kernel's, so a near-tie may rank
    differently there: the fused default's pages are compared too). A programmatic dependent launch of the second
    kernel (d83d3e7) was timed here and dropped: slower (H100, 4k 30.2 vs 26.3 us; 16k 107.0 vs 105.4)."""
    scores, score = prompt_scorer(layout, k, pq, off)
    fused = cache.clone()
    ref = None
    for warps in (4, 2, 8):
        t0 = time.time()

        def run(warps=warps):
            score(warps)
            cs.compress_store(k, v, scores, ids, cache, layout)

        if ref is None:
            cache.zero_()
            run()
            torch.cuda.synchronize()
            ref = cache.clone()
            print(f"{ctx} two kernels: pages equal to the fused kernel's {torch.equal(ref, fused)}", flush=True)
        _time(f"{ctx} scores kernel ({warps} warps) + compress", run, cache, ref, reps, t0)


def _time(label, run, cache, ref, reps, t0) -> None:
    cache.zero_()
    run()
    torch.cuda.synchronize()
    ok = torch.equal(cache, ref)
    try:
        t = f"{graph_time_us(run, reps):.1f} us"
    except Exception as e:  # noqa: BLE001 (a capture that fails is reported, the spike goes on)
        t = f"failed ({type(e).__name__}: {e})"
    print(f"{label}: {t}, pages equal {ok} ({time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
