"""Prefill / chunked-prefill attention under the block rule, at the speed of a bf16 flash kernel.

Twin: ``zipcache_vllm.engine.paged.prefill_attention``. A query at position ``p`` sees the blocks before its own
(``p // block_size``) through their compressed pages and its own block in bf16, up to ``p`` (the tail staged
before the chunk, then the chunk's tokens). The pages of every block before the chunk's last query are
present (the engine compresses the blocks a chunk completes before it attends).

Two launches:

1. ``_dequantize_kernel`` writes the pages a chunk reads to a bf16 scratch ``[num_kv_heads, rows, head_size]``
   once per call (per chunk and layer), grid ``(pages, num_seqs, num_kv_heads)``. Attention of a chunk is
   compute-bound: each page row is read by every query tile, so dequantizing it once (and not once per query
   tile, as a kernel folding the dequantization into the MMA would) keeps the tensor cores the only busy unit.
   Rows stay in page order: a block is fully visible or not at all, so the order inside it does not matter.
2. ``_prefill_kernel``, a flash-attention forward (online softmax, ``tl.dot`` on bf16 tiles), grid
   ``(num_heads, num_seqs, query tiles)``, the longest tiles of every head first. A tile of ``BLOCK_M``
   queries walks (a) the scratch rows every one of its queries sees, unmasked, (b) the scratch rows of
   blocks some of its queries see (the block-causal edge, masked) and (c) the bf16 rows of its queries' own
   blocks (tail, then chunk), masked ``block start <= x <= p``.

It writes the output and each row's log-sum-exp (natural log).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import (
    FLOATS,
    LN2_C,
    LOG2E,
    cache_args,
    check,
    check_cache,
    check_out,
    check_seq_meta,
    check_tail,
    check_tensor,
    interpreting,
    load_quarters,
    tail_args,
)

SCRATCH_ROWS = 1 << 18  # dequantized rows per launch group (x num_kv_heads x head_size x 4 bytes: 1 GiB at
# 8 x 128); sequences are grouped so a group's scratch stays below it (a longer single sequence gets its own)


# fmt: off
@triton.jit
def _dequantize_tile(
    cache_u8_ptr, cache_f16_ptr, base, out_k, out_v, stride_s_row,
    VALID: tl.constexpr, ROWS: tl.constexpr, KB: tl.constexpr, K_OFF: tl.constexpr, K_PAR: tl.constexpr,
    VB: tl.constexpr, V_OFF: tl.constexpr, V_TOK: tl.constexpr,  # one tile of layout.attention_tiles()
    V_TOK_BASE: tl.constexpr, D: tl.constexpr, N: tl.constexpr, V_NORM_OFF: tl.constexpr, DOT_FP32: tl.constexpr,
    ASM: tl.constexpr,
):
    """Rows of one tile of a page, dequantized (``paged.dequantize_pages``) into page rows of the scratch."""
    Q: tl.constexpr = D // 4
    START: tl.constexpr = (V_TOK - V_TOK_BASE) // 2  # page row of the tile's first row
    dq = tl.arange(0, Q)
    hoff = base // 2
    r = tl.arange(0, ROWS)
    rmask = r < VALID
    m = rmask[:, None]
    dst = (START + r)[:, None] * stride_s_row + dq[None, :]
    ty = out_k.dtype.element_ty
    kp = cache_f16_ptr + hoff + K_PAR // 2 + dq
    k0, k1, k2, k3 = load_quarters(cache_u8_ptr + base + K_OFF + r * (D * KB // 8), rmask, KB, D, DOT_FP32, ASM)
    tl.store(out_k + dst, (k0.to(tl.float32) * tl.load(kp).to(tl.float32)[None, :]
                           + tl.load(kp + D).to(tl.float32)[None, :]).to(ty), mask=m)
    tl.store(out_k + dst + Q, (k1.to(tl.float32) * tl.load(kp + Q).to(tl.float32)[None, :]
                               + tl.load(kp + D + Q).to(tl.float32)[None, :]).to(ty), mask=m)
    tl.store(out_k + dst + 2 * Q, (k2.to(tl.float32) * tl.load(kp + 2 * Q).to(tl.float32)[None, :]
                                   + tl.load(kp + D + 2 * Q).to(tl.float32)[None, :]).to(ty), mask=m)
    tl.store(out_k + dst + 3 * Q, (k3.to(tl.float32) * tl.load(kp + 3 * Q).to(tl.float32)[None, :]
                                   + tl.load(kp + D + 3 * Q).to(tl.float32)[None, :]).to(ty), mask=m)
    cn = cache_f16_ptr + hoff + V_NORM_OFF // 2 + dq
    vstep = tl.load(cache_f16_ptr + hoff + V_TOK // 2 + r, mask=rmask, other=0.0).to(tl.float32)[:, None]
    vmn = tl.load(cache_f16_ptr + hoff + V_TOK // 2 + N + r, mask=rmask, other=0.0).to(tl.float32)[:, None]
    v0, v1, v2, v3 = load_quarters(cache_u8_ptr + base + V_OFF + r * (D * VB // 8), rmask, VB, D, DOT_FP32, ASM)
    tl.store(out_v + dst, (tl.load(cn).to(tl.float32)[None, :] * (v0.to(tl.float32) * vstep + vmn)).to(ty), mask=m)
    tl.store(out_v + dst + Q, (tl.load(cn + Q).to(tl.float32)[None, :] * (v1.to(tl.float32) * vstep + vmn)).to(ty),
             mask=m)
    tl.store(out_v + dst + 2 * Q, (tl.load(cn + 2 * Q).to(tl.float32)[None, :]
                                   * (v2.to(tl.float32) * vstep + vmn)).to(ty), mask=m)
    tl.store(out_v + dst + 3 * Q, (tl.load(cn + 3 * Q).to(tl.float32)[None, :]
                                   * (v3.to(tl.float32) * vstep + vmn)).to(ty), mask=m)


@triton.jit
def _dequantize_kernel(
    cache_u8_ptr, cache_f16_ptr, stride_c_block, stride_c_head,  # pages; strides in bytes
    block_table_ptr, stride_bt,  # int32 [num_seqs, max_blocks]
    num_pages_ptr, page_start_ptr,  # int32 [num_seqs]: pages to dequantize, first scratch page of the sequence
    sk_ptr, sv_ptr, stride_s_head, stride_s_row,  # scratch [num_kv_heads, rows, D]
    TILES: tl.constexpr, V_TOK_BASE: tl.constexpr, D: tl.constexpr, N: tl.constexpr,
    V_NORM_OFF: tl.constexpr, DOT_FP32: tl.constexpr, ASM: tl.constexpr,
):
    p = tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2).to(tl.int64)
    if p < tl.load(num_pages_ptr + seq):
        page = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt + p).to(tl.int64)
        base = page * stride_c_block + kvh * stride_c_head
        row0 = (tl.load(page_start_ptr + seq).to(tl.int64) + p) * N
        out_k = sk_ptr + kvh * stride_s_head + row0 * stride_s_row
        out_v = sv_ptr + kvh * stride_s_head + row0 * stride_s_row
        for i in tl.static_range(len(TILES)):
            _dequantize_tile(cache_u8_ptr, cache_f16_ptr, base, out_k, out_v, stride_s_row, TILES[i][0], TILES[i][1],
                             TILES[i][2], TILES[i][3], TILES[i][4], TILES[i][5], TILES[i][6], TILES[i][7],
                             V_TOK_BASE, D, N, V_NORM_OFF, DOT_FP32, ASM)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _flash_tile(q, acc, m_i, l_i, k, v, visible, qk_scale, MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """One key tile ``k, v [BLOCK_N, D]`` (bf16) for the query tile ``q [BLOCK_M, D]``: online softmax in the
    log2 domain (the scale folded into one FMA per score), ``acc`` rescaled; ``visible [BLOCK_M, BLOCK_N]``
    applies when ``MASKED``. (Triton 3.6 folds ``acc * alpha + pv`` into the wgmma accumulator by itself:
    handing ``acc`` to ``tl.dot`` gives the same SASS.)"""
    s = _dot(q, tl.trans(k), DOT_FP32)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0, not NaN
    p = tl.exp2(s * qk_scale - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    pv = _dot(p, v, DOT_FP32) if DOT_FP32 else tl.dot(p.to(v.dtype), v)  # interpreter: fp32 probabilities
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, stride_q_tok, stride_q_head,  # [num_tokens, num_heads, D]
    k_ptr, v_ptr, stride_k_tok, stride_k_head,  # new tokens [num_tokens, H, D] (same strides for v)
    sk_ptr, sv_ptr, stride_s_head, stride_s_row,  # dequantized pages [H, rows, D] bf16
    sk_desc, sv_desc,  # TMA: host tensor descriptors of the scratch as [H * rows, D], block [BLOCK_N, D]; else None
    page_start_ptr,  # int32 [num_seqs]: the sequence's first scratch page
    query_start_loc_ptr, seq_lens_ptr, tail_lens_ptr, tail_slots_ptr,  # int32
    tk_ptr, tv_ptr, stride_t_slot, stride_t_tok, stride_t_head,  # tail [num_slots, N, H, D]
    out_ptr, stride_o_tok, stride_o_head,  # [num_tokens, num_heads, D]
    lse_ptr, stride_lse_tok,  # fp32 [num_tokens, num_heads], natural log
    qk_scale,  # softmax scale * log2(e)
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    TMA: tl.constexpr, STAGES_A: tl.constexpr,  # _config
):
    hq = tl.program_id(0).to(tl.int64)  # heads vary fastest: the heads of a GQA group share K/V in L2
    seq = tl.program_id(1)
    mt = tl.num_programs(2) - 1 - tl.program_id(2)  # the longest (last) query tiles of all heads first
    kvh = hq // G
    q0 = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int64) - q0
    if mt * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
        ctx = seq_len - q_len
        i = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = i < q_len
        pos = ctx + i  # query positions
        own = pos // N * N  # first position of each query's own block
        dd = tl.arange(0, D)
        q = tl.load(q_ptr + (q0 + i)[:, None] * stride_q_tok + hq * stride_q_head + dd[None, :],
                    mask=rmask[:, None], other=0.0).to(k_ptr.dtype.element_ty)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        p_first = ctx + mt * BLOCK_M  # first and last query position of the tile
        p_last = tl.minimum(p_first + BLOCK_M, seq_len) - 1
        lo = p_first // N * N  # scratch rows [0, lo): seen by every query of the tile
        hi = p_last // N * N  # scratch rows [lo, hi): by some (the block-causal edge)
        full = lo // BLOCK_N * BLOCK_N
        n = tl.arange(0, BLOCK_N)
        s_off = kvh * stride_s_head + tl.load(page_start_ptr + seq).to(tl.int64) * N * stride_s_row
        sk = sk_ptr + s_off + dd[None, :]
        sv = sv_ptr + s_off + dd[None, :]
        # -- (a) pages every query sees (the bulk of the work: its own pipelining depth and options) ----
        if TMA:
            row0 = kvh * (stride_s_head // stride_s_row) + tl.load(page_start_ptr + seq) * N
            for x0 in tl.range(0, full, BLOCK_N, num_stages=STAGES_A):
                r0 = (row0 + x0).to(tl.int32)
                acc, m_i, l_i = _flash_tile(q, acc, m_i, l_i, sk_desc.load([r0, 0]), sv_desc.load([r0, 0]),
                                            rmask[:, None], qk_scale, False, DOT_FP32)
        else:
            for x0 in tl.range(0, full, BLOCK_N, num_stages=STAGES_A):
                rows = (x0 + n)[:, None] * stride_s_row
                acc, m_i, l_i = _flash_tile(q, acc, m_i, l_i, tl.load(sk + rows), tl.load(sv + rows),
                                            rmask[:, None], qk_scale, False, DOT_FP32)
        # -- (b) the block-causal edge: page rows of blocks before each query's own ----
        for x0 in range(full, hi, BLOCK_N):
            x = x0 + n
            rows = x[:, None] * stride_s_row
            xm = (x < hi)[:, None]
            acc, m_i, l_i = _flash_tile(q, acc, m_i, l_i, tl.load(sk + rows, mask=xm, other=0.0),
                                        tl.load(sv + rows, mask=xm, other=0.0), x[None, :] < own[:, None], qk_scale,
                                        True, DOT_FP32)
        # -- (c) bf16 rows of the queries' own blocks: the staged tail (positions < ctx), then the chunk ----
        tail_len = tl.load(tail_lens_ptr + seq).to(tl.int64)
        t_off = tl.load(tail_slots_ptr + seq).to(tl.int64) * stride_t_slot + kvh * stride_t_head + dd[None, :]
        k_off = kvh * stride_k_head + dd[None, :]
        tail0 = ctx - tail_len  # position of the first tail row
        for x0 in range(lo, p_last + 1, BLOCK_N):
            x = x0 + n
            in_tail = (x < ctx)[:, None]
            in_new = ((x >= ctx) & (x <= p_last))[:, None]
            t_rows = (x - tail0)[:, None] * stride_t_tok
            n_rows = (q0 + x - ctx)[:, None] * stride_k_tok
            k = (tl.load(tk_ptr + t_off + t_rows, mask=in_tail, other=0.0)
                 + tl.load(k_ptr + k_off + n_rows, mask=in_new, other=0.0))
            v = (tl.load(tv_ptr + t_off + t_rows, mask=in_tail, other=0.0)
                 + tl.load(v_ptr + k_off + n_rows, mask=in_new, other=0.0))
            visible = (x[None, :] >= own[:, None]) & (x[None, :] <= pos[:, None])
            acc, m_i, l_i = _flash_tile(q, acc, m_i, l_i, k, v, visible, qk_scale, True, DOT_FP32)
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        o = acc / safe_l[:, None]
        tl.store(out_ptr + (q0 + i)[:, None] * stride_o_tok + hq * stride_o_head + dd[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
        tl.store(lse_ptr + (q0 + i) * stride_lse_tok + hq, (m_i + tl.log2(safe_l)) * LN2_C, mask=rmask)
# fmt: on


def dequantize_pages(
    kv_cache: torch.Tensor,
    layout,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    page_start: torch.Tensor,
    total_pages: int,
    max_pages: int,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``key, value (dtype) [num_kv_heads, total_pages * block_size, head_size]``: sequence ``s``'s first
    ``num_pages[s]`` pages (block table row ``s``) at scratch pages ``page_start[s] ..``, rows in page order.
    Twin: ``paged.dequantize_pages(..., order="page")`` rounded to ``dtype`` (the kernel computes in fp32;
    ``prefill_attention`` asks for fp32 under the interpreter, whose float-to-bf16 conversion truncates)."""
    h, n, d = kv_cache.shape[1], layout.block_size, layout.head_size
    sk = torch.empty(h, total_pages * n, d, dtype=dtype, device=kv_cache.device)
    sv = torch.empty_like(sk)
    if total_pages and max_pages:
        _dequantize_kernel[(max_pages, num_pages.numel(), h)](
            **cache_args(kv_cache),
            block_table_ptr=block_table,
            stride_bt=block_table.stride(0),
            num_pages_ptr=num_pages,
            page_start_ptr=page_start,
            sk_ptr=sk,
            sv_ptr=sv,
            stride_s_head=sk.stride(0),
            stride_s_row=sk.stride(1),
            TILES=layout.attention_tiles(max_rows=64),
            V_TOK_BASE=layout.v_tok_off,
            D=d,
            N=n,
            V_NORM_OFF=layout.v_norm_off,
            DOT_FP32=interpreting(),
            ASM=not interpreting(),
            num_warps=4,
        )
    return sk, sv


