"""Decode attention over mixed-precision pages: one query token per sequence, GQA, split-K.

Twin: ``zipcache_vllm.engine.paged.decode_attention``. Grid ``(num_seqs, num_kv_heads, num_splits)``: a program
takes the ``G`` query heads of one KV head as the rows of its tiles (padded to 16, the smallest ``tl.dot``),
walks a contiguous range of the sequence's pages and, in the last split, the bf16 tail. Dequantization is
folded into q (keys) and into the output (values), method doc §10, so a page is read once, as codes.
Splits are merged exactly through their log-sum-exp (flash-decoding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._attend import attend_pages, attend_tail, finish_rows, init_state
from ._common import (
    LOG2E,
    cache_args,
    check,
    check_decode_inputs,
    interpreting,
    load_q,
    num_sms,
    pow2,
    store_quarters,
    tail_args,
)

MIN_PAGES_PER_SPLIT = 2  # batch 1, 4k context: 4 pages per split took 36 us against 13 us for SDPA
PROGRAMS_PER_SM = 4  # split until about this many programs per SM are in flight


# fmt: off
@triton.jit
def _decode_kernel(
    q_ptr, stride_q_seq, stride_q_head,  # [num_seqs, num_heads, D]
    cache_u8_ptr, cache_f16_ptr, stride_c_block, stride_c_head,  # pages; strides in bytes
    block_table_ptr, stride_bt,  # [num_seqs, max_blocks] int32
    seq_lens_ptr, tail_lens_ptr, tail_slots_ptr,  # [num_seqs] int32
    tk_ptr, tv_ptr, stride_t_slot, stride_t_tok, stride_t_head,  # [num_slots, N, H, D] bf16
    out_ptr, stride_o_seq, stride_o_head,  # [num_seqs, num_heads, D], written when NUM_SPLITS == 1
    part_o_ptr, part_lse_ptr,  # fp32 [num_seqs, num_heads, NUM_SPLITS, D], [num_seqs, num_heads, NUM_SPLITS]
    qk_scale,  # softmax scale * log2(e)
    NUM_SPLITS: tl.constexpr,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, N: tl.constexpr,
    TILES: tl.constexpr, V_NORM_OFF: tl.constexpr, TAIL_ROWS: tl.constexpr, DOT_FP32: tl.constexpr,
    ASM: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    tail_len = tl.load(tail_lens_ptr + seq)
    num_pages = (seq_len - tail_len) // N
    per_split = tl.cdiv(num_pages, NUM_SPLITS)
    p_lo = split * per_split
    p_hi = tl.minimum(num_pages, p_lo + per_split)

    g = tl.arange(0, G_PAD)
    heads = kvh * G + g
    gmask = g < G
    q0, q1, q2, q3 = load_q(q_ptr, seq * stride_q_seq + heads * stride_q_head, gmask, D)
    a0, a1, a2, a3, m_i, l_i = init_state(G_PAD, D)
    a0, a1, a2, a3, m_i, l_i = attend_pages(
        q0, q1, q2, q3, a0, a1, a2, a3, m_i, l_i, block_table_ptr + seq * stride_bt, p_lo, p_hi, cache_u8_ptr,
        cache_f16_ptr, stride_c_block, kvh * stride_c_head, qk_scale, TILES, D, N, V_NORM_OFF, DOT_FP32, ASM,
    )
    if split == NUM_SPLITS - 1:
        base = tl.load(tail_slots_ptr + seq).to(tl.int64) * stride_t_slot + kvh * stride_t_head
        a0, a1, a2, a3, m_i, l_i = attend_tail(
            q0, q1, q2, q3, a0, a1, a2, a3, m_i, l_i, tk_ptr + base, tv_ptr + base, stride_t_tok, tail_len,
            qk_scale, TAIL_ROWS, D, DOT_FP32,
        )

    if NUM_SPLITS == 1:
        inv = 1.0 / l_i[:, None]
        store_quarters(out_ptr, seq * stride_o_seq + heads * stride_o_head, gmask,
                       a0 * inv, a1 * inv, a2 * inv, a3 * inv, D)
    else:
        o0, o1, o2, o3, log2_l = finish_rows(a0, a1, a2, a3, l_i)
        row = (seq * (G * tl.num_programs(1)) + heads) * NUM_SPLITS + split
        store_quarters(part_o_ptr, row * D, gmask, o0, o1, o2, o3, D)
        tl.store(part_lse_ptr + row, tl.where(l_i > 0, m_i + log2_l, float("-inf")), mask=gmask)
# fmt: on


@triton.jit
def _merge_kernel(
    part_o_ptr,
    part_lse_ptr,  # fp32 [num_seqs * num_heads, NUM_SPLITS, D], [num_seqs * num_heads, NUM_SPLITS]
    out_ptr,
    stride_o_seq,
    stride_o_head,
    num_heads,
    NUM_SPLITS: tl.constexpr,
    D: tl.constexpr,
):
    """Exact merge of split results: out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m)."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, NUM_SPLITS)
    dk = tl.arange(0, D)
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + sp)
    w = tl.exp2(lse - tl.max(lse, axis=0))
    o = tl.load(part_o_ptr + (row * NUM_SPLITS + sp)[:, None] * D + dk[None, :])
    res = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    seq = row // num_heads
    head = row % num_heads
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + dk, res.to(out_ptr.dtype.element_ty))


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): enough programs to fill the GPU, at least MIN_PAGES_PER_SPLIT pages
    each; a power of two (the merge kernel loads all splits at once). Uses only shapes: no host sync."""
    programs = num_seqs * num_kv_heads
    want = triton.cdiv(PROGRAMS_PER_SM * num_sms(device), max(1, programs))
    most = max(1, max_blocks // MIN_PAGES_PER_SPLIT)
    return max(1, min(pow2(want), 1 << (most.bit_length() - 1)))


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    tail_key: torch.Tensor,
    tail_value: torch.Tensor,
    tail_slots: torch.Tensor,
    tail_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    num_warps: int = 2,  # 591 us vs 739 us (4 warps) at batch 16, 32k tokens on the H200 (commit 9c59833)
    num_stages: int = 2,
    max_tile_rows: int = 128,
    asm_unpack: bool = True,
    split_tiles: bool = True,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its compressed pages and its bf16 tail.

    Parameters
    ----------
    query : ``[num_seqs, num_heads, head_size]`` bf16/fp16/fp32 (post-RoPE).
    kv_cache : ``uint8 [num_blocks, num_kv_heads, >= layout.page_bytes]``.
    layout : ``zipcache_vllm.engine.layout.PageLayout``.
    block_table : ``int32 [num_seqs, max_blocks]``; row ``s`` lists the pages of sequence ``s`` first.
    seq_lens, tail_slots, tail_lens : ``int32 [num_seqs]``. Sequence ``s`` has
        ``(seq_lens[s] - tail_lens[s]) / block_size`` pages (a whole number; not checked on the device) and
        ``tail_lens[s]`` bf16 tokens (the current one included) in staging slot ``tail_slots[s]``.
    tail_key, tail_value : ``[num_slots, block_size, num_kv_heads, head_size]`` bf16/fp16.
    scale : softmax scale, default ``head_size ** -0.5``.
    out : optional ``[num_seqs, num_heads, head_size]`` output (any float dtype); default like ``query``.
    num_splits : pages are split in this many ranges per (sequence, KV head); default
        :func:`choose_num_splits`. num_warps, num_stages, max_tile_rows : launch options of the main kernel
        (``max_tile_rows`` caps the page rows per ``tl.dot``; ``asm_unpack`` unpacks codes with inline PTX on
        the GPU, see ``_common.load_quarters``; ``split_tiles`` splits a region into two tiles when that pads
        fewer rows, e.g. 77 rows as 64 + 16 instead of 128).

    Returns
    -------
    ``out [num_seqs, num_heads, head_size]``.
    """
    dev = query.device
    out, h = check_decode_inputs(query, kv_cache, layout, block_table, seq_lens, tail_key, tail_value, tail_slots,
                                 tail_lens, out)
    num_seqs, num_heads, d = query.shape
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, h, block_table.shape[1], dev)
    check(num_splits >= 1 and num_splits & (num_splits - 1) == 0, "num_splits must be a power of two")
    scale = d**-0.5 if scale is None else scale
    tiles = layout.attention_tiles(max_rows=max_tile_rows, split=split_tiles)
    launch_decode(query, kv_cache, layout, block_table, seq_lens, tail_key, tail_value, tail_slots, tail_lens, out,
                  scale, num_splits, tiles, num_warps, num_stages, asm_unpack)  # fmt: skip
    return out


