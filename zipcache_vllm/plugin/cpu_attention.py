"""vLLM's own CPU attention kernel as the engine step's paged attention for prefill chunks.

The stock CPU server attends with ``cpu_attention_with_kv_cache`` over its bf16 paged cache. The ZipCache step
(:func:`zipcache_vllm.engine.step.zipcache_attention`, ``paged_attention=``) hands it every block of a chunk as
a pseudo-request over a bf16 scratch cache (the sequence's pages dequantized, then its own raw rows:
:class:`~zipcache_vllm.engine.step.BlockRequests`), so a prompt row is attended by the same C++ kernel as in
stock, in a request whose keys depend on its block alone (chunk and batch invariance:
``tests/engine/test_step.py``). The KV split is off (a split would make a row's arithmetic depend
on the other requests' lengths). The engine does not import vLLM: this module is the seam.
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa


class CpuPagedAttention:
    """A :data:`~zipcache_vllm.engine.step.PagedAttention` over a bf16 scratch cache in vLLM's CPU layout
    (``[num_blocks, num_kv_heads, 2 * block_size, head_size]``, keys then values; the ISA's own order inside a
    block, written by ``cpu_attn_reshape_and_cache``). One instance serves every layer of a worker (layers run
    one after the other): the scratch grows to the largest step and is reused; the scheduler metadata is made
    once per step (the engine hands every layer the same ``query_start_loc``)."""

    def __init__(self, block_size: int, head_size: int):
        self.block_size, self.head_size = block_size, head_size
        self.isa = _get_attn_isa(torch.bfloat16, block_size, head_size)
        self._scratch: torch.Tensor | None = None
        self._meta_for: torch.Tensor | None = None  # the query_start_loc the metadata was made for (kept alive)
        self._meta: torch.Tensor | None = None

    def scratch(self, num_blocks: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._scratch
        if s is None or s.shape[0] < num_blocks or s.shape[1] != num_kv_heads:
            s = torch.zeros(num_blocks, num_kv_heads, 2 * self.block_size, self.head_size, dtype=torch.bfloat16)
            self._scratch = s
        return s.chunk(2, dim=2)

    def __call__(self, query, key, value, slot_mapping, num_blocks, query_start_loc, seq_lens, block_table, scale):
        key_cache, value_cache = self.scratch(num_blocks, key.shape[1])
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, self.isa)
        if self._meta_for is not query_start_loc:  # made for the current thread count, as vLLM's builder does
            self._meta = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=seq_lens.shape[0], num_heads=query.shape[1], num_kv_heads=key.shape[1],
                head_dim=self.head_size, seq_lens=seq_lens, dtype=torch.bfloat16, query_start_loc=query_start_loc,
                causal=True, sliding_window_size=-1, isa=self.isa, enable_kv_split=False,
            )  # fmt: skip
            self._meta_for = query_start_loc
        out = torch.empty_like(query)
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=query_start_loc,
            seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=block_table, softcap=0.0, scheduler_metadata=self._meta, s_aux=None,
        )  # fmt: skip
        return out
