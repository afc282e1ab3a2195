"""transformers caches: ``cache.ZipCache`` (the reference: segments compressed in torch, the paper's semantics)
and ``paged_cache.PagedZipCache`` (vLLM's paged semantics over the engine's pages and kernels)."""
