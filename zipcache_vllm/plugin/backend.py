"""The vLLM seam: a ZipCache attention backend whose paged KV blocks are compressed pages.

* :class:`ZipCacheAttentionBackend` (CPU; keeps the name ``CPU_ATTN``, over which ``register()`` installs it)
  declares the compressed page in :meth:`customize_spec`, so vLLM's own memory accounting grants the extra
  blocks, and stores K/V inside ``forward`` (``forward_includes_kv_cache_update``: probe scores need Q).
* Settings derived from vLLM's config (the fitted ZipCache config, staging pool, kernels) live in
  :mod:`.plugin_settings`.
* :class:`ZipCacheMetadataBuilder` plans the bf16 staging of each step once (:mod:`.block_manager`).
* Prefix caching: a page is a function of the tokens up to the end of its block (the block probe rule, and a
  query sees earlier blocks through their pages whatever the chunk), so a cached block is the block a
  recomputation would write; a prefix hit is a chunk that starts after cached pages (``context_len`` a
  multiple of ``block_size``, no tail).
* :class:`ZipCacheAttentionImpl.forward` only adapts vLLM's metadata and calls
  :func:`zipcache_vllm.engine.step.zipcache_attention`.

CUDA graphs: on CUDA (:class:`ZipCacheCudaMetadataBuilder`) single-token decode batches are captured
(``UNIFORM_SINGLE_TOKEN_DECODE``): the staging plan and the decode rows' metadata are built once per step in the
builder, into persistent buffers, and the per-layer forward only launches kernels. CPU runs eagerly.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.kv_cache_interface import AttentionSpec

from ..engine import cpu_compress, cpu_kernels
from ..engine.builder import StepBuilder
from ..engine.layout import PageLayout
from ..engine.staging import Staging
from ..engine.step import Step, request_rows, zipcache_attention
from ..method import rotation
from ..method.config import ZipCacheConfig
from ..method.saliency import num_block_probes
from . import envs, trace
from .cpu_attention import CpuPagedAttention, rows_are_request_local
from .settings import model_config_for, num_staging_slots, pick_kernels, reserve_staging, resolve_config

logger = logging.getLogger("vllm.zipcache")

_state: dict = {}  # per process: the resolved config (stashed by the first impl for customize_spec), logs done


def dummy_slots() -> int:
    """Staging slots beyond the plan's: 1 where ``register()`` installs the CUDA backend (its builder's padded
    graph rows write there), 0 on the CPU platform (no graphs, no dummy rows: one slot less out of the budget)."""
    from vllm.platforms import current_platform

    return 0 if current_platform.is_cpu() else 1


def _layer_index(layer_name: str) -> int:
    found = re.findall(r"\.(\d+)\.", f".{layer_name}.")
    return int(found[0]) if found else 0


# ------------------------------------------------------------------------------------------------ backend
class ZipCacheAttentionBackend(CPUAttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [64, 128]  # what the Triton kernels are tested at (32 fails to compile on an H200)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type[ZipCacheAttentionImpl]:
        return ZipCacheAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[ZipCacheMetadataBuilder]:
        return ZipCacheMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Declare the compressed page: uint8, ``layout.state_content_bytes`` per (KV head, token)."""
        if spec.state_content_bytes is not None:
            return spec
        if spec.head_size_v != spec.head_size:
            raise ValueError("ZipCache needs equal key and value head sizes")
        cfg = _state.get("config") or resolve_config(spec.block_size)
        layout = PageLayout.from_config(cfg.replace(block_size=spec.block_size), spec.head_size)
        new = replace(spec, dtype=torch.uint8, state_content_bytes=layout.state_content_bytes)
        if "spec_logged" not in _state:
            _state["spec_logged"] = True
            bf16 = spec.page_size_bytes
            logger.info(
                "ZipCache layout: %d-token blocks, %d/%d bits, %d/%d salient rows (K/V), %s parameters; %d bytes "
                "per (block, KV head) = %.2f bytes/token/head vs %d in bf16 -> %.2fx capacity; page_size_bytes %d "
                "-> %d",
                layout.block_size, layout.bits_high, layout.bits_low, layout.num_salient_k,
                layout.num_salient_v, "fp16" if layout.param_bits == 16 else "one-byte", layout.page_bytes,
                layout.bytes_per_token, 4 * layout.head_size,
                bf16 / new.page_size_bytes, bf16, new.page_size_bytes,
            )
        return new


