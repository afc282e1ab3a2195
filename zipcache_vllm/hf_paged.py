"""PagedZipCache: a transformers ``Cache`` with vLLM paged semantics that attends on the compressed pages.

Where :mod:`zipcache_vllm.hf_cache` is the reference (segments compressed in torch, attention over dequantized
tensors), this cache stores what the vLLM backend stores and attends through the same kernels (Triton on CUDA,
the plain-torch twins of :mod:`zipcache_vllm.paged` on CPU). Per layer::

    pages   uint8 [num_blocks, num_kv_heads, page_bytes]      every complete block of block_size tokens,
                                                               compressed once (per-block salient quota)
    tail    bf16  [batch, block_size, num_kv_heads, head_size] the tokens of the incomplete last block,
            + fp32 running saliency (score_sum [batch, block_size, num_kv_heads], score_count [block_size])

Row ``r`` of the batch owns pages ``j * batch + r`` (block ``j``), listed in ``block_table [batch, capacity]``;
the table is shared by all layers (they complete blocks at the same steps). Capacity grows by doubling, or is
allocated once with ``reserve_len``.

Steps (the ``zipcache_paged`` attention function hands the post-RoPE queries to :meth:`PagedLayer.attend`):

* **first chunk (prompt)**: SDPA over the bf16 prompt, as the paper does (CUDA, bf16/fp16: the flash kernel,
  which also returns the log-sum-exp of every row); probe saliency (ZC-7/8, 5 % recent + 5 % random rows drawn
  per layer exactly as :mod:`hf_cache` does) by ``kernels/probe_scores`` on CUDA, the twin
  (``paged.prefill_attention``) on CPU; complete blocks compressed into pages (``compress_store``), the rest
  staged in the tail with its running sums and counts;
* **decode (one token)**: the token is staged, then ``kernels/decode_attention`` attends over pages + tail (on
  CPU: ``paged.dequantize_pages`` + fp32 attention, i.e. ``paged.decode_attention``); the query's own
  attention mass on the tail tokens (``probe_scores`` with the row's log-sum-exp from the decode splits) is
  added to their running sums, as the reference cache does; a tail that becomes a complete block is
  compressed (``score_sum / score_count``);
* **later chunks (several tokens)**: ``kernels/prefill_attention`` (twin on CPU) over pages + tail + the
  chunk, probe rows of the chunk for saliency (as the vLLM backend, :mod:`zipcache_vllm.attention`).

Semantics are those of ``hf_cache.ZipCache(ZipCacheConfig.load("paged", ...))``: same probes, saliency,
per-block quota and quantizers; attention differs only by rounding (kernels use fp16/bf16 tensor-core
operands; the page stores fp16 parameters, which the reference also rounds to). Batches must be unpadded
(equal lengths). Load the model with ``attn_implementation="zipcache_paged"`` or call :func:`enable`.

Example::

    import zipcache_vllm.hf_paged as hp
    model.set_attn_implementation(hp.ATTN_IMPLEMENTATION)
    cache = hp.PagedZipCache(ZipCacheConfig.load("paged"), model_config=model.config)
    model.generate(ids, past_key_values=cache, max_new_tokens=32)
"""

from __future__ import annotations

import functools
import importlib
import math
import threading

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import paged
from .config import Granularity, KeyScheme, Normalizer, Saliency, Selection, ZipCacheConfig
from .layout import PageLayout
from .saliency import normalizer_counts, probe_positions

STORE_DTYPE = torch.bfloat16
ATTN_IMPLEMENTATION = "zipcache_paged"
PROBE_SEED_STRIDE = 1_000_003  # probe draw of layer i: seed probe_seed * stride + i (as hf_cache)
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
_handshake = threading.local()

__all__ = ["ATTN_IMPLEMENTATION", "PagedLayer", "PagedZipCache", "decode_with_lse", "enable", "paged_attention"]


# --------------------------------------------------------------------------------------------- kernels
_MODULES: dict[str, object] = {}


def _kernel_module(name: str):
    """``zipcache_vllm.kernels.<name>`` as a module (the package re-exports functions of the same names)."""
    mod = _MODULES.get(name)
    if mod is None:
        mod = _MODULES[name] = importlib.import_module(f"{__package__}.kernels.{name}")
    return mod


