"""Nsight Compute view of a prompt's compression: occupancy, stall reasons and, with ``--source``, the SASS lines
where warps stall most (one device call, well under a minute of GPU per kernel).

    PYTHONPATH=. python benchmarks/ncu_compress.py [--context 4096] [--way step|given|fused] [--kernel NAME]
    PYTHONPATH=. python benchmarks/ncu_compress.py --way step --kernel block_scores --source 40

Re-executes itself under ``ncu`` (``benchmarks/_ncu.profile``) with ``--run``: the blocks of a
``--context``-token prompt of ``bench_compress.prompt_inputs`` (LLaMA3-8B KV geometry, ``vllm`` page), compressed
three times; the third launch of the kernels named ``--kernel`` is profiled. Ways: ``step``, the engine step's
path (``block_probe_scores``, then ``compress_store`` given the scores; ``--programs``); ``given``,
``compress_store`` alone on random scores (``--num-warps``, ``--programs``; 0: the default launch); ``fused``,
``compress_store`` scoring the blocks by their probes itself. ``--source N``: the N SASS lines with the most
warp-stall samples (ncu's source page), with their share of all samples, after the usual report.
"""

from __future__ import annotations

import argparse

from benchmarks._ncu import SECTIONS, profile, source_hotspots


def run(context: int, way: str, num_warps: int, programs: int) -> None:
    import torch

    from benchmarks.bench_compress import prompt_inputs, prompt_scorer
    from zipcache_vllm.engine.ops import kernel_module

    cs = kernel_module("compress_store")
    layout, k, v, off, pq, ids, cache = prompt_inputs(context)
    scores, score = prompt_scorer(layout, k, pq, off)
    scores.copy_(torch.rand_like(scores))  # the "given" way's scores (the step's way computes its own)
    launch = {"num_warps": num_warps or None, "programs": programs or None}
    for _ in range(3):
        if way == "step":
            score()
            cs.compress_store(k, v, scores, ids, cache, layout, **launch)
        elif way == "given":
            cs.compress_store(k, v, scores, ids, cache, layout, **launch)
        else:
            cs.compress_store(k, v, None, ids, cache, layout, probe_query=pq, probe_offsets=off)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--way", choices=["step", "given", "fused"], default="step")
    ap.add_argument("--kernel", default="compress_store", help="the kernel profiled (a name or part of one)")
    ap.add_argument("--num-warps", type=int, default=0, help="--way given: warps per program (0: default launch)")
    ap.add_argument("--programs", type=int, default=0, help="compress_store programs per (block, KV head), 1-4 "
                    "(0: the default launch)")
    ap.add_argument("--source", type=int, default=0, help="also list the N SASS lines with most stall samples")
    ap.add_argument("--run", action="store_true")
    a = ap.parse_args()
    if a.run:
        run(a.context, a.way, a.num_warps, a.programs)
        return
    argv = [__file__, "--run", "--context", str(a.context), "--way", a.way, "--num-warps", str(a.num_warps),
            "--programs", str(a.programs)]  # fmt: skip
    label = f"{a.kernel} ({a.way}, programs {a.programs or 'default'}), {a.context} tokens"
    profile(a.kernel, argv, label, SECTIONS)
    if a.source:
        source_hotspots(a.kernel, argv, label, a.source)


if __name__ == "__main__":
    main()
