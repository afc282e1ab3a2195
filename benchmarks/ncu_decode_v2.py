"""Nsight Compute view of decode v2 on one case: where its warps stall (one device call, ~1 min of GPU).

    PYTHONPATH=. python benchmarks/ncu_decode_v2.py --run            # the launches ncu profiles
    PYTHONPATH=. python benchmarks/ncu_decode_v2.py [--case 16x32768] [--preset vllm] [--variant v2]

Without ``--run`` it re-executes itself under ``ncu`` (kernels whose name contains ``decode_v2``; the third launch,
after two warm-ups) and prints occupancy, throughput and the stall reasons per issued instruction, largest
first: a long-scoreboard share says warps wait for global memory, short-scoreboard for shared memory or
MUFU, wait/math-pipe for fixed-latency arithmetic, not-selected/selected for an issue-bound kernel.
"""

from __future__ import annotations

import argparse

from benchmarks._ncu import profile


def run(case: str, preset: str, variant: str) -> None:
    import torch
    from zipcache_vllm.kernels import decode_v2

    from benchmarks.bench_kernels import PRESETS, decode_inputs, page_pool

    layout = PRESETS[preset]
    batch, ctx = map(int, case.split("x"))
    args = decode_inputs(layout, page_pool(layout, 1024), batch, ctx)
    out = torch.empty(args["query"].shape, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(args["query"].shape[:2], device="cuda", dtype=torch.float32)
    fn = getattr(decode_v2, {"v2": "decode_attention_v2"}.get(variant, variant))
    for _ in range(3):
        fn(**args, out=out, lse=lse)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="16x32768")
    ap.add_argument("--preset", default="vllm")
    ap.add_argument("--variant", default="v2", help="v2 or the name of another launcher in kernels/decode_v2.py")
    ap.add_argument("--kernel", default="decode_v2")
    ap.add_argument("--run", action="store_true")
    a = ap.parse_args()
    if a.run:
        run(a.case, a.preset, a.variant)
        return
    profile(a.kernel, [__file__, "--run", "--case", a.case, "--preset", a.preset, "--variant", a.variant],
            f"{a.variant} {a.preset} {a.case}")


if __name__ == "__main__":
    main()
