"""decode_attention_v2 (Gluon, tensor cores) vs the torch twin on the same dequantized pages.

v2 is written in Gluon: it cannot run under the Triton interpreter, so these tests run on a CUDA GPU only (the
H200 of the device tool; see docs/performance.md for the date and commit of the last run). What CI checks on
the CPU is the pure-Python part: the channel maps are permutations and the unpack PTX is well formed.
"""

import inspect
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


SCHEDULES = {  # launch options of the page loop: channel maps, one staged page refilled piece by piece, register cap
    "one-map": {"maps": 1, "ring": False},
    "one-map-ring": {"maps": 1, "ring": True},
    "one-map-ring-r168": {"maps": 1, "ring": True, "maxnreg": 168},
    "one-map-unstaged": {"maps": 1, "stage": False},
    "two-maps-ring": {"maps": 2, "ring": True},
    "one-map-tail-first-defer": {"maps": 1, "tail_first": True, "defer_sum": True},  # grid order, partial sums
    "two-maps-defer": {"maps": 2, "defer_sum": True},
    "one-map-fold": {"maps": 1, "fold_tail": True},  # the tail taken by the last page split
    "one-map-subnormal": {"maps": 1, "subnormal_values": True},  # value codes as fp16 subnormals
    "two-maps-subnormal": {"maps": 2, "subnormal_values": True},
    "one-map-ring-subnormal": {"maps": 1, "ring": True, "subnormal_values": True},
    "one-map-pieces": {"maps": 1, "piece_buffers": True},  # a shared allocation per staged piece
    "one-map-ring-pieces": {"maps": 1, "ring": True, "piece_buffers": True},
    "one-map-page-max": {"maps": 1, "page_max": True},  # a page's scores first, one rescale check per page
    "one-map-subnormal-page-max": {"maps": 1, "subnormal_values": True, "page_max": True},
    "two-maps-subnormal-page-max": {"maps": 2, "subnormal_values": True, "page_max": True},
    "one-map-unstaged-subnormal-page-max": {"maps": 1, "stage": False, "subnormal_values": True, "page_max": True},
    "one-map-subnormal-keys": {"maps": 1, "subnormal_keys": True},  # key codes as subnormals too (with the defaults)
    "two-maps-subnormal-keys": {"maps": 2, "subnormal_keys": True},
    "one-map-ring-subnormal-keys": {"maps": 1, "ring": True, "subnormal_keys": True},
    "one-map-tma": {"maps": 1, "tma_pages": True},  # staged pages copied by TMA (aligned chunks, an mbarrier)
    "two-maps-tma": {"maps": 2, "tma_pages": True},
    "one-map-no-tma": {"maps": 1, "tma_pages": False},  # cp.async staging (the default picks TMA for long splits)
}


@gpu
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("head_size", [64, 128])
def test_schedules(schedule, preset, head_size):
    """One channel map (4-bit codes read into the 2-bit map), the ring of one staged page and a register cap
    change the schedule, not the function; several pages per split so that the ring refills."""
    _compare(_layout(128, head_size, preset), 2, 4, LENGTHS[128] + [(128 * 11 + 3, 0)], num_splits=3,
             **SCHEDULES[schedule])


@gpu
@pytest.mark.parametrize("schedule", ["one-map-ring", "one-map-ring-r168", "one-map-tail-first-defer", "one-map-fold",
                                      "one-map-subnormal-page-max", "one-map-tma"])
@pytest.mark.parametrize("num_splits", [1, 2, 64])
def test_schedule_splits(schedule, num_splits):
    """The ring with one split (every page in one program), two, and more splits than pages (empty splits); the
    tail's programs first in the grid with one split (no tail program of its own), two and many; the tail taken by
    the last of 1, 2 and 64 page splits."""
    _compare(_layout(128, 128, "vllm"), 2, 4, [(128 * 9 + 5, 0), (128 * 2, 0), (1, 0)], num_splits=num_splits,
             **SCHEDULES[schedule])


@gpu
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("head_size", [64, 128])
def test_unstaged_presets(preset, head_size):
    """The register-load path (no shared memory) on every preset (the default stages pages)."""
    _compare(_layout(128, head_size, preset), 2, 4, LENGTHS[128], stage=False)


