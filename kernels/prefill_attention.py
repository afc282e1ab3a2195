"""Prefill / chunked-prefill attention over mixed-precision pages.

Twin: ``zipcache_vllm.engine.paged.prefill_attention``. Grid ``(query tiles, num_seqs, num_kv_heads)``: a program
takes ``BLOCK_Q`` query tokens x the ``G`` query heads of one KV head (``BLOCK_Q * G_PAD`` tile rows, row
``r`` = token ``r // G_PAD``, head ``r % G_PAD``), so each key is loaded once for its whole GQA group. It
walks the sequence's pages (all visible; dequantization folded as in decode), its bf16 tail (all visible),
then the chunk's own keys under the causal mask. It writes the output and each row's log-sum-exp. (The engine
gives it one sequence per block of a chunk, so that a query sees the earlier blocks through their pages and
its own block in bf16: ``zipcache_vllm.engine.step``.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._attend import attend_dense_tile, attend_pages, attend_tail, finish_rows, init_state
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
    load_q,
    pow2,
    store_quarters,
    tail_args,
)

ROWS_GPU = 128  # tile rows (query tokens x GQA heads) per program on the GPU: one 128-row wgmma tile
ROWS_INTERPRET = 32


# fmt: off
@triton.jit
def _prefill_kernel(
    q_ptr, stride_q_tok, stride_q_head,  # [num_tokens, num_heads, D]
    k_ptr, v_ptr, stride_k_tok, stride_k_head,  # new tokens [num_tokens, H, D] (same strides for v)
    cache_u8_ptr, cache_f16_ptr, stride_c_block, stride_c_head,  # pages; strides in bytes
    block_table_ptr, stride_bt,  # int32 [num_seqs, max_blocks]
    query_start_loc_ptr, seq_lens_ptr, tail_lens_ptr, tail_slots_ptr,  # int32
    tk_ptr, tv_ptr, stride_t_slot, stride_t_tok, stride_t_head,  # tail [num_slots, N, H, D]
    out_ptr, stride_o_tok, stride_o_head,  # [num_tokens, num_heads, D]
    lse_ptr, stride_lse_tok,  # fp32 [num_tokens, num_heads], natural log
    qk_scale,  # softmax scale * log2(e)
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
    N: tl.constexpr, TILES: tl.constexpr, V_NORM_OFF: tl.constexpr, TAIL_ROWS: tl.constexpr,
    DOT_FP32: tl.constexpr, ASM: tl.constexpr,
):
    qt = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    kvh = tl.program_id(2).to(tl.int64)
    q0 = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = (tl.load(query_start_loc_ptr + seq + 1) - q0).to(tl.int32)
    if qt * BLOCK_Q < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        tail_len = tl.load(tail_lens_ptr + seq)
        ctx = seq_len - q_len
        num_pages = (ctx - tail_len) // N
        r = tl.arange(0, BLOCK_Q * G_PAD)
        qi = qt * BLOCK_Q + r // G_PAD
        g = r % G_PAD
        rmask = (qi < q_len) & (g < G)
        heads = kvh * G + g
        tok = q0 + qi
        x0, x1, x2, x3 = load_q(q_ptr, tok * stride_q_tok + heads * stride_q_head, rmask, D)
        a0, a1, a2, a3, m_i, l_i = init_state(BLOCK_Q * G_PAD, D)
        # -- compressed pages, then the bf16 tail: both precede the chunk ----
        a0, a1, a2, a3, m_i, l_i = attend_pages(
            x0, x1, x2, x3, a0, a1, a2, a3, m_i, l_i, block_table_ptr + seq * stride_bt, 0, num_pages,
            cache_u8_ptr, cache_f16_ptr, stride_c_block, kvh * stride_c_head, qk_scale, TILES, D, N, V_NORM_OFF,
            DOT_FP32, ASM,
        )
        tbase = tl.load(tail_slots_ptr + seq).to(tl.int64) * stride_t_slot + kvh * stride_t_head
        a0, a1, a2, a3, m_i, l_i = attend_tail(
            x0, x1, x2, x3, a0, a1, a2, a3, m_i, l_i, tk_ptr + tbase, tv_ptr + tbase, stride_t_tok, tail_len,
            qk_scale, TAIL_ROWS, D, DOT_FP32,
        )
        # -- the chunk itself, causal ----
        for k0 in range(0, tl.minimum(q_len, (qt + 1) * BLOCK_Q), BLOCK_K):
            kj = k0 + tl.arange(0, BLOCK_K)
            kmask = kj < q_len
            koff = (q0 + kj) * stride_k_tok + kvh * stride_k_head
            visible = kmask[None, :] & (kj[None, :] <= qi[:, None])
            a0, a1, a2, a3, m_i, l_i = attend_dense_tile(
                x0, x1, x2, x3, a0, a1, a2, a3, m_i, l_i, k_ptr + koff, v_ptr + koff, kmask, visible, qk_scale,
                D, DOT_FP32,
            )
        o0, o1, o2, o3, log2_l = finish_rows(a0, a1, a2, a3, l_i)
        store_quarters(out_ptr, tok * stride_o_tok + heads * stride_o_head, rmask, o0, o1, o2, o3, D)
        tl.store(lse_ptr + tok * stride_lse_tok + heads, (m_i + log2_l) * LN2_C, mask=rmask)
# fmt: on


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk of new tokens per sequence over pages, tail and the chunk.

    Parameters
    ----------
    query : ``[num_tokens, num_heads, head_size]``; key, value : ``[num_tokens, num_kv_heads, head_size]``
        (the chunk's own tokens, post-RoPE; same strides).
    kv_cache, layout, block_table, tail_* : as :func:`decode_attention`; sequence ``s`` has
        ``(seq_lens[s] - query_len - tail_lens[s]) / block_size`` pages and ``tail_lens[s]`` tail tokens.
    query_start_loc : int32 ``[num_seqs + 1]``; seq_lens : int32 ``[num_seqs]`` (chunk included).
    max_query_len : the longest chunk (sizes the grid; vLLM's metadata has it).
    out : optional output like ``query``.

    Returns
    -------
    out : ``[num_tokens, num_heads, head_size]``; lse : fp32 ``[num_tokens, num_heads]`` (natural log).
    """
    dev = query.device
    check_tensor(query, "query", 3, FLOATS, dev)
    num_tokens, num_heads, d = query.shape
    n = layout.block_size
    check(d == layout.head_size, f"head_size {d} != layout.head_size {layout.head_size}")
    check_tensor(key, "key", 3, FLOATS, dev)
    check_tensor(value, "value", 3, (key.dtype,), dev)
    check(key.shape == value.shape and key.stride() == value.stride(), "key and value must match")
    h = key.shape[1]
    check(key.shape[0] == num_tokens and key.shape[2] == d, f"key must be [{num_tokens}, H, {d}]")
    check(num_heads % h == 0, f"num_heads={num_heads} is not a multiple of num_kv_heads={h}")
    check_tail(tail_key, tail_value, (key.dtype,), n, h, d, dev)
    check_cache(kv_cache, layout, h, dev)
    check_tensor(block_table, "block_table", 2, (torch.int32,), dev)
    num_seqs = seq_lens.numel()
    check_tensor(query_start_loc, "query_start_loc", 1, (torch.int32,), dev)
    check(query_start_loc.numel() == num_seqs + 1, "query_start_loc must have num_seqs + 1 entries")
    check_seq_meta(num_seqs, dev, seq_lens=seq_lens, tail_slots=tail_slots, tail_lens=tail_lens)
    out = check_out(out, query)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=dev)
    if num_seqs and max_query_len > 0:
        interp = interpreting()
        g = num_heads // h
        g_pad = pow2(g)
        block_q = max(1, (ROWS_INTERPRET if interp else ROWS_GPU) // g_pad)
        scale_ = d**-0.5 if scale is None else scale
        _prefill_kernel[(triton.cdiv(max_query_len, block_q), num_seqs, h)](
            q_ptr=query,
            stride_q_tok=query.stride(0),
            stride_q_head=query.stride(1),
            k_ptr=key,
            v_ptr=value,
            stride_k_tok=key.stride(0),
            stride_k_head=key.stride(1),
            **cache_args(kv_cache),
            block_table_ptr=block_table,
            stride_bt=block_table.stride(0),
            query_start_loc_ptr=query_start_loc,
            seq_lens_ptr=seq_lens,
            **tail_args(tail_key, tail_value, tail_slots, tail_lens),
            out_ptr=out,
            stride_o_tok=out.stride(0),
            stride_o_head=out.stride(1),
            lse_ptr=lse,
            stride_lse_tok=lse.stride(0),
            qk_scale=scale_ * LOG2E,
            G=g,
            G_PAD=g_pad,
            BLOCK_Q=block_q,
            BLOCK_K=32 if interp else 64,
            D=d,
            N=n,
            TILES=layout.attention_tiles(),
            V_NORM_OFF=layout.v_norm_off,
            TAIL_ROWS=min(64, pow2(n)),
            DOT_FP32=interp,
            ASM=not interp,
            num_warps=8 if block_q * g_pad >= 128 else 4,
            num_stages=2,
        )
    return out, lse
