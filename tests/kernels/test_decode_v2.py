"""decode_attention_v2 (Gluon, tensor cores) vs the torch twin on the same dequantized pages.

v2 is written in Gluon: it cannot run under the Triton interpreter, so these tests run on a CUDA GPU only (the
H200 of the device tool; see docs/performance.md for the date and commit of the last run). What CI checks on
the CPU is the pure-Python part: the channel maps are permutations and the unpack PTX is well formed.
"""

import math

import pytest
import torch
from _data import make_seqs
from conftest import DEVICE
from zipcache_vllm.kernels import decode_v2 as v2

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.layout import PageLayout

gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="Gluon kernel: CUDA only (no interpreter)")

GQA = [(2, 1), (1, 3), (2, 4), (1, 8), (1, 16)]  # (num_kv_heads, query heads per KV head)
# a sequence with no page (tail only), exactly one page and a 1-token tail, several pages and a long tail
LENGTHS = {16: [(37, 0), (17, 0), (5, 0)], 128: [(3 * 128 + 97, 0), (129, 0), (54, 0)]}
PRESETS = {  # (salient_ratio, value_salient_ratio, bits_high, bits_low)
    "vllm": (0.8, 0.2, 4, 2),
    "r0.6": (0.6, None, 4, 2),
    "keys-hi": (1.0, 0.0, 4, 2),
    "values-hi": (0.0, 1.0, 4, 2),
    "4/4": (0.5, None, 4, 4),
    "2/2": (0.5, None, 2, 2),
}


def _layout(block_size, head_size, preset):
    r, rv, bh, bl = PRESETS[preset]
    return PageLayout(block_size, head_size, bits_high=bh, bits_low=bl, salient_ratio=r, value_salient_ratio=rv)


def _reference(q, cache, layout, bt, sl, tk, tv, ts, tl_):
    """Twin output and the natural-log log-sum-exp of scale * q.k per row (float32, on the CPU)."""
    args = [x.cpu() for x in (q, cache)] + [layout] + [x.cpu() for x in (bt, sl, tk, tv, ts, tl_)]
    out = paged.decode_attention(*args)
    scale = layout.head_size**-0.5
    g = q.shape[1] // tk.shape[2]
    lse = torch.empty(q.shape[:2])
    for s in range(q.shape[0]):
        n_tail = int(tl_[s])
        pages = (int(sl[s]) - n_tail) // layout.block_size
        k, _ = paged._seq_kv(args[1], layout, args[3], s, pages, args[5], args[6], int(args[7][s]), n_tail)
        logits = torch.einsum("hd,lhd->hl", q[s].cpu().float(), k.repeat_interleave(g, 1)) * scale
        lse[s] = torch.logsumexp(logits, dim=-1)
    return out, lse


def _compare(layout, h, g, lengths, **kw):
    cache, bt, sl, tk, tv, ts, tl_ = make_seqs(layout, h, lengths, DEVICE)
    q = torch.randn(len(lengths), h * g, layout.head_size).bfloat16().to(DEVICE)
    ref, ref_lse = _reference(q, cache, layout, bt, sl, tk, tv, ts, tl_)
    out = torch.full(q.shape, float("nan"), device=DEVICE)  # poisoned: every element must be written
    lse = torch.full(q.shape[:2], float("nan"), device=DEVICE)
    v2.decode_attention_v2(q, cache, layout, bt, sl, tk, tv, ts, tl_, out=out, lse=lse, **kw)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-2, rtol=2e-2, msg=lambda m: f"{layout}: {m}")
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-2, rtol=2e-3, msg=lambda m: f"lse {layout}: {m}")
    rel = ((out.cpu() - ref).norm() / ref.norm()).item()
    assert rel < 5e-3, f"relative error {rel:.2e} (fp16 operands: expect ~1e-3)"
    return out


@gpu
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("h, g", GQA)
def test_matches_twin(head_size, h, g):
    _compare(_layout(128, head_size, "vllm"), h, g, LENGTHS[128])


@gpu
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("head_size", [64, 128])
def test_presets(preset, head_size):
    _compare(_layout(128, head_size, preset), 2, 4, LENGTHS[128])


@gpu
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_block_sizes(block_size):
    _compare(_layout(block_size, 128, "r0.6"), 2, 4, [(block_size * 7 + 3, 0), (block_size, 0), (1, 0)])


@gpu
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
def test_splits(num_splits):
    """Split boundaries anywhere, more splits than pages (empty splits), one launch (in-kernel merge of all
    query heads at once)."""
    _compare(_layout(128, 128, "vllm"), 2, 4, [(128 * 9 + 5, 0), (128 * 2, 0), (1, 0)], num_splits=num_splits)


@gpu
def test_merge_with_gqa_not_a_power_of_two():
    """The merge of all query heads pads 3 heads to 4 (masked rows)."""
    _compare(_layout(128, 64, "vllm"), 2, 3, [(128 * 5 + 3, 0), (300, 0)], num_splits=5)


