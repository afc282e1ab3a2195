"""bf16 staging of the incomplete blocks: the tokens of each sequence's last block and the queries of its probe
rows, in slots handed out by :class:`zipcache_vllm.engine.block_manager.BlockManager`. One :class:`Staging` per
layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Staging:
    """bf16 staging of one layer: ``key, value [num_slots, block_size, num_kv_heads, head_size]`` and the queries
    of the block's probe rows that have arrived, ``probe_query [num_slots, num_probes, num_heads, head_size]``
    (row ``r`` = the ``r``-th probe offset of the block, :func:`~zipcache_vllm.method.saliency.block_probe_offsets`):
    the block is scored from them when it completes (block rule)."""

    key: torch.Tensor
    value: torch.Tensor
    probe_query: torch.Tensor

    @classmethod
    def allocate(cls, num_slots, block_size, num_kv_heads, head_size, num_heads, num_probes,
                 dtype=torch.bfloat16, device="cpu"):  # fmt: skip
        kv = (num_slots, block_size, num_kv_heads, head_size)
        return cls(
            key=torch.zeros(kv, dtype=dtype, device=device),
            value=torch.zeros(kv, dtype=dtype, device=device),
            probe_query=torch.zeros(num_slots, num_probes, num_heads, head_size, dtype=dtype, device=device),
        )

    @staticmethod
    def bytes_per_slot(block_size, num_kv_heads, head_size, num_heads, num_probes, dtype=torch.bfloat16) -> int:
        elt = torch.empty(0, dtype=dtype).element_size()
        return (2 * block_size * num_kv_heads + num_probes * num_heads) * head_size * elt
