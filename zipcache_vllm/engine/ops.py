"""The kernel operations of the paged engine, chosen once per process: Triton on CUDA, the plain-torch twins of
:mod:`zipcache_vllm.engine.paged` elsewhere (the spec the kernels are tested against).

Every entry has one signature for both families, so the engine step (:mod:`zipcache_vllm.engine.decode`) is
written once. The Triton entries launch without host synchronisation or data-dependent shapes: a decode step
built from them can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import paged


def kernel_module(name: str):
    """``zipcache_vllm.kernels.<name>`` (the top-level ``kernels/`` folder, installed under that name)."""
    return importlib.import_module(f"zipcache_vllm.kernels.{name}")


@dataclass(frozen=True)
class KernelOps:
    """One family of kernel operations (signatures as the twins in :mod:`zipcache_vllm.engine.paged`):

    * ``attend(query, key, kv_cache, layout, rows, staging, scale, out)``: decode attention of each row over
      its pages and tail (the new token staged at row ``t0``), writing ``out``;
    * ``block_scores``, ``compress_slots``, ``compress_store``: as the twins (``block_probe_scores`` is the
      block rule's saliency of complete blocks);
    * ``prefill_attention(query, key, value, max_query_len, out=None, **meta) -> out``: chunks of queries
      under the block rule (pages of the earlier blocks, the own block's tail and tokens; ``max_query_len``
      sizes the Triton grid; written into ``out`` when given; ``plan``: the kernel's scratch plan, ignored by
      the twin);
    """

    name: str
    attend: Callable
    block_scores: Callable
    compress_slots: Callable
    compress_store: Callable
    prefill_attention: Callable


def _prefill_torch(query, key, value, max_query_len, out=None, plan=None, **meta):
    res = paged.prefill_attention(query, key, value, **meta)
    return res if out is None else out.copy_(res)


def _prefill_triton(query, key, value, max_query_len, out=None, **meta):
    return kernel_module("prefill_attention").prefill_attention(query, key, value, max_query_len=max_query_len,
                                                                out=out, **meta)[0]


def _attend_torch(query, key, kv_cache, layout, rows, staging, scale, out) -> None:
    out.copy_(paged.decode_attention(query, kv_cache, layout, rows.block_table, rows.seq_lens, staging.key,
                                     staging.value, rows.slots, rows.tail_lens_after, scale))


@functools.lru_cache(maxsize=16)
def _v1_tiles(layout) -> tuple:
    return layout.attention_tiles(max_rows=128, split=True)


def _attend_triton(query, key, kv_cache, layout, rows, staging, scale, out) -> None:
    num_rows, num_heads, _ = query.shape
    h = staging.key.shape[2]
    v2 = kernel_module("decode_v2")
    width = rows.block_table.shape[1]
    if query.device.type == "cuda" and v2.supported(layout) and num_heads // h <= 16:  # v2 is Gluon: no interpreter
        lse = torch.empty(num_rows, num_heads, dtype=torch.float32, device=query.device)
        splits = v2.choose_num_splits(num_rows, h, width, query.device,
                                      v2.split_programs(layout, v2.STAGE_PAGES > 0 and v2.stage_supported(layout)))
        v2.launch_decode_v2(query, kv_cache, layout, rows.block_table, rows.seq_lens, staging.key, staging.value,
                            rows.slots, rows.tail_lens_after, out, lse, scale, splits)
    else:  # layouts v2 does not read (8-bit codes, head size 256, quotas off the 16-row grid): v1
        v1 = kernel_module("decode_attention")
        splits = max(2, v1.choose_num_splits(num_rows, h, width, query.device))
        v1.launch_decode(query, kv_cache, layout, rows.block_table, rows.seq_lens, staging.key, staging.value,
                         rows.slots, rows.tail_lens_after, out, scale, splits, _v1_tiles(layout))


def check_layout(ops: KernelOps, layout) -> None:
    """Refuse a page layout that a kernel family does not read: the Triton kernels read fp16 parameters only
    (one-byte parameters are read by the twins and the CPU kernels)."""
    if ops.name == "triton" and layout.param_bits != 16:
        raise NotImplementedError("one-byte page parameters (param_bits=8) are read by the torch twins and the CPU "
                                  "(numba) kernels only; the Triton kernels read fp16 parameters: use param_bits=16 "
                                  "on CUDA (docs/performance.md)")


@functools.lru_cache(maxsize=4)
def kernel_ops(kernels: str) -> KernelOps:
    """The operations of a kernel family, chosen once: ``triton`` (CUDA, or the interpreter) or ``torch`` (the
    twins; ``numba`` hosts use them too, except ``compress_store`` (:mod:`zipcache_vllm.engine.cpu_compress`,
    the same bytes); their one-token rows take the numba path of :mod:`zipcache_vllm.engine.cpu_decode`)."""
    if kernels == "triton":
        return KernelOps(
            name="triton",
            attend=_attend_triton,
            block_scores=kernel_module("block_scores").block_probe_scores,
            compress_slots=kernel_module("compress_store").compress_slots,
            compress_store=kernel_module("compress_store").compress_store,
            prefill_attention=_prefill_triton,
        )
    if kernels in ("torch", "numba"):
        compress = paged.compress_store
        if kernels == "numba":  # the same bytes in one numba pass (engine/cpu_compress.py; the twin without numba)
            from . import cpu_compress

            compress = cpu_compress.compress_store
        return KernelOps(
            name="torch",
            attend=_attend_torch,
            block_scores=paged.block_probe_scores,
            compress_slots=paged.compress_slots,
            compress_store=compress,
            prefill_attention=_prefill_torch,
        )
    raise ValueError(f"kernels must be triton, torch or numba, got {kernels!r}")
