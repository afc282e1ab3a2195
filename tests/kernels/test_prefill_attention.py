"""prefill_attention kernel (chunk over pages + tail + causal chunk) vs its torch twin."""

import pytest
import torch
from _data import make_seqs
from conftest import DEVICE, tolerance
from zipcache_vllm.kernels.prefill_attention import prefill_attention

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.layout import PageLayout

pytestmark = pytest.mark.interpret

GQA = [(2, 1), (1, 3), (2, 4), (1, 8)]
# (compressed + tail tokens before the chunk, chunk length): a prefix with pages and a tail, a first chunk,
# a one-token chunk (decode through the prefill path)
LENGTHS = {16: [(2 * 16 + 5, 37), (0, 21), (16 + 3, 1)], 128: [(128 + 97, 45), (0, 54), (3, 1)]}


def _compare(layout, h, g, lengths):
    cache, bt, sl, tk, tv, ts, tl_ = make_seqs(layout, h, lengths, DEVICE)
    qlens = [q for _, q in lengths]
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    t, d = int(qsl[-1]), layout.head_size
    q = torch.randn(t, h * g, d).bfloat16()
    k = torch.randn(t, h, d).bfloat16()
    v = torch.randn(t, h, d).bfloat16()
    ref = paged.prefill_attention(
        q,
        k,
        v,
        cache.cpu(),
        layout,
        bt.cpu(),
        qsl,
        sl.cpu(),
        tk.cpu(),
        tv.cpu(),
        ts.cpu(),
        tl_.cpu(),
    )
    dv = lambda x: x.to(DEVICE)  # noqa: E731
    out = torch.full(q.shape, float("nan"), device=DEVICE)
    _, lse = prefill_attention(
        dv(q),
        dv(k),
        dv(v),
        cache,
        layout,
        bt,
        dv(qsl),
        sl,
        tk,
        tv,
        ts,
        tl_,
        max(qlens),
        out=out,
    )
    tol = tolerance()
    torch.testing.assert_close(out.cpu(), ref, **tol, msg=lambda m: f"out {layout}: {m}")
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("h, g", GQA)
def test_prefill_matches_twin(block_size, head_size, h, g):
    _compare(PageLayout(block_size, head_size), h, g, LENGTHS[block_size])


def test_separate_ratios_layout():
    layout = PageLayout(32, 64, salient_ratio=0.8, value_salient_ratio=0.2)
    _compare(layout, 1, 4, [(32 * 2 + 9, 33), (0, 17)])
