"""The vLLM backend's CPU decode step, without vLLM: the staging plan and 30 layers of ``zipcache_attention``.

    python benchmarks/bench_cpu_step.py [--rows 8] [--context 520] [--steps 60] [--prefill sdpa,vllm] [--threads 1]
        [--request-rows 32,128] [--decode-threads 1,2]

SmolLM2-135M geometry (9 query heads, 3 KV heads, head size 64, 30 layers, blocks of 128), the ``vllm`` preset,
the numba kernels (the CPU server's default, compiled before the timed steps as the server does), one torch
thread (``--threads``). Every row is prefilled through the step itself (one chunk; its time is printed too), then
decodes; prints the median time of a decode step (plan + all layers) over the last ``steps - 10`` steps. Used to
check that a change leaves the CPU step no slower, on one machine, back to back. ``--prefill``: the chunks'
attention by masked SDPA per block (``sdpa``) or by vLLM's CPU kernel, blocks as requests (``vllm``, the
server's default; needs vLLM's CPU build), one run each, side by side; ``--request-rows``: the vLLM prefill with
that many query rows per kernel request (``engine/step.py::REQUEST_ROWS``), each size twice, alternated.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zipcache_vllm.engine import cpu_compress, cpu_kernels
from zipcache_vllm.engine.block_manager import BlockManager
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.engine.staging import Staging
from zipcache_vllm.engine.step import prepare_step, zipcache_attention
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.method.saliency import num_block_probes

N, H, HQ, D, LAYERS = 128, 3, 9, 64, 30


def run(rows: int, context: int, steps: int, prefill: str = "sdpa", threads: int = 1,
        decode_threads: int = 1) -> tuple[float, float]:  # fmt: skip
    torch.set_num_threads(threads)
    got, why = cpu_kernels.decode_threads(decode_threads)
    if got != decode_threads:
        print(f"numba decode on {got} thread(s), not {decode_threads}: {why}", flush=True)
    paged_attention = None
    if prefill == "vllm":
        from zipcache_vllm.plugin.cpu_attention import CpuPagedAttention

        paged_attention = CpuPagedAttention(N, D)
    cfg = ZipCacheConfig.load("vllm", block_size=N)
    lay = PageLayout.from_config(cfg, D)
    width = -(-(context + steps) // N)
    kv = [torch.zeros(rows * width + 1, H, lay.page_bytes, dtype=torch.uint8) for _ in range(LAYERS)]
    staging = [Staging.allocate(rows + 8, N, H, D, HQ, num_block_probes(cfg, N)) for _ in range(LAYERS)]
    bm = BlockManager(rows + 4, N)
    tables = [list(range(1 + r * width, 1 + (r + 1) * width)) for r in range(rows)]
    bt = torch.tensor(tables, dtype=torch.int32)
    g = torch.Generator().manual_seed(0)

    def layers(q, k, v, step, sl, qsl, slots, out):
        for i in range(LAYERS):
            zipcache_attention(q, k, v, kv[i], bt, sl, qsl, slots, staging[i], step, lay, cfg, layer_idx=i, out=out,
                               kernels="numba", paged_attention=paged_attention)

    cpu_kernels.warmup(lay, H, HQ // H)  # as the backend at start-up: the timed steps load nothing
    cpu_compress.warmup(lay, H)
    t = rows * context  # prefill: one chunk per row
    qsl = torch.tensor([context * i for i in range(rows + 1)], dtype=torch.int32)
    sl = torch.full((rows,), context, dtype=torch.int32)
    slots = torch.tensor([tables[r][p // N] * N + p % N for r in range(rows) for p in range(context)])
    step = prepare_step(bm.plan(tables, [0] * rows, [context] * rows), qsl, sl, bt)
    rand = lambda *s: torch.randn(*s, generator=g).bfloat16()  # noqa: E731
    t0 = time.perf_counter()
    layers(rand(t, HQ, D), rand(t, H, D), rand(t, H, D), step, sl, qsl, slots, torch.empty(t, HQ, D))
    prefill_ms = (time.perf_counter() - t0) * 1e3
    q, k, v, out = rand(rows, HQ, D), rand(rows, H, D), rand(rows, H, D), torch.empty(rows, HQ, D)
    qsl = torch.arange(rows + 1, dtype=torch.int32)
    lens, times = [context] * rows, []
    for _ in range(steps):
        t0 = time.perf_counter()
        sl = torch.tensor([n + 1 for n in lens], dtype=torch.int32)
        step = prepare_step(bm.plan(tables, lens, [1] * rows), qsl, sl, bt)
        slots = torch.tensor([tables[r][lens[r] // N] * N + lens[r] % N for r in range(rows)])
        layers(q, k, v, step, sl, qsl, slots, out)
        times.append(time.perf_counter() - t0)
        lens = [n + 1 for n in lens]
    return prefill_ms, statistics.median(times[10:]) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--context", type=int, default=520)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--prefill", default="sdpa", help="comma list of sdpa, vllm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-threads", default="1", help="comma list: threads of the numba decode, each a run "
                    "(more than one needs numba and torch on one OpenMP runtime: cpu_kernels.decode_threads)")
    ap.add_argument("--request-rows", default=None, help="comma list: query rows per kernel request (vllm prefill)")
    args = ap.parse_args(argv)
    from zipcache_vllm.engine import step as step_module

    runs = args.prefill.split(",")
    if args.request_rows:  # vllm prefill at each request size, in turn
        runs = [f"vllm:{r}" for _ in range(2) for r in args.request_rows.split(",")]
    for how, dt in [(h, int(x)) for h in runs for x in args.decode_threads.split(",")]:
        if how.startswith("vllm:"):
            step_module.REQUEST_ROWS = int(how.split(":")[1])
        prefill, ms = run(args.rows, args.context, args.steps, how.split(":")[0], args.threads, dt)
        print(f"rows {args.rows}, context {args.context}, prefill by {how}, {args.threads} thread(s), decode on {dt}: "
              f"prefill (one "
              f"chunk per row, {LAYERS} layers' attention, probes, compression) {prefill:.0f} ms; median decode "
              f"step {ms:.2f} ms (plan + {LAYERS} layers)", flush=True)


if __name__ == "__main__":
    main()
