"""PagedZipCache: a transformers ``Cache`` with vLLM paged semantics that attends on the compressed pages.

Where :mod:`zipcache_vllm.hf.cache` is the reference (segments compressed in torch, attention over dequantized
tensors), this cache stores what the vLLM backend stores and attends through the same kernels (Triton on CUDA,
the plain-torch twins of :mod:`zipcache_vllm.engine.paged` on CPU). Per layer::

    pages   uint8 [num_blocks, num_kv_heads, page_bytes]      every complete block of block_size tokens,
                                                               compressed once (per-block salient quota)
    tail    bf16  [batch + 1, block_size, num_kv_heads, head_size] the tokens of the incomplete last block
            + bf16 probe_query [batch + 1, num_probes, num_heads, head_size], the queries of its probe rows
            (slot ``batch``: the dummy slot of the decode step)

Row ``r`` of the batch owns pages ``j * batch + r`` (block ``j``), listed in ``block_table [batch, capacity]``;
the table is shared by all layers (they complete blocks at the same steps). Capacity grows by doubling, or is
allocated once with ``reserve_len``.

The ``zipcache_paged`` attention function hands the post-RoPE queries to :meth:`PagedLayer.attend`; the steps
(prompt, decode, later chunks) are in :mod:`zipcache_vllm.hf.paged_attention`, this module holds the storage.

Semantics are those of ``hf_cache.ZipCache(ZipCacheConfig.load("paged", ...))`` and of the vLLM backend: the
block probe rule, per-block quota and quantizers, a query seeing the blocks before its own compressed and its
own block in bf16; attention differs only by rounding (kernels use fp16/bf16 tensor-core
operands; the page stores fp16 parameters, which the reference also rounds to). Batches must be unpadded
(equal lengths). Load the model with ``attn_implementation="zipcache_paged"`` or call :func:`enable`.

Example::

    import zipcache_vllm.hf.paged_cache as hp
    model.set_attn_implementation(hp.ATTN_IMPLEMENTATION)
    cache = hp.PagedZipCache(ZipCacheConfig.load("paged"), model_config=model.config)
    model.generate(ids, past_key_values=cache, max_new_tokens=32)
"""

from __future__ import annotations

import threading

import torch
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..engine.block_manager import StepPlan
from ..engine.decode import DecodeBatch, probe_ranks
from ..engine.layout import PageLayout
from ..engine.ops import check_layout, kernel_ops
from ..engine.step import prepare_step
from ..method.config import Granularity, KeyScheme, Selection, ZipCacheConfig
from ..method.saliency import num_block_probes, random_scores
from . import base as hf_base
from .paged_attention import PagedAttention

STORE_DTYPE = torch.bfloat16
ATTN_IMPLEMENTATION = "zipcache_paged"
_handshake = threading.local()

__all__ = ["ATTN_IMPLEMENTATION", "PagedLayer", "PagedZipCache", "enable", "paged_attention"]


def _check_config(cfg: ZipCacheConfig) -> None:
    if cfg.granularity is not Granularity.BLOCK or cfg.selection is not Selection.QUOTA:
        raise ValueError("PagedZipCache implements vLLM paged semantics (granularity: block, selection: quota); "
                         "use ZipCacheConfig.load('paged', ...) or hf_cache.ZipCache for the segment semantics")
    if cfg.key_scheme is not KeyScheme.CHANNELWISE:
        raise ValueError("the page layout stores keys channelwise (ZC-3); key_scheme='cst' is not supported")