def decode_with_lse(query, kv_cache, layout, block_table, seq_lens, tail_key, tail_value, tail_slots, tail_lens,
                    scale: float, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels/decode_attention`` with the row log-sum-exp the saliency update needs.

    The public launcher returns the output only; this one launches the same ``_decode_kernel`` (same
    arguments and defaults) with at least two splits, keeps the per-split log-sum-exp (base 2, of the scaled
    logits) and merges it here: ``lse = ln sum_s 2^(lse_s)``. Returns ``out [num_seqs, num_heads, head_size]``
    (dtype of ``query``) and fp32 ``lse [num_seqs, num_heads]`` (natural log of sum exp(scale * q.k)).
    """
    dk = _kernel_module("decode_attention")
    b, hq, d = query.shape
    h = tail_key.shape[2]
    g = hq // h
    n = layout.block_size
    dev = query.device
    interp = dk.interpreting()
    if splits is None:
        splits = max(2, dk.choose_num_splits(b, h, block_table.shape[1], dev))
    out = torch.empty_like(query)
    part_o = torch.empty(b * hq * splits * d, dtype=torch.float32, device=dev)
    part_lse = torch.empty(b * hq * splits, dtype=torch.float32, device=dev)
    dk._decode_kernel[(b, h, splits)](
        q_ptr=query, stride_q_seq=query.stride(0), stride_q_head=query.stride(1),
        cache_u8_ptr=kv_cache, cache_f16_ptr=kv_cache.view(torch.float16),
        stride_c_block=kv_cache.stride(0), stride_c_head=kv_cache.stride(1),
        block_table_ptr=block_table, stride_bt=block_table.stride(0),
        seq_lens_ptr=seq_lens, tail_lens_ptr=tail_lens, tail_slots_ptr=tail_slots,
        tk_ptr=tail_key, tv_ptr=tail_value, stride_t_slot=tail_key.stride(0), stride_t_tok=tail_key.stride(1),
        stride_t_head=tail_key.stride(2),
        out_ptr=out, stride_o_seq=out.stride(0), stride_o_head=out.stride(1),
        part_o_ptr=part_o, part_lse_ptr=part_lse,
        qk_scale=scale * LOG2E,
        NUM_SPLITS=splits, G=g, G_PAD=max(16, dk.pow2(g)), D=d, N=n,
        TILES=_tiles(layout),
        V_NORM_OFF=layout.v_norm_off, TAIL_ROWS=min(64, dk.pow2(n)), DOT_FP32=interp, ASM=not interp,
        num_warps=2, num_stages=2,
    )
    dk._merge_kernel[(b * hq,)](
        part_o_ptr=part_o, part_lse_ptr=part_lse, out_ptr=out, stride_o_seq=out.stride(0),
        stride_o_head=out.stride(1), num_heads=hq, NUM_SPLITS=splits, D=d, num_warps=1 if interp else 4,
    )
    lse = torch.logsumexp(part_lse.view(b, hq, splits) * LN2, dim=-1)
    return out, lse


def decode_probe_scores(query, lse, key, tail_key, meta: dict, own_out, tail_out, scale: float) -> None:
    """``kernels/probe_scores`` for a decode step, launched directly (no checks, no allocation): the query is
    the probe of its own one-token chunk ``key [b, h, d]``. Writes the token's own mass into ``own_out [b, h]``
    (head stride 1) and the mass of tail token ``j < tail_lens_before`` into ``tail_out [b, N, h]`` (raw sums;
    rows past the tail are left as they are)."""
    pk = _kernel_module("probe_scores")
    b, hq, d = query.shape
    h, n = key.shape[1], tail_key.shape[1]
    g = hq // h
    interp = pk.interpreting()
    g_pad = pk.pow2(g)
    block_k = 32 if interp else 64
    tail_tiles = -(-n // block_k)
    pk._probe_kernel[(tail_tiles + 1, b, h)](
        q_ptr=query, stride_q_tok=query.stride(0), stride_q_head=query.stride(1),
        lse_ptr=lse, stride_lse_tok=lse.stride(0),
        k_ptr=key, stride_k_tok=key.stride(0), stride_k_head=key.stride(1),
        tk_ptr=tail_key, stride_t_slot=tail_key.stride(0), stride_t_tok=tail_key.stride(1),
        stride_t_head=tail_key.stride(2),
        query_start_loc_ptr=meta["qsl"], seq_lens_ptr=meta["seq_lens"], tail_lens_ptr=meta["tail_lens_before"],
        tail_slots_ptr=meta["slots"], probe_idx_ptr=meta["probe_idx"], probe_start_loc_ptr=meta["qsl"],
        scores_ptr=own_out, stride_sc_tok=own_out.stride(0),
        tail_scores_ptr=tail_out, stride_ts_seq=tail_out.stride(0), stride_ts_tok=tail_out.stride(1),
        qk_scale=scale * LOG2E, G=g, G_PAD=g_pad, BLOCK_P=max(1, (16 if interp else 64) // g_pad),
        BLOCK_K=block_k, D=d, TAIL_TILES=tail_tiles, NORMALIZER=0, DOT_FP32=interp,
        num_warps=1 if interp else 4,
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


def _check_config(cfg: ZipCacheConfig) -> None:
    if cfg.granularity is not Granularity.BLOCK or cfg.selection is not Selection.QUOTA:
        raise ValueError("PagedZipCache implements vLLM paged semantics (granularity: block, selection: quota); "
                         "use ZipCacheConfig.load('paged', ...) or hf_cache.ZipCache for the segment semantics")
    if cfg.key_scheme is not KeyScheme.CHANNELWISE:
        raise ValueError("the page layout stores keys channelwise (ZC-3); key_scheme='cst' is not supported")


# --------------------------------------------------------------------------------------------- cache
class PagedLayer(CacheLayerMixin):
    """One layer: pages, bf16 tail and its running saliency (module docstring)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: PagedZipCache, layer_idx: int = 0):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.pages = None  # uint8 [capacity * batch, num_kv_heads, page_bytes]
        self.tail_key = self.tail_value = None  # bf16 [batch, block_size, num_kv_heads, head_size]
        self.score_sum = None  # fp32 [batch, block_size, num_kv_heads]: attention mass received (tail)
        self.score_count = None  # fp32 [block_size]: queries (probes) that contributed to it
        self.num_pages = 0  # complete blocks per batch row
        self.tail_len = 0
        self.length = 0  # tokens, including those of an update not yet attended
        self._new = None

    # -- transformers protocol ------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        c = self.cache
        c._setup(b, h, d, key_states.device)
        n = c.layout.block_size
        self.tail_key = torch.zeros(b, n, h, d, dtype=STORE_DTYPE, device=self.device)
        self.tail_value = torch.zeros_like(self.tail_key)
        self.score_sum = torch.zeros(b, n, h, dtype=torch.float32, device=self.device)
        self.score_count = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.pages = torch.zeros(c.capacity * b, h, c.layout.page_bytes, dtype=torch.uint8, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._new is not None:
            raise RuntimeError("the previous update of this layer was never attended")
        self._new = (key_states.to(STORE_DTYPE), value_states.to(STORE_DTYPE))
        self.length += key_states.shape[2]
        return key_states, value_states

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.cache, self.layer_idx)

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("PagedZipCache does not support beam search")

    # -- attention ---------------------------------------------------------------------------------------
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

    # -- storing -----------------------------------------------------------------------------------------
    def _absorb(self, k, v, sums, counts) -> None:
        """Append new tokens ``k, v [b, h, n, d]`` (bf16) with their saliency state to the tail; compress every
        block that completes."""
        n_blk = self.cache.layout.block_size
        n = k.shape[2]
        t0 = self.tail_len
        total = t0 + n
        kn, vn = k.transpose(1, 2), v.transpose(1, 2)  # [b, n, h, d]
        nc = total // n_blk
        if nc == 0:
            self.tail_key[:, t0:total] = kn
            self.tail_value[:, t0:total] = vn
            self.score_sum[:, t0:total] = sums
            self.score_count[t0:total] = counts
            self.tail_len = total
            return
        if t0:
            kn = torch.cat([self.tail_key[:, :t0], kn], 1)
            vn = torch.cat([self.tail_value[:, :t0], vn], 1)
            sums = torch.cat([self.score_sum[:, :t0], sums], 1)
            counts = torch.cat([self.score_count[:t0], counts])
        m = nc * n_blk
        self._compress(kn[:, :m], vn[:, :m], sums[:, :m], counts[:m], nc)
        rest = total - m
        sums, counts = sums[:, m:].clone(), counts[m:].clone()  # they may be views of score_sum / score_count
        self.score_sum.zero_()
        self.score_count.zero_()
        if rest:
            self.tail_key[:, :rest] = kn[:, m:]
            self.tail_value[:, :rest] = vn[:, m:]
            self.score_sum[:, :rest] = sums
            self.score_count[:rest] = counts
        self.tail_len = rest

    def _compress(self, kn, vn, sums, counts, nc: int) -> None:
        """Compress ``nc`` complete blocks per row (``kn, vn [b, nc * N, h, d]``) into pages."""
        c = self.cache
        cfg = c.config
        n = c.layout.block_size
        b, _, h, d = kn.shape
        c._ensure_capacity(self.num_pages + nc)
        self._ensure_pages()
        if cfg.saliency is Saliency.RANDOM:  # the ablation, drawn as ZipCacheCompressor does for each segment
            draws = [torch.rand((b, h, n), generator=torch.Generator().manual_seed(cfg.probe_seed + n))
                     for _ in range(nc)]
            scores = torch.cat(draws, 2).transpose(1, 2).to(kn.device)
        elif cfg.saliency is Saliency.ACCUMULATED:
            scores = sums
        else:
            scores = sums / counts.clamp(min=1.0).view(1, -1, 1)
        ids = c.block_table[:, self.num_pages : self.num_pages + nc].reshape(-1).contiguous()
        c.compress_store(kn.reshape(b * nc * n, h, d), vn.reshape(b * nc * n, h, d),
                         scores.reshape(b * nc * n, h).float().contiguous(), ids, self.pages, c.layout)
        self.num_pages += nc

    def _ensure_pages(self) -> None:
        need = self.cache.capacity * self.tail_key.shape[0]
        if self.pages.shape[0] < need:
            grown = torch.zeros(need, *self.pages.shape[1:], dtype=torch.uint8, device=self.pages.device)
            grown[: self.pages.shape[0]] = self.pages
            self.pages = grown

    # -- accounting ------------------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"pages": 0, "tail": 0, "saliency": 0}
        b, _, h, _ = self.tail_key.shape
        return {
            "pages": self.num_pages * b * h * self.cache.layout.page_bytes,
            "tail": (self.tail_key.numel() + self.tail_value.numel()) * self.tail_key.element_size(),
            "saliency": self.score_sum.numel() * 4 + self.score_count.numel() * 4,
        }


