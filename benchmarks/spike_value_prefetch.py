"""Spike: the score kernel asks L2 for the block's values, so that ``compress_store`` finds them there.

    PYTHONPATH=. python -u benchmarks/spike_value_prefetch.py [--contexts 4096,16384]

The engine step runs ``block_probe_scores`` then ``compress_store`` on a prompt's complete blocks. The score
kernel reads the keys (so ``compress_store``'s key loads hit L2) but not the values: where the prompt's K / V come
from HBM (``bench_kernels``' prefill record since 2026-12-06 times the step on copies of its inputs that exceed 3x
the L2, as SDPA is timed), the values' program of ``compress_store`` waits on HBM for every tile of its first pass.
``_score_prefetch_kernel`` is ``block_probe_scores``' kernel (the same :func:`probe_scores` and
:func:`store_scores`, so the same scores) that first issues ``prefetch.global.L2`` for the block's value rows
of its KV head (2 lines a row at head size 128; nothing waits on them). Timed side by side, twice, against the
step's kernels: on input copies (HBM, the record's way) and one call on the same inputs (L2-resident), CUDA-graph
replays (``bench_kernels.graph_time``; the prompt of ``bench_compress.prompt_inputs``).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.bench_compress import prompt_inputs
from benchmarks.bench_kernels import graph_time, input_copies
from zipcache_vllm.engine.ops import kernel_module

_ks = kernel_module("block_scores")
_cs = kernel_module("compress_store")
probe_scores, store_scores = _ks.probe_scores, _ks.store_scores


@triton.jit
def _score_prefetch_kernel(
    k_ptr, v_ptr, stride_k_blk, stride_k_tok, stride_k_head,  # keys / values [S, N, H, D], same strides
    q_ptr, stride_q_blk, stride_q_probe, stride_q_head, off_ptr, stride_off,
    out_ptr, stride_o_blk, stride_o_tok, qk_scale,
    N: tl.constexpr, N_PAD: tl.constexpr, P: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
    NORMALIZER: tl.constexpr, DOT_FP32: tl.constexpr, LINES: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, N_PAD)
    t = tl.where(t < N, t, 0)
    ln = tl.arange(0, LINES) * (D // LINES)
    vp = v_ptr + blk * stride_k_blk + kvh * stride_k_head + t[:, None] * stride_k_tok + ln[None, :]
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [vp], dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip
    acc = probe_scores(k_ptr + blk * stride_k_blk + kvh * stride_k_head, stride_k_tok, q_ptr + blk * stride_q_blk,
                       stride_q_probe, stride_q_head, off_ptr + blk * stride_off, kvh, qk_scale, N, N_PAD, P, G,
                       ROWS, D, DOT_FP32)  # fmt: skip
    o = out_ptr + blk * stride_o_blk + tl.arange(0, N_PAD) * stride_o_tok + kvh
    store_scores(acc, o, off_ptr + blk * stride_off, N, N_PAD, P, NORMALIZER)


def steps(layout, k, v, pq, off, ids, cache, prefetch: bool):
    """The step's two kernels on one input set (the score kernel with or without the values' prefetch)."""
    n, h, d = layout.block_size, k.shape[1], k.shape[2]
    nb = k.shape[0] // n
    k4, v4 = k.view(nb, n, h, d), v.view(nb, n, h, d)
    scores = torch.empty(nb, n, h, device=k.device)
    src = torch.arange(nb, device=k.device, dtype=torch.int32)
    args = _ks.probe_args(k4, pq, off, nb, "probe_nnz", "normalized", None)

    def run():
        if prefetch:
            _score_prefetch_kernel[(nb, h)](
                k4, v4, k4.stride(0), k4.stride(1), k4.stride(2),
                pq, pq.stride(0), pq.stride(1), pq.stride(2), off, off.stride(0),
                scores, scores.stride(0), scores.stride(1), LINES=d * 2 // 128, num_warps=4, **args,
            )  # fmt: skip
        else:
            _ks.block_probe_scores(k4, pq, off, src, scores)
        _cs.compress_store(k, v, scores.view(-1, h), ids, cache, layout)

    return run, scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    for ctx in map(int, a.contexts.split(",")):
        _case(ctx, a.reps)


def _case(ctx: int, reps: int) -> None:
    layout, k, v, off, pq, ids, cache = prompt_inputs(ctx)
    sets = input_copies((k, v, pq), cache.numel())
    ways, out = {}, {}
    for pf in (False, True):
        runs = [steps(layout, kc, vc, pqc, off, ids, cache, pf) for kc, vc, pqc in sets]
        ways[pf] = [r for r, _ in runs]
        cache.zero_()
        runs[0][0]()
        torch.cuda.synchronize()
        out[pf] = runs[0][1].clone(), cache.clone()
    print(f"{ctx}: with the prefetch, scores equal {torch.equal(out[True][0], out[False][0])}, pages equal "
          f"{torch.equal(out[True][1], out[False][1])}")
    for rep in range(2):
        for pf in (False, True):
            cold = graph_time(ways[pf], reps)
            hot = graph_time(ways[pf][:1], reps)
            print(f"{ctx} ({rep}) score kernel {'with' if pf else 'without'} the values' prefetch: "
                  f"{cold:.1f} us a step over {len(sets)} input copies, {hot:.1f} one call", flush=True)


if __name__ == "__main__":
    main()
