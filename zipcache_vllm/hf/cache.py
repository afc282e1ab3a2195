"""Reference compressed KV cache for transformers: a ``Cache`` that works with ``model.generate`` and plain
forward passes, for every method of the harness (ZipCache, its ablations and the baselines).

How it works, per layer::

    compressed segments (stored packed)  |  bf16 window (not yet compressed)  |  new tokens of this step
    <--------- dequantized for attention (reference path; kernels attend on the codes) --------------->

* ``update`` appends the new K/V (rounded to bf16) to the window and returns compressed + window for attention;
* the ``zipcache`` attention function (registered with transformers' ``AttentionInterface``) runs SDPA, then
  hands the post-RoPE queries to :meth:`CompressedLayer.observe`, which accumulates saliency and compresses;
  whenever the window holds ``segment_len`` tokens they are compressed as a new segment. Compressed segments are
  never re-quantized. Saliency follows the probe rule of the granularity (:mod:`zipcache_vllm.method.saliency`):
  ``segment`` (the paper): at prefill (the layer's first update) the prompt's probe tokens (ZC-7/8), afterwards
  the attention the new queries actually pay to window tokens (normalized by how many queries saw each, ZC-6);
  ``block`` (paged semantics, the vLLM plugin): each block by the probes at fixed positions of its own block
  (``saliency.block_saliency``), whose queries wait in the window with the block's tokens. At block granularity
  the layer also attends itself (:meth:`CompressedLayer.attend_blocks`), as the vLLM backend does: complete
  blocks are compressed first, and a query sees the blocks before its own dequantized and its own block in
  bf16 up to itself, so that nothing depends on how the tokens were split into forward calls.

Queries need to reach the cache, so load the model with ``attn_implementation="zipcache"`` or call
:func:`enable`. Batches must be unpadded (equal lengths), as positions are taken from the sequence length.
"""

from __future__ import annotations

import threading

import torch
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..method.compressors import Compressor, Segment, ZipCacheCompressor
from ..method.config import Granularity, Saliency, ZipCacheConfig
from ..method.saliency import (
    attention_probs,
    block_probe_offsets,
    block_saliency,
    column_sums,
    layer_probes,
    normalizer_counts,
)
from . import base as hf_base

STORE_DTYPE = torch.bfloat16
ATTN_IMPLEMENTATION = "zipcache"
_handshake = threading.local()


class CompressedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, compressor: Compressor, layer_idx: int = 0):
        super().__init__()
        self.compressor = compressor
        self.layer_idx = layer_idx
        self.segments: list[Segment] = []
        self.num_compressed = 0
        self._ck = self._cv = None  # dequantized compressed part, working copy (not counted in bytes)
        self.window_k = self.window_v = None  # bf16 [b, h, w, d]
        self.score_sum = None  # float32 [b, h, w]: attention received by window tokens (segment rule)
        self.score_count = None  # float32 [w]: number of query rows that contributed
        cfg = getattr(compressor, "config", None)
        self.block_rule = compressor.needs_saliency and cfg.granularity is Granularity.BLOCK
        self.window_q = None  # bf16 [b, num_heads, w, d]: queries of the window tokens (block rule)
        self._scaling = None

    # -- transformers protocol ------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.window_k = key_states.new_zeros(b, h, 0, d, dtype=STORE_DTYPE)
        self.window_v = value_states.new_zeros(b, h, 0, value_states.shape[-1], dtype=STORE_DTYPE)
        self.score_sum = key_states.new_zeros(b, h, 0, dtype=torch.float32)
        self.score_count = key_states.new_zeros(0, dtype=torch.float32)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._prefill = self.get_seq_length() == 0
        self._new = key_states.shape[2]
        self.window_k = torch.cat([self.window_k, key_states.to(STORE_DTYPE)], dim=2)
        self.window_v = torch.cat([self.window_v, value_states.to(STORE_DTYPE)], dim=2)
        b, h = key_states.shape[:2]
        self.score_sum = torch.cat([self.score_sum, key_states.new_zeros(b, h, self._new, dtype=torch.float32)], 2)
        self.score_count = torch.cat([self.score_count, key_states.new_zeros(self._new, dtype=torch.float32)])
        wk, wv = self.window_k.to(key_states.dtype), self.window_v.to(value_states.dtype)
        if self._ck is None:
            return wk, wv
        return (torch.cat([self._ck.to(key_states.dtype), wk], dim=2),
                torch.cat([self._cv.to(value_states.dtype), wv], dim=2))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.num_compressed + self.window_k.shape[2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.compressor, self.layer_idx)

    # -- saliency and compression -------------------------------------------------------------------------
    def attend_blocks(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Block granularity: compress the blocks the new tokens complete, then attend (module docstring).
        ``query [b, num_heads, q, d]`` (post-RoPE) of the tokens of the last update; returns ``[b, q,
        num_heads, d]`` (SDPA's layout)."""
        b, hq, ql, d = query.shape
        n = self.compressor.config.block_size
        total = self.get_seq_length()
        start, w0 = total - ql, self.num_compressed
        wk, wv = self.window_k, self.window_v  # bf16 of every token not compressed before this call
        q = query.to(STORE_DTYPE)
        self.window_q = q if self.window_q is None else torch.cat([self.window_q, q], dim=2)
        self._scaling = scaling
        self._compress(prefill=False)
        parts_k, parts_v = [wk], [wv]
        if w0:
            parts_k.insert(0, self._ck[:, :, :w0])
            parts_v.insert(0, self._cv[:, :, :w0])
        if self.num_compressed > w0:  # blocks completed now: queries of later blocks see them compressed
            parts_k.insert(-1, self._ck[:, :, w0:])
            parts_v.insert(-1, self._cv[:, :, w0:])
        k = torch.cat([x.to(query.dtype) for x in parts_k], dim=2)
        v = torch.cat([x.to(query.dtype) for x in parts_v], dim=2)
        dev = query.device
        qpos = torch.arange(start, total, device=dev).view(-1, 1)
        own = torch.div(qpos, n, rounding_mode="floor") * n  # first position of each query's block
        cpos = torch.arange(self.num_compressed, device=dev).view(1, -1)
        xpos = torch.arange(w0, total, device=dev).view(1, -1)
        mask = torch.cat([cpos < own, (xpos >= own) & (xpos <= qpos)], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling,
                                                               enable_gqa=True)
        return out.transpose(1, 2).contiguous()

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """Called after attention with the post-RoPE ``query [b, num_heads, q, d]`` and the ``key`` attended."""
        comp = self.compressor
        if self.block_rule:  # the probe rows among them are read when their block is cut
            q = query.to(STORE_DTYPE)
            self.window_q = q if self.window_q is None else torch.cat([self.window_q, q], dim=2)
            self._scaling = scaling
        elif comp.needs_saliency:
            total = key.shape[2]
            if self._prefill:
                self._prefill_scores(query, key, scaling)
            else:
                w = self.window_k.shape[2]
                qpos = torch.arange(total - query.shape[2], total, device=key.device)
                probs = attention_probs(query, key, qpos, scaling)
                self.score_sum += column_sums(probs, key.shape[1])[..., total - w :]
                kpos = torch.arange(total - w, total, device=key.device)
                self.score_count += (qpos.view(-1, 1) >= kpos.view(1, -1)).sum(0).float()
        self._compress(prefill=self._prefill)

    def _prefill_scores(self, query, key, scaling) -> None:
        cfg: ZipCacheConfig = self.compressor.config
        n = key.shape[2]
        pos = layer_probes(cfg, n, self.layer_idx).to(key.device)
        probs = attention_probs(query[:, :, pos], key, pos, scaling)
        self.score_sum = column_sums(probs, key.shape[1])
        self.score_count = normalizer_counts(pos, n, cfg.normalizer)

    def _scores(self, n: int) -> torch.Tensor:
        cfg = getattr(self.compressor, "config", None)
        if self.block_rule:  # the block's own probes (block rule): offsets from its index in the sequence
            off = block_probe_offsets(cfg, n, self.num_compressed // n).to(self.window_k.device)
            b = self.window_k.shape[0]
            q = self.window_q[:, :, off].transpose(1, 2)  # [b, P, num_heads, d]
            k = self.window_k[:, :, :n].transpose(1, 2)  # [b, n, h, d]
            s = block_saliency(q, k, off.expand(b, -1), cfg.normalizer, cfg.saliency, self._scaling)
            return s.transpose(1, 2)  # [b, h, n]
        s = self.score_sum[..., :n]
        if cfg is not None and cfg.saliency is Saliency.ACCUMULATED:
            return s
        return s / self.score_count[:n].clamp(min=1.0)

    def _compress(self, prefill: bool) -> None:
        comp = self.compressor
        w = self.window_k.shape[2]
        if comp.segment_len is None or w == 0:
            return
        if prefill and comp.prefill_all:
            self._cut(w)
        while self.window_k.shape[2] >= comp.segment_len:
            self._cut(comp.segment_len)

    def _cut(self, n: int) -> None:
        scores = self._scores(n) if self.compressor.needs_saliency else None
        k, v = self.window_k[:, :, :n].float(), self.window_v[:, :, :n].float()
        seg = self.compressor.compress(k, v, scores)
        self.segments.append(seg)
        self.num_compressed += n
        self._ck = seg.k if self._ck is None else torch.cat([self._ck, seg.k], dim=2)
        self._cv = seg.v if self._cv is None else torch.cat([self._cv, seg.v], dim=2)
        seg.k = seg.v = None
        self.window_k, self.window_v = self.window_k[:, :, n:], self.window_v[:, :, n:]
        self.score_sum, self.score_count = self.score_sum[..., n:], self.score_count[n:]
        if self.window_q is not None:
            self.window_q = self.window_q[:, :, n:]

    # -- accounting ------------------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"compressed": 0, "window": 0, "saliency": 0}
        window = (self.window_k.numel() + self.window_v.numel()) * self.window_k.element_size()
        sal = 0
        if self.block_rule and self.window_q is not None:  # the probe rows waiting in the window
            n, w = self.compressor.config.block_size, self.window_q.shape[2]
            first = self.num_compressed // n
            rows = sum(int((block_probe_offsets(self.compressor.config, n, first + i // n) == i % n).any())
                       for i in range(w))
            b, hq, _, d = self.window_q.shape
            sal = rows * b * hq * d * self.window_q.element_size()
        elif self.compressor.needs_saliency:
            sal = self.score_sum.numel() * 4 + self.score_count.numel() * 4
        return {"compressed": sum(s.nbytes for s in self.segments), "window": window, "saliency": sal}


class CompressedCache(hf_base.HandshakeCache):
    """A transformers ``Cache`` holding every layer compressed by ``compressor`` (see module docstring)."""

    handshake = _handshake
    attn_implementation = ATTN_IMPLEMENTATION
    enable_hint = "zipcache_vllm.hf.cache.enable(model)"
    what = "compressed cache"

    def __init__(self, compressor: Compressor, num_layers: int):
        super().__init__(layers=[CompressedLayer(compressor, i) for i in range(num_layers)])
        self.compressor = compressor


class ZipCache(CompressedCache):
    """ZipCache with a :class:`ZipCacheConfig` (defaults: the paper's setting)."""

    def __init__(self, config: ZipCacheConfig | None = None, num_layers: int = 0, *, model_config=None):
        if model_config is not None:
            num_layers = model_config.num_hidden_layers
        if num_layers <= 0:
            raise ValueError("give num_layers or model_config")
        super().__init__(ZipCacheCompressor(config or ZipCacheConfig()), num_layers)


def zipcache_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA, then hand the queries to the compressed cache that produced ``key`` (if any); at block granularity
    the cache's layer attends itself (:meth:`CompressedLayer.attend_blocks`)."""
    layer = hf_base.take_pending(_handshake, module)
    if layer is not None and layer.block_rule:
        return layer.attend_blocks(query, scaling), None
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    if layer is not None:
        layer.observe(query, key, scaling)
    return out, weights


hf_base.register(ATTN_IMPLEMENTATION, zipcache_attention)


def enable(model) -> None:
    """Switch ``model`` to the ``zipcache`` attention function (SDPA plus the hand-off to the cache)."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
