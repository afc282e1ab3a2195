"""Nsight Compute view of ``kernels/compress_store`` on a prompt's blocks: occupancy, stall reasons and the
hottest SASS lines (one device call, well under a minute of GPU).

    PYTHONPATH=. python benchmarks/ncu_compress.py [--context 4096] [--num-warps 4] [--probes]

Re-executes itself under ``ncu`` (``benchmarks/ncu_decode_v2.profile``) with ``--run``: the 32 (4k) blocks x 8
KV heads of LLaMA3-8B geometry, ``vllm`` preset, block 128, compressed three times (the third is profiled);
``--probes``: the blocks scored by their probes inside the kernel at the default launch (the engine step's path;
``--num-warps`` unused), the inputs of ``bench_compress.prompt_inputs``.
``SourceCounters`` lists the SASS locations where warps stall most.
"""

from __future__ import annotations

import argparse

from benchmarks.ncu_decode_v2 import SECTIONS, profile


def run(context: int, num_warps: int, probes: bool = False) -> None:
    import torch

    if probes:
        from benchmarks.bench_compress import prompt_inputs
        from zipcache_vllm.engine.ops import kernel_module

        layout, k, v, off, pq, ids, cache = prompt_inputs(context)
        for _ in range(3):
            kernel_module("compress_store").compress_store(k, v, None, ids, cache, layout, probe_query=pq,
                                                           probe_offsets=off)  # fmt: skip
        torch.cuda.synchronize()
        return

    from zipcache_vllm.engine.layout import PageLayout
    from zipcache_vllm.engine.ops import kernel_module
    from zipcache_vllm.method.config import ZipCacheConfig

    layout = PageLayout.from_config(ZipCacheConfig.load("vllm", block_size=128), 128)
    nb, h = context // 128, 8
    k = (torch.randn(nb * 128, h, 128, device="cuda") * torch.linspace(0.5, 3, 128, device="cuda")).bfloat16()
    v = torch.randn(nb * 128, h, 128, device="cuda").bfloat16()
    scores = torch.rand(nb * 128, h, device="cuda")
    ids = torch.arange(nb, device="cuda", dtype=torch.int32)
    cache = torch.zeros(nb, h, layout.page_bytes, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        kernel_module("compress_store").compress_store(k, v, scores, ids, cache, layout, num_warps=num_warps)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--probes", action="store_true")
    ap.add_argument("--run", action="store_true")
    a = ap.parse_args()
    if a.run:
        run(a.context, a.num_warps, a.probes)
        return
    extra = ["--probes"] if a.probes else []
    label = "scored in compress, default launch" if a.probes else f"{a.num_warps} warps"
    profile("compress_store", [__file__, "--run", "--context", str(a.context), "--num-warps", str(a.num_warps),
                               *extra], f"compress_store {a.context} tokens, {label}", SECTIONS + ["SourceCounters"])


if __name__ == "__main__":
    main()