def _config(interp: bool) -> dict:
    """Tile sizes and launch options on the GPU: 128 x 128 tiles, 8 warps (two warpgroups of 64 query rows),
    2 stages, and for the unmasked page loop (a) TMA copies (``TMA``: host tensor descriptors of the scratch,
    no per-row address arithmetic) pipelined 3 deep (``STAGES_A``). The masked loops (b), (c) keep pointer
    loads (their out-of-range rows must read as zeros, which a descriptor only gives at the tensor's end) and
    2 stages (the 4-load own-block loop (c) at 3 stages needs more than the 227 KiB of shared memory).
    ``benchmarks/bench_prefill_step.py --sweep`` on the H200 (4k prompt, LLaMA3-8B heads, e216b0b): 319 us
    against 369 us for pointer loads at 2 stages; 128 x 64 tiles 340-342 us.

    Tried and dropped (a55ceae, e216b0b): ``acc`` as the P @ V ``tl.dot`` accumulator (the same SASS: Triton
    folds it already); loop (a) in a second, warp-specialized launch (Triton 3.6 warp-specializes on Hopper
    only at 4 warps and only kernels without pointer-based tensor loads): 432 us without warp specialization,
    an illegal memory access with it.
    """
    if interp:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "TMA": False, "STAGES_A": None}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "TMA": True, "STAGES_A": 3}


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    layout,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tail_key: torch.Tensor,
    tail_value: torch.Tensor,
    tail_slots: torch.Tensor,
    tail_lens: torch.Tensor,
    max_query_len: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    plan: PrefillPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk of new tokens per sequence under the block rule (module docstring).

    Parameters
    ----------
    query : ``[num_tokens, num_heads, head_size]``; key, value : ``[num_tokens, num_kv_heads, head_size]``
        (the chunk's own tokens, post-RoPE, bf16 or fp16; same strides).
    kv_cache, layout, block_table, tail_* : as :func:`decode_attention`; sequence ``s`` with chunk length
        ``q_s`` and ``ctx_s = seq_lens[s] - q_s`` has ``tail_lens[s] = ctx_s % block_size`` tail tokens (its
        staging slot, ``tail_key`` dtype = ``key`` dtype) and pages for the first ``(seq_lens[s] - 1) //
        block_size`` blocks (block table row ``s``).
    query_start_loc : int32 ``[num_seqs + 1]``; seq_lens : int32 ``[num_seqs]`` (chunk included).
    max_query_len : the longest chunk (sizes the grid; vLLM's metadata has it).
    out : optional output like ``query``. config : tile sizes and launch options (``_config``'s keys;
        benchmarks sweep them).
    plan : :func:`prefill_plan` of ``seq_lens`` (host values), built once per step and shared by its layers;
        without it the page counts are read from ``seq_lens`` here (one host synchronisation per call).

    Returns
    -------
    out : ``[num_tokens, num_heads, head_size]``; lse : fp32 ``[num_tokens, num_heads]`` (natural log).

    The page count of each sequence sizes the bf16 scratch: it comes from ``plan`` (no synchronisation: the
    host can run ahead of the GPU through the layers of an eager prefill) or from ``seq_lens``.
    """
    dev = query.device
    check_tensor(query, "query", 3, FLOATS, dev)
    num_tokens, num_heads, d = query.shape
    n = layout.block_size
    check(d == layout.head_size, f"head_size {d} != layout.head_size {layout.head_size}")
    check_tensor(key, "key", 3, (torch.bfloat16, torch.float16), dev)
    check_tensor(value, "value", 3, (key.dtype,), dev)
    check(key.shape == value.shape and key.stride() == value.stride(), "key and value must match")
    h = key.shape[1]
    check(key.shape[0] == num_tokens and key.shape[2] == d, f"key must be [{num_tokens}, H, {d}]")
    check(num_heads % h == 0, f"num_heads={num_heads} is not a multiple of num_kv_heads={h}")
    check(d & (d - 1) == 0, f"head_size must be a power of two, got {d}")
    check_tail(tail_key, tail_value, (key.dtype,), n, h, d, dev)
    check_cache(kv_cache, layout, h, dev)
    check_tensor(block_table, "block_table", 2, (torch.int32,), dev)
    num_seqs = seq_lens.numel()
    check_tensor(query_start_loc, "query_start_loc", 1, (torch.int32,), dev)
    check(query_start_loc.numel() == num_seqs + 1, "query_start_loc must have num_seqs + 1 entries")
    check_seq_meta(num_seqs, dev, seq_lens=seq_lens, tail_slots=tail_slots, tail_lens=tail_lens)
    out = check_out(out, query)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=dev)
    if not num_seqs or max_query_len <= 0:
        return out, lse
    interp = interpreting()
    cfg = dict(_config(interp), **(config or {}))
    scale_ = d**-0.5 if scale is None else scale
    plan = prefill_plan(seq_lens.tolist(), n, dev) if plan is None else plan
    check(len(plan.pages) == num_seqs, f"plan has {len(plan.pages)} sequences, seq_lens {num_seqs}")
    check(max(plan.pages) <= block_table.shape[1], "block_table is narrower than the pages the chunks read")
    for a, b, page_start, num_pages, total, widest in plan.groups:  # consecutive sequences a .. b - 1
        sk, sv = dequantize_pages(kv_cache, layout, block_table[a:b], num_pages, page_start, total, widest,
                                  torch.float32 if interp else key.dtype)
        grid = (num_heads, b - a, triton.cdiv(max_query_len, cfg["BLOCK_M"]))
        if cfg["TMA"]:  # a descriptor needs a non-empty tensor: no pages, no row is read
            sk_desc, sv_desc = (TensorDescriptor.from_tensor(x.view(-1, d) if x.numel() else x.new_zeros(1, d),
                                                             [cfg["BLOCK_N"], d]) for x in (sk, sv))  # fmt: skip
        else:
            sk_desc = sv_desc = None
        _prefill_kernel[grid](
            q_ptr=query,
            stride_q_tok=query.stride(0),
            stride_q_head=query.stride(1),
            k_ptr=key,
            v_ptr=value,
            stride_k_tok=key.stride(0),
            stride_k_head=key.stride(1),
            sk_ptr=sk,
            sv_ptr=sv,
            stride_s_head=sk.stride(0),
            stride_s_row=sk.stride(1),
            sk_desc=sk_desc,
            sv_desc=sv_desc,
            page_start_ptr=page_start,
            query_start_loc_ptr=query_start_loc[a : b + 1],
            seq_lens_ptr=seq_lens[a:b],
            **tail_args(tail_key, tail_value, tail_slots[a:b], tail_lens[a:b]),
            out_ptr=out,
            stride_o_tok=out.stride(0),
            stride_o_head=out.stride(1),
            lse_ptr=lse,
            stride_lse_tok=lse.stride(0),
            qk_scale=scale_ * LOG2E,
            G=num_heads // h,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            D=d,
            N=n,
            DOT_FP32=interp,
            TMA=cfg["TMA"],
            STAGES_A=cfg["num_stages"] if cfg["STAGES_A"] is None else cfg["STAGES_A"],
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return out, lse


def _groups(pages: list[int], budget: int) -> list[tuple[int, int]]:
    """Ranges ``(a, b)`` of consecutive sequences whose scratch pages stay within ``budget`` (one range when
    they all fit; a sequence above it alone)."""
    groups, a, used = [], 0, 0
    for s, p in enumerate(pages):
        if s > a and used + p > budget:
            groups.append((a, s))
            a, used = s, 0
        used += p
    return groups + [(a, len(pages))]


@dataclass(frozen=True)
class PrefillPlan:
    """The scratch of a :func:`prefill_attention` call, from host values: ``pages[s]`` pages per sequence, and
    ``groups`` of consecutive sequences ``(a, b, page_start, num_pages, total_pages, max_pages)`` whose pages
    fit the scratch together (``page_start``, ``num_pages``: int32 device tensors of the group)."""

    pages: list[int]
    groups: list[tuple]


def prefill_plan(seq_lens, block_size: int, device) -> PrefillPlan:
    """:class:`PrefillPlan` of sequences of ``seq_lens`` tokens (host ints, the chunk included): the pages
    of the blocks before each one's last (the blocks its queries read as pages). One host-to-device copy per
    group; build it once per step and pass it to every layer's call."""
    pages = [max(0, (int(x) - 1) // block_size) for x in seq_lens]
    groups = []
    for a, b in _groups(pages, SCRATCH_ROWS // block_size):
        num_pages = pages[a:b]
        starts = [0]
        for p in num_pages[:-1]:
            starts.append(starts[-1] + p)
        meta = torch.tensor([starts, num_pages], dtype=torch.int32).to(device)
        groups.append((a, b, meta[0], meta[1], sum(num_pages), max(num_pages)))
    return PrefillPlan(pages, groups)
