"""Decode attention v2 over mixed-precision pages (Hopper/Ampere tensor cores, written in Gluon).

Twin: ``zipcache_vllm.engine.paged.decode_attention``. Same arguments as ``decode_attention`` (v1), plus the row
log-sum-exp the saliency update needs; one launch per layer and step (split-K partials are merged in the
kernel by the last program of each (sequence, KV head), through a self-resetting counter).

Why a second kernel. v1 (plain Triton) puts the ``G`` query heads of a KV head on the 16 MMA rows and
unpacks codes into a blocked layout that Triton then moves through shared memory into the tensor-core operand
layout; at batch 16 / 32k it ran at 0.89x bf16 SDPA while reading 4.4x fewer bytes. v2:

* **swap A/B**: page rows (tokens) are the M dimension of ``mma.m16n8k16``, the query heads the N = 8
  dimension (``S^T = K q'^T``, ``O^T = V^T P^T``), so 4 query heads waste half of N instead of 3/4 of M;
* **codes straight into operand registers**: a lane loads exactly the bytes its A fragment needs from the
  row-packed page (``paged.pack_row``) and turns them into fp16 pairs with ``lop3`` + one ``sub``/``fma``
  per pair (inline PTX), no shared memory on the operand path. The row packing puts channels ``i, i + D/m,
  ...`` into one byte, so a lane's fragment holds a fixed *permutation* of the channels: q, the key
  parameters and the value normalizer are read through the same permutation (``key_channel``, ``value_channel``);
* layout v2 quotas (multiples of 16 rows) make every 16-row tile one key width and one value width;
* per-chunk online softmax with lazy rescaling (only when a row max grows by more than 2^8).

Pages need ``bits_high, bits_low`` in {2, 4}, ``head_size`` 64 or 128, salient quotas in multiples of 16
(:func:`supported`); other layouts use v1.
"""

from __future__ import annotations

import functools
import weakref

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._common import LOG2E, check, check_decode_inputs, check_tensor, num_sms, pow2

MAX_CHUNK = 64  # page rows per chunk (the softmax/rescale step)
TAIL_CHUNK = 32  # bf16 tail rows per step
PROGRAMS_PER_SM = 8  # one-warp programs resident per SM (255 registers; a staged page pair is 28 KB of shared
# memory): the split count aims at one wave of them (H200 sweep: B16/32k 9 splits 154 us, 17: 157, 33: 172)
MIN_PAGES_PER_SPLIT = 2  # fewer, longer splits at batch 1: the in-kernel merge is on the critical path there
PREFETCH_PAGES = 0  # pages ahead a program asks L2 to fetch; 1, 2, 4 measured slower on the H200 (spike)
RESCALE_LOG2 = 8.0  # lazy rescale: the running max moves only when a score exceeds it by 2^8
STAGE_PAGES = 2  # pages in shared memory per program: the next page is copied (cp.async) while one is read
MAPS = 1  # channel maps of the page loop: 1 = 4-bit codes read into the 2-bit map (one value accumulator, one q,
# one value normalizer), 2 = each code width its own. H200 spike (3be1840), vllm preset, us, 2 -> 1 maps: B16/32k
# 155.7 -> 152.1, B64/4k 95.3 -> 86.9, B1/4k 13.3 -> 12.5
RING = False  # staged pages in one buffer refilled piece by piece (page pg + 1's parameters once page pg's are in
# registers, its chunk c once chunk c of page pg is read): half the shared memory of a staged pair; same speed at 8
# programs per SM (H200: 152.7 vs 152.1 us at B16/32k), and the register caps that would let more programs in lose
MAXNREG = None  # ptxas register cap per thread (None: 255); one map + ring at 200 / 184 / 168: B16/32k 200 / 198 /
# 188 us (10 / 11 / 12 programs per SM) against 152 at 255
FOLD_TAIL = False  # the bf16 tail taken by the last page split instead of a program of its own (num_splits then
# counts page splits only). H100 spike (5fc2ebe; the same page splits, one program fewer per (sequence, KV head)),
# us, off -> on: B64/4k 107.3 -> 113.4, B16/32k 185.0 -> 192.4, B1/4k 12.8 -> 18.2, B16/4k 41.5 -> 40.7; kept off
TAIL_FIRST = False  # the bf16 tail programs launched before the page programs (grid order), so that they run while
# the page programs start instead of queueing for the few slots the page programs leave free. H200 spike (cad2561):
# slower at 4k (B64 90.0 -> 92.0 us, B16 35.1 -> 36.4), faster only at B64/32k (550 -> 531); kept off
PIECE_BUFFERS = True  # every piece of a staged page (stage_plan) in a shared allocation of its own instead of packed
# into power-of-two segments: Triton then sees the cp.async writes of one page as disjoint (no barrier between them;
# the page loop loses 10 BAR.SYNC). H200 spike (4a1062c, vllm preset, us, with SUBNORMAL_VALUES): B16/32k 141.2 ->
# 139.6, B64/4k 84.8 -> 86.6, B1/4k 12.9 -> 12.8; H100 (bdba9d3, with both others): B16/32k 179.3 -> 178.5
PAGE_MAX = True  # the scores of a whole page first, then one softmax max and rescale check for the page instead
# of one per chunk (fewer cross-lane reductions and branches; all of the page's scores live at once; not with RING):
# page loop 1,712 -> 1,635 instructions executed without a rescale (sass_decode_v2.py), 254 registers, no spill. H100
# spike (bdba9d3, vllm, us, with SUBNORMAL_VALUES): B16/32k 181.7 -> 179.3, B64/4k 108.3 -> 107.7, B16/4k 40.2 -> 41.5
SUBNORMAL_KEYS = True  # key codes as fp16 subnormals too: q' carries 2^-shift, the scores come out in units of
# 2^-24 (scaled back inside the softmax's subtraction) and the page bias loses its offset half (one MMA chain):
# page loop 1,806 -> 1,772 instructions. H100 spike (4785aa9, vllm, us, off / on interleaved twice): B16/32k
# 183.3 / 181.6 -> 180.1 / 180.5, B64/4k 107.6 / 107.8 -> 107.6 / 108.4, B1/4k 13.1 / 13.0 -> 12.9 / 12.8
SUBNORMAL_VALUES = True  # value codes unpacked as fp16 subnormals (``code * 2^(shift - 24)``, no offset): the
# value accumulator of a page is scaled once per value group instead of corrected per chunk (no code-offset sums:
# 8 HMMA and 12 SHFL fewer per page). H200 spike (4a1062c, vllm preset, us, against the default measured twice in
# the same run): B16/32k 148.9 / 145.6 -> 141.2, B64/4k 87.5 / 87.3 -> 84.8, B1/4k 13.1 / 13.0 -> 12.9
TMA_PAGES = "auto"  # a staged page copied by the tensor memory accelerator (one TMA copy per piece into its own
# buffer, completion counted on an mbarrier) instead of cp.async by every lane: page loop 1,772 -> 1,718 instructions
# (no LDGSTS and their addresses; 10 UTMALDG, each after a BAR.SYNC that Triton puts between copies signalling one
# mbarrier). Needs staged pages without the ring and a cache whose pages start at multiples of 128 bytes (else
# cp.async). H100 spike (2e58f31 + this option, us, off / on, twice each): vllm B16/32k 180.6 / 180.6 -> 177.0 /
# 178.3, B64/4k 105.8 / 106.4 -> 107.3 / 107.5, B1/4k 12.7 / 12.8 -> 13.2 / 13.4, B16/4k 42.3 / 42.5 -> 44.2 / 44.5;
# r0.6 B16/32k 248.2 -> 231.0, B64/4k 139.2 -> 131.6, B1/4k 13.0 -> 13.6: it pays over many pages per program and
# costs ~0.5 us per program at the start (the descriptors' first fetch), so "auto" = where a page split of the
# block table holds at least TMA_MIN_PAGES pages
TMA_MIN_PAGES = 32
TMA_LAYOUT = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))  # a TMA box in
# shared memory: rows of int32 words, unswizzled (the staged piece's bytes in page order)
DEFER_SUM = True  # the softmax denominator kept as per-lane partial sums over 16-row tiles, summed across lanes
# once per program instead of once per chunk (three shuffle rounds fewer per chunk). H200 spike (cad2561), vllm
# preset, us, off -> on: B64/4k 90.0 -> 86.6, B16/32k 152.3 -> 150.0, B64/32k 550.2 -> 523.2, B1/4k 12.4 -> 12.5


