"""Nsight Compute view of ``kernels/prefill_attention``'s flash kernel on a prompt: occupancy, stall reasons and
the hottest SASS lines (one device call, under a minute of GPU).

    PYTHONPATH=. python benchmarks/ncu_prefill.py [--context 4096]

Re-executes itself under ``ncu`` (``benchmarks/_ncu.profile``) with ``--run``: one layer of LLaMA3-8B
heads, a prompt of ``--context`` tokens as one chunk (``bench_prefill_step.prompt_calls``), the attention
called three times (the third ``_prefill_kernel`` launch is profiled).
"""

from __future__ import annotations

import argparse

from benchmarks._ncu import SECTIONS, profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--run", action="store_true")
    a = ap.parse_args()
    if a.run:
        import torch

        from benchmarks.bench_prefill_step import prompt_calls

        attention = prompt_calls(a.context)[0]["attention"]
        for _ in range(3):
            attention()
        torch.cuda.synchronize()
        return
    profile("_prefill_kernel", [__file__, "--run", "--context", str(a.context)], f"prefill {a.context} tokens",
            SECTIONS + ["SourceCounters"])


if __name__ == "__main__":
    main()
