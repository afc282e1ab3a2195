"""Probe saliency scores of the bf16 keys of a prefill chunk (ZC-7 / ZC-8), from the attention's LSE.

Twin: the ``scores`` / ``tail_scores`` outputs of ``zipcache_vllm.engine.paged.prefill_attention``. Grid
``(key tiles, num_seqs, num_kv_heads)``: a program takes ``BLOCK_K`` keys (tail tiles first, then the chunk's
own keys) and walks the sequence's probe rows, ``BLOCK_P`` probe tokens x the GQA group per ``tl.dot``:
``p = exp(q . k * scale - lse)`` with ``lse`` the full row's log-sum-exp from the prefill attention (so ``p``
is the probe's softmax over every key, pages included), summed over probes and heads, then divided by the
normalizer. Probe blocks that end before the key tile are skipped (causal: they cannot see it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, LOG2E_C, check, check_tensor, interpreting, pow2, tail_args

NORMALIZERS = {None: 0, "accumulated": 0, "causal_count": 1, "probe_nnz": 2}


@triton.jit
def _probe_kernel(
    q_ptr,
    stride_q_tok,
    stride_q_head,  # [num_tokens, num_heads, D]
    lse_ptr,
    stride_lse_tok,  # fp32 [num_tokens, num_heads], natural log
    k_ptr,
    stride_k_tok,
    stride_k_head,  # new keys [num_tokens, H, D]
    tk_ptr,
    stride_t_slot,
    stride_t_tok,
    stride_t_head,  # tail keys [num_slots, N, H, D]
    query_start_loc_ptr,
    seq_lens_ptr,
    tail_lens_ptr,
    tail_slots_ptr,
    probe_idx_ptr,
    probe_start_loc_ptr,  # int32 probe rows (offsets in the chunk), [num_seqs + 1]
    scores_ptr,
    stride_sc_tok,  # fp32 [num_tokens, H]
    tail_scores_ptr,
    stride_ts_seq,
    stride_ts_tok,  # fp32 [num_seqs, N, H]
    qk_scale,  # softmax scale * log2(e)
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    D: tl.constexpr,
    TAIL_TILES: tl.constexpr,
    NORMALIZER: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    kt = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    kvh = tl.program_id(2).to(tl.int64)
    q0 = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = (tl.load(query_start_loc_ptr + seq + 1) - q0).to(tl.int32)
    seq_len = tl.load(seq_lens_ptr + seq)
    tail_len = tl.load(tail_lens_ptr + seq)
    ctx = seq_len - q_len
    dk = tl.arange(0, D)
    is_tail = kt < TAIL_TILES
    if is_tail:
        kj = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        kvalid = kj < tail_len
        kpos = ctx - tail_len + kj
        slot = tl.load(tail_slots_ptr + seq).to(tl.int64)
        k = tl.load(
            tk_ptr + slot * stride_t_slot + kj[:, None] * stride_t_tok + kvh * stride_t_head + dk[None, :],
            mask=kvalid[:, None],
            other=0.0,
        )
    else:
        kj = (kt - TAIL_TILES) * BLOCK_K + tl.arange(0, BLOCK_K)
        kvalid = kj < q_len
        kpos = ctx + kj
        k = tl.load(
            k_ptr + (q0 + kj)[:, None] * stride_k_tok + kvh * stride_k_head + dk[None, :],
            mask=kvalid[:, None],
            other=0.0,
        )
    if DOT_FP32:
        k = k.to(tl.float32)
    first = tl.min(tl.where(kvalid, kpos, 2147483647), axis=0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_K], dtype=tl.float32)
    p0 = tl.load(probe_start_loc_ptr + seq)
    p1 = tl.load(probe_start_loc_ptr + seq + 1)
    rr = tl.arange(0, BLOCK_P * G_PAD)
    g = rr % G_PAD
    heads = kvh * G + g
    for pb in range(p0, p1, BLOCK_P):
        last = tl.load(probe_idx_ptr + tl.minimum(pb + BLOCK_P, p1) - 1)
        if ctx + last >= first:  # else no probe of this block can see the tile
            pj = pb + rr // G_PAD
            pm = pj < p1
            rm = pm & (g < G)
            pi = tl.load(probe_idx_ptr + pj, mask=pm, other=0)
            tok = q0 + pi
            q = tl.load(
                q_ptr + tok[:, None] * stride_q_tok + heads[:, None] * stride_q_head + dk[None, :],
                mask=rm[:, None],
                other=0.0,
            )
            lse = tl.load(lse_ptr + tok * stride_lse_tok + heads, mask=rm, other=0.0) * LOG2E_C
            if DOT_FP32:  # noqa: SIM108 (a constexpr branch)
                s = tl.dot(q.to(tl.float32), tl.trans(k))
            else:
                s = tl.dot(q.to(k.dtype), tl.trans(k))
            vis = rm[:, None] & kvalid[None, :] & (kpos[None, :] <= (ctx + pi)[:, None])
            acc += tl.sum(tl.where(vis, tl.exp2(s * qk_scale - lse[:, None]), 0.0), axis=0)
            if NORMALIZER == 2:
                cnt += tl.sum((vis & (g == 0)[:, None]).to(tl.float32), axis=0)
    if NORMALIZER == 1:
        acc = acc / tl.maximum(seq_len - kpos, 1).to(tl.float32)
    elif NORMALIZER == 2:
        acc = acc / tl.maximum(cnt, 1.0)
    if is_tail:
        tl.store(tail_scores_ptr + seq * stride_ts_seq + kj * stride_ts_tok + kvh, acc, mask=kvalid)
    else:
        tl.store(scores_ptr + (q0 + kj) * stride_sc_tok + kvh, acc, mask=kvalid)


def probe_scores(
    query: torch.Tensor,
    lse: torch.Tensor,
    key: torch.Tensor,
    tail_key: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tail_slots: torch.Tensor,
    tail_lens: torch.Tensor,
    probe_idx: torch.Tensor,
    probe_start_loc: torch.Tensor,
    max_query_len: int,
    normalizer: str | None = "causal_count",
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized probe scores of the tail keys and the chunk's keys (ZC-8), per KV head.

    Parameters
    ----------
    query : ``[num_tokens, num_heads, head_size]``; lse : fp32 ``[num_tokens, num_heads]``, natural-log LSE of
        each query row over all its keys (from :func:`prefill_attention`).
    key : ``[num_tokens, num_kv_heads, head_size]`` the chunk's keys; tail_key :
        ``[num_slots, block_size, num_kv_heads, head_size]``.
    query_start_loc : int32 ``[num_seqs + 1]``; seq_lens, tail_slots, tail_lens : int32 ``[num_seqs]``.
    probe_idx : int32 ``[num_probes]``, offsets of probe rows in their chunk, ascending per sequence;
        probe_start_loc : int32 ``[num_seqs + 1]``.
    max_query_len : the longest chunk (sizes the grid without a device sync).
    normalizer : ``causal_count`` (``seq_len - position``), ``probe_nnz`` or None (ZC-5 sums).

    Returns
    -------
    scores : fp32 ``[num_tokens, num_kv_heads]``; tail_scores : fp32 ``[num_seqs, block_size, num_kv_heads]``
    (0 past each tail).
    """
    dev = query.device
    num_tokens, num_heads, d = query.shape
    num_seqs = seq_lens.numel()
    h, n = key.shape[1], tail_key.shape[1]
    norm = getattr(normalizer, "value", normalizer)
    check(norm in NORMALIZERS, f"normalizer must be one of {list(NORMALIZERS)}, got {normalizer!r}")
    check_tensor(lse, "lse", 2, (torch.float32,), dev)
    check(tuple(lse.shape) == (num_tokens, num_heads), "lse must be [num_tokens, num_heads]")
    for name, x, size in (("probe_idx", probe_idx, None), ("probe_start_loc", probe_start_loc, num_seqs + 1)):
        check_tensor(x, name, 1, (torch.int32,), dev)
        check(size is None or x.numel() == size, f"{name} must have {size} entries")
    scores = torch.zeros(num_tokens, h, dtype=torch.float32, device=dev)
    tail_scores = torch.zeros(num_seqs, n, h, dtype=torch.float32, device=dev)
    if num_seqs == 0 or probe_idx.numel() == 0:
        return scores, tail_scores
    scale = d**-0.5 if scale is None else scale
    launch_probe(query, lse, key, tail_key, query_start_loc, seq_lens, tail_slots, tail_lens, probe_idx,
                 probe_start_loc, max_query_len, scores, tail_scores, norm, scale)  # fmt: skip
    return scores, tail_scores


