"""How a :class:`~zipcache_vllm.hf.paged_cache.PagedLayer` attends: the three steps of a layer, and the kernel launches
they use (Triton on CUDA, the plain-torch twins of :mod:`zipcache_vllm.engine.paged` on CPU).

* **first chunk (prompt)**: SDPA over the bf16 prompt, as the paper does (CUDA, bf16/fp16: cuDNN's or the flash kernel,
  which also returns the log-sum-exp of every row); probe saliency (ZC-7/8, 5 % recent + 5 % random rows drawn
  per layer exactly as :mod:`hf_cache` does) by ``kernels/probe_scores`` on CUDA, the twin
  (``paged.prefill_attention``) on CPU; complete blocks compressed into pages (``compress_store``), the rest
  staged in the tail with its running sums and counts;
* **decode (one token)**: the paged engine's decode step (:mod:`zipcache_vllm.engine.decode`, the one the vLLM
  backend runs): the token is staged, ``kernels/decode_v2`` (or v1 for layouts v2 does not read) attends over
  pages + tail, the query's own attention mass on the tail tokens (``probe_scores`` on the row's
  log-sum-exp) is added to their running sums, as the reference cache does, and a tail that becomes a
  complete block is compressed (``score_sum / score_count``); on CPU the torch twins of the same operations;
* **later chunks (several tokens)**: ``kernels/prefill_attention`` (twin on CPU) over pages + tail + the
  chunk, probe rows of the chunk for saliency (as the vLLM backend, :mod:`zipcache_vllm.engine.step`).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..engine import paged
from ..engine.decode import decode_step
from ..engine.ops import causal_with_lse
from ..engine.staging import Staging
from ..method.config import Saliency
from ..method.saliency import chunk_counts, layer_probes, normalizer_counts


def _probe_lse(query, key, pos, scale, max_elems: int = 1 << 27) -> torch.Tensor:
    """fp32 ``lse [b, hq, L]`` of the causal rows ``pos`` (other rows left 0; probe_scores reads only those)."""
    b, hq, n, d = query.shape
    g = hq // key.shape[1]
    lse = torch.zeros(b, hq, n, dtype=torch.float32, device=query.device)
    kpos = torch.arange(n, device=query.device)
    pos = pos.to(query.device)
    rows = max(1, max_elems // (hq * n))
    for bi in range(b):
        kk = key[bi].float().repeat_interleave(g, 0).transpose(-1, -2)  # [hq, d, L]
        for p0 in range(0, pos.numel(), rows):
            p = pos[p0 : p0 + rows]
            logits = torch.matmul(query[bi][:, p].float(), kk) * scale  # [hq, r, L]
            logits.masked_fill_(kpos.view(1, 1, -1) > p.view(1, -1, 1), float("-inf"))
            lse[bi][:, p] = torch.logsumexp(logits, dim=-1)
    return lse


class PagedAttention:
    """The attention steps of :class:`~zipcache_vllm.hf.paged_cache.PagedLayer` (a mixin of it: it reads and updates
    the layer's pages, tail and running saliency and calls its ``_absorb`` / ``_compress``)."""

    def attend(self, module, query, attention_mask, scaling, **kwargs) -> torch.Tensor:
        """Attention for the tokens of the last update, then store them: ``out [b, q, num_heads, head_size]``."""
        if self._new is None:
            raise RuntimeError("attend() without a preceding update()")
        k, v = self._new
        self._new = None
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        if self.num_pages == 0 and self.tail_len == 0:
            return self._prefill(module, query, k, v, attention_mask, scale, **kwargs)
        if query.shape[2] == 1:
            return self._decode(query, k, v, scale)
        return self._chunk(query, k, v, scale)

    def _probes(self, n: int) -> torch.Tensor:
        return layer_probes(self.cache.config, n, self.layer_idx)

    def _prefill(self, module, query, k, v, attention_mask, scale, **kwargs):
        c = self.cache
        b, hq, n, d = query.shape
        h = k.shape[1]
        pos = self._probes(n)
        dev = query.device
        probe_idx = pos.to(dev, torch.int32).repeat(b)
        probe_start = torch.arange(b + 1, device=dev, dtype=torch.int32) * pos.numel()
        qsl = torch.arange(b + 1, device=dev, dtype=torch.int32) * n
        seq_lens = torch.full((b,), n, dtype=torch.int32, device=dev)
        zeros = torch.zeros(b, dtype=torch.int32, device=dev)
        kf = k.transpose(1, 2).reshape(b * n, h, d)
        qf = query.transpose(1, 2).reshape(b * n, hq, d)
        if c.use_triton:
            from ..kernels.probe_scores import probe_scores

            flash = causal_with_lse(query, k, v, scale) if attention_mask is None else None
            if flash is not None:
                out, lse = flash
            else:
                out = sdpa_attention_forward(module, query, k.to(query.dtype), v.to(query.dtype), attention_mask,
                                             dropout=0.0, scaling=scale, **kwargs)[0]
                lse = _probe_lse(query, k, pos, scale)
            lse = lse.transpose(1, 2).reshape(b * n, hq).contiguous()
            sums, _ = probe_scores(qf, lse, kf, self.tail_key, qsl, seq_lens, c.slots, zeros, probe_idx,
                                   probe_start, n, normalizer=None, scale=scale)
        else:
            out = sdpa_attention_forward(module, query, k.to(query.dtype), v.to(query.dtype), attention_mask,
                                         dropout=0.0, scaling=scale, **kwargs)[0]
            vf = v.transpose(1, 2).reshape(b * n, h, d)
            _, sums, _ = paged.prefill_attention(
                qf, kf, vf, self.pages, c.layout, c.block_table[:, :1], qsl, seq_lens, self.tail_key,
                self.tail_value, c.slots, zeros, probe_idx=probe_idx, probe_start_loc=probe_start,
                normalizer=None, scale=scale,
            )
        counts = normalizer_counts(pos.to(dev), n, c.config.normalizer)
        self._absorb(k, v, sums.view(b, n, h), counts)
        return out

    def _decode(self, query, k, v, scale):
        """One token per row: the engine's decode step (:func:`zipcache_vllm.engine.decode.decode_step`), row
        ``r`` staging in slot ``r``; a block that completes is compressed inside the step."""
        c = self.cache
        t = self.tail_len
        if t + 1 == c.layout.block_size:
            c._ensure_capacity(self.num_pages + 1)
            self._ensure_pages()
        rows = c.decode_rows(self.num_pages, t)
        staging = Staging(self.tail_key, self.tail_value, self.score_sum, self.score_count)
        b, hq, _, d = query.shape
        h = k.shape[1]
        out = torch.empty(b, hq, d, dtype=query.dtype, device=query.device)
        random = c.random_scores(b, h, query.device) if c.config.saliency is Saliency.RANDOM else None
        decode_step(query[:, :, 0], k[:, :, 0], v[:, :, 0], self.pages, staging, rows, c.layout,
                    c.ops, c.config.saliency, scale, out, random)
        self.tail_len = t + 1
        if self.tail_len == c.layout.block_size:
            self.num_pages += 1
            self.tail_len = 0
        return out.unsqueeze(1)

    def _chunk(self, query, k, v, scale):
        """Several new tokens over pages + tail + themselves (causal): the prefill-attention kernel or twin."""
        c = self.cache
        cfg = c.config
        b, hq, n, d = query.shape
        h = k.shape[1]
        dev = query.device
        t0 = self.tail_len
        seq_len = self.num_pages * c.layout.block_size + t0 + n
        pos = self._probes(n)
        meta = dict(
            kv_cache=self.pages,
            layout=c.layout,
            block_table=c.block_table[:, : max(1, self.num_pages)],
            query_start_loc=torch.arange(b + 1, device=dev, dtype=torch.int32) * n,
            seq_lens=torch.full((b,), seq_len, dtype=torch.int32, device=dev),
            tail_key=self.tail_key,
            tail_value=self.tail_value,
            tail_slots=c.slots,
            tail_lens=torch.full((b,), t0, dtype=torch.int32, device=dev),
            probe_idx=pos.to(dev, torch.int32).repeat(b),
            probe_start_loc=torch.arange(b + 1, device=dev, dtype=torch.int32) * pos.numel(),
            normalizer=None,
            scale=scale,
        )
        qf = query.transpose(1, 2).reshape(b * n, hq, d)
        kf = k.transpose(1, 2).reshape(b * n, h, d)
        vf = v.transpose(1, 2).reshape(b * n, h, d)
        out, sums, tail_sums = c.ops.prefill_attention(qf, kf, vf, n, **meta)
        # counts as the vLLM backend keeps them (saliency.chunk_counts): causal_count = queries of the chunk
        # that see the token, probe_nnz = probes at or after it; tail tokens first, then the chunk's
        cnt = chunk_counts(cfg.normalizer, t0, n, t0, pos).to(dev)
        if t0:
            self.score_sum[:, :t0] += tail_sums[:, :t0]
            self.score_count[:, :t0] += cnt[:t0]
        self._absorb(k, v, sums.view(b, n, h), cnt[t0:])
        return out.to(query.dtype).view(b, n, hq, d)

