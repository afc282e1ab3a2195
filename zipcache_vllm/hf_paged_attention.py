"""How a :class:`~zipcache_vllm.hf_paged.PagedLayer` attends: the three steps of a layer, and the kernel launches
they use (Triton on CUDA, the plain-torch twins of :mod:`zipcache_vllm.paged` on CPU).

* **first chunk (prompt)**: SDPA over the bf16 prompt, as the paper does (CUDA, bf16/fp16: the flash kernel,
  which also returns the log-sum-exp of every row); probe saliency (ZC-7/8, 5 % recent + 5 % random rows drawn
  per layer exactly as :mod:`hf_cache` does) by ``kernels/probe_scores`` on CUDA, the twin
  (``paged.prefill_attention``) on CPU; complete blocks compressed into pages (``compress_store``), the rest
  staged in the tail with its running sums and counts;
* **decode (one token)**: the token is staged, then ``kernels/decode_v2`` (or v1 ``kernels/decode_attention`` for
  layouts v2 does not read) attends over pages + tail (on
  CPU: ``paged.dequantize_pages`` + fp32 attention, i.e. ``paged.decode_attention``); the query's own
  attention mass on the tail tokens (``probe_scores`` with the row's log-sum-exp from the decode splits) is
  added to their running sums, as the reference cache does; a tail that becomes a complete block is
  compressed (``score_sum / score_count``);
* **later chunks (several tokens)**: ``kernels/prefill_attention`` (twin on CPU) over pages + tail + the
  chunk, probe rows of the chunk for saliency (as the vLLM backend, :mod:`zipcache_vllm.attention`).
"""

from __future__ import annotations

import functools
import importlib
import math

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import paged
from .config import Normalizer
from .layout import PageLayout
from .saliency import normalizer_counts, probe_positions

PROBE_SEED_STRIDE = 1_000_003  # probe draw of layer i: seed probe_seed * stride + i (as hf_cache)
LN2 = math.log(2.0)

_MODULES: dict[str, object] = {}


def kernel_module(name: str):
    """``zipcache_vllm.kernels.<name>`` as a module, imported on first use (the package re-exports functions of
    the same names)."""
    mod = _MODULES.get(name)
    if mod is None:
        mod = _MODULES[name] = importlib.import_module(f"{__package__}.kernels.{name}")
    return mod


