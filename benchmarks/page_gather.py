"""Page-gather roofline: the bandwidth at which a kernel can stream exactly the bytes a decode step must read.

A decode step reads, for every (sequence, KV head), the codes and parameters of each of its pages (scattered
through the cache, found through the block table) once. This kernel does only that: the same grid and the
same split of pages as the decode kernels, 16-byte loads of the first ``layout.mask_off`` bytes of every page
(codes + parameters; the bitmaps and the padding are never read), and an integer sum so the loads stay. Its
bandwidth is the ceiling the decode kernel is judged against (docs/performance.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kernel(cache_ptr, stride_c_block, stride_c_head, block_table_ptr, stride_bt, num_pages, out_ptr,
                   NUM_SPLITS: tl.constexpr, WORDS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    per_split = tl.cdiv(num_pages, NUM_SPLITS)
    p_lo = split * per_split
    p_hi = tl.minimum(num_pages, p_lo + per_split)
    w = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for p in range(p_lo, p_hi):
        page = tl.load(block_table_ptr + seq * stride_bt + p).to(tl.int64)
        base = (cache_ptr + page * stride_c_block + kvh * stride_c_head).to(tl.pointer_type(tl.int32))
        for w0 in tl.static_range(0, WORDS, BLOCK):
            acc += tl.load(base + w0 + w, mask=w0 + w < WORDS, other=0)
    tl.store(out_ptr + (seq * tl.num_programs(1) + kvh) * NUM_SPLITS + split, tl.sum(acc, axis=0))


def page_gather(kv_cache: torch.Tensor, layout, block_table: torch.Tensor, num_pages: int, num_splits: int,
                out: torch.Tensor | None = None, num_warps: int = 4) -> torch.Tensor:  # fmt: skip
    """Stream the first ``layout.mask_off`` bytes of pages ``block_table[s, :num_pages]`` for every KV head."""
    num_seqs, h = block_table.shape[0], kv_cache.shape[1]
    words = layout.mask_off // 4
    if out is None:
        out = torch.empty(num_seqs * h * num_splits, dtype=torch.int32, device=kv_cache.device)
    _gather_kernel[(num_seqs, h, num_splits)](
        kv_cache, kv_cache.stride(0), kv_cache.stride(1), block_table, block_table.stride(0), num_pages, out,
        NUM_SPLITS=num_splits, WORDS=words, BLOCK=min(1024, triton.next_power_of_2(words)), num_warps=num_warps,
    )  # fmt: skip
    return out


def gather_bytes(layout, num_seqs: int, num_kv_heads: int, num_pages: int) -> int:
    return num_seqs * num_kv_heads * num_pages * (layout.mask_off // 4) * 4
