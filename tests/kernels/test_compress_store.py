"""compress_store kernel vs its torch twin: every byte of every page equal (codes, fp16 params, bitmaps)."""

import numpy as np
import pytest
import torch
from conftest import DEVICE
from zipcache_vllm.kernels.compress_store import compress_slots, compress_store, reciprocal32, tile_rows

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.method.saliency import block_probe_offsets

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
    (104, 64, 0.6, 0.3, 4, 2),  # no multiple of 16: quotas 63 and 32 (ceil), tiles of one row (tile_rows)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_signed_zeros_and_constant_channels(dtype):
    """bf16 and fp16 keys and values (on the GPU the keys' group min / max run on pairs of them, min.bf16x2 /
    min.f16x2, unconverted): channels of zeros of both signs, of -0 only, constant, and of subnormals, in both
    precision groups; the twin's bytes."""
    layout = PageLayout(32, 64, salient_ratio=0.5)
    h, nb = 2, 3
    k = torch.randn(nb * 32, h, 64) * torch.rand(64) * 4
    k[:, :, 3] = torch.where(torch.rand(nb * 32, h) < 0.5, -0.0, 0.0)
    k[:, :, 4] = -0.0
    k[:, :, 5] = 0.75
    if dtype == torch.float16 or DEVICE.type == "cuda":  # (the interpreter rounds fp32 subnormals to bf16 wrongly:
        # -1.01e-39 -> -4.41e-39 with triton 3.9's TRITON_INTERPRET, so the bf16 scratch of the ranges is off there)
        k[:, :, 6] = torch.randn(nb * 32, h) * (1e-39 if dtype == torch.bfloat16 else 1e-6)  # subnormal in the dtype
    v = torch.randn(nb * 32, h, 64)
    v[:, :, 3] = torch.where(torch.rand(nb * 32, h) < 0.5, -0.0, 0.0)
    scores = torch.rand(nb * 32, h)
    ref, got = _run(layout, k.to(dtype), v.to(dtype), scores, torch.tensor([2, 0, 3], dtype=torch.int32), 4)
    diff = (ref != got).nonzero()
    assert diff.numel() == 0, f"{len(diff)} bytes differ, first at (block, head, byte) {diff[:5].tolist()}"


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
    pq = torch.randn(1, 2, 3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="probe_offsets"):
        compress_store(k, k, None, ids, cache, layout, probe_query=pq)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        compress_store(torch.randn(16, 2, 64, device=DEVICE), torch.randn(16, 2, 64, device=DEVICE), None, ids,
                       torch.zeros(2, 2, layout.page_bytes, dtype=torch.uint8, device=DEVICE), layout,
                       probe_query=pq, probe_offsets=torch.zeros(1, 2, dtype=torch.int32, device=DEVICE))



# (block_size, num_kv_heads, GQA group, head_size, salient_ratio, value_salient_ratio)
PROBE_CASES = [
    (128, 2, 4, 128, 0.8, 0.2),  # the vllm preset on LLaMA3-8B heads
    (128, 3, 3, 64, 0.6, None),  # SmolLM2 heads, r = 0.6
    (16, 2, 3, 64, 0.6, None),
    (48, 1, 8, 64, 0.5, None),  # block size not a power of two
]