def decode_with_lse(query, kv_cache, layout, block_table, seq_lens, tail_key, tail_value, tail_slots, tail_lens,
                    scale: float, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention with the row log-sum-exp the saliency update needs: ``out [num_seqs, num_heads,
    head_size]`` (dtype of ``query``) and fp32 ``lse [num_seqs, num_heads]`` (natural log of sum exp(scale *
    q.k)).

    ``kernels/decode_v2`` (tensor cores, one launch, lse from the kernel) where it reads the layout
    (``decode_v2.supported``: 4/2-bit codes, head size 64/128, quotas in multiples of 16), else
    ``kernels/decode_attention`` (v1) with at least two splits, its per-split log-sum-exp merged here.
    """
    v2 = kernel_module("decode_v2")
    if v2.supported(layout) and query.shape[1] // tail_key.shape[2] <= 16:
        out = torch.empty_like(query)
        lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device)
        v2.launch_decode_v2(query, kv_cache, layout, block_table, seq_lens, tail_key, tail_value, tail_slots,
                            tail_lens, out, lse, scale, v2.choose_num_splits(query.shape[0], tail_key.shape[2],
                                                                             block_table.shape[1], query.device))
        return out, lse
    dk = kernel_module("decode_attention")
    if splits is None:
        splits = max(2, dk.choose_num_splits(query.shape[0], tail_key.shape[2], block_table.shape[1], query.device))
    out = torch.empty_like(query)
    part_lse = dk.launch_decode(query, kv_cache, layout, block_table, seq_lens, tail_key, tail_value, tail_slots,
                                tail_lens, out, scale, splits, _tiles(layout))
    return out, torch.logsumexp(part_lse * LN2, dim=-1)


def decode_probe_scores(query, lse, key, tail_key, meta: dict, own_out, tail_out, scale: float) -> None:
    """``kernels/probe_scores`` for a decode step, launched directly (no checks, no allocation): the query is
    the probe of its own one-token chunk ``key [b, h, d]``. Writes the token's own mass into ``own_out [b, h]``
    (head stride 1) and the mass of tail token ``j < tail_lens_before`` into ``tail_out [b, N, h]`` (raw sums;
    rows past the tail are left as they are)."""
    kernel_module("probe_scores").launch_probe(
        query, lse, key, tail_key, meta["qsl"], meta["seq_lens"], meta["slots"], meta["tail_lens_before"],
        meta["probe_idx"], meta["qsl"], 1, own_out, tail_out, None, scale,
    )


@functools.lru_cache(maxsize=16)
def _tiles(layout: PageLayout) -> tuple:
    return layout.attention_tiles(max_rows=128, split=True)  # the launcher's defaults


def _flash_with_lse(query, key, value, scale):
    """Causal flash attention with the log-sum-exp of every row: ``out [b, L, hq, d]``, fp32 ``lse [b, hq, L]``.
    None where the flash kernel does not apply (CPU, fp32, old torch)."""
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    fn = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
    if fn is None:
        return None
    key, value = key.to(query.dtype), value.to(query.dtype)
    try:
        res = fn(query, key, value, 0.0, True, False, scale=scale)
    except Exception:  # a build without native GQA in the flash op: expand the KV heads
        g = query.shape[1] // key.shape[1]
        try:
            res = fn(query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), 0.0, True, False,
                     scale=scale)
        except Exception:
            return None
    return res[0].transpose(1, 2), res[1][..., : query.shape[2]].float()


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
    """The attention steps of :class:`~zipcache_vllm.hf_paged.PagedLayer` (a mixin of it: it reads and updates
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
        cfg = self.cache.config
        gen = torch.Generator().manual_seed(cfg.probe_seed * PROBE_SEED_STRIDE + self.layer_idx)
        return probe_positions(n, cfg.probe_recent, cfg.probe_random, gen, cfg.probe_compat)

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
            from .kernels.probe_scores import probe_scores

            flash = _flash_with_lse(query, k, v, scale) if attention_mask is None else None
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
        c = self.cache
        t = self.tail_len
        self.tail_key[:, t] = k[:, :, 0]
        self.tail_value[:, t] = v[:, :, 0]
        q = query[:, :, 0]
        # invariant: score_sum / score_count rows at and past the tail are 0
        if c.use_triton:
            m = c.step_meta(self.num_pages, t)
            out, lse = decode_with_lse(q, self.pages, c.layout, m["block_table"], m["seq_lens"], self.tail_key,
                                       self.tail_value, c.slots, m["tail_lens_after"], scale, splits=m["splits"])
            scratch = c.scratch(self.score_sum)
            # own mass straight into score_sum[:, t]; the tail's (without the token) into scratch
            decode_probe_scores(q, lse, k[:, :, 0], self.tail_key, m, self.score_sum[:, t], scratch, scale)
            if t:
                self.score_sum[:, :t] += scratch[:, :t]
        else:
            out, mass = self._twin_decode(q, t + 1, scale)
            self.score_sum[:, : t + 1] += mass
        self.score_count[: t + 1] += 1.0
        self.tail_len = t + 1
        if self.tail_len == c.layout.block_size:
            self._compress(self.tail_key, self.tail_value, self.score_sum, self.score_count, 1)
            self.tail_len = 0
            self.score_sum.zero_()
            self.score_count.zero_()
        return out.to(query.dtype).unsqueeze(1)

    def _twin_decode(self, q, tail_len, scale):
        """CPU: ``paged.decode_attention`` (dequantized pages + bf16 tail, fp32), also returning the mass each
        tail token receives ``[b, tail_len, num_kv_heads]``."""
        c = self.cache
        b, hq, d = q.shape
        h = self.tail_key.shape[2]
        g = hq // h
        n = c.layout.block_size
        keys = [self.tail_key[:, :tail_len].float()]
        vals = [self.tail_value[:, :tail_len].float()]
        if self.num_pages:
            ids = c.block_table[:, : self.num_pages].reshape(-1)
            pk, pv = paged.dequantize_pages(self.pages, ids, c.layout, order="page")  # [b * P, N, h, d]
            keys.insert(0, pk.view(b, self.num_pages * n, h, d))
            vals.insert(0, pv.view(b, self.num_pages * n, h, d))
        kk, vv = torch.cat(keys, 1), torch.cat(vals, 1)
        logits = torch.einsum("bhgd,blhd->bhgl", q.float().view(b, h, g, d), kk) * scale
        probs = torch.softmax(logits, dim=-1)
        out = torch.einsum("bhgl,blhd->bhgd", probs, vv).reshape(b, hq, d)
        mass = probs[..., kk.shape[1] - tail_len :].sum(dim=2).transpose(1, 2)
        return out, mass

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
        if c.use_triton:
            from .kernels.prefill_attention import prefill_attention

            out, _, sums, tail_sums = prefill_attention(qf, kf, vf, max_query_len=n, **meta)
        else:
            out, sums, tail_sums = paged.prefill_attention(qf, kf, vf, **meta)
        # counts as the vLLM backend keeps them (attention._counts): causal_count = queries of the chunk that
        # see the token, probe_nnz = probes at or after it
        p = pos.to(dev)
        if cfg.normalizer is Normalizer.PROBE_NNZ:
            tail_cnt = float(p.numel())
            new_cnt = (p.view(-1, 1) >= torch.arange(n, device=dev).view(1, -1)).sum(0).float()
        else:
            tail_cnt = float(n)
            new_cnt = (n - torch.arange(n, device=dev)).float()
        if t0:
            self.score_sum[:, :t0] += tail_sums[:, :t0]
            self.score_count[:t0] += tail_cnt
        self._absorb(k, v, sums.view(b, n, h), new_cnt)
        return out.to(query.dtype).view(b, n, hq, d)

