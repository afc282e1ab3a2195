"""Synthetic contexts: a prompt's cache as the engine leaves it after prefill, written without attending.

Complete blocks get pages compressed from random K/V (a pool of template pages per layer, copied), the last
``context_len % block_size`` tokens a random bf16 tail in a staging slot with random probe queries, and the
staging plan learns the slot exactly as a prefill step would have told it. For GPU tests and benchmarks that
start from long contexts without paying for their prefill (the decode step reads pages the same way whatever
their content). Not a serving path.
"""

from __future__ import annotations

import torch

from .block_manager import BlockManager
from .layout import PageLayout
from .ops import kernel_ops
from .staging import Staging


def template_pages(num_pages: int, num_kv_heads: int, layout: PageLayout, device, seed: int = 0) -> torch.Tensor:
    """``uint8 [num_pages, num_kv_heads, page_bytes]`` compressed from random K/V (channels of different
    ranges, as keys have) with random saliency."""
    n, d = layout.block_size, layout.head_size
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = num_pages * n
    k = (torch.randn(rows, num_kv_heads, d, generator=gen, device=device)
         * torch.linspace(0.5, 4.0, d, device=device)).bfloat16()  # fmt: skip
    v = torch.randn(rows, num_kv_heads, d, generator=gen, device=device).bfloat16()
    scores = torch.rand(rows, num_kv_heads, generator=gen, device=device)
    pages = torch.zeros(num_pages, num_kv_heads, layout.page_bytes, dtype=torch.uint8, device=device)
    ids = torch.arange(num_pages, device=device)
    kernel_ops("triton" if pages.device.type == "cuda" else "torch").compress_store(k, v, scores, ids, pages, layout)
    return pages


def admit(block_manager: BlockManager, block_table_row: list[int], context_len: int, kv_caches: list[torch.Tensor],
          stagings: list[Staging], templates: list[torch.Tensor], seed: int) -> int:  # fmt: skip
    """Write a ``context_len``-token context into the blocks ``block_table_row`` of every layer (``kv_caches[i]``
    ``[num_blocks, num_kv_heads, >= page_bytes]``, ``stagings[i]``, pages drawn from ``templates[i]``) and
    register its tail with ``block_manager``. Returns the tail's slot (-1: none). The same seed writes the same
    context."""
    n = block_manager.block_size
    plan = block_manager.plan([block_table_row], [0], [context_len])
    slot = plan.tail_slots[0]
    nb, t = divmod(context_len, n)
    dev = kv_caches[0].device
    gen = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.tensor(block_table_row[:nb], dtype=torch.long).to(dev, non_blocking=True)
    pick = torch.randint(0, templates[0].shape[0], (nb,), generator=gen, device=dev)  # one draw for all layers
    if t:
        h, d = stagings[0].key.shape[2], stagings[0].key.shape[3]
        kv_tail = torch.randn(2, t, h, d, generator=gen, device=dev)
        probes = torch.randn(stagings[0].probe_query.shape[1:], generator=gen, device=dev)
    for kv, st, tpl in zip(kv_caches, stagings, templates, strict=True):
        if nb:
            if kv.shape[2] == tpl.shape[2] and kv.is_contiguous():
                kv.view(kv.shape[0], -1).index_copy_(0, ids, tpl.view(tpl.shape[0], -1).index_select(0, pick))
            else:
                kv[ids, :, : tpl.shape[2]] = tpl[pick]
        if t:
            st.key[slot, :t] = kv_tail[0]
            st.value[slot, :t] = kv_tail[1]
            st.probe_query[slot] = probes
    return slot