@pytest.mark.parametrize("n, h, g, d, r, rv", PROBE_CASES)
@pytest.mark.parametrize("normalizer", ["probe_nnz", "causal_count"])
def test_scored_by_probes_in_the_kernel(n, h, g, d, r, rv, normalizer):
    """Blocks scored by their own probes inside compress_store (the block rule, fused): the scores it reports
    agree with the twin's (block_probe_scores) within float tolerance, and every page byte equals the twin's
    compression under those very scores (a near-tie may rank differently under other rounding, so pages are
    compared at equal scores)."""
    layout = PageLayout(n, d, salient_ratio=r, value_salient_ratio=rv)
    nb = 3
    cfg = ZipCacheConfig(block_size=n)
    offsets = torch.stack([block_probe_offsets(cfg, n, i) for i in (0, 5, 2)]).int()
    p = offsets.shape[1]
    k = (torch.randn(nb * n, h, d) * torch.rand(d) * 3).bfloat16()
    v = torch.randn(nb * n, h, d).bfloat16()
    pq = torch.randn(nb, p, h * g, d).bfloat16()
    ids = torch.tensor([4, 0, 2], dtype=torch.int32)
    base = torch.randint(0, 256, (6, h, layout.page_bytes), dtype=torch.uint8)
    got = base.to(DEVICE)
    scores = torch.full((nb * n, h), -1.0, device=DEVICE)
    compress_store(k.to(DEVICE), v.to(DEVICE), scores, ids.to(DEVICE), got, layout, probe_query=pq.to(DEVICE),
                   probe_offsets=offsets.to(DEVICE), normalizer=normalizer, scale=d**-0.5)  # fmt: skip
    want = paged.block_probe_scores(k.view(nb, n, h, d), pq, offsets, torch.arange(nb), torch.empty(nb, n, h),
                                    normalizer, "normalized", d**-0.5)  # fmt: skip
    tol = {"atol": 2e-3, "rtol": 2e-2} if DEVICE.type == "cuda" else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(scores.cpu().view(nb, n, h), want, **tol)
    ref = base.clone()
    paged.compress_store(k, v, scores.cpu(), ids, ref, layout)
    assert torch.equal(got.cpu(), ref)
    # without a scores tensor: the same pages
    again = base.to(DEVICE)
    compress_store(k.to(DEVICE), v.to(DEVICE), None, ids.to(DEVICE), again, layout, probe_query=pq.to(DEVICE),
                   probe_offsets=offsets.to(DEVICE), normalizer=normalizer, scale=d**-0.5)  # fmt: skip
    assert torch.equal(again.cpu(), ref)


@pytest.mark.parametrize("n, h, g, d, r, rv", [PROBE_CASES[1], PROBE_CASES[3]])
def test_two_programs_write_the_same_pages(n, h, g, d, r, rv):
    """``programs=2`` (a program for the keys and one for the values of each block and head, each ranking the
    block in its own scratch): the twin's pages under given scores, and the one-program fused kernel's pages and
    scores when the blocks are scored by their probes; a negative block id writes nothing. (A 48-token block pads
    to 64 page rows.)"""
    layout = PageLayout(n, d, salient_ratio=r, value_salient_ratio=rv)
    nb = 3
    cfg = ZipCacheConfig(block_size=n)
    offsets = torch.stack([block_probe_offsets(cfg, n, i) for i in (1, 0, 4)]).int()
    k = (torch.randn(nb * n, h, d) * torch.rand(d) * 3).bfloat16()
    v = torch.randn(nb * n, h, d).bfloat16()
    pq = torch.randn(nb, offsets.shape[1], h * g, d).bfloat16()
    ids = torch.tensor([3, -1, 1], dtype=torch.int32)
    base = torch.randint(0, 256, (5, h, layout.page_bytes), dtype=torch.uint8)
    scores = torch.rand(nb * n, h)
    ref = base.clone()
    paged.compress_store(k[[*range(n), *range(2 * n, 3 * n)]], v[[*range(n), *range(2 * n, 3 * n)]],
                         scores[[*range(n), *range(2 * n, 3 * n)]], torch.tensor([3, 1]), ref, layout)  # fmt: skip
    kd, vd, idd = k.to(DEVICE), v.to(DEVICE), ids.to(DEVICE)
    got = base.to(DEVICE)
    compress_store(kd, vd, scores.to(DEVICE), idd, got, layout, programs=2)
    assert torch.equal(got.cpu(), ref)
    probe = {"probe_query": pq.to(DEVICE), "probe_offsets": offsets.to(DEVICE), "scale": d**-0.5}
    want, want_scores = base.to(DEVICE), torch.full((nb * n, h), -1.0, device=DEVICE)
    compress_store(kd, vd, want_scores, idd, want, layout, programs=1, **probe)
    got, got_scores = base.to(DEVICE), torch.full((nb * n, h), -1.0, device=DEVICE)
    compress_store(kd, vd, got_scores, idd, got, layout, programs=2, **probe)
    assert torch.equal(got.cpu(), want.cpu())
    assert torch.equal(got_scores.cpu(), want_scores.cpu())


def test_programs_refused():
    """A program count other than 1 or 2 raises (3 and 4 were measured slower and removed: kernel docstring)."""
    layout = PageLayout(16, 64, salient_ratio=0.0, value_salient_ratio=1.0)
    k = torch.randn(16, 1, 64).bfloat16().to(DEVICE)
    args = (k, k, torch.rand(16, 1, device=DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE),
            torch.zeros(1, 1, layout.page_bytes, dtype=torch.uint8, device=DEVICE), layout)  # fmt: skip
    for programs in (0, 3, 4):
        with pytest.raises(ValueError, match="programs must be 1 or 2"):
            compress_store(*args, programs=programs)