class PagedZipCache(Cache):
    """ZipCache in vLLM paged semantics over compressed pages (module docstring).

    Parameters
    ----------
    config : a block-granularity, per-block-quota :class:`ZipCacheConfig` (default: the ``paged`` preset).
    num_layers / model_config : number of layers (or the model's config).
    kernels : ``auto`` (Triton on CUDA, torch twins on CPU), ``triton`` (also under ``TRITON_INTERPRET=1``)
        or ``torch``.
    reserve_len : tokens per row to allocate pages for up front (default: grow by doubling).
    """

    def __init__(self, config: ZipCacheConfig | None = None, num_layers: int = 0, *, model_config=None,
                 kernels: str = "auto", reserve_len: int | None = None):
        config = ZipCacheConfig.load("paged") if config is None else config
        _check_config(config)
        if model_config is not None:
            num_layers = model_config.num_hidden_layers
        if num_layers <= 0:
            raise ValueError("give num_layers or model_config")
        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be auto, triton or torch, got {kernels!r}")
        self.config = config
        self.kernels = kernels
        self.reserve_len = reserve_len
        self.layout: PageLayout | None = None
        self.use_triton = False
        self.capacity = 0  # blocks per row
        self.block_table = None  # int32 [batch, capacity]: block j of row r is page j * batch + r
        self.slots = None  # int32 [batch]: tail slot of each row (the row itself)
        self._meta_key = None
        self._meta = {}
        self._scratch = None
        self._num_kv_heads = 0
        super().__init__(layers=[PagedLayer(self, i) for i in range(num_layers)])

    # -- shared state ---------------------------------------------------------------------------------------
    def _setup(self, batch: int, num_kv_heads: int, head_size: int, device) -> None:
        if self.layout is not None:
            if (self.slots.numel(), head_size) != (batch, self.layout.head_size):
                raise ValueError("all layers must have the same batch size and head size")
            return
        self.layout = PageLayout.from_config(self.config, head_size)
        self._num_kv_heads = num_kv_heads
        dev = torch.device(device)
        self.use_triton = self.kernels == "triton" or (self.kernels == "auto" and dev.type == "cuda")
        if self.use_triton:
            from .kernels.compress_store import compress_store
        else:
            compress_store = paged.compress_store
        self.compress_store = compress_store
        self.slots = torch.arange(batch, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(batch, 0, dtype=torch.int32, device=dev)
        blocks = -(-self.reserve_len // self.layout.block_size) if self.reserve_len else 1
        self._ensure_capacity(blocks, exact=True)

    def _ensure_capacity(self, blocks: int, exact: bool = False) -> None:
        if blocks <= self.capacity:
            return
        cap = blocks if exact else max(blocks, 2 * self.capacity)
        b = self.slots.numel()
        dev = self.slots.device
        self.block_table = (torch.arange(cap, device=dev, dtype=torch.int32).view(1, -1) * b
                            + self.slots.view(-1, 1)).contiguous()
        self.capacity = cap

    def step_meta(self, num_pages: int, tail_before: int) -> dict:
        """Device metadata of a decode step (``num_pages`` complete blocks and ``tail_before`` tail tokens per row
        before the new one), built once and shared by all layers."""
        key = (num_pages, tail_before, self.capacity)
        if key != self._meta_key:
            b, dev = self.slots.numel(), self.slots.device
            full = lambda x: torch.full((b,), x, dtype=torch.int32, device=dev)  # noqa: E731
            cols = max(1, num_pages)
            dk = _kernel_module("decode_attention")
            self._meta = {
                "seq_lens": full(num_pages * self.layout.block_size + tail_before + 1),
                "tail_lens_before": full(tail_before),
                "tail_lens_after": full(tail_before + 1),
                "qsl": torch.arange(b + 1, dtype=torch.int32, device=dev),
                "probe_idx": torch.zeros(b, dtype=torch.int32, device=dev),
                "slots": self.slots,
                "block_table": self.block_table[:, :cols],
                "splits": max(2, dk.choose_num_splits(b, self._num_kv_heads, cols, dev)),
            }
            self._meta_key = key
        return self._meta

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A reusable fp32 buffer shaped like ``like`` (consumed in stream order before the next layer's use)."""
        buf = self._scratch
        if buf is None or buf.shape != like.shape:
            buf = self._scratch = torch.empty_like(like)
        return buf

    # -- transformers protocol -------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        pending = getattr(_handshake, "pending", None)
        if pending is not None and pending[0] is self:
            raise RuntimeError(
                "the paged cache never saw the queries of the previous layer: load the model with "
                f"attn_implementation='{ATTN_IMPLEMENTATION}' or call zipcache_vllm.hf_paged.enable(model)"
            )
        out = self.layers[layer_idx].update(key_states, value_states)
        _handshake.pending = (self, layer_idx)
        return out

    def nbytes(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                total[k] = total.get(k, 0) + v
        total["total"] = sum(total.values())
        return total


def paged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``zipcache_paged`` attention function: the paged cache's layer attends itself; with any other
    cache (or none), plain SDPA."""
    pending = getattr(_handshake, "pending", None)
    if pending is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cache, layer_idx = pending
    _handshake.pending = None
    if getattr(module, "layer_idx", layer_idx) != layer_idx:
        raise RuntimeError(f"cache updated layer {layer_idx} but attention ran for layer {module.layer_idx}")
    return cache.layers[layer_idx].attend(module, query, attention_mask, scaling, **kwargs), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # same masks as SDPA


def enable(model) -> None:
    """Switch ``model`` to the ``zipcache_paged`` attention function."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