class ZipCacheCudaAttentionBackend(ZipCacheAttentionBackend):
    """The same backend in vLLM's CUSTOM slot (CUDA hosts: ``--attention-backend CUSTOM``), with the CUDA
    metadata builder (decode steps as CUDA graphs). No GPU vLLM run was possible here (docs/vllm-plugin.md):
    its builder and forward are tested on CPU through vLLM's API, the captured step on an H200 without vLLM."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_builder_cls() -> type[ZipCacheCudaMetadataBuilder]:
        return ZipCacheCudaMetadataBuilder


class _Refuse(type):
    def __getattribute__(cls, name):
        if name.startswith("__"):
            return super().__getattribute__(name)
        raise ValueError(
            "--kv-cache-backend zipcache does not support MLA models (their cache holds a compressed latent, "
            "not K/V pages). Serve this model without --kv-cache-backend zipcache."
        )


class ZipCacheRefusesMLA(metaclass=_Refuse):
    """Installed over vLLM's MLA backends while ZipCache is on: any use stops start-up with the reason."""


def cpu_prefill_kernel(block_size: int, head_size: int, num_heads: int, num_kv_heads: int):
    """vLLM's CPU attention kernel for the prefill chunks (:mod:`.cpu_attention`), if a query row's output
    depends on its own request alone on this host's ISA (checked now, a few milliseconds), else None: the
    engine's masked SDPA then, with a warning (load-independent answers come first)."""
    kernel = CpuPagedAttention(block_size, head_size)
    if not rows_are_request_local(kernel, num_heads, num_kv_heads):
        logger.warning("ZipCache CPU prefill: vLLM's CPU attention kernel (isa %s) gives a row other bits when the "
                       "rest of its call changes; prefill chunks go through masked SDPA instead (slower, "
                       "load-independent)", kernel.isa)
        return None
    logger.info("ZipCache CPU prefill: vLLM's CPU attention kernel (isa %s), requests of %d block-aligned rows "
                "over a bf16 scratch", kernel.isa, request_rows(block_size))
    return kernel


# ----------------------------------------------------------------------------------------------- metadata
@dataclass
class ZipCacheMetadata:
    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor
    max_seq_len: int
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    step: Step
    causal: bool = True


class ZipCacheMetadataBuilder(AttentionMetadataBuilder[ZipCacheMetadata]):
    """CPU: plans the staging of each step (:class:`~zipcache_vllm.engine.builder.StepBuilder`); one-token rows
    are batched by the CPU decode paths. Runs eagerly (no CUDA graphs on CPU)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    engine_decode: ClassVar[bool] = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        sched = vllm_config.scheduler_config
        comp = getattr(vllm_config, "compilation_config", None)
        max_rows = max(sched.max_num_seqs, getattr(comp, "max_cudagraph_capture_size", None) or 0)
        block_size = kv_cache_spec.block_size
        if "config" not in _state:
            _state["config"] = resolve_config(block_size, vllm_config.additional_config)
        self.step_builder = StepBuilder(num_staging_slots(vllm_config), block_size, max_rows, device,
                                        engine_decode=self.engine_decode, batched_cpu_decode=device.type == "cpu",
                                        config=_state["config"])
        if self.engine_decode:
            self._init_reorder_batch_threshold(1)  # decodes first: the leading rows go to the engine's step

    @property
    def block_manager(self):
        return self.step_builder.block_manager

    def _metadata(self, cm: CommonAttentionMetadata, step: Step) -> ZipCacheMetadata:
        n = cm.num_reqs
        return ZipCacheMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc[: n + 1],
            max_seq_len=cm.max_seq_len,
            seq_lens=cm.seq_lens[:n],
            block_table=cm.block_table_tensor[:n],
            slot_mapping=cm.slot_mapping,
            step=step,
        )

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> ZipCacheMetadata:
        cm = common_attn_metadata
        n = cm.num_reqs
        table = cm.block_table_tensor[:n]
        # NOTE: the host block table costs a device-to-host copy and a Python list per step (the staging plan
        # reads the blocks a step touches); vLLM does not hand builders its host copy
        step = self.step_builder.build(cm.query_start_loc_cpu[: n + 1], cm.seq_lens[:n].cpu(), table.tolist(), table)
        return self._metadata(cm, step)


class ZipCacheCudaMetadataBuilder(ZipCacheMetadataBuilder):
    """CUDA: decodes go first (``reorder_batch_threshold = 1``) and run through the engine's decode step, whose
    per-step metadata sits in persistent buffers; a batch of single-token decodes is a pure sequence of kernel
    launches, so vLLM captures and replays it as a full CUDA graph (``UNIFORM_SINGLE_TOKEN_DECODE``). Mixed
    and prefill batches run eagerly (decode rows still through the engine step)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    engine_decode: ClassVar[bool] = True

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> ZipCacheMetadata:
        """Capture with dummy rows only: the staging plan is untouched, and every replay reads the buffers that
        :meth:`build` refills for the real step."""
        cm = common_attn_metadata
        step = self.step_builder.build_for_capture(cm.num_reqs, cm.block_table_tensor[: cm.num_reqs])
        return self._metadata(cm, step)


