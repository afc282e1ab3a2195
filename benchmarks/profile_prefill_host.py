"""Where the host time of one prefill step goes (Python, launches), as vLLM runs it eagerly per layer.

    PYTHONPATH=. python benchmarks/profile_prefill_host.py [--context 4096] [--calls 50]

The step of ``bench_prefill_step.prompt_calls`` (one layer, LLaMA3-8B heads, a prompt as one chunk) called
``--calls`` times back to back under ``cProfile`` after a warm-up; prints the host microseconds per call and
the functions with the most own time. ``bench_prefill_step.py``'s back-to-back wall time is this host time
whenever it exceeds the GPU time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from benchmarks.bench_prefill_step import prompt_calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    step = prompt_calls(a.context)[0]["step"]
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.calls):
        step()
    host = (time.perf_counter() - t0) / a.calls * 1e6
    torch.cuda.synchronize()
    print(f"host us per call (issue only, no sync): {host:.0f}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.calls):
        step()
    prof.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(prof).sort_stats("tottime")
    st.print_stats(a.top)
    st.sort_stats("cumulative").print_stats(a.top)


if __name__ == "__main__":
    main()
