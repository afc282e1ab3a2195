"""Block-rule saliency of complete blocks (ZC-7 / ZC-8 inside a block), from a fixed-size work list.

Twin: ``zipcache_vllm.engine.paged.block_probe_scores`` (``zipcache_vllm.method.saliency.block_saliency``). A
block is scored by its own probe rows (fixed positions of the block, ``saliency.block_probe_offsets``): probe
``p`` attends over keys ``0 .. offsets[p]`` of the block (block-local causal softmax, fp32); token ``j`` gets
the probabilities it receives, summed over the probes and the query heads of its GQA group, divided by the
probes at or after it (``probe_nnz``) or by ``N - j`` (``causal_count``), or not (``accumulated``).

Grid ``(entries, num_kv_heads)``: one program loads the block's ``N`` keys of one KV head once and its ``P``
probe queries x ``G`` query heads as the rows of one ``tl.dot`` (``P * G`` rows, 117 for 13 probes of 9:3
GQA). Entries with a negative source do nothing, so the decode step launches it with a fixed grid
(graph-capturable); a program reads and writes only its own block, so a block's scores never depend on the
other entries of the launch. The normalizer divides after the column sums went out and came back one per lane
(:func:`normalize_scores`; counted from the offsets, not summed from the mask), and the softmax's unseen keys
are zeros of ``exp2(-inf)`` (no second mask): sm_90 SASS at 4 warps 2,312 -> 1,488 instructions, 147 -> 102
registers (``benchmarks/sass_compress.py --block-scores``; 2026-12-05, not timed yet).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, check, check_tensor, interpreting, pow2

NORMALIZERS = {"accumulated": 0, "causal_count": 1, "probe_nnz": 2}


@triton.jit
def probe_scores(
    k_ptr, stride_k_tok,  # keys of one block and KV head: row j at k_ptr + j * stride_k_tok, D contiguous
    q_ptr, stride_q_probe, stride_q_head,  # probe queries of that block: [P, num_heads, D]
    off_ptr,  # int32 [P]: the probe offsets
    kvh, qk_scale,
    N: tl.constexpr, N_PAD: tl.constexpr, P: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
    D: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """The block rule's column sums ``[N_PAD]`` (fp32) of one block and KV head, before the normalizer
    (:func:`normalize_scores`): its ``P`` probes x ``G`` query heads as the rows of one ``tl.dot`` over the
    block's keys (shared by ``_block_scores_kernel`` and the fused scoring of ``compress_store``)."""
    j = tl.arange(0, N_PAD)
    dk = tl.arange(0, D)
    k = tl.load(k_ptr + j[:, None] * stride_k_tok + dk[None, :], mask=(j < N)[:, None], other=0.0)
    r = tl.arange(0, ROWS)
    p = r // G  # row r = probe p, query head kvh * G + r % G
    rvalid = p < P
    off = tl.load(off_ptr + p, mask=rvalid, other=-1)
    heads = kvh * G + r % G
    q = tl.load(q_ptr + p[:, None] * stride_q_probe + heads[:, None] * stride_q_head + dk[None, :],
                mask=rvalid[:, None], other=0.0)  # fmt: skip
    if DOT_FP32:  # noqa: SIM108 (a constexpr branch; the interpreter multiplies bf16 bit patterns as integers)
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        s = tl.dot(q.to(k.dtype), tl.trans(k))
    seen = (j[None, :] <= off[:, None]) & (j < N)[None, :]  # off = -1 on padded rows: nothing seen
    s = tl.where(seen, s, float("-inf"))
    m = tl.maximum(tl.max(s, axis=1), -1e30) * qk_scale  # the scale > 0 commutes with the max
    w = tl.exp2(tl.fma(s, qk_scale, -m[:, None]))  # one FMA an element; 0 where unseen (s is -inf there, m finite)
    w = w * (1.0 / tl.maximum(tl.sum(w, axis=1), 1e-30))[:, None]  # a reciprocal per row, not a division each
    return tl.sum(w, axis=0)


@triton.jit
def normalize_scores(acc, j, off_ptr, N: tl.constexpr, P: tl.constexpr, NORMALIZER: tl.constexpr):
    """The block rule's normalizer applied to the column sums ``acc`` of :func:`probe_scores` (tokens ``j``):
    ``probe_nnz`` divides by the probes at or after each token, counted from the ``P`` offsets (not a column
    sum of the ``[P * G, N]`` mask); ``causal_count`` by ``N - j``. Each lane divides the tokens it holds, so
    callers pass ``acc`` in a layout where a lane holds few (the sums come out of the dot's layout with 32 per
    lane)."""
    if NORMALIZER == 2:
        nnz = tl.zeros(j.shape, tl.int32)
        for i in tl.static_range(P):
            nnz += (j <= tl.load(off_ptr + i)).to(tl.int32)
        acc = acc / tl.maximum(nnz, 1).to(tl.float32)
    elif NORMALIZER == 1:
        acc = acc / tl.maximum(N - j, 1).to(tl.float32)
    return acc


@triton.jit
def store_scores(acc, o, off_ptr, N: tl.constexpr, N_PAD: tl.constexpr, P: tl.constexpr, NORMALIZER: tl.constexpr):
    """Store the column sums ``acc`` of :func:`probe_scores` at ``o`` (token ``j`` at ``o + j * stride``, ``o`` a
    ``[N_PAD]`` pointer tensor) as scores, normalized: the sums go out in the dot's layout and come back one per
    lane, where :func:`normalize_scores` is cheap. Returns the normalized scores in that layout."""
    j = tl.arange(0, N_PAD)
    tl.store(o, acc, mask=j < N)
    if NORMALIZER != 0:
        tl.debug_barrier()
        acc = normalize_scores(tl.load(o, mask=j < N, other=0.0), j, off_ptr, N, P, NORMALIZER)
        tl.store(o, acc, mask=j < N)
    return acc


