"""The torch twins (zipcache_vllm.engine.paged) against dense references built from quant.py / saliency.py."""

import pytest
import torch
import torch.nn.functional as F

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.method import quant, saliency
from zipcache_vllm.method.config import Selection, ZipCacheConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("n, d, r, rv", [(16, 64, 0.6, None), (32, 128, 0.8, 0.2), (16, 64, 0.25, 0.75)])
def test_pages_dequantize_to_the_quantizers(n, d, r, rv):
    """Per block: keys = ZC-3 channelwise per precision group, values = ZC-2 CST, per-block quota."""
    lay = PageLayout(n, d, salient_ratio=r, value_salient_ratio=rv)
    h, nb = 2, 3
    k, v, s = (
        torch.randn(nb * n, h, d).bfloat16(),
        torch.randn(nb * n, h, d).bfloat16(),
        torch.rand(nb * n, h),
    )
    cache = torch.zeros(nb, h, lay.page_bytes, dtype=torch.uint8)
    paged.compress_store(k, v, s, torch.arange(nb), cache, lay)
    kd, vd = paged.dequantize_pages(cache, torch.arange(nb), lay)  # [B, N, H, D], token order
    x = k.float().view(nb, n, h, d).transpose(1, 2)
    y = v.float().view(nb, n, h, d).transpose(1, 2)
    sc = s.view(nb, n, h).transpose(1, 2)
    ks = saliency.select_salient(sc, r, Selection.QUOTA, n)
    vs = saliency.select_salient(sc, lay.v_salient_ratio, Selection.QUOTA, n)
    hi, lo = quant.quantize_channelwise_mixed(x, ks, 4, 2)
    k_ref = quant.select_mixed(hi.dequantize(), lo.dequantize(), ks)
    c, vhi, vlo = quant.quantize_cst_mixed(y, vs, 4, 2)
    v_ref = quant.select_mixed(vhi.dequantize(), vlo.dequantize(), vs) * c.float()
    assert torch.equal(kd.transpose(1, 2), k_ref)
    assert torch.equal(vd.transpose(1, 2), v_ref)


def _setup(lay, h, lengths, tail_extra=0):
    """Pages + tails for sequences of (pages, tail_len); dense fp32 K/V per sequence in token order."""
    n, d = lay.block_size, lay.head_size
    total = sum(p for p, _ in lengths)
    k, v, s = torch.randn(total * n, h, d), torch.randn(total * n, h, d), torch.rand(total * n, h)
    cache = torch.zeros(total + 1, h, lay.page_bytes, dtype=torch.uint8)
    ids = torch.randperm(total + 1)[:total]
    paged.compress_store(k, v, s, ids, cache, lay)
    kd, vd = paged.dequantize_pages(cache, ids, lay)
    tk, tv = torch.randn(len(lengths), n, h, d), torch.randn(len(lengths), n, h, d)
    bt = torch.zeros(len(lengths), max(1, max(p for p, _ in lengths)), dtype=torch.int32)
    dense, start = [], 0
    for i, (p, t) in enumerate(lengths):
        bt[i, :p] = ids[start : start + p].int()
        dk = torch.cat([kd[start : start + p].reshape(-1, h, d), tk[i, :t]])
        dv = torch.cat([vd[start : start + p].reshape(-1, h, d), tv[i, :t]])
        dense.append((dk, dv))
        start += p
    tails = torch.tensor([t for _, t in lengths], dtype=torch.int32)
    return cache, bt, tk, tv, torch.arange(len(lengths), dtype=torch.int32), tails, dense


def test_decode_twin_is_sdpa_on_dequantized_cache():
    lay, h, g = PageLayout(16, 64), 2, 3
    lengths = [(3, 5), (0, 7), (2, 1)]
    cache, bt, tk, tv, ts, tails, dense = _setup(lay, h, lengths)
    seq_lens = torch.tensor([p * 16 + t for p, t in lengths], dtype=torch.int32)
    q = torch.randn(3, h * g, 64)
    out = paged.decode_attention(q, cache, lay, bt, seq_lens, tk, tv, ts, tails)
    for i, (dk, dv) in enumerate(dense):
        ref = F.scaled_dot_product_attention(q[i].unsqueeze(1), dk.transpose(0, 1), dv.transpose(0, 1), enable_gqa=True)
        torch.testing.assert_close(out[i], ref.squeeze(1), atol=1e-5, rtol=1e-5)