# --------------------------------------------------------------------------------------------------- impl
def check_supported(head_size, alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None,
                    attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None, sinks=None) -> None:
    """Refuse, at start-up and with the reason, what the compressed pages cannot represent."""
    unsupported = {
        "sliding-window attention": sliding_window is not None,
        "ALiBi": alibi_slopes is not None,
        "logits soft-capping": bool(logits_soft_cap),
        "attention sinks": sinks is not None,
        f"attention type {attn_type}": attn_type != AttentionType.DECODER,
        "cross-layer KV sharing": kv_sharing_target_layer_name is not None,
        f"kv_cache_dtype {kv_cache_dtype} (use auto)": kv_cache_dtype != "auto",
        f"head size {head_size} (supported: {ZipCacheAttentionBackend.get_supported_head_sizes()})":
            head_size not in ZipCacheAttentionBackend.get_supported_head_sizes(),
    }
    bad = [name for name, hit in unsupported.items() if hit]
    if bad:
        raise ValueError(
            f"--kv-cache-backend zipcache does not support this model: {', '.join(bad)}. "
            "Serve it without --kv-cache-backend zipcache."
        )


class ZipCacheAttentionImpl(CPUAttentionBackendImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        check_supported(head_size, alibi_slopes, sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                        kv_sharing_target_layer_name, sinks)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        vllm_config = get_current_vllm_config()
        block_size = vllm_config.cache_config.block_size
        if "config" not in _state:
            _state["config"] = resolve_config(block_size, vllm_config.additional_config)
        # the model's config (a per-layer salient split, if any); the layer's own is taken at its first forward
        self.model_config: ZipCacheConfig = model_config_for(_state["config"], vllm_config, num_kv_heads, head_size)
        self.config = self.model_config.for_layer(0)
        self.layout = PageLayout.from_config(self.config, head_size)
        self.kernels = pick_kernels(envs.kernels(), torch.cuda.is_available())
        self.trace_dir = envs.trace_dir()  # debugging: every call's rows saved (plugin/trace.py)
        if self.kernels == "numba" and "numba_ready" not in _state:
            _state["numba_ready"] = True
            threads, why = cpu_kernels.decode_threads(envs.cpu_decode_threads() or torch.get_num_threads())
            logger.info("ZipCache CPU decode (numba) on %d thread(s): %s", threads, why)
            cpu_kernels.warmup(self.layout, num_kv_heads, num_heads // num_kv_heads)  # compile before requests
            cpu_compress.warmup(self.layout, num_kv_heads)
        num_slots = num_staging_slots(vllm_config)
        device = "cuda" if self.kernels == "triton" else "cpu"
        num_probes = num_block_probes(self.config, block_size)
        # CUDA hosts (the CUDA builder's graph-capturable decode step): one more slot than the staging plan
        # hands out, the dummy slot of padded decode rows (engine/decode.DecodeBatch); the CPU builder has none
        num_slots += dummy_slots()
        self.staging = Staging.allocate(num_slots, block_size, num_kv_heads, head_size, num_heads, num_probes,
                                        dtype=torch.bfloat16, device=device)
        reserve_staging(vllm_config, num_slots, block_size, num_kv_heads, head_size, num_heads, num_probes)
        if self.config.value_rotation:  # its device copy exists before a CUDA graph is captured
            rotation.hadamard(head_size, device)
        self.layer_idx: int | None = None
        # CPU prefill chunks through vLLM's own CPU attention kernel (one instance, its scratch, for all layers)
        self.paged_attention = None
        if device == "cpu" and envs.cpu_prefill() == "vllm":
            if "cpu_attention" not in _state:
                _state["cpu_attention"] = cpu_prefill_kernel(block_size, head_size, num_heads, num_kv_heads)
            self.paged_attention = _state["cpu_attention"]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        """NOTE: runs eagerly for every layer and step; keep Python here minimal (the plan is built once).

        query ``[num_tokens, num_heads, head_size]``, key/value ``[num_tokens, num_kv_heads, head_size]``,
        kv_cache uint8 ``[num_blocks, num_kv_heads, block_size, state_content_bytes]``, output like query.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the ZipCache backend")
        if self.layer_idx is None:
            self.layer_idx = _layer_index(getattr(layer, "layer_name", ""))
            self.config = self.model_config.for_layer(self.layer_idx)  # same page size: the config checks it
            self.layout = PageLayout.from_config(self.config, self.layout.head_size)
        if attn_metadata is None:  # profiling / warm-up
            return output
        md: ZipCacheMetadata = attn_metadata
        zipcache_attention(
            query, key, value, kv_cache.flatten(2), md.block_table, md.seq_lens, md.query_start_loc,
            md.slot_mapping, self.staging, md.step, self.layout, self.config, layer_idx=self.layer_idx,
            scale=self.scale, out=output, kernels=self.kernels, paged_attention=self.paged_attention,
        )
        if self.trace_dir is not None:
            trace.write(self.trace_dir, self.layer_idx, md.step, query, key, value, output)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        raise RuntimeError("the ZipCache backend stores K/V inside forward (forward_includes_kv_cache_update)")
