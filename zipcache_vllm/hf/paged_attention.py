"""How a :class:`~zipcache_vllm.hf.paged_cache.PagedLayer` attends: the two steps of a layer, and the kernel
launches they use (Triton on CUDA, the plain-torch twins of :mod:`zipcache_vllm.engine.paged` on CPU), with the
semantics of the vLLM backend (:mod:`zipcache_vllm.engine.step`):

* **chunk (the prompt, or later tokens several at a time)**: the blocks the chunk completes are scored by the
  block rule (their own probe rows, ``ops.block_scores``) and compressed first (``compress_store``); then each
  query attends over the pages of the blocks before its own and the bf16 tokens of its own block up to itself
  (``prefill_attention``); the rest is staged in the tail, with the
  queries of its probe rows;
* **decode (one token)**: the paged engine's decode step (:mod:`zipcache_vllm.engine.decode`, the one the vLLM
  backend runs): the token (and its query, when its position is a probe of its block) is staged, a tail that
  becomes a complete block is scored and compressed, and the query attends over pages + tail.
"""

from __future__ import annotations

import torch

from ..engine.decode import decode_step, probe_ranks
from ..engine.staging import Staging
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
        """Several new tokens (or a first one): compress the blocks they complete, attend block by block, stage
        the rest (module docstring)."""
        c = self.cache
        cfg, n = c.config, c.layout.block_size
        b, hq, m, d = query.shape
        h = k.shape[1]
        dev = query.device
        t0 = self.tail_len
        ctx = self.num_pages * n + t0
        end = ctx + m
        qn = query.to(self.tail_key.dtype).transpose(1, 2)  # [b, m, hq, d]
        kn, vn = k.transpose(1, 2), v.transpose(1, 2)  # [b, m, h, d] bf16
        nc = end // n - self.num_pages  # blocks completed by this chunk
        if nc:
            c._ensure_capacity(self.num_pages + nc)
            self._ensure_pages()
            bk = torch.cat([self.tail_key[:b, :t0], kn[:, : nc * n - t0]], 1)  # [b, nc * n, h, d]
            bv = torch.cat([self.tail_value[:b, :t0], vn[:, : nc * n - t0]], 1)
            if cfg.saliency is Saliency.RANDOM:  # the ablation, drawn as ZipCacheCompressor does for each segment
                scores = c.random_scores(b, h, dev)[:b].repeat(1, nc, 1)
            else:
                pq, offs = [], []
                for j in range(nc):
                    bi = self.num_pages + j
                    off, _ = probe_ranks(cfg, n, bi)
                    rows = []
                    for rank, o in enumerate(off):
                        x = bi * n + o
                        rows.append(self.probe_query[:b, rank] if x < ctx else qn[:, x - ctx])
                    pq.append(torch.stack(rows, 1))
                    offs.append(off)
                pq = torch.stack(pq, 1).flatten(0, 1)  # [b * nc, P, hq, d]
                offsets = torch.tensor(offs, dtype=torch.int32, device=dev).repeat(b, 1)
                scores = torch.empty(b * nc, n, h, dtype=torch.float32, device=dev)
                c.ops.block_scores(bk.reshape(b * nc, n, h, d), pq, offsets, torch.arange(b * nc, device=dev),
                                   scores, cfg.normalizer, cfg.saliency, scale)
            self._compress(bk, bv, scores.reshape(b, nc * n, h), nc)
        out = self._attend_blocks(query, k, v, ctx, t0, scale)
        # stage the new tail and the queries of its probe rows (attention read the old tail)
        rest = end % n
        if rest:
            first = max(ctx, end - rest)
            self.tail_key[:b, rest - (end - first) : rest] = kn[:, first - ctx :]
            self.tail_value[:b, rest - (end - first) : rest] = vn[:, first - ctx :]
            _, rank = probe_ranks(cfg, n, end // n)
            for x in range(first, end):
                r = rank.get(x % n)
                if r is not None:
                    self.probe_query[:b, r] = qn[:, x - ctx]
        self.tail_len = rest
        return out

    def _attend_blocks(self, query, k, v, ctx, t0, scale):
        """``prefill_attention`` of the chunk, one sequence per row (the block rule is the kernel's contract:
        the pages before each query's own block, the bf16 tail and the chunk's tokens in it)."""
        c = self.cache
        b, hq, m, d = query.shape
        h = k.shape[1]
        dev = query.device
        i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
        meta = dict(
            kv_cache=self.pages,
            layout=c.layout,
            block_table=c.block_table[:b],
            query_start_loc=i32([r * m for r in range(b + 1)]),
            seq_lens=i32([ctx + m] * b),
            tail_key=self.tail_key,
            tail_value=self.tail_value,
            tail_slots=c.slots[:b],
            tail_lens=i32([t0] * b),
            scale=scale,
        )
        qf = query.transpose(1, 2).reshape(b * m, hq, d)
        kf = k.transpose(1, 2).reshape(b * m, h, d)
        vf = v.transpose(1, 2).reshape(b * m, h, d)
        out = c.ops.prefill_attention(qf, kf, vf, m, **meta)
        return out.to(query.dtype).view(b, m, hq, d)
