"""Timing helper shared by the GPU benchmarks: CUDA-graph replays of a callable, median microseconds."""

from __future__ import annotations

import statistics

import torch


def graph_time_us(fn, reps: int = 20) -> float:
    """Capture ``fn`` once in a CUDA graph (after one eager warm-up call) and return the median of ``reps``
    replays, each timed with CUDA events (launch overhead excluded)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)
