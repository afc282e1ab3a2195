"""zipcache-vllm: ZipCache mixed-precision KV cache compression for vLLM.

The vLLM plugin boundary is :func:`register` (entry point ``vllm.general_plugins: zipcache``). Importing this
package has no side effects and does not import vLLM.
"""

from __future__ import annotations

_REGISTERED = False

CPU_BACKEND = "zipcache_vllm.plugin.backend.ZipCacheAttentionBackend"
CUDA_BACKEND = "zipcache_vllm.plugin.backend.ZipCacheCudaAttentionBackend"
MLA_REFUSAL = "zipcache_vllm.plugin.backend.ZipCacheRefusesMLA"


def register() -> None:
    """Add ``--kv-cache-backend`` / ``--zipcache-config`` to vLLM's CLI, and install the ZipCache attention
    backend when ``ZIPCACHE_KV_CACHE_BACKEND=zipcache`` (set by ``vllm serve --kv-cache-backend zipcache`` or
    ``zipcache-vllm serve --kv-cache-backend zipcache``); without the flag vLLM stays stock.

    vLLM calls this in every process (API server, EngineCore, worker), possibly more than once. On CPU the
    backend replaces ``CPU_ATTN`` (CPU ignores ``--attention-backend CUSTOM``); on CUDA it fills vLLM's
    ``CUSTOM`` slot, selected with ``--attention-backend CUSTOM``. MLA backends are replaced by one that stops
    start-up with the reason (ZipCache pages hold K/V, not MLA latents).
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from .plugin import envs
    from .plugin.serve import install_cli_flags

    install_cli_flags()  # `vllm serve --kv-cache-backend zipcache`; absent flags leave vLLM stock
    if not envs.enabled():
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
    else:
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND)
    # MLA models cache a latent, not K/V pages: their backends are replaced by one that fails at start-up
    for member in AttentionBackendEnum:
        if member.value and ".mla." in member.value:
            register_backend(member, MLA_REFUSAL)
    _REGISTERED = True
