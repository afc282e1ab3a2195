"""What numba's OpenMP layer does to torch's CPU kernels when both run on one OpenMP runtime (docs/vllm-plugin.md).

    python benchmarks/probe_openmp_nesting.py [--threads 2] [--tokens 520]

Times torch's causal SDPA (SmolLM2's 9 heads x head size 64, one prompt) on ``--threads`` torch threads three
times: before numba's threading layer starts, after it starts (numba switches nested parallelism on in the
runtime it binds to), and after ``cpu_kernels.decode_threads`` (which switches it off again). Prints the
medians in ms and whether torch's runtime saw numba's switch (i.e. whether the two share it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def sdpa_ms(q: torch.Tensor, reps: int = 30) -> float:
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=520)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    q = torch.randn(1, 9, a.tokens, 64)
    from zipcache_vllm.engine import cpu_kernels

    omp = cpu_kernels._torch_openmp()
    before = sdpa_ms(q)
    import numba
    from numba.np.ufunc import parallel

    numba.config.THREADING_LAYER = "omp"
    parallel._launch_threads()
    nested = omp.omp_get_nested()
    started = sdpa_ms(q)
    omp.omp_set_nested(0)
    omp.omp_set_max_active_levels(1)
    off = sdpa_ms(q)
    print(f"causal SDPA, 9 heads x {a.tokens} tokens, {a.threads} torch threads: before numba's layer {before:.2f} ms; "
          f"after it starts {started:.2f} ms (torch's runtime nested = {nested}: "
          f"{'shared' if nested else 'not shared'}); nesting off again {off:.2f} ms")


if __name__ == "__main__":
    main()
