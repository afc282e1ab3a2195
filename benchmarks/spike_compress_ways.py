"""Spike: ``compress_store`` with the blocks scored inside it, at the default launch and at fixed launches with
and without ``split_kv``, printing each time as it comes (a hang shows where it is). The hand-off variants of
56b69e9, timed here, were dropped (docs/performance.md).

    PYTHONPATH=. python -u benchmarks/spike_compress_ways.py [--contexts 4096,8192]

The prompt of ``bench_compress.prompt_inputs`` (LLaMA3-8B KV geometry, ``vllm`` preset page), CUDA-graph replays
(``_timing.graph_time_us``); every variant's pages are checked against the default's first.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._timing import graph_time_us
from benchmarks.bench_compress import prompt_inputs
from zipcache_vllm.engine.ops import kernel_module

cs = kernel_module("compress_store")  # the module (the package exports its function under the same name)
VARIANTS = {
    "default": {},
    "16x2": {"num_warps": 2, "rows_per_tile": 16},
    "32x4": {"num_warps": 4, "rows_per_tile": 32},
    "split 16x2": {"num_warps": 2, "rows_per_tile": 16, "split_kv": True},
    "split 32x4": {"num_warps": 4, "rows_per_tile": 32, "split_kv": True},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,8192")
    ap.add_argument("--reps", type=int, default=30)
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

            cache.zero_()
            run()
            torch.cuda.synchronize()
            ok = torch.equal(cache, ref)
            t = graph_time_us(run, a.reps)
            print(f"{ctx} scored in compress, {name}: {t:.1f} us, pages equal {ok} ({time.time() - t0:.1f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
