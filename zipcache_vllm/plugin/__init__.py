"""The vLLM glue: the attention backend and metadata builders (``backend``), settings derived from vLLM's config
(``settings``, ``envs``), the CLI (``serve``, ``launch``, ``compat``) and the /metrics gauges (``metrics``).
Only ``backend``, the CLI and ``zipcache_vllm.register`` import vLLM."""