# --------------------------------------------------------------------------------------------- channel maps
# A lane of mma.m16n8k16 holds rows (g, g + 8) and k-columns (2t, 2t + 1, 2t + 8, 2t + 9) of each 16 x 16
# A tile (g = lane // 4, t = lane % 4). Codes are unpacked into "planes" of 16 columns; plane j, column kk
# (keys) or plane j, row m (values) is one channel of the head, given by these maps.
def key_channel(bits: int, d: int, j: int, kk: int) -> int:
    """Channel of column ``kk`` of key plane ``j`` (the A operand ``K [rows, D]``, tokens on M)."""
    t, p, h = (kk % 8) // 2, kk % 2, kk // 8
    if bits == 4:
        return t * (d // 8) + 4 * (j // 2) + (j % 2) + 2 * p + (d // 2) * h
    return t * (d // 16) + 4 * (j // 4) + h + 2 * p + (d // 4) * (j % 4)


def value_channel(bits: int, d: int, j: int, m: int) -> int:
    """Channel of row ``m`` of value plane ``j`` (the A operand ``V^T [D, rows]``, channels on M)."""
    lbv = d * bits // 64  # bytes of one page row a lane reads
    g, mh = m % 8, m // 8
    if bits == 4:
        return g * lbv + j + (d // 2) * mh
    return g * lbv + (j % lbv) + (d // 4) * (2 * mh + j // lbv)


def param_load_plan(kind: str, bits: int, d: int) -> tuple:
    """How a lane loads the per-channel page parameters it needs (key step/mn in the key map, value normalizer
    in the value map) with wide loads: a ``[NO, NL, RUN]`` tensor in channel order (``RUN`` contiguous
    channels per register run, ``NL`` lanes: t for keys, g for values, the other lanes broadcast), then a
    reshape into bits, a permutation and a reshape into the map order, which moves no data.

    Returns ``(layout, NO, NL, RUN, OS, split_shape, perm)``; channel = ``OS * o + RUN * lane + r``."""
    lb = lambda n: n.bit_length() - 1  # noqa: E731
    if kind == "key":
        nl, lane_bits = 4, ["t0", "t1"]
        target = ["p", "t0", "t1", "h"] + [f"j{i}" for i in range(lb(d // 16))]
        if bits == 4:
            no, run, os_ = 2, d // 8, d // 2
            r_bits, o_bits = ["j0", "p"] + [f"j{i}" for i in range(1, lb(d // 16))], ["h"]
        else:
            no, run, os_ = 4, d // 16, d // 4
            r_bits, o_bits = ["h", "p"] + (["j2"] if d == 128 else []), ["j0", "j1"]
        lanes = [[0, 1, 0], [0, 2, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    else:
        nl, lane_bits = 8, ["g0", "g1", "g2"]
        target = ["g0", "g1", "g2", "mh"] + [f"j{i}" for i in range(lb(d // 16))]
        if bits == 4:
            no, run, os_ = 2, d // 16, d // 2
            r_bits, o_bits = [f"j{i}" for i in range(lb(run))], ["mh"]
        else:
            no, run, os_ = 4, d // 32, d // 4
            r_bits, o_bits = [f"j{i}" for i in range(lb(run))], [f"j{lb(run)}", "mh"]
        lanes = [[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
    regs = [[0, 0, 1 << k] for k in range(lb(run))] + [[1 << k, 0, 0] for k in range(lb(no))]
    layout = gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=[], block_bases=[],
                                        shape=[no, nl, run])
    dims = o_bits[::-1] + lane_bits[::-1] + r_bits[::-1]  # the bit dims after the reshape, most significant first
    perm = tuple(dims.index(b) for b in target[::-1])
    return layout, no, nl, run, os_, (2,) * len(dims), perm


# --------------------------------------------------------------------------------------------- unpack PTX
def _magic(shift: int) -> int:
    """fp16 bits of 2^(10 - shift): OR-ed above a code whose lowest bit sits at mantissa bit ``shift``, the
    pair reads ``2^(10 - shift) + code`` exactly (the offset is taken out after the MMA, see FIELD_OFFSET)."""
    return (25 - shift) << 10


def _extract(dst: str, src: str, bits: int, field: int, subnormal: bool = False) -> str:
    """fp16 pair ``offset + code`` of the code at ``field`` (in units of ``bits``) of both 16-bit halves of
    ``src``: one ``lop3`` ((src & mask) | magic). ``subnormal``: no magic, the pair is the subnormal
    ``code * 2^(field * bits - 24)`` (exact while the field ends below bit 10)."""
    mask = ((1 << bits) - 1) << (field * bits)
    magic = 0 if subnormal else _magic(field * bits) * 0x10001
    if subnormal and field * bits + bits > 10:
        raise ValueError(f"a {bits}-bit field at bit {field * bits} is not a subnormal fp16")
    return f"lop3.b32 {dst}, {src}, {mask * 0x10001:#x}, {magic:#x}, 0xEA; "


_PRELUDE = ".reg .b32 x<8>, y<8>; "


def crosses(bits: int, map_bits: int) -> bool:
    """Whether a tile of ``bits``-bit codes is read into the channel map of ``map_bits`` (4-bit codes in the
    2-bit map: then one map serves every tile of a page, see ``MAPS``)."""
    return bits == 4 and map_bits == 2


def key_unpack_asm(bits: int, d: int, map_bits: int = 0, subnormal: bool = False) -> tuple[str, str, int]:
    """(PTX, constraints, input registers) turning a lane's key bytes of one 16-row tile into ``D/16`` fp16
    A-fragments (4 registers each), in the channel map of ``map_bits`` (default ``bits``). Input register
    ``q``: row ``g + 8 (q % 2)``, word ``q // 2`` of the lane's ``D bits / 32`` bytes of that row
    (``_key_offsets``). Read into the 2-bit map, a 4-bit row's byte ``b`` holds channels ``b`` and ``b + D/2``:
    plane ``j`` takes nibble ``j1`` of the lane's words ``(j0, j2)`` (bit ``i`` of ``j`` is ``ji``)."""
    planes, nin = d // 16, d * bits // 64
    cross = crosses(bits, map_bits)
    out = []
    body = ""
    shifted = set()
    for j in range(planes):
        for r in range(4):  # r = mh + 2 h: (row g | g + 8) x (columns 2t.. | 2t + 8..)
            mh, h = r % 2, r // 2
            if cross:
                word = (j & 1) * (2 if d == 64 else 4) + (j >> 2) * 2
                q, sigma, field = mh + word, h, (j >> 1) & 1
            elif bits == 4:
                q, sigma, field = mh + 2 * (j // 2), j % 2, h
            else:
                q, sigma, field = mh + 2 * (j // 4), h, j % 4
            src = f"${4 * planes + q}"
            if sigma:
                if q not in shifted:
                    body += f"shr.b32 y{q}, {src}, 8; "
                    shifted.add(q)
                src = f"y{q}"
            dst = f"${4 * j + r}"
            body += _extract(dst, src, bits, field, subnormal)
            out.append(dst)
    cons = ",".join(["=r"] * (4 * planes) + ["r"] * nin)
    return "{ " + _PRELUDE + body + "}", cons, nin


def value_unpack_asm(bits: int, d: int, subnormal: bool = False) -> tuple[str, str, int]:
    """(PTX, constraints, input registers) turning a lane's value bytes of one 16-token step into ``D/16``
    fp16 A-fragments of ``V^T`` (4 registers each; a register pairs tokens ``2t, 2t + 1`` of one channel).
    Input registers as ``_value_offsets`` loads them (``value_es`` bytes per element). ``subnormal``: the
    fragments hold ``code * 2^(shift - 24)`` instead of ``offset + code`` (``SUBNORMAL_VALUES``)."""
    planes, lbv = d // 16, d * bits // 64
    es = lbv // 2
    nin = lbv
    body = ""
    paired: dict = {}

    def pw(i: int, h: int) -> str:  # the register holding lane bytes 2i, 2i + 1 of tokens (2t, 2t + 1) + 8h
        key = (i, h)
        if key in paired:
            return paired[key]
        if es == 4:  # whole words of each row: interleave the two rows' bytes
            w, y = i // 2, i % 2
            a, b = f"${4 * planes + 2 * w + 4 * h}", f"${4 * planes + 2 * w + 4 * h + 1}"
            name = f"x{len(paired)}"
            body_ = f"prmt.b32 {name}, {a}, {b}, {0x7632 if y else 0x5410:#x}; "
        else:
            name = f"${4 * planes + (i + 2 * h if es == 2 else h)}"
            body_ = ""
        paired[key] = name
        nonlocal body
        body += body_
        return name

    shifted: dict = {}
    for j in range(planes):
        for r in range(4):  # r = mh + 2 h: (channel row g | g + 8) x (tokens 2t.. | 2t + 8..)
            mh, h = r % 2, r // 2
            if bits == 4:
                bb, field = j, mh
            else:
                bb, field = j % lbv, (j // lbv) + 2 * mh
            src = pw(bb // 2, h)
            if bb % 2:
                if src not in shifted:
                    shifted[src] = f"y{len(shifted)}"
                    body += f"shr.b32 {shifted[src]}, {src}, 8; "
                src = shifted[src]
            body += _extract(f"${4 * j + r}", src, bits, field, subnormal)
    cons = ",".join(["=r"] * (4 * planes) + ["r"] * nin)
    return "{ " + _PRELUDE + body + "}", cons, nin



# --------------------------------------------------------------------------------------------- shared views
# With ``STAGE_PAGES`` pages in flight a program copies whole pages into shared memory (cp.async, no registers
# held while the copy is in flight) and reads each lane's fragment bytes from there. The fragment patterns
# below are the same as the global loads' (``_key_offsets``, ``_value_offsets``): a bit permutation of the
# tensor coordinates, so a chunk's codes are a shared view with an explicit linear layout, and the load goes
# into a register order sorted by address (wide ``ld.shared``), then a register permutation into the operand.
def _lg(n: int) -> int:
    return n.bit_length() - 1


def key_address(bits: int, d: int, m: int, kk: int, map_bits: int = 0) -> int:
    """Element address (units of the key load element, ``d * bits / 128`` bytes) of key operand ``(m, kk)``
    inside its chunk's codes: the byte offsets of ``_key_offsets`` divided by the element size."""
    es, rb, lb = d * bits // 128, d * bits // 8, d * bits // 32
    t, p, h, mh = (kk % 8) // 2, kk % 2, kk // 8, (m % 16) // 8
    base = (m // 16) * 16 + m % 8
    if crosses(bits, map_bits) and es == 4:  # words (j2, j0) = (mh, h) of row g + 8 p
        off = (base + 8 * p) * rb + t * (d // 16) + 4 * mh + (d // 4) * h
    elif crosses(bits, map_bits):  # halves p of word j0 = h of row g + 8 mh
        off = (base + 8 * mh) * rb + t * (d // 16) + (d // 4) * h + 2 * p
    elif es == 4:
        off = (base + 8 * p) * rb + t * lb + 4 * (mh + 2 * h)
    elif es == 2:
        off = m * rb + t * lb + 4 * h + 2 * p
    else:
        off = (base + 8 * h) * rb + t * lb + p + 2 * mh
    return off // es


def value_address(bits: int, d: int, m: int, k: int, map_bits: int = 0) -> int:
    """Element address of value operand ``(m, k)`` (``V^T``: channel row m, token k) inside its chunk's codes,
    as ``_value_offsets`` loads it."""
    es, rb, lbv = d * bits // 128, d * bits // 8, d * bits // 64
    g, mh = m % 8, m // 8
    if crosses(bits, map_bits):  # the 2-bit map's lane bytes: two runs of D/32 bytes, D/4 apart
        off = k * rb + g * (d // 32) + (d // 4) * mh
    elif es == 1:
        off = ((k // 16) * 16 + 2 * ((k % 8) // 2) + mh + 8 * ((k % 16) // 8)) * rb + g * lbv + k % 2
    else:
        off = k * rb + g * lbv + es * mh
    return off // es


def operand_bases(shape: tuple) -> tuple[list, list]:
    """(reg_bases, lane_bases) of ``mma.m16n8k16``'s A operand (k_width 2, one warp) over ``shape``."""
    lanes = [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]]
    regs = [[0, 1], [8, 0], [0, 8]]
    regs += [[16 << i, 0] for i in range(_lg(shape[0] // 16))] + [[0, 16 << i] for i in range(_lg(shape[1] // 16))]
    return regs, lanes


def _address_bases(shape: tuple, address) -> list:
    """``offset_bases`` of a shared linear layout: for address bit i, the coordinate stored there. Checks that
    ``address`` is a bit permutation of the coordinates (every element once, XOR-linear)."""
    coords = [[0] * len(shape) for _ in range(sum(_lg(n) for n in shape))]
    seen = {}
    for dim, n in enumerate(shape):
        for b in range(_lg(n)):
            c = [0] * len(shape)
            c[dim] = 1 << b
            a = address(*c)
            if a <= 0 or a & (a - 1) or _lg(a) in seen or _lg(a) >= len(coords):
                raise ValueError(f"address map is not a bit permutation at {c} -> {a}")
            seen[_lg(a)] = c
    for i, c in seen.items():
        coords[i] = c
    return coords


@functools.lru_cache(maxsize=256)
def shared_operand(kind: str, bits: int, d: int, rows: int, map_bits: int = 0) -> tuple:
    """(view, load) layouts of one chunk's codes in shared memory: ``view`` a ``SharedLinearLayout`` of the
    operand tensor (keys ``[rows, 16]``, values ``[16, rows]``), ``load`` the operand's lane map with its
    registers ordered by address."""
    shape = (rows, 16) if kind == "key" else (16, rows)
    fn = key_address if kind == "key" else value_address
    address = lambda i, j: fn(bits, d, i, j, map_bits)  # noqa: E731
    bases = _address_bases(shape, address)
    regs, lanes = operand_bases(shape)
    regs = sorted(regs, key=lambda c: address(*c))
    view = gl.SharedLinearLayout(offset_bases=bases)
    load = gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=[], block_bases=[],
                                      shape=list(shape))
    return view, load


@functools.lru_cache(maxsize=64)
def shared_params(plan: tuple) -> gl.SharedLinearLayout:
    """Shared view of per-channel parameters in ``param_load_plan``'s ``[NO, NL, RUN]`` order."""
    _, no, nl, run, os_, _, _ = plan
    return gl.SharedLinearLayout(offset_bases=_address_bases((no, nl, run), lambda o, ln, r: o * os_ + ln * run + r))


def stage_plan(layout, tiles: tuple, piece_buffers: bool = False, tma: bool = False) -> tuple[tuple, tuple]:
    """Where a staged page lives in shared memory: ``(segments, pieces)``. Triton allocates power-of-two shapes,
    so the bytes a program reads (each chunk's key and value codes and per-token value parameters, the key
    parameters, the value normalizer: power-of-two pieces, 16-byte aligned) are packed into segments whose sizes are
    the binary digits of their total, largest pieces first (no padding). ``segments``: int32 words of each;
    ``pieces``: ``(page byte offset, bytes, segment, word offset)``. ``piece_buffers``: every piece a segment
    of its own (``PIECE_BUFFERS``). ``tma`` (``TMA_PAGES``, piece buffers): the per-token value parameters as one
    piece (read at any offset: flat views) and the value normalizer not staged (read from global memory once per
    page), so that a page takes few TMA copies and two staged pages and their mbarrier fit the shared memory of
    eight programs per SM."""
    d, n = layout.head_size, layout.block_size
    reads = {(layout.k_param_off, 8 * d)} | ({(layout.v_tok_off, 4 * n)} if tma else {(layout.v_norm_off, 2 * d)})
    piece_buffers = piece_buffers or tma
    for start, rows, k_hi, k_off, v_hi, v_off in tiles:  # a view must start at a multiple of its size
        if not tma:
            reads |= {(layout.v_tok_off + 2 * start, 2 * rows), (layout.v_tok_off + 2 * (n + start), 2 * rows)}
        reads.add((k_off, rows * d * (layout.bits_high if k_hi else layout.bits_low) // 8))
        reads.add((v_off, rows * d * (layout.bits_high if v_hi else layout.bits_low) // 8))
    reads = sorted(reads, key=lambda r: (-r[1], r[0]))
    words = sum(nb // 4 for _, nb in reads)
    segments = tuple(1 << b for b in range(_lg(words), -1, -1) if words >> b & 1)
    if piece_buffers:
        segments = tuple(nb // 4 for _, nb in reads)
    fill = [0] * len(segments)
    pieces = []
    for off, nb in reads:
        if nb & (nb - 1) or off % 16:
            raise ValueError(f"page piece at {off} of {nb} bytes is not a 16-byte aligned power of two")
        seg = next(i for i, size in enumerate(segments)
                   if size - fill[i] >= nb // 4 and not (piece_buffers and fill[i]))
        pieces.append((off, nb, seg, fill[seg]))
        fill[seg] += nb // 4
    return segments, tuple(pieces)


def ring_groups(layout, tiles: tuple, pieces: tuple) -> tuple:
    """``stage_plan``'s pieces with the group the ring refills them in, ``(off, bytes, segment, word, group)``:
    group 0 the page parameters, group ``1 + c`` chunk ``c``'s."""
    d, n = layout.head_size, layout.block_size
    groups = [{(layout.k_param_off, 8 * d), (layout.v_norm_off, 2 * d)}]
    for start, rows, k_hi, k_off, v_hi, v_off in tiles:
        groups.append({(layout.v_tok_off + 2 * start, 2 * rows), (layout.v_tok_off + 2 * (n + start), 2 * rows),
                       (k_off, rows * d * (layout.bits_high if k_hi else layout.bits_low) // 8),
                       (v_off, rows * d * (layout.bits_high if v_hi else layout.bits_low) // 8)})
    return tuple(pc + (i,) for i, g in enumerate(groups) for pc in pieces if (pc[0], pc[1]) in g)


def tma_boxes(pieces: tuple) -> tuple[tuple, tuple]:
    """TMA copies of a staged page's pieces (``TMA_PAGES``): ``(boxes, shapes)``. The cache is viewed as rows of
    ``W`` int32 words, ``W`` the widest of 32, 16, 8, 4 that divides the piece's page offset and size with at most
    256 rows per copy; ``shapes``: the distinct ``(rows, W)`` boxes, one tensor descriptor each; ``boxes``: per
    piece ``(segment, descriptor, first row counted from the page's, rows per 128 bytes, rows, W)`` (a page starts
    at a multiple of 128 bytes). Raises ``ValueError`` where a piece fits no box."""
    shapes, boxes = [], []
    for off, nb, seg, word in pieces:
        w = next((w for w in (32, 16, 8, 4) if off % (4 * w) == 0 and nb % (4 * w) == 0 and nb // (4 * w) <= 256),
                 None)  # fmt: skip
        if w is None or word:
            raise ValueError(f"page piece at {off} of {nb} bytes fits no TMA box")
        shape = (nb // (4 * w), w)
        if shape not in shapes:
            shapes.append(shape)
        if len(shapes) > TMA_DESCRIPTORS:
            raise ValueError(f"a page needs more than {TMA_DESCRIPTORS} TMA box shapes")
        boxes.append((seg, shapes.index(shape), off // (4 * w), 32 // w) + shape)
    return tuple(boxes), tuple(shapes)


@functools.lru_cache(maxsize=64)
def tma_plan(layout, max_chunk: int = MAX_CHUNK) -> tuple | None:
    """A page of this layout staged by TMA: ``(tiles, segments, pieces, boxes, shapes)`` (aligned ``chunks``,
    ``stage_plan(..., tma=True)``, ``tma_boxes``), or None where it cannot be: TMA needs ``tma_boxes`` of its
    pieces, each piece a multiple of 128 bytes (every shared buffer then starts at one: Triton places buffers by
    decreasing size), and the page size a multiple of 128 bytes (every page of a contiguous cache starts at one)."""
    if not stage_supported(layout) or layout.page_bytes % 128:
        return None
    tiles = chunks(layout, max_chunk, True)
    try:
        segments, pieces = stage_plan(layout, tiles, True, True)
        boxes, shapes = tma_boxes(pieces)
    except ValueError:
        return None
    return (tiles, segments, pieces, boxes, shapes) if all(nb % 128 == 0 for _, nb, _, _ in pieces) else None


def tma_supported(layout, max_chunk: int = MAX_CHUNK) -> bool:
    """Whether a staged page of this layout can be copied by TMA (:func:`tma_plan`)."""
    return tma_plan(layout, max_chunk) is not None


def stage_bytes(layout, stage: bool, ring: bool, max_chunk: int = MAX_CHUNK) -> int:
    """Shared memory of one program: two staged pages, one (``ring``), or none."""
    return (4 if ring else 8) * sum(stage_plan(layout, chunks(layout, max_chunk))[0]) if stage else 0


def split_programs(layout, stage: bool = True, ring: bool | None = None, maxnreg: int | None = None) -> int:
    """The programs per SM the split count aims at: ``PROGRAMS_PER_SM`` (the measured sweep) for staged page
    pairs without a register cap, else :func:`resident_programs`."""
    ring = RING if ring is None else ring
    maxnreg = MAXNREG if maxnreg is None else maxnreg
    return PROGRAMS_PER_SM if not ring and maxnreg is None else resident_programs(layout, stage, ring, maxnreg)


def resident_programs(layout, stage: bool = True, ring: bool | None = None, maxnreg: int | None = None,
                      max_chunk: int = MAX_CHUNK) -> int:  # fmt: skip
    """One-warp programs that fit an H100/H200 SM: by registers (``maxnreg``, else 255; 64 K per SM, allocated
    per warp in units of 256) and by shared memory (228 KB, 1 KB reserved per program). ``ring``/``maxnreg``:
    None = the module's ``RING``/``MAXNREG``."""
    ring = RING if ring is None else ring
    maxnreg = MAXNREG if maxnreg is None else maxnreg
    by_regs = 65536 // (-(-(maxnreg or 255) * 32 // 256) * 256)
    smem = stage_bytes(layout, stage, ring, max_chunk)
    return max(1, min(by_regs, 233472 // (smem + 1024) if smem else 32))


def stage_supported(layout) -> bool:
    """Whether pages can be staged (every piece a program reads 16-byte aligned, a power of two in size)."""
    try:
        stage_plan(layout, chunks(layout))
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------- chunks
def chunks(layout, max_rows: int = MAX_CHUNK, aligned: bool = False) -> tuple:
    """Compile-time tiles of page rows: ``(start, rows, k_hi, k_off, v_hi, v_off)`` with one key group and one
    value group each (``*_hi``: 1 for the salient rows), ``rows`` a power of two in [16, max_rows]; byte offsets
    of the first row's codes. ``aligned``: ``start`` a multiple of ``rows`` (``TMA_PAGES``: the per-token value
    parameters of a chunk are then a view of the page's at a multiple of its size)."""
    n, d = layout.block_size, layout.head_size
    sk, sv = layout.num_salient_k, layout.num_salient_v
    cuts = sorted({0, sk, sv, n})
    out = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        start = a
        while start < b:
            rows = min(max_rows, 1 << ((b - start).bit_length() - 1))
            while aligned and start % rows:
                rows //= 2
            kb = layout.bits_high if start < sk else layout.bits_low
            vb = layout.bits_high if start < sv else layout.bits_low
            k_off = (layout.k_hi_off + start * d * kb // 8) if start < sk else (
                layout.k_lo_off + (start - sk) * d * kb // 8)
            v_off = (layout.v_hi_off + start * d * vb // 8) if start < sv else (
                layout.v_lo_off + (start - sv) * d * vb // 8)
            out.append((start, rows, int(start < sk), k_off, int(start < sv), v_off))
            start += rows
    return tuple(out)


def supported(layout) -> bool:
    """Whether v2 reads this page layout (else use v1)."""
    return (
        layout.bits_high in (2, 4)
        and layout.bits_low in (2, 4)
        and layout.head_size in (64, 128)
        and layout.block_size % 16 == 0
        and layout.num_salient_k % 16 == 0
        and layout.num_salient_v % 16 == 0
    )


# --------------------------------------------------------------------------------------------- jit helpers
@gluon.jit
def _key_map(BITS: gl.constexpr, D: gl.constexpr, layout: gl.constexpr):
    """``key_channel`` of plane ``i // 16``, column ``i % 16`` for ``i`` in [0, D), in ``layout``."""
    i = gl.arange(0, D, layout=layout)
    j = i // 16
    kk = i % 16
    t = (kk % 8) // 2
    if BITS == 4:
        ch = t * (D // 8) + 4 * (j // 2) + (j % 2) + 2 * (kk % 2) + (D // 2) * (kk // 8)
    else:
        ch = t * (D // 16) + 4 * (j // 4) + (kk // 8) + 2 * (kk % 2) + (D // 4) * (j % 4)
    return ch


@gluon.jit
def _value_map(BITS: gl.constexpr, D: gl.constexpr, layout: gl.constexpr):
    """``value_channel`` of plane ``i // 16``, row ``i % 16`` for ``i`` in [0, D), in ``layout``."""
    LBV: gl.constexpr = D * BITS // 64
    i = gl.arange(0, D, layout=layout)
    j = i // 16
    m = i % 16
    if BITS == 4:
        ch = (m % 8) * LBV + j + (D // 2) * (m // 8)
    else:
        ch = (m % 8) * LBV + (j % LBV) + (D // 4) * (2 * (m // 8) + j // LBV)
    return ch


@gluon.jit
def _key_field_offset(BITS: gl.constexpr, D: gl.constexpr, layout: gl.constexpr, MAPB: gl.constexpr):
    """fp32 ``2^(10 - shift)`` that the unpacked key code of plane ``i // 16``, column ``i % 16`` carries (codes of
    ``BITS`` read into the map of ``MAPB``)."""
    i = gl.arange(0, D, layout=layout)
    if BITS == 4 and MAPB == 2:
        sh = 4 * (((i // 16) // 2) % 2)
    elif BITS == 4:
        sh = 4 * ((i % 16) // 8)
    else:
        sh = 2 * ((i // 16) % 4)
    return gl.exp2((10 - sh).to(gl.float32))


@gluon.jit
def _value_field_offset(BITS: gl.constexpr, D: gl.constexpr, layout: gl.constexpr):
    """fp32 ``2^(10 - shift)`` that the unpacked value code of plane ``i // 16``, row ``i % 16`` carries."""
    LBV: gl.constexpr = D * BITS // 64
    i = gl.arange(0, D, layout=layout)
    mh = (i % 16) // 8
    if BITS == 4:  # noqa: SIM108 (constexpr branches)
        sh = 4 * mh
    else:
        sh = 2 * ((i // 16) // LBV + 2 * mh)
    return gl.exp2((10 - sh).to(gl.float32))


@gluon.jit
def _tile_rows(x, ROWS: gl.constexpr, MMA: gl.constexpr):
    """``x [16, NP]`` (MMA layout, all rows equal or not) repeated to ``[ROWS, NP]``: register copies only."""
    if ROWS == 16:
        res = x
    else:
        y = _tile_rows(x, ROWS // 2, MMA)
        z = gl.join(y, y)  # [R, NP, 2]
        res = gl.convert_layout(gl.reshape(gl.permute(z, (2, 0, 1)), (ROWS, x.shape[1])), MMA, assert_trivial=True)
    return res


@gluon.jit
def _load_params(ptr, PLAN: gl.constexpr, D: gl.constexpr, TARGET: gl.constexpr):
    """fp16 ``[D]`` page parameters in map order (``TARGET`` layout), loaded as ``param_load_plan`` says."""
    L: gl.constexpr = PLAN[0]
    o = gl.arange(0, PLAN[1], layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))
    ln = gl.arange(0, PLAN[2], layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))
    r = gl.arange(0, PLAN[3], layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))
    x = gl.load(ptr + (o[:, None, None] * PLAN[4] + ln[None, :, None] * PLAN[3] + r[None, None, :]))
    return _params_order(x, PLAN, D, TARGET)


@gluon.jit
def _params_order(x, PLAN: gl.constexpr, D: gl.constexpr, TARGET: gl.constexpr):
    x = gl.reshape(gl.permute(gl.reshape(x, PLAN[5]), PLAN[6]), [D])
    return gl.convert_layout(x, TARGET, assert_trivial=True)


@gluon.jit
def _params(src, OFF: gl.constexpr, PLAN: gl.constexpr, VIEW: gl.constexpr, D: gl.constexpr,
            TARGET: gl.constexpr, SMEM: gl.constexpr, PIECES: gl.constexpr):  # fmt: skip
    """The page's fp16 parameters at byte ``OFF`` in map order, from global memory (``src`` = the page's byte
    pointer) or from the staged page (``src`` = its int32 shared view)."""
    if SMEM:
        LOC: gl.constexpr = _locate(PIECES, OFF)
        x = src[LOC[0]].slice(LOC[1], D // 2)._reinterpret(gl.float16, [PLAN[1], PLAN[2], PLAN[3]], VIEW)
        x = x.load(PLAN[0])
        res = _params_order(x, PLAN, D, TARGET)
    else:
        res = _load_params(src.to(gl.pointer_type(gl.float16)) + OFF // 2, PLAN, D, TARGET)
    return res


@gluon.jit
def _rows_f16(src, OFF: gl.constexpr, ROWS: gl.constexpr, LAYOUT: gl.constexpr, SMEM: gl.constexpr,
              PIECES: gl.constexpr):  # fmt: skip
    """``ROWS`` consecutive fp16 per-token parameters at byte ``OFF`` of the page, as fp32 in ``LAYOUT``."""
    if SMEM:
        FLAT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        LOC: gl.constexpr = _locate(PIECES, OFF)
        x = src[LOC[0]].slice(LOC[1], ROWS // 2)._reinterpret(gl.float16, [ROWS], FLAT).load(LAYOUT)
    else:
        x = gl.load(src.to(gl.pointer_type(gl.float16)) + OFF // 2 + gl.arange(0, ROWS, layout=LAYOUT))
    return x.to(gl.float32)


@gluon.constexpr_function
def _locate(pieces, off):
    """(segment, word offset) of page byte ``off`` in a staged page (``stage_plan``'s pieces)."""
    for start, nb, seg, word in pieces:
        if start <= off < start + nb:
            return (seg, word + (off - start) // 4)
    raise ValueError(f"page byte {off} is not staged")


@gluon.jit
def _alloc_stage(SEGMENTS: gl.constexpr, NBUF: gl.constexpr):
    """``NBUF`` buffers of every segment (a tuple of ``[NBUF, words]`` int32 shared allocations)."""
    L: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # rank 1: each indexed buffer is flat
    bufs = ()
    for i in gl.static_range(len(SEGMENTS)):
        bufs = bufs + (gl.allocate_shared_memory(gl.int32, [NBUF, SEGMENTS[i]], L),)
    return bufs


@gluon.jit
def _stage_view(bufs, stage, SEGMENTS: gl.constexpr):
    """The buffers of one stage (a tuple of ``[words]`` views)."""
    out = ()
    for i in gl.static_range(len(SEGMENTS)):
        out = out + (bufs[i].index(stage),)
    return out


@gluon.jit
def _copy_page(dst, src, PIECES: gl.constexpr):
    """cp.async of the pieces of the page at byte pointer ``src`` into the stage views ``dst``, 16 bytes per
    lane and copy where the piece allows."""
    for i in gl.static_range(len(PIECES)):
        _copy_piece(dst[PIECES[i][2]], src, PIECES[i][0], PIECES[i][1] // 4, PIECES[i][3])


@gluon.jit
def _copy_piece(dst, src, OFF: gl.constexpr, NW: gl.constexpr, WORD: gl.constexpr):
    VEC: gl.constexpr = 4 if NW >= 128 else (NW // 32 if NW >= 32 else 1)
    L: gl.constexpr = gl.BlockedLayout([VEC], [32], [1], [0])
    offs = gl.arange(0, NW, layout=L)
    async_copy.async_copy_global_to_shared(dst.slice(WORD, NW), (src + OFF).to(gl.pointer_type(gl.int32)) + offs)


@gluon.jit
def _tma_page(dst, descs, row, bar, BOXES: gl.constexpr, NBYTES: gl.constexpr):
    """TMA copies of the pieces of the page whose first 128-byte row of the cache is ``row`` into the stage views
    ``dst`` (``tma_boxes``), completing on the mbarrier ``bar`` (``NBYTES`` in all)."""
    mbarrier.expect(bar, NBYTES)
    for i in gl.static_range(len(BOXES)):
        view = dst[BOXES[i][0]].slice(0, BOXES[i][4] * BOXES[i][5])._reinterpret(
            gl.int32, [BOXES[i][4], BOXES[i][5]], TMA_LAYOUT)
        tma.async_copy_global_to_shared(descs[BOXES[i][1]], [row * BOXES[i][3] + BOXES[i][2], 0], bar, view)


@gluon.jit
def _page_row(bt_row, pg, kvh, stride_c_block, stride_c_head):
    """The page's first 128-byte row of the cache (its byte offset / 128)."""
    return gl.load(bt_row + pg) * (stride_c_block // 128) + kvh * (stride_c_head // 128)


@gluon.jit
def _prefetch_l2(page_ptr, lane, PF_BYTES: gl.constexpr, PF_ASM: gl.constexpr):
    """``cp.async.bulk.prefetch.L2`` of the page's codes and parameters (``PF_BYTES``): one bulk request, the
    same address in every lane (a uniform operand: no per-lane loop)."""
    gl.inline_asm_elementwise(PF_ASM, "=r,l", [page_ptr + lane * 0], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _join_planes(planes, P: gl.constexpr, AXIS: gl.constexpr):
    """``P`` (4 or 8) tensors ``[R, C]`` -> one tensor with plane ``j`` at rows (AXIS 0) or columns (AXIS 1)
    ``16 j ..``: joins and a register permutation only."""
    a = gl.join(planes[0], planes[1])
    b = gl.join(planes[2], planes[3])
    x = gl.join(a, b)  # [R, C, 2, 2]: plane = b0 + 2 b1
    if P == 8:
        c = gl.join(planes[4], planes[5])
        e = gl.join(planes[6], planes[7])
        z = gl.join(x, gl.join(c, e))  # [R, C, 2, 2, 2]
        if AXIS == 1:
            res = gl.reshape(gl.permute(z, (0, 4, 3, 2, 1)), (z.shape[0], 8 * z.shape[1]))
        else:
            res = gl.reshape(gl.permute(z, (4, 3, 2, 0, 1)), (8 * z.shape[0], z.shape[1]))
    else:
        if AXIS == 1:
            res = gl.reshape(gl.permute(x, (0, 3, 2, 1)), (x.shape[0], 4 * x.shape[1]))
        else:
            res = gl.reshape(gl.permute(x, (3, 2, 0, 1)), (4 * x.shape[0], x.shape[1]))
    return res


@gluon.jit
def _key_offsets(ROWS: gl.constexpr, RB: gl.constexpr, LB: gl.constexpr, ES: gl.constexpr, A: gl.constexpr,
                 CROSS: gl.constexpr, D: gl.constexpr):  # fmt: skip
    """Byte offsets ``[ROWS, 16]`` (A layout) of the key elements a lane loads for ``key_unpack_asm``
    (``CROSS``: 4-bit codes into the 2-bit map, as ``key_address``)."""
    m = gl.arange(0, ROWS, layout=gl.SliceLayout(1, A))[:, None]
    kk = gl.arange(0, 16, layout=gl.SliceLayout(0, A))[None, :]
    t = (kk % 8) // 2
    p = kk % 2
    h = kk // 8
    mh = (m % 16) // 8
    base = (m // 16) * 16 + (m % 8)
    if CROSS and ES == 4:
        off = (base + 8 * p) * RB + t * (D // 16) + 4 * mh + (D // 4) * h
    elif CROSS:
        off = (base + 8 * mh) * RB + t * (D // 16) + (D // 4) * h + 2 * p
    elif ES == 4:
        off = (base + 8 * p) * RB + t * LB + 4 * (mh + 2 * h)
    elif ES == 2:
        off = m * RB + t * LB + 4 * h + 2 * p
    else:
        off = (base + 8 * h) * RB + t * LB + p + 2 * mh
    return off


@gluon.jit
def _value_offsets(ROWS: gl.constexpr, RB: gl.constexpr, LBV: gl.constexpr, ES: gl.constexpr,
                   A: gl.constexpr, CROSS: gl.constexpr, D: gl.constexpr):  # fmt: skip
    """Byte offsets ``[16, ROWS]`` (A layout of ``V^T``) of the value elements for ``value_unpack_asm``
    (``CROSS``: 4-bit codes into the 2-bit map, as ``value_address``)."""
    m = gl.arange(0, 16, layout=gl.SliceLayout(1, A))[:, None]
    k = gl.arange(0, ROWS, layout=gl.SliceLayout(0, A))[None, :]
    g = m % 8
    mh = m // 8
    if CROSS:
        off = k * RB + g * (D // 32) + (D // 4) * mh
    elif ES == 1:
        off = ((k // 16) * 16 + 2 * ((k % 8) // 2) + mh + 8 * ((k % 16) // 8)) * RB + g * LBV + k % 2
    else:
        off = k * RB + g * LBV + ES * mh
    return off


@gluon.jit
def _planes(w, ASM: gl.constexpr, CONS: gl.constexpr, P: gl.constexpr, AXIS: gl.constexpr, A: gl.constexpr):
    """Code words ``w`` (A layout) -> the fp16 operand (``offset + code`` per element), by ``ASM``."""
    if P == 8:
        planes = gl.inline_asm_elementwise(ASM, CONS, [w], dtype=(gl.float16,) * 8, is_pure=True, pack=8)
    else:
        planes = gl.inline_asm_elementwise(ASM, CONS, [w], dtype=(gl.float16,) * 4, is_pure=True, pack=8)
    return gl.convert_layout(_join_planes(planes, P, AXIS), A, assert_trivial=True)


@gluon.jit
def _unpack(src, OFF: gl.constexpr, offs, SHAPE: gl.constexpr, VIEW: gl.constexpr, LOAD: gl.constexpr,
            ASM: gl.constexpr,
            CONS: gl.constexpr, ES: gl.constexpr, P: gl.constexpr, AXIS: gl.constexpr, A: gl.constexpr,
            SMEM: gl.constexpr, PIECES: gl.constexpr):  # fmt: skip
    """One chunk's codes at byte ``OFF`` of the page as an fp16 operand: from global memory at ``offs``
    (``src`` = the page's byte pointer) or from the staged page through the layouts ``VIEW`` (shared) and ``LOAD``
    (registers)."""
    if SMEM:
        NW: gl.constexpr = SHAPE[0] * SHAPE[1] * ES // 4
        LOC: gl.constexpr = _locate(PIECES, OFF)
        w = src[LOC[0]].slice(LOC[1], NW)._reinterpret(_elem_type(ES), [SHAPE[0], SHAPE[1]], VIEW).load(LOAD)
        w = gl.convert_layout(w, A)
    else:
        w = gl.load((src + OFF + offs).to(gl.pointer_type(_elem_type(ES))))
    return _planes(w, ASM, CONS, P, AXIS, A)


@gluon.constexpr_function
def _elem_type(es):
    return {4: gl.int32, 2: gl.int16, 1: gl.int8}[es]


@gluon.jit
def _softmax_chunk(s, m_ref, l_i, o_hi, o_lo, u, pm, RESCALE: gl.constexpr, ONE: gl.constexpr,
                   DEFER: gl.constexpr, SUBN: gl.constexpr, CHECK: gl.constexpr, MMA: gl.constexpr,
                   KSCALE: gl.constexpr = 1.0):  # fmt: skip
    """Lazy online softmax over a chunk ``s [rows, NP]`` (log2 domain): rescale the state only when a column
    max exceeds the reference by more than ``RESCALE`` (``CHECK``; else the caller has, for the whole page).
    Returns (p, m_ref, l_i, o_hi, o_lo, u, pm); with one channel map (``ONE``) ``o_lo`` is unused. ``DEFER``:
    ``l_i`` is ``[16, NP]`` partial sums (MMA layout; the column sums are its row sums, taken once at the end),
    else ``[NP]``. ``SUBN``: which of the page's value-minimum partials ``pm`` and value group accumulator ``u``
    hold state to rescale too (0: neither, 1: ``pm``, 2: both). ``KSCALE``: ``s`` is in units of ``1 / KSCALE``
    (subnormal key codes)."""
    if CHECK:
        m_ref, l_i, o_hi, o_lo, u, pm = _rescale(gl.max(s, axis=0) * KSCALE, m_ref, l_i, o_hi, o_lo, u, pm, RESCALE,
                                                 ONE, DEFER, SUBN)
    if KSCALE == 1.0:  # noqa: SIM108 (constexpr branches)
        p = gl.exp2(s - m_ref[None, :])
    else:
        p = gl.exp2(s * KSCALE - m_ref[None, :])
    if DEFER:  # noqa: SIM108 (constexpr branches)
        l_i = l_i + _fold_rows(p, MMA)
    else:
        l_i = l_i + gl.sum(p, axis=0)
    return p, m_ref, l_i, o_hi, o_lo, u, pm


@gluon.jit
def _rescale(c_max, m_ref, l_i, o_hi, o_lo, u, pm, RESCALE: gl.constexpr, ONE: gl.constexpr, DEFER: gl.constexpr,
             SUBN: gl.constexpr):  # fmt: skip
    """The lazy rescale of ``_softmax_chunk`` for column maxima ``c_max [NP]``: returns (m_ref, l_i, o_hi, o_lo,
    u, pm)."""
    if gl.max(c_max - m_ref, axis=0) > RESCALE:
        m_new = gl.maximum(m_ref, c_max)
        alpha = gl.exp2(m_ref - m_new)
        if DEFER:  # noqa: SIM108 (constexpr branches)
            l_i = l_i * alpha[None, :]
        else:
            l_i = l_i * alpha
        o_hi = o_hi * alpha[None, :]
        if not ONE:
            o_lo = o_lo * alpha[None, :]
        if SUBN >= 1:
            pm = pm * alpha[None, :]
        if SUBN == 2:
            u = u * alpha[None, :]
        m_ref = m_new
    return m_ref, l_i, o_hi, o_lo, u, pm


@gluon.jit
def _fold_rows(x, MMA: gl.constexpr, MAX: gl.constexpr = False):
    """``x [ROWS, NP]`` (MMA layout) summed (``MAX``: maxed) over its 16-row tiles to ``[16, NP]``: in-lane
    operations only (the inverse of ``_tile_rows``)."""
    if x.shape[0] == 16:
        res = x
    else:
        y = gl.permute(gl.reshape(x, (2, x.shape[0] // 2, x.shape[1])), (1, 2, 0))  # [R/2, NP, 2]
        a, b = gl.split(y)
        if MAX:  # noqa: SIM108 (constexpr branches)
            c = gl.maximum(a, b)
        else:
            c = a + b
        res = _fold_rows(gl.convert_layout(c, MMA, assert_trivial=True), MMA, MAX)
    return res


@gluon.jit
def _chunk_scores(src, qp_h, qp_l, bias_h, bias_l, ROWS: gl.constexpr, K_HI: gl.constexpr, K_OFF: gl.constexpr,
                  KVIEW: gl.constexpr, KLOAD: gl.constexpr, BH: gl.constexpr, BL: gl.constexpr, D: gl.constexpr,
                  K_ASM_H: gl.constexpr, K_CONS_H: gl.constexpr, K_ASM_L: gl.constexpr, K_CONS_L: gl.constexpr,
                  MMA: gl.constexpr, A: gl.constexpr, SMEM: gl.constexpr, PIECES: gl.constexpr, MH: gl.constexpr,
                  ML: gl.constexpr):  # fmt: skip
    """Scores ``S^T [ROWS, NP] = (offset + K codes) @ q'^T + (bias - offset term)`` of one chunk (one key group),
    accumulated from the bias."""
    P: gl.constexpr = D // 16
    if K_HI:
        KES: gl.constexpr = D * BH // 128
        kc = _unpack(src, K_OFF, _key_offsets(ROWS, D * BH // 8, D * BH // 32, KES, A, BH == 4 and MH == 2, D),
                     (ROWS, 16), KVIEW, KLOAD, K_ASM_H, K_CONS_H, KES, P, 1, A, SMEM, PIECES)
        s = mma_v2(kc, qp_h, _tile_rows(bias_h, ROWS, MMA))
    else:
        KES: gl.constexpr = D * BL // 128
        kc = _unpack(src, K_OFF, _key_offsets(ROWS, D * BL // 8, D * BL // 32, KES, A, BL == 4 and ML == 2, D),
                     (ROWS, 16), KVIEW, KLOAD, K_ASM_L, K_CONS_L, KES, P, 1, A, SMEM, PIECES)
        s = mma_v2(kc, qp_l, _tile_rows(bias_l, ROWS, MMA))
    return s


# fmt: off
@gluon.jit
def _page_chunk(
    src, s, cn_h, cn_l, voff_h, voff_l, m_ref, l_i, o_hi, o_lo, u, pm,
    START: gl.constexpr, ROWS: gl.constexpr, V_HI: gl.constexpr, V_OFF: gl.constexpr, VVIEW: gl.constexpr,
    VLOAD: gl.constexpr, BH: gl.constexpr, BL: gl.constexpr, D: gl.constexpr, N: gl.constexpr,
    NP: gl.constexpr, V_TOK: gl.constexpr, V_ASM_H: gl.constexpr, V_CONS_H: gl.constexpr, V_ASM_L: gl.constexpr,
    V_CONS_L: gl.constexpr, RESCALE: gl.constexpr, MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr,
    SMEM: gl.constexpr, PIECES: gl.constexpr, MH: gl.constexpr, ML: gl.constexpr, ONE: gl.constexpr,
    DEFER: gl.constexpr, SUBN: gl.constexpr, FIRST: gl.constexpr, CHECK: gl.constexpr, KSCALE: gl.constexpr,
):
    """Rows ``START .. START + ROWS`` of one page (one key group, one value group) with their scores ``s``.
    ``MH``, ``ML``: the channel maps (their bits) the high and low tiles are read into; ``ONE``: one map, one
    value accumulator. ``SUBN``: subnormal value codes, accumulated in ``u`` (``FIRST``: the chunk starts its
    value group) and ``pm`` (the value-minimum term as ``[16, NP]`` partials), both scaled into the output by
    ``_page``. ``CHECK``: this chunk's maxima may rescale the state (else ``_page`` checked the whole page)."""
    P: gl.constexpr = D // 16
    LIVE: gl.constexpr = (0 if START == 0 else (1 if FIRST else 2)) if SUBN else 0  # the state pm, u hold
    p, m_ref, l_i, o_hi, o_lo, u, pm = _softmax_chunk(s, m_ref, l_i, o_hi, o_lo, u, pm, RESCALE, ONE, DEFER, LIVE,
                                                     CHECK, MMA, KSCALE)
    # values: P' = p * step_t (fp16 B operand)
    vstep = _rows_f16(src, V_TOK + 2 * START, ROWS, gl.SliceLayout(1, MMA), SMEM, PIECES)
    vmn = _rows_f16(src, V_TOK + 2 * (N + START), ROWS, gl.SliceLayout(1, MMA), SMEM, PIECES)
    pb = gl.convert_layout((p * vstep[:, None]).to(gl.float16), B)
    if V_HI:
        VES: gl.constexpr = D * BH // 128
        vc = _unpack(src, V_OFF, _value_offsets(ROWS, D * BH // 8, D * BH // 64, VES, A, BH == 4 and MH == 2, D),
                     (16, ROWS), VVIEW, VLOAD, V_ASM_H, V_CONS_H, VES, P, 0, A, SMEM, PIECES)
    else:
        VES: gl.constexpr = D * BL // 128
        vc = _unpack(src, V_OFF, _value_offsets(ROWS, D * BL // 8, D * BL // 64, VES, A, BL == 4 and ML == 2, D),
                     (16, ROWS), VVIEW, VLOAD, V_ASM_L, V_CONS_L, VES, P, 0, A, SMEM, PIECES)
    if SUBN:  # u += V^T P' (codes * 2^(shift - 24): no offset), pm += p * mn_t as per-lane partials
        pm = pm + _fold_rows(p * vmn[:, None], MMA)
        if FIRST:  # noqa: SIM108 (constexpr branches)
            u = mma_v2(vc, pb, gl.zeros([D, NP], gl.float32, MMA))
        else:
            u = mma_v2(vc, pb, u)
    else:  # u = V^T P' + sum_t p_t mn_t, the code offsets taken out through the sum of P' (as rounded); O^T += c u
        pmin = gl.sum(p * vmn[:, None], axis=0)
        # sum_t P'[t] exactly as the MMA sees it, on every row (an MMA with a ones operand: no shuffles)
        psum = _tile_rows(mma_v2(gl.full([16, ROWS], 1.0, gl.float16, A), pb, gl.zeros([16, NP], gl.float32, MMA)),
                          D, MMA)
        if V_HI:
            u = mma_v2(vc, pb, pmin[None, :] - voff_h[:, None] * psum)
            o_hi = o_hi + cn_h[:, None] * u
        else:
            u = mma_v2(vc, pb, pmin[None, :] - voff_l[:, None] * psum)
            if ONE:
                o_hi = o_hi + cn_l[:, None] * u
            else:
                o_lo = o_lo + cn_l[:, None] * u
    return m_ref, l_i, o_hi, o_lo, u, pm


@gluon.jit
def _page_bias(mn, q, qp, BITS: gl.constexpr, D: gl.constexpr, NP: gl.constexpr, MMA: gl.constexpr,
               A: gl.constexpr, MAPB: gl.constexpr, SUBK: gl.constexpr):  # fmt: skip
    """``sum_c q_c mn_c - sum_c' offset_c' q'_c'`` per query head ([NP], columns of the MMA layout): two MMAs
    with the row vectors ``mn`` (the page's key minima in map order) and ``-offset`` on all 16 rows of A.
    ``SUBK`` (subnormal key codes, no offset): ``2^-24 sum_c q_c mn_c``, the scores' unit."""
    mn = gl.convert_layout(mn, gl.SliceLayout(0, A))
    zero_a = gl.zeros([16, D], gl.float16, A)
    if SUBK:
        acc = mma_v2(gl.broadcast(mn[None, :], zero_a)[0], q, gl.zeros([16, NP], gl.float32, layout=MMA))
        acc = acc * (1.0 / 16777216.0)
    else:
        neg_off = -_key_field_offset(BITS, D, gl.SliceLayout(0, A), MAPB).to(gl.float16)
        acc = mma_v2(gl.broadcast(neg_off[None, :], zero_a)[0], qp, gl.zeros([16, NP], gl.float32, layout=MMA))
        acc = mma_v2(gl.broadcast(mn[None, :], zero_a)[0], q, acc)
    return acc  # [16, NP]: every row holds the same sums


@gluon.constexpr_function
def _value_groups(chunks):
    """Per chunk: (it starts a value group, it ends one); a group is a run of chunks of one value width."""
    v = [c[4] for c in chunks]
    return tuple((i == 0 or v[i - 1] != v[i], i == len(v) - 1 or v[i + 1] != v[i]) for i in range(len(v)))


@gluon.jit
def _page(
    src, q_h, q_l, voff_h, voff_l, m_ref, l_i, o_hi, o_lo,
    CHUNKS: gl.constexpr, SHARED: gl.constexpr, BH: gl.constexpr, BL: gl.constexpr, D: gl.constexpr,
    N: gl.constexpr, NP: gl.constexpr, K_PAR: gl.constexpr, V_NORM: gl.constexpr, V_TOK: gl.constexpr,
    K_ASM_H: gl.constexpr, K_CONS_H: gl.constexpr, K_ASM_L: gl.constexpr, K_CONS_L: gl.constexpr,
    V_ASM_H: gl.constexpr, V_CONS_H: gl.constexpr, V_ASM_L: gl.constexpr, V_CONS_L: gl.constexpr,
    KP_H: gl.constexpr, KP_L: gl.constexpr, VP_H: gl.constexpr, VP_L: gl.constexpr,
    RESCALE: gl.constexpr, MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr, SMEM: gl.constexpr,
    PIECES: gl.constexpr, MH: gl.constexpr, ML: gl.constexpr, ONE: gl.constexpr, RING: gl.constexpr,
    GROUPS: gl.constexpr, DEFER: gl.constexpr, SUBN: gl.constexpr, PAGE_MAX: gl.constexpr, SUBK: gl.constexpr,
    nxt, has_next, gsrc, TMA: gl.constexpr,
):
    """One page: its parameters, then its chunks (``src``: the page's byte pointer, or its shared view). With
    ``RING`` the shared view is refilled from ``nxt`` (the next page, if ``has_next``) piece group by piece
    group (``ring_groups``) as soon as every lane is done with one; each group is one commit group (empty
    without a next page), so the wait before each read is the same: ``len(CHUNKS)`` newer groups may still be
    in flight. ``SUBN``: each value group's accumulator is added to the output once, scaled by the value
    normalizer times ``2^(24 - shift)`` (``voff_* * 2^14``), then the value-minimum term ``c * sum_t p_t mn_t``.
    ``PAGE_MAX``: the scores of every chunk first, one rescale check for the page (not with ``RING``). ``TMA``: the
    value normalizer is not staged, read from the page in global memory (``gsrc``, its byte pointer)."""
    ROW_B: gl.constexpr = gl.SliceLayout(1, B)
    ROW_C: gl.constexpr = gl.SliceLayout(1, MMA)
    # key parameters: q' = q * step (fp16; SUBK: times 2^-shift, the subnormal codes' 2^shift), the bias of each group
    qp_h = q_h * _params(src, K_PAR, KP_H, gl.constexpr(SHARED[0]), D, ROW_B, SMEM, PIECES)[:, None]
    qp_l = q_l * _params(src, K_PAR + 4 * D, KP_L, gl.constexpr(SHARED[1]), D, ROW_B, SMEM, PIECES)[:, None]
    if SUBK:  # after the product: q * step is far from fp16's subnormals, step * 2^-6 may not be
        qp_h = qp_h * (_key_field_offset(BH, D, ROW_B, MH) * (1.0 / 1024.0)).to(gl.float16)[:, None]
        qp_l = qp_l * (_key_field_offset(BL, D, ROW_B, ML) * (1.0 / 1024.0)).to(gl.float16)[:, None]
    mn_h = _params(src, K_PAR + 2 * D, KP_H, gl.constexpr(SHARED[0]), D, ROW_B, SMEM, PIECES)
    mn_l = _params(src, K_PAR + 6 * D, KP_L, gl.constexpr(SHARED[1]), D, ROW_B, SMEM, PIECES)
    bias_h = _page_bias(mn_h, q_h, qp_h, BH, D, NP, MMA, A, MH, SUBK)
    bias_l = _page_bias(mn_l, q_l, qp_l, BL, D, NP, MMA, A, ML, SUBK)
    KSCALE: gl.constexpr = 16777216.0 if SUBK else 1.0
    if TMA:  # the value normalizer from global memory (not staged)
        cn_h = _params(gsrc, V_NORM, VP_H, gl.constexpr(SHARED[2]), D, ROW_C, False, PIECES).to(gl.float32)
    else:
        cn_h = _params(src, V_NORM, VP_H, gl.constexpr(SHARED[2]), D, ROW_C, SMEM, PIECES).to(gl.float32)
    if ONE:  # noqa: SIM108 (constexpr branches)
        cn_l = cn_h
    elif TMA:
        cn_l = _params(gsrc, V_NORM, VP_L, gl.constexpr(SHARED[3]), D, ROW_C, False, PIECES).to(gl.float32)
    else:
        cn_l = _params(src, V_NORM, VP_L, gl.constexpr(SHARED[3]), D, ROW_C, SMEM, PIECES).to(gl.float32)
    if RING:
        _refill(src, nxt, has_next, GROUPS, 0)
    EDGES: gl.constexpr = _value_groups(CHUNKS)
    u = gl.zeros([D, NP], gl.float32, MMA)  # (SUBN) the current value group's V^T P'
    pm = gl.zeros([16, NP], gl.float32, MMA)  # (SUBN) sum_t p_t mn_t, per-lane partials
    scores = ()
    if PAGE_MAX:  # every chunk's scores, their maxima folded in-lane, one cross-lane max and check per page
        for ci in gl.static_range(len(CHUNKS)):
            scores = scores + (_chunk_scores(
                src, qp_h, qp_l, bias_h, bias_l, CHUNKS[ci][1], CHUNKS[ci][2], CHUNKS[ci][3],
                gl.constexpr(SHARED[4 + 4 * ci]), gl.constexpr(SHARED[5 + 4 * ci]), BH, BL, D, K_ASM_H, K_CONS_H,
                K_ASM_L, K_CONS_L, MMA, A, SMEM, PIECES, MH, ML),)
        f = _fold_rows(scores[0], MMA, True)
        for ci in gl.static_range(1, len(CHUNKS)):
            f = gl.maximum(f, _fold_rows(scores[ci], MMA, True))
        m_ref, l_i, o_hi, o_lo, u, pm = _rescale(gl.max(f, axis=0) * KSCALE, m_ref, l_i, o_hi, o_lo, u, pm,
                                                 RESCALE, ONE, DEFER, 0)
    for ci in gl.static_range(len(CHUNKS)):
        if RING:
            async_copy.wait_group(len(CHUNKS))
            gl.thread_barrier()  # the chunk's bytes, copied by all lanes, are visible to all
        if PAGE_MAX:  # noqa: SIM108 (constexpr branches)
            s = scores[ci]
        else:
            s = _chunk_scores(
                src, qp_h, qp_l, bias_h, bias_l, CHUNKS[ci][1], CHUNKS[ci][2], CHUNKS[ci][3],
                gl.constexpr(SHARED[4 + 4 * ci]), gl.constexpr(SHARED[5 + 4 * ci]), BH, BL, D, K_ASM_H, K_CONS_H,
                K_ASM_L, K_CONS_L, MMA, A, SMEM, PIECES, MH, ML)
        m_ref, l_i, o_hi, o_lo, u, pm = _page_chunk(
            src, s, cn_h, cn_l, voff_h, voff_l, m_ref, l_i, o_hi, o_lo, u, pm,
            CHUNKS[ci][0], CHUNKS[ci][1], CHUNKS[ci][4], CHUNKS[ci][5], gl.constexpr(SHARED[6 + 4 * ci]),
            gl.constexpr(SHARED[7 + 4 * ci]), BH, BL, D, N, NP, V_TOK, V_ASM_H, V_CONS_H, V_ASM_L, V_CONS_L,
            RESCALE, MMA, A, B, SMEM, PIECES, MH, ML, ONE, DEFER, SUBN, EDGES[ci][0], not PAGE_MAX, KSCALE,
        )
        if SUBN and EDGES[ci][1]:  # the value group ends: O^T += (c * 2^(24 - shift)) u
            if CHUNKS[ci][4]:
                o_hi = o_hi + (cn_h * (voff_h * 16384.0))[:, None] * u
            elif ONE:
                o_hi = o_hi + (cn_l * (voff_l * 16384.0))[:, None] * u
            else:
                o_lo = o_lo + (cn_l * (voff_l * 16384.0))[:, None] * u
        if RING:
            _refill(src, nxt, has_next, GROUPS, 1 + ci)
    if SUBN:
        o_hi = o_hi + cn_h[:, None] * gl.sum(pm, axis=0)[None, :]
    return m_ref, l_i, o_hi, o_lo


@gluon.jit
def _refill(dst, nxt, has_next, GROUPS: gl.constexpr, GI: gl.constexpr):
    """Once every lane is done reading group ``GI`` of the staged page, copy that of the next page into its
    place (one commit group, empty without a next page)."""
    gl.thread_barrier()
    if has_next:
        _copy_group(dst, nxt, GROUPS, GI)
    async_copy.commit_group()


@gluon.jit
def _copy_group(dst, src, GROUPS: gl.constexpr, GI: gl.constexpr):
    """``_copy_page`` of the pieces of ring group ``GI`` (``ring_groups``)."""
    for i in gl.static_range(len(GROUPS)):
        if GROUPS[i][4] == GI:
            _copy_piece(dst[GROUPS[i][2]], src, GROUPS[i][0], GROUPS[i][1] // 4, GROUPS[i][3])


@gluon.jit
def _decode_v2_kernel(
    q_ptr, stride_q_seq, stride_q_head,
    cache_ptr, stride_c_block, stride_c_head,  # uint8 pages; strides in bytes
    block_table_ptr, stride_bt,
    seq_lens_ptr, tail_lens_ptr, tail_slots_ptr,
    tk_ptr, tv_ptr, stride_t_slot, stride_t_tok, stride_t_head,
    out_ptr, stride_o_seq, stride_o_head,
    lse_ptr,  # fp32 [num_seqs, num_heads] natural-log log-sum-exp (written when WRITE_LSE)
    part_o_ptr, part_lse_ptr,  # fp32 [num_seqs, num_heads, NUM_SPLITS, D], [num_seqs, num_heads, NUM_SPLITS]
    counter_ptr,  # int32 [num_seqs * num_kv_heads], zero between launches
    desc0, desc1, desc2, desc3, desc4, desc5,  # TMA: descriptors of the cache as int32 rows (tma_boxes' shapes)
    qk_scale, num_kv_heads,
    NUM_SPLITS: gl.constexpr, G: gl.constexpr, NP: gl.constexpr, D: gl.constexpr, N: gl.constexpr,
    CHUNKS: gl.constexpr, BH: gl.constexpr, BL: gl.constexpr,
    K_PAR: gl.constexpr, V_NORM: gl.constexpr, V_TOK: gl.constexpr,
    K_ASM_H: gl.constexpr, K_CONS_H: gl.constexpr, K_ASM_L: gl.constexpr, K_CONS_L: gl.constexpr,
    V_ASM_H: gl.constexpr, V_CONS_H: gl.constexpr, V_ASM_L: gl.constexpr, V_CONS_L: gl.constexpr,
    TAIL: gl.constexpr, WRITE_LSE: gl.constexpr, RESCALE: gl.constexpr, GP: gl.constexpr,
    KP_H: gl.constexpr, KP_L: gl.constexpr, VP_H: gl.constexpr, VP_L: gl.constexpr,
    PREFETCH: gl.constexpr, PF_BYTES: gl.constexpr, PF_ASM: gl.constexpr,
    SMEM: gl.constexpr, SHARED: gl.constexpr, SEGMENTS: gl.constexpr, PIECES: gl.constexpr,
    MH: gl.constexpr, ML: gl.constexpr, ONE: gl.constexpr, RING: gl.constexpr, GROUPS: gl.constexpr,
    TAIL_FIRST: gl.constexpr, DEFER: gl.constexpr, FOLD_TAIL: gl.constexpr, SUBN: gl.constexpr,
    PAGE_MAX: gl.constexpr, SUBK: gl.constexpr, TMA: gl.constexpr, BOXES: gl.constexpr, TMA_BYTES: gl.constexpr,
):
    """Grid ``(num_seqs, num_kv_heads, NUM_SPLITS)``, one warp each. With several splits, splits
    ``0 .. NUM_SPLITS - 2`` share the pages and the last one takes the bf16 tail alone (``TAIL_FIRST``: the
    tail's programs are the grid's first, ``program_id(2) == 0``). ``MH``, ``ML``: bits of the channel maps of
    the high and low tiles (equal with ``ONE`` map). ``DEFER``: the softmax denominator as per-lane partials.
    ``FOLD_TAIL``: every split shares the pages and the last one also takes the tail (no program of its own)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    COL_B: gl.constexpr = gl.SliceLayout(0, B)
    ROW_B: gl.constexpr = gl.SliceLayout(1, B)
    COL_C: gl.constexpr = gl.SliceLayout(0, MMA)
    ROW_C: gl.constexpr = gl.SliceLayout(1, MMA)

    seq = gl.program_id(0).to(gl.int64)
    kvh = gl.program_id(1)
    split = gl.program_id(2)
    if TAIL_FIRST:  # grid z 0 is the tail, 1.. the page splits
        split = (split + NUM_SPLITS - 1) % NUM_SPLITS
    seq_len = gl.load(seq_lens_ptr + seq)
    tail_len = gl.load(tail_lens_ptr + seq)
    num_pages = (seq_len - tail_len) // N
    if NUM_SPLITS == 1:
        p_lo = 0
        p_hi = num_pages
    else:
        per_split = gl.cdiv(num_pages, NUM_SPLITS if FOLD_TAIL else NUM_SPLITS - 1)
        p_lo = gl.minimum(num_pages, split * per_split)
        p_hi = gl.minimum(num_pages, p_lo + per_split)

    # -- the query in the key maps, scaled (fp16, B layout [D, NP]) ----
    n_b = gl.arange(0, NP, layout=COL_B)
    q_row = q_ptr + seq * stride_q_seq + (kvh * G + n_b)[None, :] * stride_q_head
    kmap_h = _key_map(MH, D, ROW_B)
    qmask = (n_b < G)[None, :]
    q_h = (gl.load(q_row + kmap_h[:, None], mask=qmask, other=0.0).to(gl.float32) * qk_scale).to(gl.float16)
    if ONE:  # noqa: SIM108 (constexpr branches)
        q_l = q_h
    else:
        kmap_l = _key_map(ML, D, ROW_B)
        q_l = (gl.load(q_row + kmap_l[:, None], mask=qmask, other=0.0).to(gl.float32) * qk_scale).to(gl.float16)
    vmap_h = _value_map(MH, D, ROW_C)
    vmap_l = _value_map(ML, D, ROW_C)
    voff_h = _value_field_offset(BH, D, ROW_C)
    voff_l = _value_field_offset(BL, D, ROW_C)

    m_ref = gl.full([NP], float("-inf"), gl.float32, layout=COL_C)
    if DEFER:  # noqa: SIM108 (constexpr branches)
        l_i = gl.zeros([16, NP], gl.float32, layout=MMA)
    else:
        l_i = gl.zeros([NP], gl.float32, layout=COL_C)
    o_hi = gl.zeros([D, NP], gl.float32, layout=MMA)
    o_lo = gl.zeros([D, NP], gl.float32, layout=MMA)

    bt_row = block_table_ptr + seq * stride_bt
    PF: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    lane = gl.arange(0, 32, layout=PF)
    for pg in gl.static_range(PREFETCH):  # the first pages, into L2
        if p_lo + pg < p_hi:
            _prefetch_l2(cache_ptr + gl.load(bt_row + p_lo + pg).to(gl.int64) * stride_c_block
                         + kvh * stride_c_head, lane, PF_BYTES, PF_ASM)
    if RING:  # one staged page, refilled group by group (_page): the first page's groups, one commit each
        ring = _alloc_stage(SEGMENTS, 1)
        first = cache_ptr + gl.load(bt_row + p_lo, mask=p_lo < p_hi, other=0).to(gl.int64) * stride_c_block \
            + kvh * stride_c_head  # (no page: a block table row may be empty)
        for gi in gl.static_range(len(CHUNKS) + 1):
            if p_lo < p_hi:
                _copy_group(_stage_view(ring, 0, SEGMENTS), first, GROUPS, gi)
            async_copy.commit_group()
    elif TMA:  # staged as below, each page's pieces copied by TMA, completing on the stage's mbarrier
        descs = (desc0, desc1, desc2, desc3, desc4, desc5)
        ring = _alloc_stage(SEGMENTS, 2)
        bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(bars.index(0), count=1)
        mbarrier.init(bars.index(1), count=1)
        if p_lo < p_hi:
            _tma_page(_stage_view(ring, 0, SEGMENTS), descs,
                      _page_row(bt_row, p_lo, kvh, stride_c_block, stride_c_head), bars.index(0), BOXES, TMA_BYTES)
    elif SMEM:  # pages staged in shared memory: page pg + 1 is copied while page pg is read
        ring = _alloc_stage(SEGMENTS, 2)
        if p_lo < p_hi:
            _copy_page(_stage_view(ring, 0, SEGMENTS), cache_ptr + gl.load(bt_row + p_lo).to(gl.int64)
                       * stride_c_block + kvh * stride_c_head, PIECES)
        async_copy.commit_group()
    for pg in range(p_lo, p_hi):
        nxt = cache_ptr
        gsrc = cache_ptr
        has_next = pg + 1 < p_hi
        if TMA:
            stage = (pg - p_lo) % 2
            gl.thread_barrier()  # every lane is done with the buffer the next copy overwrites
            if pg + 1 < p_hi:
                _tma_page(_stage_view(ring, 1 - stage, SEGMENTS), descs,
                          _page_row(bt_row, pg + 1, kvh, stride_c_block, stride_c_head), bars.index(1 - stage), BOXES,
                          TMA_BYTES)
            gsrc = cache_ptr + gl.load(bt_row + pg).to(gl.int64) * stride_c_block + kvh * stride_c_head
            mbarrier.wait(bars.index(stage), ((pg - p_lo) // 2) & 1)
            src = _stage_view(ring, stage, SEGMENTS)
        elif RING:
            nxt = cache_ptr + gl.load(bt_row + gl.minimum(pg + 1, p_hi - 1)).to(gl.int64) * stride_c_block \
                + kvh * stride_c_head
            async_copy.wait_group(len(CHUNKS))  # this page's parameters (copied during the previous page)
            gl.thread_barrier()
            src = _stage_view(ring, 0, SEGMENTS)
        elif SMEM:
            stage = (pg - p_lo) % 2
            gl.thread_barrier()  # every lane is done with the buffer the next copy overwrites
            if pg + 1 < p_hi:
                _copy_page(_stage_view(ring, 1 - stage, SEGMENTS), cache_ptr + gl.load(bt_row + pg + 1).to(gl.int64)
                           * stride_c_block + kvh * stride_c_head, PIECES)
            async_copy.commit_group()
            async_copy.wait_group(1)
            gl.thread_barrier()  # page pg's bytes, copied by all lanes, are visible to all
            src = _stage_view(ring, stage, SEGMENTS)
        else:
            src = cache_ptr + gl.load(bt_row + pg).to(gl.int64) * stride_c_block + kvh * stride_c_head
            if pg + PREFETCH < p_hi:  # a page a few steps ahead, into L2 (no registers held)
                _prefetch_l2(cache_ptr + gl.load(bt_row + pg + PREFETCH).to(gl.int64) * stride_c_block
                             + kvh * stride_c_head, lane, PF_BYTES, PF_ASM)
        m_ref, l_i, o_hi, o_lo = _page(
            src, q_h, q_l, voff_h, voff_l, m_ref, l_i, o_hi, o_lo, CHUNKS, SHARED, BH, BL, D, N, NP, K_PAR, V_NORM,
            V_TOK, K_ASM_H, K_CONS_H, K_ASM_L, K_CONS_L, V_ASM_H, V_CONS_H, V_ASM_L, V_CONS_L, KP_H, KP_L, VP_H,
            VP_L, RESCALE, MMA, A, B, SMEM, PIECES, MH, ML, ONE, RING, GROUPS, DEFER, SUBN, PAGE_MAX, SUBK,
            nxt, has_next, gsrc, TMA,
        )

    # -- the bf16 tail (the last split): keys in the high key map, values in the high value map ----
    if split == NUM_SPLITS - 1:
        t_base = gl.load(tail_slots_ptr + seq).to(gl.int64) * stride_t_slot + kvh * stride_t_head
        rk = gl.arange(0, TAIL, layout=gl.SliceLayout(1, A))
        kmap_a = _key_map(MH, D, gl.SliceLayout(0, A))
        rv = gl.arange(0, TAIL, layout=gl.SliceLayout(0, A))
        vmap_a = _value_map(MH, D, gl.SliceLayout(1, A))
        r_c = gl.arange(0, TAIL, layout=ROW_C)
        for t0 in range(0, tail_len, TAIL):
            kt = gl.load(tk_ptr + t_base + (t0 + rk)[:, None] * stride_t_tok + kmap_a[None, :],
                         mask=(t0 + rk < tail_len)[:, None], other=0.0).to(gl.float16)
            s = mma_v2(kt, q_h, gl.zeros([TAIL, NP], gl.float32, MMA))
            s = gl.where((t0 + r_c < tail_len)[:, None], s, float("-inf"))
            p, m_ref, l_i, o_hi, o_lo, _, _ = _softmax_chunk(s, m_ref, l_i, o_hi, o_lo, o_lo, l_i, RESCALE, ONE,
                                                             DEFER, 0, True, MMA)
            vt = gl.load(tv_ptr + t_base + (t0 + rv)[None, :] * stride_t_tok + vmap_a[:, None],
                         mask=(t0 + rv < tail_len)[None, :], other=0.0).to(gl.float16)
            o_hi = mma_v2(vt, gl.convert_layout(p.to(gl.float16), B), o_hi)

    # -- combine the two value maps through this program's partial row, then finish or merge ----
    if DEFER:
        l_i = gl.sum(l_i, axis=0)
    n_c = gl.arange(0, NP, layout=COL_C)
    heads_c = kvh * G + n_c
    hmask = (n_c < G)[None, :]
    row = (seq * (G * num_kv_heads) + heads_c) * NUM_SPLITS + split  # [NP]
    part = part_o_ptr + row[None, :] * D
    safe_l = gl.where(l_i > 0, l_i, 1.0)
    if ONE:  # noqa: SIM108 (constexpr branches)
        o = o_hi / safe_l[None, :]
    else:
        gl.store(part + vmap_h[:, None], o_hi, mask=hmask)
        gl.thread_barrier()
        o = (gl.load(part + vmap_l[:, None], mask=hmask, other=0.0) + o_lo) / safe_l[None, :]
    lse2 = gl.where(l_i > 0, m_ref + gl.log2(safe_l), float("-inf"))  # base 2, of the scaled logits
    if NUM_SPLITS == 1:
        dst = out_ptr + seq * stride_o_seq + heads_c[None, :] * stride_o_head + vmap_l[:, None]
        gl.store(dst, o.to(out_ptr.dtype.element_ty), mask=hmask)
        if WRITE_LSE:
            gl.store(lse_ptr + seq * (G * num_kv_heads) + heads_c, lse2 * 0.6931471805599453, mask=n_c < G)
    else:
        gl.store(part + vmap_l[:, None], o, mask=hmask)
        gl.store(part_lse_ptr + row, lse2, mask=n_c < G)
        gl.thread_barrier()
        done = gl.atomic_add(counter_ptr + seq * num_kv_heads + kvh, 1, sem="acq_rel", scope="gpu")
        if done == NUM_SPLITS - 1:  # the last program of this (sequence, KV head) merges the splits
            gl.store(counter_ptr + seq * num_kv_heads + kvh, 0)
            hrow0 = (seq * (G * num_kv_heads) + kvh * G) * NUM_SPLITS
            out_row = out_ptr + seq * stride_o_seq + kvh * G * stride_o_head
            lse_row = lse_ptr + seq * (G * num_kv_heads) + kvh * G
            _merge_heads(part_o_ptr, part_lse_ptr, hrow0, out_row, stride_o_head, lse_row, NUM_SPLITS, G, GP, D,
                         WRITE_LSE)


@gluon.jit
def _merge_heads(part_o_ptr, part_lse_ptr, hrow0, out_row, stride_o_head, lse_row, NUM_SPLITS: gl.constexpr,
                 G: gl.constexpr, GP: gl.constexpr, D: gl.constexpr, WRITE_LSE: gl.constexpr):
    """The splits' partial rows merged for all ``G`` query heads at once (``GP`` = G rounded up to a power of
    two): the splits unrolled, each a ``[GP, D]`` load independent of the others (the L2 round trips overlap;
    one head at a time, as before b224266, was 0.9 us slower at batch 1 / 4k), read at L2 (``.cg``: rows
    written by other SMs)."""
    ML: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, 1], [1, 0])
    hh = gl.arange(0, GP, layout=gl.SliceLayout(1, ML))
    dk = gl.arange(0, D, layout=gl.SliceLayout(0, ML))
    hv = hh < G
    hrow = hrow0 + hh * NUM_SPLITS  # [GP]
    mx = gl.full([GP], float("-inf"), gl.float32, layout=gl.SliceLayout(1, ML))
    lses = ()
    for s in gl.static_range(NUM_SPLITS):
        x = gl.load(part_lse_ptr + hrow + s, mask=hv, other=float("-inf"), cache_modifier=".cg")
        lses = lses + (x,)
        mx = gl.maximum(mx, x)
    mx = gl.where(mx == float("-inf"), 0.0, mx)
    tot = gl.zeros([GP], gl.float32, layout=gl.SliceLayout(1, ML))
    acc = gl.zeros([GP, D], gl.float32, layout=ML)
    for s in gl.static_range(NUM_SPLITS):
        w = gl.exp2(lses[s] - mx)
        tot = tot + w
        acc = acc + w[:, None] * gl.load(part_o_ptr + (hrow + s)[:, None] * D + dk[None, :], mask=hv[:, None],
                                         other=0.0, cache_modifier=".cg")
    res = acc / gl.where(tot > 0, tot, 1.0)[:, None]
    gl.store(out_row + hh[:, None] * stride_o_head + dk[None, :], res.to(out_row.dtype.element_ty), mask=hv[:, None])
    if WRITE_LSE:
        gl.store(lse_row + hh, (mx + gl.log2(gl.where(tot > 0, tot, 1.0))) * 0.6931471805599453
                 + gl.where(tot > 0, 0.0, float("-inf")), mask=hv)


# fmt: on


# --------------------------------------------------------------------------------------------- launcher
_COUNTERS: dict = {}


def _counter(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters that the kernel resets itself (valid across CUDA-graph replays)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, device: torch.device,
                      programs_per_sm: int = PROGRAMS_PER_SM) -> int:  # fmt: skip
    """Programs per (sequence, KV head) from shapes only (no host sync): page splits of at least
    MIN_PAGES_PER_SPLIT pages, about ``programs_per_sm`` one-warp programs per SM (``resident_programs``),
    plus one for the bf16 tail."""
    if max_blocks == 0:
        return 1
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(programs_per_sm * num_sms(device), programs)
    most = max(1, max_blocks // MIN_PAGES_PER_SPLIT)
    return 1 + max(1, min(want - 1, most, 63))


def map_bits(layout, maps: int) -> tuple[int, int]:
    """Bits of the channel maps the high and the low tiles are read into: their own (two maps), or the smaller
    width's for both (one map: 4-bit codes are read into the 2-bit map, one value accumulator)."""
    bh, bl = layout.bits_high, layout.bits_low
    return (bh, bl) if maps == 2 else (min(bh, bl),) * 2


@functools.lru_cache(maxsize=64)
def _constexprs(layout, max_chunk: int = MAX_CHUNK, stage: bool = False, maps: int = 2, ring: bool = False,
                subnormal: bool = False, piece_buffers: bool = False,
                subnormal_keys: bool = False, tma: bool = False) -> dict:  # fmt: skip
    d, bh, bl = layout.head_size, layout.bits_high, layout.bits_low
    mh, ml = map_bits(layout, maps)
    plans = [param_load_plan("key", mh, d), param_load_plan("key", ml, d), param_load_plan("value", mh, d),
             param_load_plan("value", ml, d)]
    tma = tma and stage and not ring
    if tma:
        check(tma_supported(layout, max_chunk), f"pages of this layout cannot be staged by TMA: {layout}")
        tiles, segments, pieces, boxes, _ = tma_plan(layout, max_chunk)
    else:
        tiles, boxes = chunks(layout, max_chunk), ()
        segments, pieces = stage_plan(layout, tiles, piece_buffers) if stage else ((32,), ())
    shared = tuple(shared_params(p) for p in plans) + tuple(
        x for c in tiles for x in shared_operand("key", bh if c[2] else bl, d, c[1], mh if c[2] else ml)
        + shared_operand("value", bh if c[4] else bl, d, c[1], mh if c[4] else ml)) if stage else (
        None,) * (4 + 4 * len(tiles))
    kh, kch, _ = key_unpack_asm(bh, d, mh, subnormal_keys)
    kl, kcl, _ = key_unpack_asm(bl, d, ml, subnormal_keys)
    vh, vch, _ = value_unpack_asm(bh, d, subnormal)
    vl, vcl, _ = value_unpack_asm(bl, d, subnormal)
    return {
        "D": d, "N": layout.block_size, "CHUNKS": tiles, "BH": bh, "BL": bl,
        "K_PAR": layout.k_param_off, "V_NORM": layout.v_norm_off, "V_TOK": layout.v_tok_off,
        "K_ASM_H": kh, "K_CONS_H": kch, "K_ASM_L": kl, "K_CONS_L": kcl,
        "V_ASM_H": vh, "V_CONS_H": vch, "V_ASM_L": vl, "V_CONS_L": vcl,
        "KP_H": plans[0], "KP_L": plans[1], "VP_H": plans[2], "VP_L": plans[3],
        "SMEM": stage, "SHARED": shared, "SEGMENTS": segments, "PIECES": pieces, "MH": mh, "ML": ml,
        "ONE": mh == ml and maps == 1, "RING": stage and ring, "SUBN": subnormal,
        "SUBK": subnormal_keys, "TMA": tma, "BOXES": boxes, "TMA_BYTES": sum(p[1] for p in pieces) if tma else 0,
        "GROUPS": ring_groups(layout, tiles, pieces) if stage and ring else (),
        "PF_BYTES": _pf_bytes(layout),  # codes + parameters, a multiple of 16 bytes
        "PF_ASM": f"cp.async.bulk.prefetch.L2.global [$1], {_pf_bytes(layout)}; mov.u32 $0, 0;",
    }  # fmt: skip


def _pf_bytes(layout) -> int:
    return -(-layout.mask_off // 16) * 16


def tma_wanted(tma_pages, width: int, num_splits: int, fold_tail: bool = False) -> bool:
    """``tma_pages`` resolved from shapes (no host sync, as the split count): ``"auto"`` wants TMA where a page
    split of a block table ``width`` pages wide holds at least ``TMA_MIN_PAGES`` pages."""
    if tma_pages == "auto":
        return width >= TMA_MIN_PAGES * max(1, num_splits - (num_splits > 1 and not fold_tail))
    return bool(tma_pages)


def _span(kv_cache: torch.Tensor) -> int:
    """Bytes from the cache's first to its last byte."""
    return 1 + sum((n - 1) * st for n, st in zip(kv_cache.shape, kv_cache.stride(), strict=True))


def tma_cache(kv_cache: torch.Tensor) -> bool:
    """Whether every page of ``kv_cache`` (uint8 ``[num_blocks, num_kv_heads, page_bytes]``) starts at a multiple
    of 128 bytes and its 128-byte rows are counted in int32 (the kernel's page rows, TMA's coordinates), as
    ``tma_descriptors`` needs."""
    return (kv_cache.data_ptr() % 128 == 0 and kv_cache.stride(0) % 128 == 0 and kv_cache.stride(1) % 128 == 0
            and _span(kv_cache) // 128 < 2**31)


_DESCRIPTORS: dict = {}
TMA_DESCRIPTORS = 6  # descriptor parameters of the kernel (box shapes a page may need)


def _descriptor_args(kv_cache, layout, max_chunk: int, tma: bool) -> tuple:
    """The kernel's ``TMA_DESCRIPTORS`` descriptor arguments (None where unused)."""
    descs = tma_descriptors(kv_cache, tma_plan(layout, max_chunk)[4]) if tma else ()
    return descs + (None,) * (TMA_DESCRIPTORS - len(descs))


def tma_descriptors(kv_cache: torch.Tensor, shapes: tuple) -> tuple:
    """Tensor descriptors of the cache's bytes as int32 rows of ``W`` words, one per ``(rows, W)`` box of
    ``tma_boxes`` (kept while the cache tensor lives: the same objects at every call, valid across CUDA-graph
    replays; they hold a view of the cache's memory, so the entry goes with the tensor, not to keep it alive)."""
    span = _span(kv_cache)
    key = (kv_cache.data_ptr(), span, shapes)
    descs = _DESCRIPTORS.get(key)
    if descs is None:
        if len(_DESCRIPTORS) > 256:
            _DESCRIPTORS.clear()
        flat = torch.as_strided(kv_cache, (span,), (1,))
        descs = _DESCRIPTORS[key] = tuple(
            TensorDescriptor.from_tensor(flat[: span // (4 * w) * 4 * w].view(torch.int32).view(-1, w), [r, w],
                                         TMA_LAYOUT.value)
            for r, w in shapes)
        weakref.finalize(kv_cache, _DESCRIPTORS.pop, key, None)
    return descs


SCHEDULE = {  # the page loop's launch options -> their module defaults, in _schedule's order
    "maps": "MAPS", "ring": "RING", "maxnreg": "MAXNREG", "tail_first": "TAIL_FIRST", "defer_sum": "DEFER_SUM",
    "fold_tail": "FOLD_TAIL", "subnormal_values": "SUBNORMAL_VALUES", "piece_buffers": "PIECE_BUFFERS",
    "page_max": "PAGE_MAX", "subnormal_keys": "SUBNORMAL_KEYS", "tma_pages": "TMA_PAGES",
}


def schedule_defaults() -> dict:
    """The schedule a call that names no launch option runs, by option name (``PAGE_MAX`` as resolved)."""
    return dict(zip(SCHEDULE, _schedule(None, None, None), strict=True))


def set_schedule_defaults(**options) -> None:
    """Set module defaults by launch option name (a benchmark runs a variant everywhere, the engine included)."""
    for name, value in options.items():
        globals()[SCHEDULE[name]] = value


def _schedule(maps, ring, maxnreg, tail_first=None, defer_sum=None, fold_tail=None, subnormal_values=None,
              piece_buffers=None, page_max=None, subnormal_keys=None, tma_pages=None) -> tuple:  # fmt: skip
    """Launch options, None meaning the module's default at the time of the call (``PAGE_MAX`` only where the
    ring is off: the ring refills a chunk's bytes once its values are read)."""
    ring = RING if ring is None else ring
    if page_max is None:
        page_max = PAGE_MAX and not ring
    return (MAPS if maps is None else maps, ring,
            MAXNREG if maxnreg is None else maxnreg, TAIL_FIRST if tail_first is None else tail_first,
            DEFER_SUM if defer_sum is None else defer_sum,
            FOLD_TAIL if fold_tail is None else fold_tail,
            SUBNORMAL_VALUES if subnormal_values is None else subnormal_values,
            PIECE_BUFFERS if piece_buffers is None else piece_buffers,
            page_max, SUBNORMAL_KEYS if subnormal_keys is None else subnormal_keys,
            TMA_PAGES if tma_pages is None else tma_pages)  # fmt: skip


def decode_attention_v2(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    tail_key: torch.Tensor,
    tail_value: torch.Tensor,
    tail_slots: torch.Tensor,
    tail_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_chunk: int = MAX_CHUNK,
    prefetch: int = PREFETCH_PAGES,
    stage: bool | None = None,
    maps: int | None = None,
    ring: bool | None = None,
    maxnreg: int | None = None,
    tail_first: bool | None = None,
    defer_sum: bool | None = None,
    fold_tail: bool | None = None,
    subnormal_values: bool | None = None,
    piece_buffers: bool | None = None,
    page_max: bool | None = None,
    subnormal_keys: bool | None = None,
    tma_pages: bool | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its compressed pages and its bf16 tail (CUDA).

    Arguments as ``decode_attention`` (v1). ``lse``: optional fp32 ``[num_seqs, num_heads]`` that receives
    the natural-log log-sum-exp of ``scale * q.k`` per row (what the saliency update needs). ``maps``: channel
    maps of the page loop; ``ring``: one staged page refilled piece by piece; ``maxnreg``: a register cap;
    ``tail_first``: the tail programs first in the grid; ``defer_sum``: the softmax denominator as per-lane
    partials; ``fold_tail``: the last page split takes the tail (``num_splits`` then counts page splits);
    ``subnormal_values``: value codes as fp16 subnormals, scaled once per value group; ``piece_buffers``: each
    staged piece in its own shared allocation; ``page_max``: one softmax rescale check per page (only where the
    ring is off); ``subnormal_keys``: key codes as fp16 subnormals too; ``tma_pages``: staged pages copied by TMA
    (where ``tma_supported`` and the cache's pages start at multiples of 128 bytes; else cp.async; ``"auto"``: where
    a page split of the block table holds at least ``TMA_MIN_PAGES`` pages) (each None: the
    module's ``MAPS``, ``RING``, ``MAXNREG``, ``TAIL_FIRST``, ``DEFER_SUM``, ``FOLD_TAIL``, ``SUBNORMAL_VALUES``,
    ``PIECE_BUFFERS``, ``PAGE_MAX``, ``SUBNORMAL_KEYS``, ``TMA_PAGES``, read at the call). Returns ``out``.
    """
    dev = query.device
    check(dev.type == "cuda", "decode_attention_v2 runs on CUDA only (use decode_attention elsewhere)")
    check(supported(layout), f"layout not supported by v2 (use v1): {layout}")
    out, h = check_decode_inputs(query, kv_cache, layout, block_table, seq_lens, tail_key, tail_value, tail_slots,
                                 tail_lens, out, (torch.bfloat16, torch.float16))
    num_seqs, num_heads, d = query.shape
    check(num_heads // h <= 16, "v2 takes at most 16 query heads per KV head")
    if lse is not None:
        check_tensor(lse, "lse", 2, (torch.float32,), dev)
        check(tuple(lse.shape) == (num_seqs, num_heads) and lse.is_contiguous(), "lse must be [num_seqs, num_heads]")
    if num_seqs == 0:
        return out
    if stage is None:
        stage = STAGE_PAGES > 0 and stage_supported(layout)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, h, block_table.shape[1], dev,
                                       split_programs(layout, stage, ring, maxnreg))
    check(num_splits >= 1, "num_splits must be >= 1")
    (maps, ring, maxnreg, tail_first, defer_sum, fold_tail, subnormal_values, piece_buffers, page_max,
     subnormal_keys, tma_pages) = _schedule(maps, ring, maxnreg, tail_first, defer_sum, fold_tail, subnormal_values,
                                            piece_buffers, page_max, subnormal_keys, tma_pages)
    check(maps in (1, 2), "maps must be 1 or 2")
    check(not (page_max and ring), "page_max reads a page's scores before its values: not with ring")
    check(tma_pages in (True, False, "auto"), "tma_pages must be True, False or 'auto'")
    check(not (tma_pages is True and ring), "tma_pages copies whole pages into a staged pair: not with ring")
    scale = d**-0.5 if scale is None else scale
    launch_decode_v2(query, kv_cache, layout, block_table, seq_lens, tail_key, tail_value, tail_slots, tail_lens,
                     out, lse, scale, num_splits, max_chunk, prefetch, stage, maps, ring, maxnreg, tail_first,
                     defer_sum, fold_tail, subnormal_values, piece_buffers, page_max, subnormal_keys,
                     tma_pages)  # fmt: skip
    return out


def launch_decode_v2(query, kv_cache, layout, block_table, seq_lens, tail_key, tail_value, tail_slots, tail_lens,
                     out, lse, scale: float, num_splits: int, max_chunk: int = MAX_CHUNK,
                     prefetch: int = PREFETCH_PAGES, stage: bool | None = None,
                     maps: int | None = None, ring: bool | None = None,
                     maxnreg: int | None = None, tail_first: bool | None = None,
                     defer_sum: bool | None = None, fold_tail: bool | None = None,
                     subnormal_values: bool | None = None, piece_buffers: bool | None = None,
                     page_max: bool | None = None, subnormal_keys: bool | None = None,
                     tma_pages: bool | None = None) -> None:  # fmt: skip
    """The kernel of :func:`decode_attention_v2` on checked arguments (no checks, no host sync)."""
    (maps, ring, maxnreg, tail_first, defer_sum, fold_tail, subnormal_values, piece_buffers, page_max,
     subnormal_keys, tma_pages) = _schedule(maps, ring, maxnreg, tail_first, defer_sum, fold_tail, subnormal_values,
                                            piece_buffers, page_max, subnormal_keys, tma_pages)
    if stage is None:
        stage = STAGE_PAGES > 0 and stage_supported(layout)
    tma_pages = tma_wanted(tma_pages, block_table.shape[1], num_splits, bool(fold_tail))
    tma_pages = bool(tma_pages and stage and not ring and tma_supported(layout, max_chunk) and tma_cache(kv_cache))
    num_seqs, num_heads, d = query.shape
    h = tail_key.shape[2]
    g = num_heads // h
    dev = query.device
    part_o = torch.empty(num_seqs * num_heads * num_splits * d, dtype=torch.float32, device=dev)
    part_lse = torch.empty(num_seqs * num_heads * num_splits, dtype=torch.float32, device=dev)
    _decode_v2_kernel[(num_seqs, h, num_splits)](
        query, query.stride(0), query.stride(1),
        kv_cache, kv_cache.stride(0), kv_cache.stride(1),
        block_table, block_table.stride(0),
        seq_lens, tail_lens, tail_slots,
        tail_key, tail_value, tail_key.stride(0), tail_key.stride(1), tail_key.stride(2),
        out, out.stride(0), out.stride(1),
        part_lse if lse is None else lse,
        part_o, part_lse,
        _counter(num_seqs * h, dev),
        *_descriptor_args(kv_cache, layout, max_chunk, tma_pages),
        scale * LOG2E, h,
        NUM_SPLITS=num_splits, G=g, NP=max(8, pow2(g)), TAIL=TAIL_CHUNK,
        WRITE_LSE=lse is not None, RESCALE=RESCALE_LOG2, GP=pow2(g),
        **_constexprs(layout, max_chunk, stage, maps, ring, bool(subnormal_values), bool(piece_buffers),
                      bool(subnormal_keys), tma_pages),
        PREFETCH=prefetch, TAIL_FIRST=bool(tail_first), DEFER=bool(defer_sum), FOLD_TAIL=bool(fold_tail),
        PAGE_MAX=bool(page_max),
        num_warps=1,
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )  # fmt: skip
