"""The only reader of ``ZIPCACHE_*`` environment variables: name, parser, default, meaning.

Environment variables are the channel that reaches every vLLM process (API server, EngineCore, worker) and
the one place where vLLM asks the backend for its page size (``customize_spec``, which cannot see
``--additional-config``). ``zipcache-vllm serve`` sets them from its own flags.

=============================== ========== ===============================================================
variable                        default    meaning
=============================== ========== ===============================================================
``ZIPCACHE_KV_CACHE_BACKEND``   ``auto``   ``zipcache`` selects the compressed KV cache; ``auto`` = stock vLLM
``ZIPCACHE_CONFIG``             ``vllm``   preset name (``configs/*.yaml``) or path of a YAML file
``ZIPCACHE_CONFIG_OVERRIDES``   (none)     JSON object of ``ZipCacheConfig`` keys applied over the preset
``ZIPCACHE_STAGING_SLOTS``      (auto)     bf16 staging slots (incomplete blocks held at once); default
                                           ``max_num_seqs`` + a margin
``ZIPCACHE_KERNELS``            ``auto``   ``torch`` (the plain-torch twins), ``numba`` (CPU decode over the
                                           codes), ``triton``, or ``auto`` (Triton on CUDA, numba on CPU
                                           when it imports, else torch)
``ZIPCACHE_CPU_PREFILL``        ``vllm``   CPU prefill chunks through ``vllm`` (vLLM's own CPU attention
                                           kernel, every block a request over a bf16 scratch) or ``sdpa``
                                           (masked torch SDPA per block, fp32: the engine's own path)
``ZIPCACHE_CPU_DECODE_THREADS`` (auto)     threads of the numba decode; default torch's thread count where
                                           numba and torch share one OpenMP runtime, else 1
``ZIPCACHE_TRACE_DIR``          (none)     a folder: save every attention call's rows there (positions, q, k,
                                           v, output; slow, for debugging load-dependent answers:
                                           ``benchmarks/trace_load_divergence.py``)
=============================== ========== ===============================================================
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..method.config import ZipCacheConfig

KV_CACHE_BACKEND = "ZIPCACHE_KV_CACHE_BACKEND"
CONFIG = "ZIPCACHE_CONFIG"
CONFIG_OVERRIDES = "ZIPCACHE_CONFIG_OVERRIDES"
STAGING_SLOTS = "ZIPCACHE_STAGING_SLOTS"
KERNELS = "ZIPCACHE_KERNELS"
CPU_PREFILL = "ZIPCACHE_CPU_PREFILL"
CPU_DECODE_THREADS = "ZIPCACHE_CPU_DECODE_THREADS"
TRACE_DIR = "ZIPCACHE_TRACE_DIR"

BACKENDS = ("auto", "zipcache")
KERNEL_CHOICES = ("auto", "torch", "numba", "triton")
CPU_PREFILL_CHOICES = ("vllm", "sdpa")
DEFAULT_CONFIG = "vllm"


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid; choose one of: {', '.join(choices)}")
    return value


def kv_cache_backend() -> str:
    return _choice(KV_CACHE_BACKEND, "auto", BACKENDS)


def enabled() -> bool:
    """True when the ZipCache backend is selected."""
    return kv_cache_backend() == "zipcache"


def config_source() -> str:
    return os.environ.get(CONFIG, "").strip() or DEFAULT_CONFIG


def config_overrides() -> dict[str, Any]:
    raw = os.environ.get(CONFIG_OVERRIDES, "").strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{CONFIG_OVERRIDES} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{CONFIG_OVERRIDES} must be a JSON object, got {type(data).__name__}")
    return data


def load_config(extra: dict[str, Any] | None = None) -> ZipCacheConfig:
    """The preset or file of ``ZIPCACHE_CONFIG``, then ``ZIPCACHE_CONFIG_OVERRIDES``, then ``extra``."""
    overrides = {**config_overrides(), **(extra or {})}
    return ZipCacheConfig.load(config_source(), **overrides)


def _positive(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def staging_slots() -> int | None:
    return _positive(STAGING_SLOTS)


def cpu_decode_threads() -> int | None:
    """Threads of the numba decode (None: torch's thread count, where safe)."""
    return _positive(CPU_DECODE_THREADS)



def trace_dir() -> str | None:
    """The folder of :mod:`zipcache_vllm.plugin.trace`'s attention traces (None: no tracing); it must exist."""
    raw = os.environ.get(TRACE_DIR, "").strip()
    if raw and not os.path.isdir(raw):
        raise ValueError(f"{TRACE_DIR}={raw!r} is not a directory")
    return raw or None


def kernels() -> str:
    return _choice(KERNELS, "auto", KERNEL_CHOICES)


def cpu_prefill() -> str:
    return _choice(CPU_PREFILL, "vllm", CPU_PREFILL_CHOICES)
