"""decode_attention kernel vs its torch twin on the same (dequantized) pages, and split-K consistency."""

import pytest
import torch
from _data import make_seqs
from conftest import DEVICE, tolerance
from zipcache_vllm.kernels.decode_attention import decode_attention

from zipcache_vllm import paged
from zipcache_vllm.layout import PageLayout

pytestmark = pytest.mark.interpret

GQA = [(2, 1), (1, 3), (2, 4), (1, 8)]  # (num_kv_heads, query heads per KV head)
# odd lengths: a sequence with no page, one with exactly one page and a 1-token tail, one with a long tail
LENGTHS = {16: [(37, 0), (17, 0), (5, 0)], 128: [(2 * 128 + 97, 0), (129, 0), (54, 0)]}


def _compare(layout, h, g, lengths, **kw):
    cache, bt, sl, tk, tv, ts, tl_ = make_seqs(layout, h, lengths, DEVICE)
    q = torch.randn(len(lengths), h * g, layout.head_size).bfloat16().to(DEVICE)
    ref = paged.decode_attention(
        q.cpu(), cache.cpu(), layout, bt.cpu(), sl.cpu(), tk.cpu(), tv.cpu(), ts.cpu(), tl_.cpu()
    )
    out = torch.full(q.shape, float("nan"), device=DEVICE)  # poisoned: every element must be written
    decode_attention(q, cache, layout, bt, sl, tk, tv, ts, tl_, out=out, **kw)
    torch.testing.assert_close(out.cpu(), ref, **tolerance(), msg=lambda m: f"{layout}: {m}")
    return out


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("h, g", GQA)
def test_decode_matches_twin(block_size, head_size, h, g):
    _compare(PageLayout(block_size, head_size), h, g, LENGTHS[block_size])


@pytest.mark.parametrize("num_splits", [1, 2, 8])
def test_split_k_merge(num_splits):
    """More splits than pages (empty splits) must still merge exactly."""
    layout = PageLayout(16, 64)
    _compare(layout, 2, 4, [(16 * 5 + 3, 0), (16 * 2, 0)], num_splits=num_splits)


@pytest.mark.parametrize("r, rv, bh, bl", [(0.8, 0.2, 4, 2), (0.25, 0.5, 8, 4), (0.0, 1.0, 4, 2)])
def test_other_layouts(r, rv, bh, bl):
    layout = PageLayout(32, 64, bits_high=bh, bits_low=bl, salient_ratio=r, value_salient_ratio=rv)
    _compare(layout, 1, 4, [(32 * 3 + 7, 0), (40, 0)])


def test_bf16_output_close_to_dense_attention():
    """End to end against unquantized keys: only the quantization error remains (a loose bound)."""
    layout = PageLayout(16, 64, bits_high=8, bits_low=8)
    out = _compare(layout, 1, 2, [(16 * 4 + 2, 0)])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kw",
    [
        {"max_tile_rows": 128, "split_tiles": False},
        {"max_tile_rows": 32},
        {"max_tile_rows": 16, "asm_unpack": False},
        {"asm_unpack": False, "split_tiles": False, "num_warps": 2},
    ],
)
def test_launch_options(kw):
    """The launch options the benchmark sweeps compute the same function."""
    layout = PageLayout(128, 64)
    _compare(layout, 2, 4, [(128 * 2 + 7, 0), (130, 0)], **kw)
