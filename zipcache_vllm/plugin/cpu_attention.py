"""vLLM's own CPU attention kernel as the engine step's paged attention for prefill chunks.

The stock CPU server attends with ``cpu_attention_with_kv_cache`` over its bf16 paged cache. The ZipCache step
(:func:`zipcache_vllm.engine.step.zipcache_attention`, ``paged_attention=``) hands it the rows of a chunk in
requests of ``REQUEST_ROWS`` block-aligned rows over a bf16 scratch cache (the sequence's pages dequantized,
then its own raw rows: :class:`~zipcache_vllm.engine.step.BlockRequests`), so a prompt row is attended by the
same C++ kernel as in stock, with arithmetic that depends on its row group alone: the kernel tiles a request by
its shape (query rows and their start: a request of a chunk's rows only gave some rows other bits from ~16
blocks of context on) and shares a call's work among its threads (requests in one call: other bits under
other batches), so every request has its group's shape and goes in a call of its own, KV split off (chunk and
batch invariance: ``tests/engine/test_step.py``). The engine does not import vLLM: this module is the seam.

That invariance is a property of the kernel on the host's ISA (``vec`` here; ``amx`` on recent Xeons, ``neon``
on ARM), so the backend asks :func:`rows_are_request_local` at start-up and falls back to the masked SDPA
(``ZIPCACHE_CPU_PREFILL=sdpa``) with a warning where it does not hold.
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from ..engine.step import request_rows


class CpuPagedAttention:
    """A :data:`~zipcache_vllm.engine.step.PagedAttention` over a bf16 scratch cache in vLLM's CPU layout
    (``[num_blocks, num_kv_heads, 2 * block_size, head_size]``, keys then values; the ISA's own order inside a
    block, written by ``cpu_attn_reshape_and_cache``), one kernel call per request. One instance serves every
    layer of a worker (layers run one after the other): the scratch grows to the largest step and is reused; the
    requests' scheduler metadata is made once per step (the engine hands every layer the same
    ``query_start_loc``)."""

    def __init__(self, block_size: int, head_size: int):
        self.block_size, self.head_size = block_size, head_size
        self.isa = _get_attn_isa(torch.bfloat16, block_size, head_size)
        self._scratch: torch.Tensor | None = None
        self._meta_for: torch.Tensor | None = None  # the query_start_loc the metadata was made for (kept alive)
        self._meta: list = []  # (query_start_loc, scheduler metadata) of each request

    def scratch(self, num_blocks: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._scratch
        if s is None or s.shape[0] < num_blocks or s.shape[1] != num_kv_heads:
            s = torch.zeros(num_blocks, num_kv_heads, 2 * self.block_size, self.head_size, dtype=torch.bfloat16)
            self._scratch = s
        return s.chunk(2, dim=2)

    def __call__(self, query, key, value, slot_mapping, num_blocks, query_start_loc, seq_lens, block_table, scale):
        key_cache, value_cache = self.scratch(num_blocks, key.shape[1])
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, self.isa)
        starts, lens = query_start_loc.tolist(), seq_lens.tolist()
        if self._meta_for is not query_start_loc:  # made for the current thread count, as vLLM's builder does
            # one call per request: the kernel's scheduler shares the call's work among its threads, so a row's
            # tiling (and last bits) would depend on the other requests of the call
            self._meta = []
            for r in range(len(lens)):
                qsl = torch.tensor([0, starts[r + 1] - starts[r]], dtype=torch.int32)
                self._meta.append((qsl, ops.cpu_attn_get_scheduler_metadata(
                    num_reqs=1, num_heads=query.shape[1], num_kv_heads=key.shape[1], head_dim=self.head_size,
                    seq_lens=seq_lens[r : r + 1], dtype=torch.bfloat16, query_start_loc=qsl, causal=True,
                    sliding_window_size=-1, isa=self.isa, enable_kv_split=False,
                )))  # fmt: skip
            self._meta_for = query_start_loc
        out = torch.empty_like(query)
        for r, (qsl, meta) in enumerate(self._meta):
            a, b = starts[r], starts[r + 1]
            ops.cpu_attention_with_kv_cache(
                query=query[a:b], key_cache=key_cache, value_cache=value_cache, output=out[a:b],
                query_start_loc=qsl, seq_lens=seq_lens[r : r + 1],
                scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=block_table[r : r + 1],
                softcap=0.0, scheduler_metadata=meta, s_aux=None,
            )  # fmt: skip
        return out


def rows_are_request_local(kernel: CpuPagedAttention, num_heads: int, num_kv_heads: int, seed: int = 0) -> bool:
    """Whether ``kernel`` gives a query row of a request shaped as
    :func:`~zipcache_vllm.engine.step.block_requests` makes them (``REQUEST_ROWS`` block-aligned rows, the chunk's
    among them) the same bits whatever the other rows hold and whatever other requests the step has: the second
    row group of the last of 16 blocks of context (where vLLM's kernel changes its tiling), with the chunk's
    rows alone (the rest zeros) and among real rows, and next to two other requests. A guard for the host's ISA
    (``tests/engine/test_step.py`` proves chunk invariance through the engine on this one); random data, a few
    milliseconds."""
    n, d, h, nb = kernel.block_size, kernel.head_size, num_kv_heads, 16
    m = request_rows(n)
    end = (nb - 1) * n + min(2 * m, n)  # the request's last position + 1 (its second group, if the block has one)
    g = torch.Generator().manual_seed(seed)
    rows = tuple(torch.randn((nb + 1) * n, h, d, generator=g).bfloat16() for _ in range(2))
    query = torch.randn(3 * m, num_heads, d, generator=g).bfloat16()
    slots = torch.arange((nb + 1) * n)  # scratch blocks 0 .. nb - 1 (the request's), nb (another request's)
    qsl = torch.arange(0, 4 * m, m, dtype=torch.int32)
    table = torch.tensor([[nb, *range(nb - 1)], list(range(nb)), [nb, *range(nb - 1)]], dtype=torch.int32)
    lens = torch.tensor([m, end, n + m], dtype=torch.int32)

    def call(own, requests):  # the request's rows, alone or between two others
        if requests == 1:
            return kernel(own, *rows, slots, nb + 1, qsl[:2], lens[1:2], table[1:2], d**-0.5)
        q = torch.cat([query[:m], own, query[2 * m :]])
        return kernel(q, *rows, slots, nb + 1, qsl, lens, table, d**-0.5)[m : 2 * m]

    real = query[m : 2 * m]
    lo, hi = min(5, m - 1), min(23, m)  # the chunk's rows in the request
    chunk = torch.zeros_like(real)
    chunk[lo:hi] = real[lo:hi]
    want = call(real, 1)[lo:hi]
    return all(torch.equal(call(x, r)[lo:hi], want) for x, r in ((chunk, 1), (real, 3), (chunk, 3)))
