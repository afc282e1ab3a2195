"""CPU decode step of one layer: the torch path (dequantize every page) vs the numba path (read the codes).

    python benchmarks/bench_cpu_decode.py [--rows 1,8] [--context 520,2000] [--threads 2] [--preset vllm]

SmolLM2-135M geometry (9 query heads, 3 KV heads, head size 64, blocks of 128), the ``vllm`` preset (keys 0.8,
values 0.2 salient; ``--preset paged``: 0.6 for both). Each row is one decode query over ``context`` tokens: full
pages plus a bf16 tail. Prints one line per case and a table last.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.block_manager import BlockManager
from zipcache_vllm.engine.cpu_decode import decode_attend, decode_attend_codes
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.engine.staging import Staging
from zipcache_vllm.engine.step import prepare_step
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.method.saliency import num_block_probes

N, H, G, D = 128, 3, 3, 64


def case(rows: int, context: int, repeats: int, preset: str = "vllm") -> dict:
    cfg = ZipCacheConfig.load(preset, block_size=N)
    lay = PageLayout.from_config(cfg, D)
    pages = context // N
    tail = context - pages * N
    num_blocks = rows * (pages + 1) + 1
    gen = torch.Generator().manual_seed(0)
    cache = torch.zeros(num_blocks, H, lay.page_bytes, dtype=torch.uint8)
    if pages:
        t = rows * pages * N
        k = (torch.randn(t, H, D, generator=gen) * torch.linspace(0.5, 4, D)).bfloat16()
        v = torch.randn(t, H, D, generator=gen).bfloat16()
        ids = torch.arange(1, rows * pages + 1)
        paged.compress_store(k, v, torch.rand(t, H, generator=gen), ids, cache, lay)
    block_table = torch.zeros(rows, pages + 1, dtype=torch.int32)
    for r in range(rows):
        block_table[r, :pages] = torch.arange(1 + r * pages, 1 + (r + 1) * pages)
        block_table[r, pages] = rows * pages + 1 + r if rows * pages + 1 + r < num_blocks else 0
    bm = BlockManager(rows + 4, N)
    bm.plan(block_table.tolist(), [context - tail] * rows, [tail] * rows)  # the tails were staged by a prefill
    plan = bm.plan(block_table.tolist(), [context] * rows, [1] * rows)
    qsl = torch.arange(rows + 1, dtype=torch.int32)
    seq_lens = torch.full((rows,), context + 1, dtype=torch.int32)
    step = prepare_step(plan, qsl, seq_lens, block_table)
    staging = Staging.allocate(rows + 4, N, H, D, H * G, num_block_probes(cfg, N))
    staging.key.normal_(generator=gen)
    staging.value.normal_(generator=gen)
    q = torch.randn(rows, H * G, D, generator=gen).bfloat16()
    k1 = torch.randn(rows, H, D, generator=gen).bfloat16()
    v1 = torch.randn(rows, H, D, generator=gen).bfloat16()
    result = {"rows": rows, "context": context}
    outs = {}
    for name, fn in (("torch", decode_attend), ("numba", decode_attend_codes)):
        out = torch.empty(rows, H * G, D)
        fn(q, k1, v1, cache, staging, step.decode, lay, D**-0.5, out)  # warm-up (numba compiles once)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(q, k1, v1, cache, staging, step.decode, lay, D**-0.5, out)
        result[f"{name}_ms"] = (time.perf_counter() - t0) / repeats * 1e3
        outs[name] = out.clone()
    result["max_abs_diff"] = (outs["torch"] - outs["numba"]).abs().max().item()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--context", default="520,2000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--preset", default="vllm", help="ZipCacheConfig preset (vllm, paged)")
    ap.add_argument("--output", default=None, help="JSON file for the results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for rows in map(int, args.rows.split(",")):
        for context in map(int, args.context.split(",")):
            r = case(rows, context, args.repeats, args.preset)
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"threads": args.threads, "results": results}, f, indent=1)
    print(f"\n{'rows':>5} {'context':>8} {'torch ms':>9} {'numba ms':>9} {'speed-up':>9} {'max diff':>9}")
    for r in results:
        print(f"{r['rows']:>5} {r['context']:>8} {r['torch_ms']:>9.2f} {r['numba_ms']:>9.2f} "
              f"{r['torch_ms'] / r['numba_ms']:>8.1f}x {r['max_abs_diff']:>9.1e}")


if __name__ == "__main__":
    main()