class PagedLayer(PagedAttention, CacheLayerMixin):
    """One layer: pages, bf16 tail and the queries of its probe rows (module docstring)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: PagedZipCache, layer_idx: int = 0):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.pages = None  # uint8 [capacity * batch, num_kv_heads, page_bytes]
        self.tail_key = self.tail_value = None  # bf16 [batch + 1, block_size, num_kv_heads, head_size]
        self.probe_query = None  # bf16 [batch + 1, num_probes, num_heads, head_size] (allocated by attend)
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
        self.tail_key = torch.zeros(b + 1, n, h, d, dtype=STORE_DTYPE, device=self.device)
        self.tail_value = torch.zeros_like(self.tail_key)
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

    # -- storing -----------------------------------------------------------------------------------------
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
        b -= 1  # the dummy slot is scratch
        return {
            "pages": self.num_pages * b * h * self.cache.layout.page_bytes,
            "tail": 2 * self.tail_key[:b].numel() * self.tail_key.element_size(),
            "saliency": self.probe_query[:b].numel() * self.probe_query.element_size(),
        }


class PagedZipCache(hf_base.HandshakeCache):
    """ZipCache in vLLM paged semantics over compressed pages (module docstring).

    Parameters
    ----------
    config : a block-granularity, per-block-quota :class:`ZipCacheConfig` (default: the ``paged`` preset).
    num_layers / model_config : number of layers (or the model's config).
    kernels : ``auto`` (Triton on CUDA, torch twins on CPU), ``triton`` (also under ``TRITON_INTERPRET=1``)
        or ``torch``.
    reserve_len : tokens per row to allocate pages for up front (default: grow by doubling).
    """

    handshake = _handshake
    attn_implementation = ATTN_IMPLEMENTATION
    enable_hint = "zipcache_vllm.hf.paged_cache.enable(model)"
    what = "paged cache"

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
        self._chunk_meta = None  # (key, metadata) of the last chunk step (chunk_step)
        self._decode: DecodeBatch | None = None
        self._random = None
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
        self.ops = kernel_ops("triton" if self.use_triton else "torch")
        check_layout(self.ops, self.layout)
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

    def decode_rows(self, num_pages: int, tail_before: int):
        """The :class:`~zipcache_vllm.engine.decode.DecodeRows` of a decode step (``num_pages`` complete blocks
        and ``tail_before`` tail tokens per row before the new one; row ``r`` stages in slot ``r``), filled once
        and shared by all layers."""
        key = (num_pages, tail_before, self.capacity)
        b, n = self.slots.numel(), self.layout.block_size
        if self._decode is None:  # slot b: the dummy slot (queries of tokens that are not probes go there)
            self._decode = DecodeBatch(b, n, dummy_slot=b, device=self.slots.device,
                                       num_probes=num_block_probes(self.config, n))
        if key != self._meta_key:
            done = tail_before + 1 == n
            offs, rank = probe_ranks(self.config, n, num_pages)
            self._decode.fill(
                slots=list(range(b)),
                tail_lens=[tail_before] * b,
                seq_lens=[num_pages * n + tail_before + 1] * b,
                block_ids=[num_pages * b + r for r in range(b)] if done else [-1] * b,  # page of block j: j * b + r
                probe_ranks=[rank.get(tail_before, -1)] * b,
                probe_offsets=[offs] * b,
            )
            self._meta_key = key
        return self._decode.rows(self.block_table[:, : max(1, num_pages)])

    def chunk_step(self, num_pages: int, tail_before: int, query_len: int) -> dict:
        """Metadata of a chunk step for the engine's :func:`~zipcache_vllm.engine.step.zipcache_attention`:
        ``query_len`` new tokens in every row after ``num_pages`` pages and ``tail_before`` tail tokens (row
        ``r`` is sequence ``r``, staging slot ``r``, block ``j`` in page ``j * batch + r``); built once and
        shared by all layers."""
        key = ("chunk", num_pages, tail_before, query_len, self.capacity)
        if self._chunk_meta is not None and self._chunk_meta[0] == key:
            return self._chunk_meta[1]
        b, n = self.slots.numel(), self.layout.block_size
        dev = self.slots.device
        ctx = num_pages * n + tail_before
        end = ctx + query_len
        plan = StepPlan(tail_slots=list(range(b)), tail_lens=[tail_before] * b, new_tail_lens=[end % n] * b,
                        block_size=n)
        qsl = torch.arange(b + 1, dtype=torch.int32, device=dev) * query_len
        seq_lens = torch.full((b,), end, dtype=torch.int32, device=dev)
        pos = torch.arange(ctx, end, device=dev)
        rows = torch.arange(b, device=dev).view(-1, 1)
        slot_mapping = (((pos // n) * b + rows) * n + pos % n).reshape(-1)  # page of block j in row r: j * b + r
        meta = {"step": prepare_step(plan, qsl, seq_lens, device=dev), "query_start_loc": qsl, "seq_lens": seq_lens,
                "slot_mapping": slot_mapping}  # fmt: skip
        self._chunk_meta = (key, meta)
        return meta

    def random_scores(self, batch: int, num_kv_heads: int, device) -> torch.Tensor:
        """The random-saliency ablation's scores of one block ``[batch + 1, block_size, num_kv_heads]`` (row
        ``r`` draws its own, the last row is the dummy slot's; every block the same draw, as
        ZipCacheCompressor does for each segment)."""
        if self._random is None:
            draw = random_scores(self.config, batch + 1, num_kv_heads, self.layout.block_size)
            self._random = draw.transpose(1, 2).contiguous().to(device)
        return self._random


def paged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``zipcache_paged`` attention function: the paged cache's layer attends itself; with any other
    cache (or none), plain SDPA."""
    layer = hf_base.take_pending(_handshake, module)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return layer.attend(module, query, attention_mask, scaling, **kwargs), None


hf_base.register(ATTN_IMPLEMENTATION, paged_attention)


def enable(model) -> None:
    """Switch ``model`` to the ``zipcache_paged`` attention function."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
