"""The compression figures as Prometheus gauges on vLLM's ``/metrics`` (a ``vllm.stat_logger_plugins`` plugin).

Gauges, set once at start-up (nothing is registered when ZipCache is off). Declared in pyproject.toml as
``[project.entry-points."vllm.stat_logger_plugins"] zipcache = "zipcache_vllm.plugin.metrics:ZipCacheStatLogger"``:

=======================================  =============================================================
``zipcache:bits_per_value``              page bits per stored K or V value (codes, parameters, masks)
``zipcache:bits_high`` / ``bits_low``    code widths of salient and regular tokens
``zipcache:salient_ratio``               share of salient tokens per block (keys; ``value_...`` values)
``zipcache:capacity_ratio_vs_bf16``      tokens per byte relative to bf16 K/V (the layout's figure)
``zipcache:kv_cache_tokens``             vLLM's KV capacity in tokens (blocks x block size), once known
``zipcache:staging_slots``               bf16 staging slots (incomplete blocks held at once)
``zipcache:layer_key_salient_rows``      per layer (label ``layer``): salient key rows per block, when the
                                         config splits the salient rows per layer (preset ``adaptive``)
``zipcache:layer_value_salient_rows``    the same for values (key + value rows: the same total in every layer)
=======================================  =============================================================
"""

from __future__ import annotations

from prometheus_client import Gauge
from vllm.v1.metrics.loggers import StatLoggerBase

from ..engine.layout import PageLayout
from . import envs

_GAUGES: dict[str, Gauge] = {}  # prometheus names are process-global: create each gauge once

HELP = {
    "bits_per_value": "ZipCache page bits per stored K/V value, parameters and masks included",
    "bits_high": "ZipCache code width of salient tokens",
    "bits_low": "ZipCache code width of regular tokens",
    "param_bits": "ZipCache bits of each stored quantization parameter (16: fp16, 8: one byte under fp16 scales)",
    "salient_ratio": "ZipCache share of salient key tokens per block",
    "value_salient_ratio": "ZipCache share of salient value tokens per block",
    "capacity_ratio_vs_bf16": "ZipCache tokens per KV byte relative to bf16",
    "kv_cache_tokens": "KV cache capacity in tokens as vLLM allocated it",
    "staging_slots": "ZipCache bf16 staging slots for incomplete blocks",
    "layer_key_salient_rows": "ZipCache salient key rows per block in each layer (per-layer split)",
    "layer_value_salient_rows": "ZipCache salient value rows per block in each layer (per-layer split)",
}
LAYER_GAUGES = ("layer_key_salient_rows", "layer_value_salient_rows")


def _gauge(name: str) -> Gauge:
    if name not in _GAUGES:
        labels = ("layer",) if name in LAYER_GAUGES else ()
        _GAUGES[name] = Gauge(f"zipcache:{name}", HELP[name], labels, multiprocess_mode="mostrecent")
    return _GAUGES[name]


def layer_rows(vllm_config) -> dict[str, list[int]]:
    """Salient key and value rows per block of every layer, when the config splits them per layer (else {})."""
    from .settings import resolve_config

    mc = vllm_config.model_config
    cfg = resolve_config(vllm_config.cache_config.block_size, vllm_config.additional_config)
    if cfg.layer_salient_ratios is None and cfg.calibration is None:
        return {}
    layers = mc.get_num_layers(vllm_config.parallel_config)
    cfg = cfg.for_model(layers, mc.get_num_kv_heads(vllm_config.parallel_config), mc.get_head_size())
    if cfg.layer_salient_ratios is None:
        return {}
    n = cfg.block_size
    return {"layer_key_salient_rows": [round(k * n) for k, _ in cfg.layer_salient_ratios],
            "layer_value_salient_rows": [round(v * n) for _, v in cfg.layer_salient_ratios]}


def figures(vllm_config) -> dict[str, float]:
    """The compression figures of this server's config (vLLM config in, plain numbers out)."""
    from .settings import num_staging_slots, resolve_config

    block_size = vllm_config.cache_config.block_size
    cfg = resolve_config(block_size, vllm_config.additional_config)
    lay = PageLayout.from_config(cfg, vllm_config.model_config.get_head_size())
    return {
        "bits_per_value": lay.page_bytes * 8 / (lay.block_size * 2 * lay.head_size),
        "bits_high": cfg.bits_high,
        "bits_low": cfg.bits_low,
        "param_bits": cfg.param_bits,
        "salient_ratio": lay.num_salient_k / lay.block_size,
        "value_salient_ratio": lay.num_salient_v / lay.block_size,
        "capacity_ratio_vs_bf16": lay.capacity_vs_bf16,
        "staging_slots": num_staging_slots(vllm_config),
    }


class ZipCacheStatLogger(StatLoggerBase):
    """Publishes :func:`figures` when ``--kv-cache-backend zipcache`` is on; records nothing per step."""

    def __init__(self, vllm_config, engine_index: int = 0):
        self.vllm_config = vllm_config
        self.enabled = envs.enabled()
        if self.enabled:
            for name, value in figures(vllm_config).items():
                _gauge(name).set(value)
            for name, rows in layer_rows(vllm_config).items():
                for i, r in enumerate(rows):
                    _gauge(name).labels(layer=str(i)).set(r)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        pass

    def log_engine_initialized(self):
        cache = self.vllm_config.cache_config
        if self.enabled and cache.num_gpu_blocks:
            _gauge("kv_cache_tokens").set(cache.num_gpu_blocks * cache.block_size)
