"""prefill_attention kernel (a chunk under the block rule: earlier blocks through their pages, the own block in
bf16) and its page dequantization, against the torch twins."""

import pytest
import torch
from _data import make_seqs
from conftest import DEVICE, tolerance
from zipcache_vllm.kernels.prefill_attention import _groups, dequantize_pages, prefill_attention

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.layout import PageLayout

pytestmark = pytest.mark.interpret

GQA = [(2, 1), (1, 3), (2, 4), (1, 8)]
# (tokens before the chunk, chunk length): a prefix with pages and a tail and a chunk over several blocks, a
# first chunk over two blocks, a one-token chunk, a chunk starting mid-block and ending on a block edge
LENGTHS = {16: [(2 * 16 + 5, 37), (0, 21), (16 + 3, 1), (5, 27)], 128: [(128 + 97, 45), (0, 150), (3, 1)]}


def block_rule_seqs(layout, h, lengths):
    """Sequences whose block tables hold the pages of every block before the chunk's last query (as the engine
    leaves them: the blocks a chunk completes are compressed before it attends), tails of ``ctx % n``."""
    n = layout.block_size
    shaped = [(max(0, (c + q - 1) // n) * n + c % n, q) for c, q in lengths]
    cache, bt, _, tk, tv, ts, tl_ = make_seqs(layout, h, shaped, DEVICE)
    sl = torch.tensor([c + q for c, q in lengths], dtype=torch.int32, device=DEVICE)
    return cache, bt, sl, tk, tv, ts, tl_


def _compare(layout, h, g, lengths, dtype=torch.bfloat16, config=None):
    cache, bt, sl, tk, tv, ts, tl_ = block_rule_seqs(layout, h, lengths)
    tk, tv = tk.to(dtype), tv.to(dtype)
    qlens = [q for _, q in lengths]
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    t, d = int(qsl[-1]), layout.head_size
    q = torch.randn(t, h * g, d).to(dtype)
    k = torch.randn(t, h, d).to(dtype)
    v = torch.randn(t, h, d).to(dtype)
    cpu = lambda x: x.cpu()  # noqa: E731
    ref = paged.prefill_attention(q, k, v, *map(cpu, (cache,)), layout, *map(cpu, (bt, qsl, sl, tk, tv, ts, tl_)))
    dv = lambda x: x.to(DEVICE)  # noqa: E731
    out = torch.full(q.shape, float("nan"), device=DEVICE)
    _, lse = prefill_attention(dv(q), dv(k), dv(v), cache, layout, bt, dv(qsl), sl, tk, tv, ts, tl_, max(qlens),
                               out=out, config=config)
    torch.testing.assert_close(out.cpu(), ref, **tolerance(), msg=lambda m: f"out {layout}: {m}")
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("h, g", GQA)
def test_prefill_matches_twin(block_size, head_size, h, g):
    _compare(PageLayout(block_size, head_size), h, g, LENGTHS[block_size])


# kernel variants (prefill_attention._config; timed by bench_prefill_step.py --sweep): the interpreter runs
# their arithmetic (tensor descriptors as plain indexed loads, num_stages ignored); the TMA
# copies and pipelining depths themselves only run on a GPU (this test there, with the
# GPU tile sizes; sass_prefill.py shows they compile for sm_90)
VARIANTS = {
    "pointer_loads": {"TMA": False, "STAGES_A": None},
    "tma": {"TMA": True, "STAGES_A": None},
    "tma_a3": {"TMA": True, "STAGES_A": 3},
}


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_match_twin(variant, block_size):
    _compare(PageLayout(block_size, 64), 2, 4, LENGTHS[block_size], config=VARIANTS[variant])
    _compare(PageLayout(block_size, 64), 1, 2, [(0, 5)], config=VARIANTS[variant])  # no pages: an empty scratch


def test_separate_ratios_layout_and_fp16():
    layout = PageLayout(32, 64, salient_ratio=0.8, value_salient_ratio=0.2)
    _compare(layout, 1, 4, [(32 * 2 + 9, 33), (0, 17)], dtype=torch.float16)


def test_chunking_does_not_change_rows():
    """A chunk's rows are the rows the same positions get in one longer chunk (the block rule: attention reads
    pages and the own block, never the chunk boundary)."""
    layout, h, g, d = PageLayout(16, 64), 1, 4, 64
    cache, bt, sl, tk, tv, ts, tl_ = block_rule_seqs(layout, h, [(0, 53)])
    q, k, v = torch.randn(53, h * g, d).bfloat16(), torch.randn(53, h, d).bfloat16(), torch.randn(53, h, d).bfloat16()
    dv = lambda x: x.to(DEVICE)  # noqa: E731
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    full, _ = prefill_attention(dv(q), dv(k), dv(v), cache, layout, bt, i32([0, 53]), sl, tk, tv, ts, tl_, 53)
    c = 37  # second chunk starts at 37 = 2 * 16 + 5: the tail holds positions 32..36
    tk2, tv2 = tk.clone(), tv.clone()
    tk2[int(ts[0]), :5], tv2[int(ts[0]), :5] = dv(k[32:37]), dv(v[32:37])
    part, _ = prefill_attention(dv(q[c:]), dv(k[c:]), dv(v[c:]), cache, layout, bt, i32([0, 53 - c]), sl, tk2, tv2,
                                ts, i32([5]), 53 - c)
    torch.testing.assert_close(part.cpu().float(), full[c:].cpu().float(), atol=1e-2, rtol=1e-2)


VLLM_128 = PageLayout(128, 128, salient_ratio=0.8, value_salient_ratio=0.2)


@pytest.mark.parametrize("layout", [PageLayout(16, 64), VLLM_128])
def test_dequantize_matches_twin(layout):
    """The scratch rows are the twin's page-order dequantization: in fp32 exactly (the interpreter's dtype),
    in bf16 on the GPU within one unit in the last place (one rounding; a fused multiply-add may flip it)."""
    cache, bt, _, _, _, _, _ = make_seqs(layout, 2, [(3 * layout.block_size, 1), (layout.block_size + 2, 1)], DEVICE)
    num_pages = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    start = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)  # the second sequence's page first
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    sk, sv = dequantize_pages(cache, layout, bt, num_pages, start, 4, 3, dtype)
    n = layout.block_size
    for s, (p, a) in enumerate(((3, 1), (1, 0))):
        rk, rv = paged.dequantize_pages(cache.cpu(), bt[s, :p].cpu(), layout, order="page")  # [p, n, h, d]
        for got, ref in ((sk, rk), (sv, rv)):
            got = got[:, a * n : (a + p) * n].cpu().float().transpose(0, 1).reshape(p, n, *ref.shape[2:])
            torch.testing.assert_close(got, ref.to(dtype).float(), atol=0, rtol=0 if dtype == torch.float32 else 2**-7)


def test_groups_bound_the_scratch():
    assert _groups([3, 4, 5], 100) == [(0, 3)]
    assert _groups([3, 4, 5, 1], 8) == [(0, 2), (2, 4)]
    assert _groups([20, 1], 8) == [(0, 1), (1, 2)]


def test_bad_head_size_is_a_clear_error():
    layout = PageLayout(16, 48)
    cache, bt, sl, tk, tv, ts, tl_ = block_rule_seqs(layout, 1, [(0, 4)])
    x = torch.zeros(4, 1, 48, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        prefill_attention(x, x, x, cache, layout, bt, torch.tensor([0, 4], dtype=torch.int32, device=DEVICE), sl,
                          tk, tv, ts, tl_, 4)
