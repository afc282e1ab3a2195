"""The value rotation (method/rotation.py): an orthonormal, symmetric Hadamard basis for any head size, and
values quantized in it reconstructed in the model's basis, with less error where a token's channels differ in
size (what ZC-2's per-token step suffers from)."""

from __future__ import annotations

import pytest
import torch

from zipcache_vllm.method import rotation
from zipcache_vllm.method.compressors import ZipCacheCompressor
from zipcache_vllm.method.config import ZipCacheConfig


@pytest.mark.parametrize("head_size", [64, 128, 96, 80, 16])
def test_hadamard_is_orthonormal_symmetric_and_mixes_blocks(head_size):
    h = rotation.hadamard(head_size)
    assert h.dtype == torch.float32 and torch.equal(h, h.T)
    torch.testing.assert_close(h @ h, torch.eye(head_size), atol=1e-6, rtol=0)
    block = head_size & -head_size
    assert (h[:block, :block].abs() == block**-0.5).all()  # every channel of a block mixed into every other


def test_rotate_twice_is_the_identity_and_keeps_the_dtype():
    x = torch.randn(5, 3, 64).bfloat16()
    y = rotation.rotate(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(rotation.rotate(rotation.rotate(x.float())), x.float(), atol=1e-5, rtol=0)


def test_rotated_values_lose_less_where_channels_differ():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 128, 64, generator=g)
    v = torch.randn(1, 2, 128, 64, generator=g) * torch.rand(1, 2, 128, 64, generator=g) ** 4 * 4  # spiky tokens
    scores = torch.rand(1, 2, 128, generator=g)
    err = {}
    for rot in (False, True):
        cfg = ZipCacheConfig.load("vllm", granularity="block", selection="quota", value_rotation=rot)
        seg = ZipCacheCompressor(cfg).compress(k, v, scores)
        err[rot] = ((seg.v - v).pow(2).sum() / v.pow(2).sum()).item()
        assert torch.equal(seg.k, ZipCacheCompressor(cfg.replace(value_rotation=not rot)).compress(k, v, scores).k)
    assert err[True] < 0.8 * err[False], err


def test_config_refuses_a_non_boolean():
    with pytest.raises(ValueError, match="value_rotation"):
        ZipCacheConfig(value_rotation="yes")
