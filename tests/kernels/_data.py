"""Random paged caches shared by the kernel tests (built with the torch twin, so kernels are tested alone)."""

from __future__ import annotations

import torch

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.layout import PageLayout


def make_cache_kv(layout: PageLayout, num_kv_heads: int, num_blocks: int, device, outlier: float = 8.0):
    """:func:`make_cache` plus what it compressed: ``(cache, key, value, scores)`` with the original bf16
    ``key, value [num_blocks * block_size, num_kv_heads, head_size]`` (block ``b`` = rows ``b * block_size ..``,
    token order) and the fp32 saliency ``scores [num_blocks * block_size, num_kv_heads]`` (on the CPU)."""
    n, d = layout.block_size, layout.head_size
    k = torch.randn(num_blocks * n, num_kv_heads, d)
    k[..., : d // 8] *= outlier
    v = torch.randn(num_blocks * n, num_kv_heads, d)
    scores = torch.rand(num_blocks * n, num_kv_heads)
    cache = torch.zeros(num_blocks, num_kv_heads, layout.page_bytes, dtype=torch.uint8)
    k, v = k.bfloat16(), v.bfloat16()
    paged.compress_store(k, v, scores, torch.arange(num_blocks), cache, layout)
    return cache.to(device), k, v, scores


def make_cache(layout: PageLayout, num_kv_heads: int, num_blocks: int, device, outlier: float = 8.0):
    """A cache of ``num_blocks`` compressed pages of random K/V with outlier channels (as real keys have)."""
    return make_cache_kv(layout, num_kv_heads, num_blocks, device, outlier)[0]


def make_seqs_kv(layout: PageLayout, num_kv_heads: int, lengths: list[tuple[int, int]], device):
    """:func:`make_seqs` plus ``(key, value, scores)`` of the cache's blocks (see :func:`make_cache_kv`):
    returns ``(cache, block_table, seq_lens, tail_key, tail_value, tail_slots, tail_lens), (key, value,
    scores)``."""
    n = layout.block_size
    pages = [c // n for c, _ in lengths]
    num_blocks = max(1, sum(pages)) + 2
    perm = torch.randperm(num_blocks)
    width = max(1, max(pages))
    block_table = torch.zeros(len(lengths), width, dtype=torch.int32)
    start = 0
    for s, p in enumerate(pages):
        block_table[s, :p] = perm[start : start + p].int()
        start += p
    tail_lens = torch.tensor([c % n for c, _ in lengths], dtype=torch.int32)
    seq_lens = torch.tensor([c + q for c, q in lengths], dtype=torch.int32)
    num_slots = len(lengths) + 1
    tail_slots = torch.randperm(num_slots)[: len(lengths)].int()
    tail_key = torch.randn(num_slots, n, num_kv_heads, layout.head_size).bfloat16()
    tail_value = torch.randn(num_slots, n, num_kv_heads, layout.head_size).bfloat16()
    cache, key, value, scores = make_cache_kv(layout, num_kv_heads, num_blocks, device)
    to = lambda x: x.to(device)  # noqa: E731
    seqs = cache, to(block_table), to(seq_lens), to(tail_key), to(tail_value), to(tail_slots), to(tail_lens)
    return seqs, (key, value, scores)


def make_seqs(layout: PageLayout, num_kv_heads: int, lengths: list[tuple[int, int]], device):
    """Sequences from (compressed tokens incl. tail, new tokens) pairs: block_table over a shuffled cache,
    tails of random length-mod-block_size in shuffled staging slots."""
    return make_seqs_kv(layout, num_kv_heads, lengths, device)[0]