@pytest.mark.parametrize("piece_buffers", [False, True])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_stage_plan(block_size, head_size, preset, piece_buffers):
    """Staged pages: every byte the kernel reads is in exactly one aligned piece, pieces do not overlap in shared
    memory, views start at multiples of their size, and the operand views are bit permutations;
    ``piece_buffers``: one piece per segment, the same bytes in all."""
    layout = _layout(block_size, head_size, preset)
    if not v2.supported(layout):
        pytest.skip("layout not read by v2")
    tiles = v2.chunks(layout)
    segments, pieces = v2.stage_plan(layout, tiles, piece_buffers)
    assert all(s & (s - 1) == 0 for s in segments)
    if piece_buffers:
        assert len(segments) == len(pieces) and sorted(p[2] for p in pieces) == list(range(len(pieces)))
        assert sum(segments) == sum(v2.stage_plan(layout, tiles)[0])
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
    groups = v2.ring_groups(layout, tiles, pieces)  # the ring refills every piece once, in its chunk's group
    assert sorted(p[:4] for p in groups) == sorted(pieces)
    assert {p[4] for p in groups} == set(range(len(tiles) + 1))
    for off, _nb, _, _, gi in groups:
        if gi:
            start = tiles[gi - 1][0]
            assert off in (tiles[gi - 1][3], tiles[gi - 1][5], layout.v_tok_off + 2 * start,
                           layout.v_tok_off + 2 * (layout.block_size + start)), (off, gi)
    if layout.bits_high == 4 and layout.bits_low == 2:  # one map: the 4-bit tiles' views in the 2-bit map
        for _start, rows, k_hi, _, v_hi, _ in tiles:
            for kind, hi in (("key", k_hi), ("value", v_hi)):
                view, _ = v2.shared_operand(kind, 4 if hi else 2, d, rows, 2)
                assert len(view.offset_bases) == (rows * 16).bit_length() - 1


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
@pytest.mark.parametrize("bits, map_bits", [(2, 2), (4, 4), (4, 2)])
def test_unpack_asm_operands(d, bits, map_bits):
    """Every output register is written once; inputs are the registers the loads provide."""
    for make in (v2.key_unpack_asm, v2.value_unpack_asm):
        asm, cons, nin = make(bits, d, map_bits) if make is v2.key_unpack_asm else make(bits, d)
        outs = 4 * (d // 16)
        assert cons.count("=r") == outs and cons.count(",r") + cons.startswith("r") == nin
        assert nin == d * bits // 64
        for i in range(outs):
            assert asm.count(f"lop3.b32 ${i}, ") == 1, (make.__name__, i)
        assert f"${outs + nin}" not in asm


def test_resident_programs():
    """Programs per SM by registers and shared memory: the staged pair of the vllm page (28 KB) allows 8, a ring
    of one page 15; 168 registers allow 12, 255 allow 8."""
    layout = _layout(128, 128, "vllm")
    assert v2.resident_programs(layout, True, False, None) == 8
    assert v2.resident_programs(layout, True, True, None) == 8
    assert v2.resident_programs(layout, True, True, 168) == 12
    assert v2.resident_programs(layout, True, True, 128) == 15
    assert v2.resident_programs(layout, True, False, 168) == 8


def test_supported():
    assert v2.supported(_layout(128, 128, "vllm")) and v2.supported(_layout(128, 64, "r0.6"))
    assert not v2.supported(PageLayout(128, 128, bits_high=8, bits_low=4))
    assert not v2.supported(PageLayout(128, 256))
    assert math.isclose(PageLayout(128, 128, salient_ratio=0.6).num_salient_k % 16, 0)


# ------------------------------------------------------------------ the lane's loads + unpack PTX, emulated on the CPU
def _run_ptx(asm: str, regs: dict) -> dict:
    """Execute the unpack PTX (``shr``, ``prmt``, ``lop3 0xEA``) on 32-bit register values."""

    def val(name):
        return regs[name] if name in regs else int(name, 0)

    for ins in asm.strip("{} ").split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, args = ins.split(None, 1)
        a = [x.strip() for x in args.split(",")]
        if op == "shr.b32":
            regs[a[0]] = val(a[1]) >> int(a[2])
        elif op == "lop3.b32":
            assert a[4] == "0xEA"  # (a & b) | c
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "prmt.b32":
            pool = val(a[1]) | val(a[2]) << 32
            sel = int(a[3], 0)
            regs[a[0]] = sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        else:
            raise AssertionError(f"unexpected PTX {op}")
    return regs


def _halves(word: int) -> tuple[float, float]:
    import struct

    return struct.unpack("<2e", word.to_bytes(4, "little"))


def _lane_inputs(packed, es: int, nin: int, offsets: list[int], first: int) -> dict:
    """The asm's input registers ``$first ..`` from the lane's 8 loaded elements (register order), as Triton
    packs them (16- and 8-bit elements share a 32-bit register, the first in the low bits)."""
    elems = [int.from_bytes(bytes(packed[o : o + es]), "little") for o in offsets]
    per = 4 // es
    return {f"${first + i}": sum(elems[per * i + k] << (8 * es * k) for k in range(per)) for i in range(nin)}


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits, map_bits", [(2, 2), (4, 4), (4, 2)])
def test_unpack_reads_the_channel_map(d, bits, map_bits):
    """Every lane's loads (``key_address`` / ``value_address``) and unpack PTX give ``offset + code`` of exactly
    the channel its map names, for a random tile of 32 page rows packed as pages store them (``pack_row``);
    ``(4, 2)``: 4-bit codes read into the 2-bit map (``maps=1``)."""
    rows, planes = 32, d // 16
    gen = torch.Generator().manual_seed(bits * d)
    codes = torch.randint(0, 1 << bits, (rows, d), generator=gen, dtype=torch.uint8)
    flat = paged.pack_row(codes, bits).reshape(-1).tolist()
    es = d * bits // 128
    for kind in ("key", "value"):
        make = v2.key_unpack_asm if kind == "key" else v2.value_unpack_asm
        asm, _, nin = make(bits, d, map_bits) if kind == "key" else make(bits, d)
        base = 4 * planes
        for tile in range(rows // 16):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                offs = []
                for e in range(8):  # register order of the A fragment: bit 0 -> +1, bit 1 -> row + 8, bit 2 -> +8
                    lo, mid, hi = e & 1, (e >> 1) & 1, e >> 2
                    if kind == "key":  # A = K [rows, 16]: (page row, column)
                        addr = v2.key_address(bits, d, 16 * tile + g + 8 * mid, 2 * t + lo + 8 * hi, map_bits)
                    else:  # A = V^T [16, rows]: (channel row, page row)
                        addr = v2.value_address(bits, d, g + 8 * mid, 16 * tile + 2 * t + lo + 8 * hi, map_bits)
                    offs.append(addr * es)
                regs = _run_ptx(asm, _lane_inputs(flat, es, nin, offs, base))
                sub_asm = v2.key_unpack_asm(bits, d, map_bits, True) if kind == "key" else v2.value_unpack_asm(
                    bits, d, True)
                sub = _run_ptx(sub_asm[0], _lane_inputs(flat, es, nin, offs, base))
                for j in range(planes):
                    for r in range(4):
                        mh, h = r % 2, r // 2
                        for half, x in enumerate(_halves(regs[f"${4 * j + r}"])):
                            if kind == "key":
                                row, ch = 16 * tile + g + 8 * mh, v2.key_channel(map_bits, d, j, 2 * t + half + 8 * h)
                            else:
                                row, ch = 16 * tile + 2 * t + half + 8 * h, v2.value_channel(map_bits, d, j, g + 8 * mh)
                            offset = 2.0 ** math.floor(math.log2(x))
                            assert x - offset == codes[row, ch], (kind, tile, lane, j, r, half, x)
                            y = _halves(sub[f"${4 * j + r}"])[half]  # subnormal: code * 2^(shift - 24)
                            assert y == codes[row, ch] * 2.0**-14 / offset, (kind, tile, lane, j, r, half, y)


def test_page_max_default_only_without_ring():
    """``PAGE_MAX`` applies where the ring is off (the ring refills a chunk's bytes once its values are read);
    asked for together with the ring, the launch refuses."""
    page_max = 8  # its place in _schedule's tuple
    assert v2._schedule(1, True, None)[page_max] is False
    assert v2._schedule(1, False, None)[page_max] == v2.PAGE_MAX
    assert v2._schedule(1, True, None, page_max=True)[page_max] is True  # explicit: decode_attention_v2 refuses it


def test_schedule_names_follow_the_launch_options():
    """``SCHEDULE`` lists ``_schedule``'s parameters in order, each with its module default."""
    assert list(v2.SCHEDULE) == list(inspect.signature(v2._schedule).parameters)
    assert v2.schedule_defaults()["defer_sum"] == v2.DEFER_SUM and all(hasattr(v2, c) for c in v2.SCHEDULE.values())


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tma_boxes(block_size, head_size, preset):
    """TMA staging (``tma_pages``): aligned chunks start at multiples of their rows and tile the page; every
    piece is one box of at most 256 rows of ``W`` words at a row offset that lands on its page bytes, the per-token
    value parameters are one piece holding every chunk's view at a multiple of its size, the value normalizer is not
    staged, and two staged pages plus their mbarriers fit the shared memory of eight programs per SM."""
    layout = _layout(block_size, head_size, preset)
    if not v2.supported(layout) or not v2.tma_supported(layout):
        pytest.skip("layout not staged by TMA")
    tiles = v2.chunks(layout, v2.MAX_CHUNK, True)
    assert all(start % rows == 0 for start, rows, *_ in tiles)
    assert sum(rows for _, rows, *_ in tiles) == layout.block_size
    assert [t[0] for t in tiles] == sorted(t[0] for t in tiles)
    segments, pieces = v2.stage_plan(layout, tiles, True, True)
    boxes, shapes = v2.tma_boxes(pieces)
    assert len(boxes) == len(pieces) == len(segments)
    for (off, nb, seg, word), (bseg, desc, row, per128, rows, w) in zip(pieces, boxes, strict=True):
        assert bseg == seg and word == 0 and shapes[desc] == (rows, w) and rows <= 256 and w * 4 >= 16
        assert rows * w * 4 == nb == segments[seg] * 4 and row * w * 4 == off and per128 * w == 32
    assert (layout.v_norm_off, 2 * head_size) not in {(o, n) for o, n, _, _ in pieces}
    vtok = v2._locate(pieces, layout.v_tok_off)
    for start, rows, *_ in tiles:
        for off in (layout.v_tok_off + 2 * start, layout.v_tok_off + 2 * (layout.block_size + start)):
            seg, word = v2._locate(pieces, off)
            assert seg == vtok[0] and word % (rows // 2) == 0
    if layout.page_bytes <= 14208:  # the vllm preset at head size 128 and smaller pages
        assert 8 * (2 * 4 * sum(segments) + 16 + 1024) <= 233472


def test_tma_wanted():
    """``tma_pages="auto"`` takes TMA only for long page splits (the last split holds the tail unless folded)."""
    n = v2.TMA_MIN_PAGES
    assert v2.tma_wanted("auto", 8 * n, 9) and not v2.tma_wanted("auto", 8 * n - 1, 9)
    assert v2.tma_wanted("auto", n, 1) and not v2.tma_wanted("auto", n - 1, 1)
    assert v2.tma_wanted("auto", 3 * n, 3, True) and not v2.tma_wanted("auto", 3 * n, 4, True)
    assert v2.tma_wanted(True, 1, 64) and not v2.tma_wanted(False, 10**6, 1)


@gpu
def test_tma_descriptors_do_not_keep_the_cache_alive():
    """The descriptors kept per cache tensor hold a view of its memory: they go with the tensor."""
    import gc

    cache = torch.zeros(4, 2, 14208, dtype=torch.uint8, device="cuda")
    key_count = len(v2._DESCRIPTORS)
    first = v2.tma_descriptors(cache, ((32, 32), (8, 32)))
    assert v2.tma_descriptors(cache, ((32, 32), (8, 32))) is first and len(v2._DESCRIPTORS) == key_count + 1
    del cache, first
    gc.collect()
    assert len(v2._DESCRIPTORS) == key_count


def test_tma_cache():
    """TMA staging needs pages at multiples of 128 bytes (layout and strides) and int32 row counts."""
    n = 4 * 2 * 14208
    base = torch.zeros(n + 256, dtype=torch.uint8)
    at = -base.data_ptr() % 128  # a host allocation need not start at a multiple of 128 bytes
    assert v2.tma_cache(base[at:at + n].view(4, 2, 14208))
    assert not v2.tma_cache(base[at + 16:at + 16 + n].view(4, 2, 14208))  # the address off the grid
    assert not v2.tma_cache(torch.empty(4, 2, 14208 + 16, dtype=torch.uint8, device="meta")[:, :, :14208])  # stride
    assert v2.tma_cache(torch.empty(2**21, 8, 14208, dtype=torch.uint8, device="meta"))  # 238 GB: rows fit int32
    assert not v2.tma_cache(torch.empty(2**22, 8, 14208, dtype=torch.uint8, device="meta"))  # 477 GB: they do not
