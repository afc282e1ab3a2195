"""Triton kernels over ZipCache pages (importable only as ``zipcache_vllm.kernels``; torch + triton only).

Each launcher validates, allocates and launches; its plain-torch twin of the same name is in
``zipcache_vllm.engine.paged``.
"""

from .block_scores import block_probe_scores
from .compress_store import compress_store
from .decode_attention import decode_attention
from .prefill_attention import prefill_attention

__all__ = ["block_probe_scores", "compress_store", "decode_attention", "prefill_attention"]
