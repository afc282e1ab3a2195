"""The decode step's own kernels against their twins: compress_slots (pages bit-exact, fixed-size work lists
with idle entries, every saliency mode) and block_probe_scores (the block rule's scores of complete blocks)."""

import pytest
import torch
from conftest import DEVICE
from zipcache_vllm.kernels.block_scores import block_probe_scores
from zipcache_vllm.kernels.compress_store import compress_slots

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.method.saliency import block_probe_offsets, block_saliency

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


@pytest.mark.parametrize("mode", ["probe_nnz", "causal_count", "accumulated"])
@pytest.mark.parametrize("n, h, g, d", [(16, 2, 3, 64), (128, 3, 3, 64), (128, 2, 4, 128), (48, 1, 8, 64)])
def test_block_probe_scores_matches_twin(mode, n, h, g, d):
    """The kernel against the twin (saliency.block_saliency): the probes of each block (offsets drawn per block
    index as the engine does), a work list with idle entries, blocks in a staging-like tensor with more slots
    than entries. Idle slots are left untouched."""
    cfg = ZipCacheConfig(block_size=n)
    num_slots = 5
    offs = [block_probe_offsets(cfg, n, i) for i in (0, 7, 3, 1)]
    p = offs[0].numel()
    key = (torch.randn(num_slots, n, h, d) * torch.rand(d) * 3).bfloat16()
    pq = torch.randn(num_slots, p, h * g, d).bfloat16()
    offsets = torch.stack(offs).int()
    src = torch.tensor([3, -1, 0, 4], dtype=torch.int32)
    normalizer = "probe_nnz" if mode == "accumulated" else mode
    saliency = "accumulated" if mode == "accumulated" else "normalized"
    base = torch.full((num_slots, n, h), -7.0)
    ref = paged.block_probe_scores(key, pq, offsets, src, base.clone(), normalizer, saliency, d**-0.5)
    got = block_probe_scores(key.to(DEVICE), pq.to(DEVICE), offsets.to(DEVICE), src.to(DEVICE), base.to(DEVICE),
                             normalizer, saliency, d**-0.5).cpu()
    assert (got[[1, 2]] == -7.0).all() and (ref[[1, 2]] == -7.0).all()  # slots of no entry: untouched
    tol = {"atol": 2e-3, "rtol": 2e-2} if DEVICE.type == "cuda" else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got, ref, **tol)
    # the twin is the block rule: entry 0 (slot 3) by hand, through saliency.block_saliency
    want = block_saliency(pq[3:4], key[3:4], offsets[0:1], normalizer, saliency, d**-0.5)[0]
    torch.testing.assert_close(ref[3], want, atol=0, rtol=0)
    if mode == "probe_nnz":  # each probe hands out one unit per query head: the sums over tokens say so
        sums = block_saliency(pq[3:4], key[3:4], offsets[0:1], normalizer, "accumulated", d**-0.5)[0]
        torch.testing.assert_close(sums.sum(0), torch.full((h,), float(p * g)), atol=1e-3, rtol=1e-4)
