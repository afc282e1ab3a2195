"""The paged engine, shared by the vLLM backend and the transformers paged cache (no vLLM import):

* ``layout``: the compressed page of one (block, KV head); ``paged``: plain-torch twins of the kernels;
* ``block_manager`` + ``staging``: the bf16 tails of incomplete blocks and the queries of their probe rows;
* ``step``: one attention step for a batch (compress completed blocks by the block probe rule, attend, stage);
  ``decode``: its graph-capturable decode step; ``builder``: the per-step metadata both call;
* ``ops``: the kernel operations (Triton on CUDA, twins elsewhere); ``cpu_decode`` / ``cpu_kernels``: the CPU
  decode paths (batched torch, numba over the codes);
* ``synthetic``: contexts written without prefill, for GPU tests and benchmarks.

Kernels live in the top-level ``kernels/`` folder, installed as ``zipcache_vllm.kernels`` (pyproject's
package-dir; on a bare GPU machine, ``ln -s ../kernels zipcache_vllm/kernels``)."""
