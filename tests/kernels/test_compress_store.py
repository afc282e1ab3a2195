"""compress_store kernel vs its torch twin: every byte of every page equal (codes, fp16 params, bitmaps)."""

import pytest
import torch
from conftest import DEVICE
from zipcache_vllm.kernels.compress_store import compress_store

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.layout import PageLayout

pytestmark = pytest.mark.interpret

# (block_size, head_size, salient_ratio, value_salient_ratio, bits_high, bits_low)
CASES = [
    (16, 64, 0.6, None, 4, 2),
    (16, 128, 0.6, None, 4, 2),
    (128, 64, 0.6, None, 4, 2),
    (128, 128, 0.6, None, 4, 2),
    (32, 64, 0.8, 0.2, 4, 2),  # separate key / value ratios: tier B rows
    (32, 64, 0.3, 0.7, 8, 4),  # value ratio above the key ratio; 8-bit codes
    (16, 64, 0.0, 1.0, 4, 2),  # an empty key group (parameters EPS, 0) and an all-salient value group
    (48, 64, 0.5, None, 4, 2),  # block size not a power of two (padded lanes)
]


def _run(layout, k, v, scores, block_ids, num_blocks):
    h = k.shape[1]
    base = torch.randint(0, 256, (num_blocks, h, layout.page_bytes), dtype=torch.uint8)  # untouched bytes stay
    ref = base.clone()
    paged.compress_store(k, v, scores, block_ids, ref, layout)
    got = base.to(DEVICE)
    compress_store(k.to(DEVICE), v.to(DEVICE), scores.to(DEVICE), block_ids.to(DEVICE), got, layout)
    return ref, got.cpu()


@pytest.mark.parametrize("n, d, r, rv, bh, bl", CASES)
def test_pages_bit_exact(n, d, r, rv, bh, bl):
    layout = PageLayout(n, d, bits_high=bh, bits_low=bl, salient_ratio=r, value_salient_ratio=rv)
    h, nb = 2, 3
    k = (torch.randn(nb * n, h, d) * torch.rand(d) * 10).bfloat16()  # channels of different ranges
    v = torch.randn(nb * n, h, d).bfloat16()
    scores = torch.rand(nb * n, h)
    ref, got = _run(layout, k, v, scores, torch.tensor([4, 0, 2], dtype=torch.int32), 6)
    diff = (ref != got).nonzero()
    assert diff.numel() == 0, f"{len(diff)} bytes differ, first at (block, head, byte) {diff[:5].tolist()}"


def test_ties_constant_rows_and_fp32_input():
    """Tied scores go to the earlier token; a constant key channel reconstructs exactly; fp32 input; subnormal and
    signed-zero keys and values (the kernel divides by a shared reciprocal with one correction step: 1 ulp off
    IEEE division for subnormal dividends only, which must still give the twin's bytes)."""
    layout = PageLayout(16, 64)
    h, nb = 1, 2
    k = torch.randn(nb * 16, h, 64)
    k[:, :, 5] = 0.75  # constant channel: step = EPS, codes 0
    v = torch.randn(nb * 16, h, 64)
    v[:, :, 7] = 1e-31  # sqrt rounds to 0 in fp16: normalizer 1
    v[:, :, 9] = 0.0
    k[:, :, 6] = torch.randn(nb * 16, h) * 1e-39  # subnormal channel: (x - mn) subnormal
    k[:4, :, 7] = -0.0
    v[:, :, 10] = torch.randn(nb * 16, h) * 1e-40  # subnormal values: x / c subnormal
    v[:, :, 11] = -0.0
    v[3, :, :] = torch.randn(64) * 1e-39  # a row of subnormals: its own (step, mn)
    scores = torch.randint(0, 3, (nb * 16, h)).float()  # many ties
    ref, got = _run(layout, k, v, scores, torch.tensor([1, 0], dtype=torch.int32), 2)
    assert torch.equal(ref, got)
    kd, _ = paged.dequantize_pages(got, torch.tensor([1]), layout)
    assert torch.all(kd[0, :, 0, 5] == 0.75)


def test_strided_inputs_and_int64_block_ids():
    """key/value as slices of a fused qkv tensor, scores transposed."""
    layout = PageLayout(16, 64)
    h, nb = 2, 2
    qkv = torch.randn(nb * 16, 3, h, 64).bfloat16()
    k, v = qkv[:, 1], qkv[:, 2]
    scores = torch.rand(h, nb * 16).T
    ids = torch.tensor([1, 2])
    ref = torch.zeros(3, h, layout.page_bytes, dtype=torch.uint8)
    paged.compress_store(k.contiguous(), v.contiguous(), scores.contiguous(), ids, ref, layout)
    got = torch.zeros(3, h, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    compress_store(k.to(DEVICE), v.to(DEVICE), scores.to(DEVICE), ids.to(DEVICE), got, layout)
    assert torch.equal(ref, got.cpu())


def test_rejects_bad_inputs():
    layout = PageLayout(16, 64)
    k = torch.randn(16, 1, 64, device=DEVICE)
    cache = torch.zeros(2, 1, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    ids = torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="tokens"):
        compress_store(k[:8], k[:8], torch.rand(8, 1, device=DEVICE), ids, cache, layout)
    with pytest.raises(ValueError, match="pages hold"):
        compress_store(k, k, torch.rand(16, 1, device=DEVICE), ids, cache[:, :, :64], layout)

