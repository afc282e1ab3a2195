"""The value rotation (``ZipCacheConfig.value_rotation``): values are quantized in a Hadamard basis.

Attention is linear in the values: ``sum_t p_t v_t = (sum_t p_t (v_t H)) H^T`` for an orthonormal ``H``. So the
cache may store ``v H`` instead of ``v`` and rotate each attention output back, with no change to the attention
itself (the kernels attend whatever values the pages hold). A Hadamard basis spreads a token's few large channels
over all channels, which is what a per-token quantizer (ZC-2's tokenwise step and minimum, 2 bits for the regular
tokens) needs: the same bytes lose less (docs/accuracy.md, *Value rotation*). Keys are not rotated: ZC-3 quantizes
them per channel, and their outlier channels are what that scheme exploits.

``H`` is the normalized Sylvester Hadamard matrix of the largest power of two dividing the head size, repeated
block-diagonally (64 -> one 64 x 64 block, 96 -> three 32 x 32 blocks); symmetric and its own inverse.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(head_size: int) -> torch.Tensor:
    b = head_size & -head_size  # the largest power of two dividing head_size
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / b**0.5
    return torch.block_diag(*[h] * (head_size // b)).float()


def hadamard(head_size: int, device=None) -> torch.Tensor:
    """The fp32 ``[head_size, head_size]`` rotation (symmetric, orthonormal: ``H @ H = I``), one copy per device
    (call it once before a CUDA graph is captured: the first call copies it to the device)."""
    if head_size < 1:
        raise ValueError(f"head_size must be positive, got {head_size}")
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cpu":
        return _hadamard_cpu(head_size)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _on_device(head_size, dev)


@functools.lru_cache(maxsize=16)
def _on_device(head_size: int, device: torch.device) -> torch.Tensor:
    return _hadamard_cpu(head_size).to(device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x [..., head_size] @ H`` in fp32, returned in ``x``'s dtype (also the inverse: ``H`` is its own)."""
    return (x.float() @ hadamard(x.shape[-1], x.device)).to(x.dtype)
