"""The decode step's own kernels against their twins: compress_slots (pages bit-exact, fixed-size work lists
with idle entries, every saliency mode) and update_decode_saliency (exact fp32 sums and counts)."""

import pytest
import torch
from conftest import DEVICE
from zipcache_vllm.kernels.compress_store import compress_slots
from zipcache_vllm.kernels.decode_saliency import update_decode_saliency

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.layout import PageLayout

pytestmark = pytest.mark.interpret


def _staging(num_slots, n, h, d):
    key = (torch.randn(num_slots, n, h, d) * torch.rand(d) * 5).bfloat16()
    value = torch.randn(num_slots, n, h, d).bfloat16()
    score_sum = torch.rand(num_slots, n, h)
    score_count = torch.randint(0, 5, (num_slots, n)).float()  # 0 counts: divided by 1
    return key, value, score_sum, score_count


@pytest.mark.parametrize("mode", ["normalized", "accumulated", "random"])
@pytest.mark.parametrize("n, d, r, rv", [(16, 64, 0.8, 0.2), (32, 128, 0.5, None), (48, 64, 0.6, None)])
def test_compress_slots_bit_exact(mode, n, d, r, rv):
    layout = PageLayout(n, d, salient_ratio=r, value_salient_ratio=rv)
    h, num_slots = 2, 5
    key, value, score_sum, score_count = _staging(num_slots, n, h, d)
    slots = torch.tensor([3, 0, 4, 1], dtype=torch.int32)
    block_ids = torch.tensor([6, -1, 2, -1], dtype=torch.int32)  # two idle entries
    if mode == "random":
        scores, count = torch.rand(1, n, h).expand(num_slots, -1, -1), None
    else:
        scores, count = score_sum, (score_count if mode == "normalized" else None)
    base = torch.randint(0, 256, (8, h, layout.page_bytes), dtype=torch.uint8)
    ref = base.clone()
    paged.compress_slots(key, value, scores, count, slots, block_ids, ref, layout)
    assert not torch.equal(ref[6], base[6]) and torch.equal(ref[0], base[0])  # idle entries write nothing
    got = base.to(DEVICE)
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    compress_slots(dev(key), dev(value), dev(scores), dev(count), dev(slots), dev(block_ids), got, layout)
    diff = (ref != got.cpu()).nonzero()
    assert diff.numel() == 0, f"{len(diff)} bytes differ, first at {diff[:5].tolist()}"


def test_compress_slots_matches_compress_store_of_the_same_blocks():
    """A slot's block compressed from staging equals the block compressed from contiguous rows."""
    layout = PageLayout(16, 64)
    key, value, score_sum, score_count = _staging(3, 16, 2, 64)
    a = torch.zeros(4, 2, layout.page_bytes, dtype=torch.uint8)
    b = torch.zeros_like(a)
    paged.compress_slots(key, value, score_sum, score_count, torch.tensor([2]), torch.tensor([1]), a, layout)
    scores = (score_sum[2] / score_count[2].clamp(min=1).unsqueeze(-1))
    paged.compress_store(key[2], value[2], scores, torch.tensor([1]), b, layout)
    assert torch.equal(a, b)


@pytest.mark.parametrize("n, h", [(16, 2), (128, 8), (48, 3)])
def test_update_decode_saliency_exact(n, h):
    num_slots, rows = 6, 4
    score_sum, score_count = torch.rand(num_slots, n, h), torch.randint(0, 9, (num_slots, n)).float()
    slots = torch.tensor([4, 1, 5, 0], dtype=torch.int32)
    tail_lens = torch.tensor([0, n - 1, 3, n // 2], dtype=torch.int32)
    own, tail_mass = torch.rand(rows, h), torch.rand(rows, n, h)
    ref_sum, ref_cnt = score_sum.clone(), score_count.clone()
    paged.update_decode_saliency(ref_sum, ref_cnt, slots, tail_lens, own, tail_mass)
    got_sum, got_cnt = score_sum.to(DEVICE), score_count.to(DEVICE)
    update_decode_saliency(got_sum, got_cnt, slots.to(DEVICE), tail_lens.to(DEVICE), own.to(DEVICE),
                           tail_mass.to(DEVICE))
    assert torch.equal(got_sum.cpu(), ref_sum) and torch.equal(got_cnt.cpu(), ref_cnt)
    assert torch.equal(ref_sum[2], score_sum[2]) and torch.equal(ref_cnt[3], score_count[3])  # untouched slots
    assert ref_cnt[1, n - 1] == 1 and ref_cnt[4, 0] == 1  # the new token starts at one