def test_slots_scored_by_probes_in_the_kernel():
    """compress_slots with probe queries in the staging slots: a work list with idle entries, entries out of
    slot order; the pages equal the twin's under the kernel's scores, the pages of idle entries stay."""
    n, h, g, d = 32, 2, 4, 64
    layout = PageLayout(n, d, salient_ratio=0.8, value_salient_ratio=0.2)
    cfg = ZipCacheConfig(block_size=n)
    num_slots = 5
    offsets = torch.stack([block_probe_offsets(cfg, n, i) for i in (3, 0, 9, 1)]).int()
    p = offsets.shape[1]
    tk = (torch.randn(num_slots, n, h, d) * torch.rand(d) * 3).bfloat16()
    tv = torch.randn(num_slots, n, h, d).bfloat16()
    pq = torch.randn(num_slots, p, h * g, d).bfloat16()
    slots = torch.tensor([4, 1, 0, 2], dtype=torch.int32)
    ids = torch.tensor([3, -1, 0, 5], dtype=torch.int32)
    base = torch.randint(0, 256, (6, h, layout.page_bytes), dtype=torch.uint8)
    got = base.to(DEVICE)
    scores = torch.full((num_slots, n, h), -1.0, device=DEVICE)
    compress_slots(tk.to(DEVICE), tv.to(DEVICE), scores, None, slots.to(DEVICE), ids.to(DEVICE), got, layout,
                   probe_query=pq.to(DEVICE), probe_offsets=offsets.to(DEVICE))  # fmt: skip
    scores = scores.cpu()
    assert (scores[[1, 3]] == -1.0).all()  # slot 1 (idle entry) and slot 3 (no entry): not scored
    src = torch.where(ids >= 0, slots, -1)
    want = paged.block_probe_scores(tk, pq, offsets, src, torch.full((num_slots, n, h), -1.0))
    tol = {"atol": 2e-3, "rtol": 2e-2} if DEVICE.type == "cuda" else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(scores, want, **tol)
    ref = base.clone()
    paged.compress_slots(tk, tv, scores, None, slots, ids, ref, layout)
    assert torch.equal(got.cpu(), ref)
    assert torch.equal(got.cpu()[[1, 2, 4]], base[[1, 2, 4]])  # pages no entry writes


@pytest.mark.parametrize("rows_per_tile", [32, 64, 128])  # not 16: the interpreter default at D 64
@pytest.mark.parametrize("ratios", [(0.8, 0.2), (0.5, 0.5)])  # quotas 96 / 32 (tiles of 32 at most), 64 / 64
def test_rows_per_tile_gives_the_same_pages(rows_per_tile, ratios):
    layout = PageLayout(128, 64, salient_ratio=ratios[0], value_salient_ratio=ratios[1])
    k = (torch.randn(256, 2, 64) * torch.rand(64) * 3).bfloat16().to(DEVICE)
    v = torch.randn(256, 2, 64).bfloat16().to(DEVICE)
    scores = torch.rand(256, 2, device=DEVICE)
    ids = torch.tensor([1, 0], device=DEVICE)
    a = torch.zeros(2, 2, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    b = a.clone()
    compress_store(k, v, scores, ids, a, layout)
    compress_store(k, v, scores, ids, b, layout, rows_per_tile=rows_per_tile)
    assert torch.equal(a, b)


def test_reciprocal32_is_the_rounded_ieee_reciprocal():
    """The host-rounded ``1 / (2^bits - 1)`` that the kernel's parameter division (``_div``) multiplies by."""
    for bits in (1, 2, 3, 4, 8):
        q = (1 << bits) - 1
        assert reciprocal32(q) == float(np.float32(1.0) / np.float32(q))
        assert float(np.float32(reciprocal32(q))) == reciprocal32(q)  # exactly a float32


def test_tile_rows_divide_both_quotas():
    """A tile of page rows holds one key and one value group: its rows divide both salient quotas."""
    assert tile_rows(16, 96, 32) == 16
    assert tile_rows(64, 96, 32) == 32
    assert tile_rows(128, 64, 64) == 64
    assert tile_rows(32, 0, 128) == 32  # an empty group does not bound the tile
    assert tile_rows(16, 15, 8) == 1
    for r, sk, sv in ((16, 80, 80), (32, 96, 32), (64, 112, 16), (8, 0, 0)):
        t = tile_rows(r, sk, sv)
        assert t <= r and t & (t - 1) == 0 and sk % t == 0 and sv % t == 0
