"""Plugin settings derived from vLLM's config, without vLLM types: the ZipCache config fitted to paged
semantics, the staging pool and its share of the KV budget, and the kernels a process runs. Used by
:mod:`zipcache_vllm.plugin.backend` and :mod:`zipcache_vllm.plugin.metrics`; ``vllm_config`` is read by attribute only.
"""

from __future__ import annotations

import logging

import torch

from ..engine import cpu_kernels
from ..engine.block_manager import default_num_slots
from ..engine.staging import Staging
from ..method.config import Granularity, KeyScheme, Selection, ZipCacheConfig
from . import envs

logger = logging.getLogger("vllm.zipcache")

_state: dict = {}  # per process: warnings and reservations done once


def resolve_config(block_size: int, additional: dict | None = None) -> ZipCacheConfig:
    """The env config, then ``additional_config["zipcache"]``, fitted to vLLM's paged semantics."""
    section = (additional or {}).get("zipcache") or {}
    if not isinstance(section, dict):
        raise ValueError("additional_config 'zipcache' must be a mapping of ZipCacheConfig keys")
    cfg = envs.load_config(section)
    if cfg.param_bits != 16 and torch.cuda.is_available():
        raise ValueError("param_bits 8 (one-byte page parameters) is served by the CPU build only: the Triton "
                         "kernels read fp16 parameters (docs/performance.md); use param_bits 16 on CUDA")
    if cfg.key_scheme is not KeyScheme.CHANNELWISE:
        raise ValueError("ZipCache in vLLM stores keys channelwise (ZC-3); key_scheme=cst is not supported")
    paged = {"granularity": Granularity.BLOCK, "selection": Selection.QUOTA, "block_size": block_size}
    changed = {k: v for k, v in paged.items() if getattr(cfg, k) != v}
    if changed and "coerced" not in _state:
        _state["coerced"] = True
        logger.warning(
            "ZipCache in vLLM compresses each complete block of %d tokens with a per-block salient quota; "
            "config values %s replaced by %s",
            block_size,
            {k: getattr(cfg, k).value if hasattr(getattr(cfg, k), "value") else getattr(cfg, k) for k in changed},
            {k: v.value if hasattr(v, "value") else v for k, v in changed.items()},
        )
    return cfg.replace(**paged)


def model_config_for(cfg: ZipCacheConfig, vllm_config, num_kv_heads: int, head_size: int) -> ZipCacheConfig:
    """``cfg`` with its per-layer salient split filled for this model (calibration), logged once per process.

    Every layer keeps the base total of salient rows, so all layers' pages have one size (vLLM allocates one
    page size for all layers; ``ZipCacheConfig`` refuses a split that changes it)."""
    layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
    cfg = cfg.for_model(layers, num_kv_heads, head_size)
    if cfg.layer_salient_ratios is not None and "split_logged" not in _state:
        _state["split_logged"] = True
        rows = [f"{i}:{round(k * cfg.block_size)}/{round(v * cfg.block_size)}"
                for i, (k, v) in enumerate(cfg.layer_salient_ratios)]
        logger.info("ZipCache salient rows per layer (K/V of %d, %s): %s", cfg.block_size,
                    f"calibration {cfg.calibration}" if cfg.calibration else "layer_salient_ratios", " ".join(rows))
    return cfg


def num_staging_slots(vllm_config) -> int:
    """Incomplete blocks held at once: at most one per running sequence, plus room for stale slots."""
    explicit = envs.staging_slots()
    if explicit is not None:
        return explicit
    return default_num_slots(vllm_config.scheduler_config.max_num_seqs)


def pick_kernels(choice: str, cuda: bool) -> str:
    """``auto``: Triton on CUDA; on CPU the numba decode over the codes when numba imports, else torch."""
    if choice != "auto":
        if choice == "numba" and not cpu_kernels.available():
            raise ValueError("ZIPCACHE_KERNELS=numba needs numba (pip install 'zipcache-vllm[cpu]')")
        return choice
    if cuda:
        return "triton"
    if cpu_kernels.available():
        return "numba"
    if "numba_missing" not in _state:
        _state["numba_missing"] = True
        logger.warning("numba is not installed: the CPU decode dequantizes every page every step (slower); "
                       "pip install numba")
    return "torch"


def reserve_staging(vllm_config, num_slots, block_size, num_kv_heads, head_size, num_heads, num_probes) -> None:
    """Count the staging of all layers in vLLM's KV budget, once per process.

    An explicit KV size (``VLLM_CPU_KVCACHE_SPACE``, ``--kv-cache-memory-bytes``) is handed to the KV cache
    as is, so the staging is taken out of it here; otherwise vLLM measures this memory as non-KV usage.
    """
    if "reserved" in _state:
        return
    _state["reserved"] = True
    layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
    per_slot = Staging.bytes_per_slot(block_size, num_kv_heads, head_size, num_heads, num_probes, torch.bfloat16)
    total = num_slots * layers * per_slot
    cache = vllm_config.cache_config
    budget = cache.kv_cache_memory_bytes
    if budget is not None:
        if total >= budget:
            raise ValueError(
                f"ZipCache bf16 staging ({total / 2**20:.0f} MiB for {num_slots} slots) does not fit the KV cache "
                f"budget ({budget / 2**20:.0f} MiB): lower --max-num-seqs or ZIPCACHE_STAGING_SLOTS"
            )
        cache.kv_cache_memory_bytes = budget - total
    logger.info(
        "ZipCache bf16 staging: %d slots x %d layers x %d bytes = %.1f MiB%s",
        num_slots, layers, per_slot, total / 2**20,
        "" if budget is None else f", taken from the KV cache budget ({budget / 2**30:.3f} -> "
        f"{(budget - total) / 2**30:.3f} GiB)",
    )