def launch_probe(query, lse, key, tail_key, query_start_loc, seq_lens, tail_slots, tail_lens, probe_idx,
                 probe_start_loc, max_query_len: int, scores, tail_scores, normalizer: str | None,
                 scale: float) -> None:  # fmt: skip
    """The kernel of :func:`probe_scores` on checked arguments (no checks, no allocation): writes the scores of
    the chunk's keys into ``scores [num_tokens, num_kv_heads]`` and of the tail's into ``tail_scores
    [num_seqs, >= block_size, num_kv_heads]`` (rows past each tail are left as they are); any strides but the
    head stride 1."""
    num_heads, d = query.shape[1:]
    h, n = key.shape[1], tail_key.shape[1]
    interp = interpreting()
    g = num_heads // h
    g_pad = pow2(g)
    # 64 x 64 tiles, 4 warps: 89 us at 4k tokens on the H200 against 134 us for 128 x 128 tiles, 8 warps
    block_p = max(1, (16 if interp else 64) // g_pad)
    block_k = 32 if interp else 64
    tail_tiles = triton.cdiv(n, block_k)
    grid = (tail_tiles + triton.cdiv(max(1, max_query_len), block_k), seq_lens.numel(), h)
    _probe_kernel[grid](
        q_ptr=query,
        stride_q_tok=query.stride(0),
        stride_q_head=query.stride(1),
        lse_ptr=lse,
        stride_lse_tok=lse.stride(0),
        k_ptr=key,
        stride_k_tok=key.stride(0),
        stride_k_head=key.stride(1),
        query_start_loc_ptr=query_start_loc,
        seq_lens_ptr=seq_lens,
        **tail_args(tail_key, None, tail_slots, tail_lens),
        probe_idx_ptr=probe_idx,
        probe_start_loc_ptr=probe_start_loc,
        scores_ptr=scores,
        stride_sc_tok=scores.stride(0),
        tail_scores_ptr=tail_scores,
        stride_ts_seq=tail_scores.stride(0),
        stride_ts_tok=tail_scores.stride(1),
        qk_scale=scale * LOG2E,
        G=g,
        G_PAD=g_pad,
        BLOCK_P=block_p,
        BLOCK_K=block_k,
        D=d,
        TAIL_TILES=tail_tiles,
        NORMALIZER=NORMALIZERS[normalizer],
        DOT_FP32=interp,
        num_warps=1 if interp else 4,
    )