def test_prefill_twin_is_causal_sdpa_within_one_block():
    """A prompt inside its first block (no pages, no tail): plain causal attention."""
    lay, h, g, n_tok, d = PageLayout(16, 64), 2, 4, 16, 64
    q, k, v = torch.randn(n_tok, h * g, d), torch.randn(n_tok, h, d), torch.randn(n_tok, h, d)
    empty = torch.zeros(1, 16, h, d)
    one = torch.zeros(1, dtype=torch.int32)
    out = paged.prefill_attention(q, k, v, torch.zeros(1, h, lay.page_bytes, dtype=torch.uint8), lay,
                                  torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, n_tok], dtype=torch.int32),
                                  torch.tensor([n_tok], dtype=torch.int32), empty, empty, one, one)
    causal = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    )
    torch.testing.assert_close(out, causal.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_prefill_twin_is_the_block_rule_row_by_row():
    """A chunk from mid-block 2 over 3 blocks: each query attends (dense reference, one row at a time) over the
    dequantized pages of the blocks before its own, then the tail / chunk rows of its own block up to itself."""
    lay, h, g, d, n = PageLayout(16, 64), 2, 3, 64, 16
    cache, bt, tk, tv, ts, tails, dense = _setup(lay, h, [(4, 5)])  # pages of blocks 0-3 (2 and 3 in the chunk)
    ctx, ql = 2 * n + 5, 30  # positions 37 .. 66: blocks 2, 3, 4
    q, k, v = torch.randn(ql, h * g, d), torch.randn(ql, h, d), torch.randn(ql, h, d)
    out = paged.prefill_attention(q, k, v, cache, lay, bt, torch.tensor([0, ql], dtype=torch.int32),
                                  torch.tensor([ctx + ql], dtype=torch.int32), tk, tv, ts, tails)
    pk, pv = (x[: 4 * n] for x in dense[0])  # page rows in token order (dense) are a permutation within a block
    raw_k = torch.cat([tk[0, :5], k])  # positions 32 .. 66
    raw_v = torch.cat([tv[0, :5], v])
    for i in range(ql):
        p = ctx + i
        b = p // n
        kk = torch.cat([pk[: b * n], raw_k[b * n - 32 : p - 32 + 1]])
        vv = torch.cat([pv[: b * n], raw_v[b * n - 32 : p - 32 + 1]])
        ref, _ = paged._attend(q[i : i + 1], kk, vv, None, d**-0.5)
        torch.testing.assert_close(out[i], ref[0], atol=1e-5, rtol=1e-5)


def test_block_probe_scores_twin_is_the_block_rule():
    """paged.block_probe_scores writes saliency.block_saliency of each entry's block, skips idle entries, and a
    block's scores do not depend on the other blocks of the call (bit for bit)."""
    n, h, g, d = 32, 2, 3, 64
    cfg = ZipCacheConfig(block_size=n)
    offs = torch.stack([saliency.block_probe_offsets(cfg, n, i) for i in range(4)]).int()
    key, pq = torch.randn(4, n, h, d).bfloat16(), torch.randn(4, offs.shape[1], h * g, d).bfloat16()
    out = paged.block_probe_scores(key, pq, offs, torch.tensor([0, 1, -1, 3]), torch.full((4, n, h), -1.0))
    assert (out[2] == -1).all()
    for i in (0, 1, 3):
        alone = saliency.block_saliency(pq[i : i + 1], key[i : i + 1], offs[i : i + 1])[0]
        assert torch.equal(out[i], alone)


def test_chunked_prefill_equals_one_chunk():
    """Two chunks (the second starting mid-block) produce the rows one chunk produces: the block rule reads
    pages and the own block, never the chunk boundary."""
    lay, h, g, d = PageLayout(16, 64), 1, 4, 64
    cache, bt, tk, tv, ts, tails, dense = _setup(lay, h, [(3, 5)])  # pages 0-2: block 2 completes in the chunk
    ctx = 16 + 5
    q, k, v = torch.randn(20, h * g, d), torch.randn(20, h, d), torch.randn(20, h, d)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    full = paged.prefill_attention(q, k, v, cache, lay, bt, i32([0, 20]), i32([ctx + 20]), tk, tv, ts, tails)
    tk2, tv2 = tk.clone(), tv.clone()  # the second chunk starts at 28: the tail holds positions 16 .. 27
    tk2[0, 5:12], tv2[0, 5:12] = k[:7], v[:7]
    second = paged.prefill_attention(q[7:], k[7:], v[7:], cache, lay, bt, i32([0, 13]), i32([ctx + 20]), tk2, tv2,
                                     ts, tails + 7)
    torch.testing.assert_close(second, full[7:], atol=1e-5, rtol=1e-5)