@triton.jit
def _block_scores_kernel(
    k_ptr, stride_k_blk, stride_k_tok, stride_k_head,  # keys [S, N, H, D], last dim contiguous
    q_ptr, stride_q_blk, stride_q_probe, stride_q_head,  # probe queries [S, P, num_heads, D]
    off_ptr, stride_off,  # int32 [E, P]: probe offsets of each entry's block
    src_ptr,  # int [E]: the block (row of k, q and out) of each entry, < 0: nothing to do
    out_ptr, stride_o_blk, stride_o_tok,  # fp32 [S, N, H], head stride 1
    qk_scale,  # softmax scale * log2(e)
    N: tl.constexpr, N_PAD: tl.constexpr, P: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
    D: tl.constexpr, NORMALIZER: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    blk = tl.load(src_ptr + e).to(tl.int64)
    if blk >= 0:
        acc = probe_scores(k_ptr + blk * stride_k_blk + kvh * stride_k_head, stride_k_tok,
                           q_ptr + blk * stride_q_blk, stride_q_probe, stride_q_head, off_ptr + e * stride_off,
                           kvh, qk_scale, N, N_PAD, P, G, ROWS, D, DOT_FP32)  # fmt: skip
        o = out_ptr + blk * stride_o_blk + tl.arange(0, N_PAD) * stride_o_tok + kvh
        store_scores(acc, o, off_ptr + e * stride_off, N, N_PAD, P, NORMALIZER)


def block_probe_scores(key, probe_query, offsets, src, out, normalizer="probe_nnz", saliency="normalized",
                       scale=None, num_warps=None):  # fmt: skip
    """Scores of the complete blocks of a work list, written into ``out`` (the block rule).

    Parameters
    ----------
    key : ``[S, block_size, num_kv_heads, head_size]`` (bf16/fp16/fp32), the keys of ``S`` blocks (staging
        slots, or the blocks completed in a chunk).
    probe_query : ``[S, num_probes, num_heads, head_size]``, each block's probe queries in offset order.
    offsets : int32 ``[E, num_probes]``, the probe offsets of each entry's block.
    src : int ``[E]``: entry ``e`` scores block ``src[e]``; negative entries do nothing.
    out : fp32 ``[S, block_size, num_kv_heads]`` (head stride 1): row ``src[e]`` written.
    normalizer, saliency : as ``saliency.block_saliency``. scale : softmax scale (default ``head_size ** -0.5``).
    num_warps : per program (one program per entry and KV head; default 4).

    Returns ``out``.
    """
    args = probe_args(key, probe_query, offsets, src.numel(), normalizer, saliency, scale)
    s_, n, h, _ = key.shape
    check_tensor(out, "out", 3, (torch.float32,), key.device)
    check(tuple(out.shape) == (s_, n, h), "out must be [S, block_size, num_kv_heads]")
    if src.numel() == 0:
        return out
    _block_scores_kernel[(src.numel(), h)](
        key, key.stride(0), key.stride(1), key.stride(2),
        probe_query, probe_query.stride(0), probe_query.stride(1), probe_query.stride(2),
        offsets, offsets.stride(0),
        src,
        out, out.stride(0), out.stride(1),
        num_warps=num_warps or (1 if interpreting() else 4), **args,
    )  # fmt: skip
    return out


def probe_args(key, probe_query, offsets, num_entries, normalizer, saliency, scale) -> dict:
    """Checks and launch arguments of :func:`probe_scores` (``qk_scale`` and the constexprs) for ``key [S,
    block_size, num_kv_heads, head_size]`` and ``probe_query [S, num_probes, num_heads, head_size]``."""
    dev = key.device
    s_, n, h, d = key.shape
    num_probes, num_heads = probe_query.shape[1], probe_query.shape[2]
    check_tensor(key, "key", 4, (torch.bfloat16, torch.float16, torch.float32), dev)
    check_tensor(probe_query, "probe_query", 4, (torch.bfloat16, torch.float16, torch.float32), dev)
    check_tensor(offsets, "offsets", 2, (torch.int32,), dev)
    check(probe_query.shape[0] == s_ and probe_query.shape[3] == d, "probe_query must be [S, P, num_heads, D]")
    check(num_heads % h == 0, f"num_heads={num_heads} is not a multiple of num_kv_heads={h}")
    check(offsets.shape[1] == num_probes and offsets.shape[0] == num_entries, "offsets must be [E, num_probes]")
    norm = "accumulated" if getattr(saliency, "value", saliency) == "accumulated" else getattr(
        normalizer, "value", normalizer)
    check(norm in NORMALIZERS, f"normalizer must be one of {list(NORMALIZERS)}, got {normalizer!r}")
    g = num_heads // h
    scale = d**-0.5 if scale is None else scale
    return {"qk_scale": scale * LOG2E, "N": n, "N_PAD": pow2(n), "P": num_probes, "G": g,
            "ROWS": max(16, pow2(num_probes * g)), "D": d, "NORMALIZER": NORMALIZERS[norm],
            "DOT_FP32": interpreting()}  # fmt: skip