def launch_decode(query, kv_cache, layout, block_table, seq_lens, tail_key, tail_value, tail_slots, tail_lens, out,
                  scale: float, num_splits: int, tiles: tuple, num_warps: int = 2, num_stages: int = 2,
                  asm_unpack: bool = True) -> torch.Tensor | None:  # fmt: skip
    """The kernels of :func:`decode_attention` on checked arguments (no checks, no host sync): ``tiles`` is
    ``layout.attention_tiles(...)``, ``num_splits`` a power of two. Writes ``out`` and returns the per-split
    log-sum-exp, fp32 ``[num_seqs, num_heads, num_splits]`` (base 2, of the scaled logits; -inf for an empty
    split), or None for one split."""
    num_seqs, num_heads, d = query.shape
    h = tail_key.shape[2]
    n = layout.block_size
    g = num_heads // h
    interp = interpreting()
    if num_splits > 1:
        part_o = torch.empty(num_seqs * num_heads * num_splits * d, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(num_seqs * num_heads * num_splits, dtype=torch.float32, device=query.device)
    else:
        part_o = part_lse = out  # unused
    _decode_kernel[(num_seqs, h, num_splits)](
        q_ptr=query,
        stride_q_seq=query.stride(0),
        stride_q_head=query.stride(1),
        **cache_args(kv_cache),
        block_table_ptr=block_table,
        stride_bt=block_table.stride(0),
        seq_lens_ptr=seq_lens,
        **tail_args(tail_key, tail_value, tail_slots, tail_lens),
        out_ptr=out,
        stride_o_seq=out.stride(0),
        stride_o_head=out.stride(1),
        part_o_ptr=part_o,
        part_lse_ptr=part_lse,
        qk_scale=scale * LOG2E,
        NUM_SPLITS=num_splits,
        G=g,
        G_PAD=max(16, pow2(g)),
        D=d,
        N=n,
        TILES=tiles,
        V_NORM_OFF=layout.v_norm_off,
        TAIL_ROWS=min(64, pow2(n)),
        DOT_FP32=interp,
        ASM=asm_unpack and not interp,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits == 1:
        return None
    _merge_kernel[(num_seqs * num_heads,)](
        part_o_ptr=part_o,
        part_lse_ptr=part_lse,
        out_ptr=out,
        stride_o_seq=out.stride(0),
        stride_o_head=out.stride(1),
        num_heads=num_heads,
        NUM_SPLITS=num_splits,
        D=d,
        num_warps=1 if interp else 4,
    )
    return part_lse.view(num_seqs, num_heads, num_splits)