@gpu
@pytest.mark.parametrize("prefetch, max_chunk, stage", [(0, 16, True), (1, 32, False), (4, 64, False), (0, 32, True)])
def test_launch_options(prefetch, max_chunk, stage):
    """L2 prefetch depth, chunk size and staging pages in shared memory change the schedule, not the function."""
    _compare(_layout(128, 128, "r0.6"), 2, 4, [(128 * 5 + 9, 0), (128, 0)], prefetch=prefetch, max_chunk=max_chunk,
             stage=stage)


@gpu
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("head_size", [64, 128])
def test_unstaged_presets(preset, head_size):
    """The register-load path (no shared memory) on every preset (the default stages pages)."""
    _compare(_layout(128, head_size, preset), 2, 4, LENGTHS[128], stage=False)


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_stage_plan(block_size, head_size, preset):
    """Staged pages: every byte the kernel reads is in exactly one aligned piece, pieces do not overlap in shared
    memory, views start at multiples of their size, and the operand views are bit permutations."""
    layout = _layout(block_size, head_size, preset)
    if not v2.supported(layout):
        pytest.skip("layout not read by v2")
    tiles = v2.chunks(layout)
    segments, pieces = v2.stage_plan(layout, tiles)
    assert all(s & (s - 1) == 0 for s in segments)
    used = [set() for _ in segments]
    for off, nb, seg, word in pieces:
        assert off % 16 == 0 and nb & (nb - 1) == 0 and word % (nb // 4) == 0
        cells = set(range(word, word + nb // 4))
        assert not cells & used[seg] and max(cells) < segments[seg]
        used[seg] |= cells
    assert sum(map(len, used)) == sum(segments)  # no padding
    d = head_size
    reads = [(layout.k_param_off, 8 * d), (layout.v_norm_off, 2 * d)]
    for start, rows, k_hi, k_off, v_hi, v_off in tiles:
        kb, vb = (layout.bits_high if k_hi else layout.bits_low), (layout.bits_high if v_hi else layout.bits_low)
        reads += [(k_off, rows * d * kb // 8), (v_off, rows * d * vb // 8), (layout.v_tok_off + 2 * start, 2 * rows),
                  (layout.v_tok_off + 2 * (layout.block_size + start), 2 * rows)]
        for kind, bits in (("key", kb), ("value", vb)):
            view, load = v2.shared_operand(kind, bits, d, rows)
            assert len(view.offset_bases) == (rows * 16).bit_length() - 1
    for off, nb in reads:
        assert any(p[0] == off and p[1] == nb for p in pieces), (off, nb)


@gpu
def test_graph_replay_matches_eager():
    """Captured once, replayed with new lengths and tails: equal to eager calls (counters reset themselves)."""
    layout = _layout(128, 128, "vllm")
    cache, bt, sl, tk, tv, ts, tl_ = make_seqs(layout, 2, [(128 * 6 + 100, 0), (128 * 3 + 1, 0)], DEVICE)
    q = torch.randn(2, 8, 128, device=DEVICE).bfloat16()
    out = torch.empty_like(q)
    kw = {"out": out, "num_splits": 4}
    v2.decode_attention_v2(q, cache, layout, bt, sl, tk, tv, ts, tl_, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v2.decode_attention_v2(q, cache, layout, bt, sl, tk, tv, ts, tl_, **kw)
    for step in range(6):
        if step == 3:  # a sequence finishes and another one, tail only, takes its row
            sl[1], tl_[1] = 7, 7
        sl.add_(1)
        tl_.add_(1)
        q.normal_()
        graph.replay()
        got = out.clone()
        v2.decode_attention_v2(q, cache, layout, bt, sl, tk, tv, ts, tl_, out=out, num_splits=4)
        torch.testing.assert_close(got, out, atol=0, rtol=0, msg=lambda m, step=step: f"step {step}: {m}")


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2, 4])
def test_channel_maps_are_permutations(d, bits):
    planes = d // 16
    keys = sorted(v2.key_channel(bits, d, j, i) for j in range(planes) for i in range(16))
    vals = sorted(v2.value_channel(bits, d, j, i) for j in range(planes) for i in range(16))
    assert keys == list(range(d)) and vals == list(range(d))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2, 4])
def test_unpack_asm_operands(d, bits):
    """Every output register is written once; inputs are the registers the loads provide."""
    for make in (v2.key_unpack_asm, v2.value_unpack_asm):
        asm, cons, nin = make(bits, d)
        outs = 4 * (d // 16)
        assert cons.count("=r") == outs and cons.count(",r") + cons.startswith("r") == nin
        assert nin == d * bits // 64
        for i in range(outs):
            assert asm.count(f"lop3.b32 ${i}, ") == 1, (make.__name__, i)
        assert f"${outs + nin}" not in asm


def test_supported():
    assert v2.supported(_layout(128, 128, "vllm")) and v2.supported(_layout(128, 64, "r0.6"))
    assert not v2.supported(PageLayout(128, 128, bits_high=8, bits_low=4))
    assert not v2.supported(PageLayout(128, 256))
    assert math.isclose(PageLayout(128, 128, salient_ratio=0.6).num_salient_k % 16, 0)
