"""bf16 staging of the incomplete blocks: the tokens of each sequence's last block and their running saliency,
in slots handed out by :class:`zipcache_vllm.engine.block_manager.BlockManager`. One :class:`Staging` per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Staging:
    """bf16 staging of one layer: ``key, value [num_slots, block_size, num_kv_heads, head_size]``, and the
    saliency state of each staged token, ``score_sum [num_slots, block_size, num_kv_heads]`` and
    ``score_count [num_slots, block_size]`` (fp32)."""

    key: torch.Tensor
    value: torch.Tensor
    score_sum: torch.Tensor
    score_count: torch.Tensor

    @classmethod
    def allocate(cls, num_slots, block_size, num_kv_heads, head_size, dtype=torch.bfloat16, device="cpu"):
        kv = (num_slots, block_size, num_kv_heads, head_size)
        return cls(
            key=torch.zeros(kv, dtype=dtype, device=device),
            value=torch.zeros(kv, dtype=dtype, device=device),
            score_sum=torch.zeros(num_slots, block_size, num_kv_heads, dtype=torch.float32, device=device),
            score_count=torch.zeros(num_slots, block_size, dtype=torch.float32, device=device),
        )

    @staticmethod
    def bytes_per_slot(block_size, num_kv_heads, head_size, dtype=torch.bfloat16) -> int:
        elt = torch.empty(0, dtype=dtype).element_size()
        return block_size * (2 * num_kv_heads * head_size * elt + 4 * num_kv_heads + 4)
