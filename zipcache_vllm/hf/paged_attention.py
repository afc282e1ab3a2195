"""How a :class:`~zipcache_vllm.hf.paged_cache.PagedLayer` attends: the two steps of a layer, and the kernel
launches they use (Triton on CUDA, the plain-torch twins of :mod:`zipcache_vllm.engine.paged` on CPU), with the
semantics of the vLLM backend (:mod:`zipcache_vllm.engine.step`):

* **chunk (the prompt, or later tokens several at a time)**: the vLLM backend's step
  (:func:`zipcache_vllm.engine.step.zipcache_attention`, each batch row a sequence in its own staging slot):
  the blocks the chunk completes are scored by the block rule (their own probe rows) and compressed first;
  then each query attends over the pages of the blocks before its own and the bf16 tokens of its own block up
  to itself (``prefill_attention``); the rest is staged in the tail, with the queries of its probe rows;
* **decode (one token)**: the paged engine's decode step (:mod:`zipcache_vllm.engine.decode`, the one the vLLM
  backend runs): the token (and its query, when its position is a probe of its block) is staged, a tail that
  becomes a complete block is scored and compressed, and the query attends over pages + tail.
"""

from __future__ import annotations

import torch

from ..engine.decode import decode_step
from ..engine.staging import Staging
from ..engine.step import zipcache_attention
from ..method.config import Saliency
from ..method.saliency import num_block_probes


class PagedAttention:
    """The attention steps of :class:`~zipcache_vllm.hf.paged_cache.PagedLayer` (a mixin of it: it reads and updates
    the layer's pages, tail and staged probe queries)."""

    def attend(self, module, query, attention_mask, scaling, **kwargs) -> torch.Tensor:
        """Attention for the tokens of the last update, then store them: ``out [b, q, num_heads, head_size]``."""
        if self._new is None:
            raise RuntimeError("attend() without a preceding update()")
        k, v = self._new
        self._new = None
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        if self.probe_query is None:
            b, hq, _, d = query.shape
            p = num_block_probes(self.cache.config, self.cache.layout.block_size)
            self.probe_query = torch.zeros(b + 1, p, hq, d, dtype=self.tail_key.dtype, device=query.device)
        if query.shape[2] == 1 and (self.num_pages or self.tail_len):
            return self._decode(query, k, v, scale)
        return self._chunk(query, k, v, scale)

    def _staging(self) -> Staging:
        return Staging(self.tail_key, self.tail_value, self.probe_query)

    def _decode(self, query, k, v, scale):
        """One token per row: the engine's decode step (:func:`zipcache_vllm.engine.decode.decode_step`), row
        ``r`` staging in slot ``r``; a block that completes is compressed inside the step."""
        c = self.cache
        t = self.tail_len
        if t + 1 == c.layout.block_size:
            c._ensure_capacity(self.num_pages + 1)
            self._ensure_pages()
        rows = c.decode_rows(self.num_pages, t)
        b, hq, _, d = query.shape
        h = k.shape[1]
        out = torch.empty(b, hq, d, dtype=query.dtype, device=query.device)
        random = c.random_scores(b, h, query.device) if c.config.saliency is Saliency.RANDOM else None
        decode_step(query[:, :, 0], k[:, :, 0], v[:, :, 0], self.pages, self._staging(), rows, c.layout,
                    c.ops, c.config, scale, out, random)
        self.tail_len = t + 1
        if self.tail_len == c.layout.block_size:
            self.num_pages += 1
            self.tail_len = 0
        return out.unsqueeze(1)

    def _chunk(self, query, k, v, scale):
        """Several new tokens (or a first one) per row: the vLLM backend's step
        (:func:`zipcache_vllm.engine.step.zipcache_attention`) with row ``r`` as sequence ``r`` in staging
        slot ``r``: it compresses the blocks the chunk completes, attends (block rule) and stages the rest."""
        c = self.cache
        n = c.layout.block_size
        b, hq, m, d = query.shape
        h = k.shape[1]
        t0 = self.tail_len
        end = self.num_pages * n + t0 + m
        nc = end // n - self.num_pages  # blocks completed by this chunk
        if nc:
            c._ensure_capacity(self.num_pages + nc)
            self._ensure_pages()
        meta = c.chunk_step(self.num_pages, t0, m)
        out = torch.empty(b * m, hq, d, dtype=query.dtype, device=query.device)
        random = c.random_scores(b, h, query.device) if c.config.saliency is Saliency.RANDOM else None
        zipcache_attention(query.transpose(1, 2).reshape(b * m, hq, d), k.transpose(1, 2).reshape(b * m, h, d),
                           v.transpose(1, 2).reshape(b * m, h, d), self.pages, c.block_table, meta["seq_lens"],
                           meta["query_start_loc"], meta["slot_mapping"], self._staging(), meta["step"], c.layout,
                           c.config, scale=scale, out=out, kernels=c.ops, random_scores=random)
        self.num_pages += nc
        self.tail_len = end % n
        return out.view(b, m, hq, d)
