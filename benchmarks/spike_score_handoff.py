"""Spike: is it worth moving a prompt's ranking and first passes into the score kernel (the hand-off)?

    PYTHONPATH=. python -u benchmarks/spike_score_handoff.py [--contexts 4096,16384]

``spike_compress_parts.py`` bounds what ``compress_store`` would still cost if a kernel ahead of it handed over
the page rows and the parameters (``code passes only``: H100, f7e9ea9, 4k 22.3 us after the score kernel against
25.9 for the kernel, ``benchmarks/results/h100_compress_parts_f7e9ea9.log``). This spike bounds the other side:
``_score_prep_kernel`` is ``block_probe_scores`` (same :func:`probe_scores` and :func:`store_scores`) that also
ranks the block (``compress_store._page_rows``), writes the token of each page row to ``compress_store``'s scratch
row, and reduces the block's keys to per-group channel min / max and its values to channel max |x| (the inputs of
the keys' ``(step, mn)`` and of the values' normalizer). It is timed before the ``code passes only`` variant of
``compress_store``, against the engine step's two kernels, in one graph each (CUDA-graph replays,
``_timing.graph_time_us``; the prompt of ``bench_compress.prompt_inputs``: LLaMA3-8B KV geometry, ``vllm`` page).
The pages of the cut kernel are not valid (a bound); the reductions are checked against torch on the ranking the
kernel wrote.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks._timing import graph_time_us
from benchmarks.bench_compress import prompt_inputs, prompt_scorer
from benchmarks.spike_compress_parts import CUTS, variant
from zipcache_vllm.engine.ops import kernel_module

_ks = kernel_module("block_scores")
_cs = kernel_module("compress_store")
probe_scores, store_scores, _page_rows = _ks.probe_scores, _ks.store_scores, _cs._page_rows
_BIG = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _score_prep_kernel(
    k_ptr, v_ptr, stride_k_blk, stride_k_tok, stride_k_head,  # keys / values [S, N, H, D], same strides
    q_ptr, stride_q_blk, stride_q_probe, stride_q_head, off_ptr, stride_off,
    out_ptr, stride_o_blk, stride_o_tok,  # fp32 [S, N, H]: the normalized scores
    work_ptr,  # int32 [S, H, 2, N_PAD]: the token of each page row, then the page row of each token
    par_ptr,  # fp32 [S, H, 5, D]: keys' salient min, max, regular min, max; values' max |x|
    qk_scale,
    N: tl.constexpr, N_PAD: tl.constexpr, P: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
    NORMALIZER: tl.constexpr, DOT_FP32: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr, RC: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    kb = k_ptr + blk * stride_k_blk + kvh * stride_k_head
    vb = v_ptr + blk * stride_k_blk + kvh * stride_k_head
    acc = probe_scores(kb, stride_k_tok, q_ptr + blk * stride_q_blk, stride_q_probe, stride_q_head,
                       off_ptr + blk * stride_off, kvh, qk_scale, N, N_PAD, P, G, ROWS, D, DOT_FP32)  # fmt: skip
    j = tl.arange(0, N_PAD)
    tv = j < N
    o = out_ptr + blk * stride_o_blk + j * stride_o_tok + kvh
    s = store_scores(acc, o, off_ptr + blk * stride_off, N, N_PAD, P, NORMALIZER)
    ksal, vsal, row = _page_rows(s, j, tv, SK, SV, N_PAD)
    work = work_ptr + (blk * tl.num_programs(1) + kvh) * 2 * N_PAD
    tl.store(work + row, j, mask=tv)
    tl.store(work + N_PAD + j, row, mask=tv)
    tl.debug_barrier()
    d = tl.arange(0, D)
    mn_s = tl.full((RC, D), _BIG, tl.float32)
    mx_s = tl.full((RC, D), -_BIG, tl.float32)
    mn_r = tl.full((RC, D), _BIG, tl.float32)
    mx_r = tl.full((RC, D), -_BIG, tl.float32)
    amax = tl.zeros((RC, D), tl.float32)
    for r0 in range(0, N_PAD, RC):
        rr = r0 + tl.arange(0, RC)
        rv = rr < N
        prow = tl.load(work + N_PAD + rr, mask=rv, other=N)
        ks = ((prow < SK) & rv)[:, None]
        kr = ((prow >= SK) & rv)[:, None]
        kx = tl.load(kb + rr[:, None] * stride_k_tok + d[None, :], mask=rv[:, None], other=0.0).to(tl.float32)
        vx = tl.load(vb + rr[:, None] * stride_k_tok + d[None, :], mask=rv[:, None], other=0.0).to(tl.float32)
        mn_s = tl.minimum(mn_s, tl.where(ks, kx, _BIG))
        mx_s = tl.maximum(mx_s, tl.where(ks, kx, -_BIG))
        mn_r = tl.minimum(mn_r, tl.where(kr, kx, _BIG))
        mx_r = tl.maximum(mx_r, tl.where(kr, kx, -_BIG))
        amax = tl.maximum(amax, tl.abs(vx))
    par = par_ptr + (blk * tl.num_programs(1) + kvh) * 5 * D + d
    tl.store(par, tl.min(mn_s, axis=0))
    tl.store(par + D, tl.max(mx_s, axis=0))
    tl.store(par + 2 * D, tl.min(mn_r, axis=0))
    tl.store(par + 3 * D, tl.max(mx_r, axis=0))
    tl.store(par + 4 * D, tl.max(amax, axis=0))


def score_prep(layout, k, v, pq, offsets, num_warps=4, rows=16):
    """``(scores [S, N, H], work [S, H, 2, N_PAD], par [S, H, 5, D], run)``; ``run()`` launches the kernel."""
    n, h, d = layout.block_size, k.shape[1], k.shape[2]
    nb = k.shape[0] // n
    k4, v4 = k.view(nb, n, h, d), v.view(nb, n, h, d)
    args = _ks.probe_args(k4, pq, offsets, nb, "probe_nnz", "normalized", None)
    n_pad = args["N_PAD"]
    scores = torch.empty(nb, n, h, device=k.device)
    work = torch.empty(nb, h, 2, n_pad, device=k.device, dtype=torch.int32)
    par = torch.empty(nb, h, 5, d, device=k.device)

    def run():
        _score_prep_kernel[(nb, h)](
            k4, v4, k4.stride(0), k4.stride(1), k4.stride(2),
            pq, pq.stride(0), pq.stride(1), pq.stride(2), offsets, offsets.stride(0),
            scores, scores.stride(0), scores.stride(1), work, par,
            SK=layout.num_salient_k, SV=layout.num_salient_v, RC=rows, num_warps=num_warps, **args,
        )  # fmt: skip

    return scores, work, par, run


def check(layout, k, v, scores_ref, scores, work, par) -> str:
    """The kernel's scores against ``block_probe_scores``'; its reductions against torch on the ranking it wrote."""
    n, h, d = layout.block_size, k.shape[1], k.shape[2]
    nb = k.shape[0] // n
    kf = k.view(nb, n, h, d).float().permute(0, 2, 1, 3)  # [S, H, N, D]
    vf = v.view(nb, n, h, d).float().permute(0, 2, 1, 3)
    ks = (work[:, :, 1, :n] < layout.num_salient_k)[..., None]
    big = torch.finfo(torch.float32).max
    ref = torch.stack([
        kf.masked_fill(~ks, big).amin(2), kf.masked_fill(~ks, -big).amax(2),
        kf.masked_fill(ks, big).amin(2), kf.masked_fill(ks, -big).amax(2), vf.abs().amax(2),
    ], dim=2)  # fmt: skip
    rows_ok = bool((work[:, :, 0, :n].sort(-1).values == torch.arange(n, device=k.device)).all())
    return (f"scores max diff {(scores.view(-1, h) - scores_ref).abs().max().item():.2e}, page rows a permutation "
            f"{rows_ok}, reductions equal {torch.equal(par, ref)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    cut = variant("code passes only", CUTS["code passes only"])
    for ctx in map(int, a.contexts.split(",")):
        _case(ctx, cut, a.reps)


def _case(ctx: int, cut, reps: int) -> None:
    layout, k, v, off, pq, ids, cache = prompt_inputs(ctx)
    scores, score = prompt_scorer(layout, k, pq, off)
    score()

    def step():
        score()
        _cs.compress_store(k, v, scores, ids, cache, layout)

    for warps in (4, 8):
        sp, work, par, prep = score_prep(layout, k, v, pq, off, num_warps=warps)
        prep()
        torch.cuda.synchronize()
        print(f"{ctx} score + prep kernel ({warps} warps): {check(layout, k, v, scores, sp, work, par)}")

        def handoff(prep=prep):
            prep()
            cut.compress_store(k, v, scores, ids, cache, layout)

        t = [graph_time_us(f, reps) for f in (score, prep, step, handoff, step, handoff)]
        print(f"{ctx} ({warps} warps) score kernel {t[0]:.1f} us, score + prep kernel {t[1]:.1f}; the step's "
              f"two kernels {t[2]:.1f} / {t[4]:.1f}, hand-off bound {t[3]:.1f} / {t[5]:.1f} us", flush=True)


if __name__ == "__main__":
    main()
