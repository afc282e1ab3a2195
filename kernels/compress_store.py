"""Compress complete blocks into mixed-precision pages: saliency ranking, ZC-3 keys, ZC-2 values, packing.

Twin: ``zipcache_vllm.engine.paged.compress_store``; every byte it writes (codes, fp16 parameters, bitmaps) is equal.
One program per (block, KV head), 2 warps. The page rows come from one bitonic sort of the scores (the top-k
thresholds) and prefix sums (:func:`_page_rows`, each reduction serving keys and values at once); the token of
each page row goes to a small scratch row (a register tensor cannot be sliced) and the block is then quantized
in tiles of ``R`` page rows (16 at head size 128). Page rows ``0 .. SK-1`` are the key-salient tokens and
``0 .. SV-1`` the value-salient ones, and ``R`` divides both quotas (:func:`tile_rows`; layout v2 quotas are
multiples of 16), so every tile is of one key and one value group: it is quantized with one set of parameters,
packed at one width (:func:`_store_packed`) and stored as whole rows. Keys take two passes (each group's min/max
per channel, from the whole block loaded at once in page-row order, :func:`_load_block`, taken on bf16 / fp16 pairs
unconverted, :func:`_rows_reduce`; then codes by tiles),
values two (max |x| per channel, from the block loaded at once in token order; then each row's ``(step, mn)`` of
``x / c`` and codes by tiles); each program asks L1 for its first pass's rows before the ranking. The running
tiles are reduced per channel through a scratch (:func:`_channel_reduce`), so each
channel's parameters are computed by few lanes, not by the 16 that held it. The per-element divisions divide by
a reciprocal shared per channel or row with one Markstein correction (:func:`_div`), not by a full IEEE division
each; so does the parameters' division by ``2^bits - 1`` (a host-rounded reciprocal, :func:`reciprocal32`). The
tile loops take their bounds at run time (ptxas unrolls constant-trip loops: measured slower, below).

sm_90 SASS (``benchmarks/sass_compress.py``, ``vllm`` page, R 16, 2 warps): 8,240 instructions before
:func:`reciprocal32`, 7,376 after it (timed side by side on an H100 at 4785aa9: the same at 4k, 37.0 vs 36.7 us,
5 % faster at 16k, 99.1 vs 104.5 us); **4,896** with page-row tiles, the scratch reductions, codes rounded by the
float addition alone (:func:`_codes`), the ranking's packed reductions and the next tile's tokens loaded ahead
(2026-12-05), 255 -> 168 registers, and per warp ~20,250 -> ~12,670 executed instructions (loop sizes x trip
counts + the straight-line rest, which fell from ~5,500 to ~2,500); at R 32 and 4 warps ~7,480. Timed on an
H100 (35dbe21, ``vllm`` page, 4k / 16k prompt): 28.5 / 81.3 us at 16 x 2 against 35.3 / 97.3 before; 32 x 4
26.4 / 106.0 (faster where the programs are one wave). Where they are, the default now splits each (block, KV
head) into a program for the keys and one for the values (``programs=2``, 2 warps each; ``_launch``): with the
scores computed inside, 4k 28.2 us against 30.0 at 32 x 4 (H100, 56b69e9). Measured and dropped on the way (H100,
2026-12-06): keys and values in the same two passes over the page rows (a5ee8d7: same instructions per warp, no
gain: 4k 26.0 vs 25.6 us given scores, 16k 91.4 vs 80.8), and a hand-off where the values' program takes the keys'
program's page rows through a flag instead of ranking the block itself (56b69e9: 28.5 vs split's 28.2 us at 4k:
the keys' program, which scores and ranks, is the critical path either way). The tile loops load the next tile
before they work on the current one (:func:`_next_tile`; 168 -> 232 registers, still four 2-warp programs an SM):
given scores 19.1 vs 19.4 us at 4k (split), 77.4 vs 80.1 at 16k (H100, ff3f49b + this change,
``benchmarks/results/h100_compress_prefetch_ff3f49b.json``; at 170904c, on the whole-tile kernel, it gained
nothing). Each value tile's per-row ``(step, mn)`` go out in one store (:func:`_value_rows`; the compiler routes
each such store through shared memory to coalesce it, so one conversion fewer: 6 -> 4 and 4 -> 2 barriers per tile
in the two value loops). Measured and dropped (2026-12-06): more programs per (block, KV head), each a shorter
stream, 3 (the values' page rows in two halves, a program each) and 4 (the keys' channels in two byte-closed halves
too): the step's two kernels at 4k 29.9 / 33.7 us against 27.9 at 2 programs on the H100, 29.8 / 31.6 against 26.2
on the H200, slower at 8k and 16k too (``benchmarks/results/h100_checkup_b4645a5.log``,
``h200_compress_ways_7ea8c29.log``; the code is at 98400d4); the values' normalizer pass moved before the ranking
(it does not depend on it) and each program asking L2 for its block's rows first (``prefetch.global.L2``): 4k 27.2
us with both, 26.4 with the move alone, 26.0 with neither; 16k 111.1 / 106.9 / 102.3 (H100, 6b457ba,
``h100_checkup_prefetch_6b457ba.log``). Where the time goes at 4k (``benchmarks/spike_compress_parts.py``, H100,
``h100_compress_parts_748a2b6.log``; the pages of the cut kernels are not valid): 20.9 us alone, 19.8 without the
ranking, 17.9 with only the keys' programs, 19.6 with only the values': one program's chain of dependent tile
loads, not the sum of the work, sets the time at one wave.
First passes as one load of the block (2026-12-06 afternoon; before, a tile loop waited a memory latency per
tile): the step's two kernels at 4k 26.7 / 26.4 us against 28.5 / 28.1 over input copies (H100, 009faed, with the
L1 prefetch and the keys' scratch loads issued together), slower at 16k in one program (105 against 102: each
program's 32 KB burst), where the key code tiles now take their parameters from registers (94 us; slower split, 28
against 27 at 4k: ``programs=2`` reads them back) (``benchmarks/results/h100_trace_compress_009faed.log``).
The keys' group min / max on pairs (2026-12-06 evening): ``min.bf16x2`` / ``max.bf16x2`` (``.f16x2``) over the row
tiles, not fp32 min / max of converted elements (ptxas does that for the values' max |x| by itself, ``VHMNMX``, but not
for the keys' masked ranges): the keys' straight line to their first code loop 2,673 -> 1,971 instructions a warp, their
first passes 4.86 -> 4.10 us (median per program, both launched with PDL); the step's two kernels at 16k 86.9 against
93.6 us, at 4k 26.4 against 26.0 (the values' programs, now the longer half, set that time; H100, 172f505's kernel timed
at dc0260c, ``benchmarks/results/h100_spike_pdl.log``, ``h100_pdl_trace.log``). Measured there and dropped: launching
this kernel as a programmatic dependent (PDL) of the score kernel, its programs starting beside the score kernel's (the
values' normalizer computed before ``griddepcontrol.wait``), or at the score programs' ends, or capped at 152 registers
so that all of them fit beside the score kernel's at once: 4k 29.3 / 27.5 / 26.6 us against 26.4, 16k 96.0 / 98.6 /
118.2 against 86.9 (the code is at dc0260c, ``benchmarks/spike_pdl.py`` there).
Fewer instructions and no barriers in the tile loops (2026-12-06 night): :func:`_div` takes the negated divisor
(with fp fusion off a per-element ``-q`` is ``0 - q``, an FADD ptxas keeps) and keeps a zero's sign by one LOP3,
not a predicated FMA; the values' per-row ``(step, mn)`` and the page rows' tokens go out by inline ``st.global``
from the layout they are in (:func:`_store_in_place`), and the packed codes in 8-byte runs from the code tile's
(:func:`_store_packed`), where ``tl.store`` first moved each through shared memory between two barriers; the
bitmaps are stored by the keys' program alone. sm_90 SASS: value tile 635 -> 572, key tile 388 -> 349
instructions, 4 / 2 barriers a tile -> 0, ~11,140 -> ~10,410 executed per warp. H200, the step's two kernels at
4k (``bench_kernels.py --quick``): 23.8 us, 9.2 % of SDPA causal (``benchmarks/results/h200_9062055.json``).
With ``probe_query`` the program scores its block by its probes first (``block_scores.probe_scores``, the block
rule), so the scores never leave the SM: since page-row tiles faster than the two kernels in sequence (4k 30.7 us
against 14.0 + 26.4, 16k 97.9 against 27.6 + 81.3; it was slower before, below). The engine step launched this
path from then until bc9fb34 (2026-12-06), and now launches ``block_probe_scores`` then this kernel given the
scores, as its decode step always did: one scoring kernel for every block (its 4 warps use the Hopper ``wgmma``,
this kernel's 2 warps ``mma.sync``, and the two round the sums differently, so a near-tie could rank otherwise and
a block's page would depend on whether a prompt or decode rows completed it), and faster where a step's blocks are
one wave (H100, 653aee4: 4k 25.7 us against 26.7 one launch; 8k 51.1 against 48.6, 16k 101.7 against 90.6:
``benchmarks/results/h100_checkup_653aee4.log``). The one launch stays for callers that score every block this way.

The row-tile kernel before page-row tiles (170904c) on the H200, the 32 / 128 blocks x 8 KV heads of a 4k / 16k
prompt, ``vllm`` preset (``benchmarks/bench_compress.py``, CUDA-graph replays of one launch): 36 / 99 us, against 55
/ 188 us for the whole-tile kernel before it (255 registers, 12.5 % occupancy, instruction-cache misses) and 113 /
433 us for the first one. Tiles of 32 elements per thread are the sweet spot: 16 rows x 2 warps, 32 x 4 (36 / 128
us) and 8 x 1 (51 / 90 us); 16 elements per thread (16 x 4, 8 x 2) run 2-3x slower, 8 warps slower still. Scoring
inside the kernel: 62 / 243 us against 11 / 26 us (``block_probe_scores``) + 36 / 99. Prefetching the next tile,
unrolled tile loops and a program per K or V were no faster (``benchmarks/results/h200_compress_*.json``).
Bit-exactness rests on the conventions of ``zipcache_vllm/method/quant.py``: float32 min/max, IEEE division and
square root (``div_rn`` / ``sqrt_rn``, or :func:`_div`'s equal result), parameters rounded to fp16 before the
codes, round-half-to-even, and no contraction into fused multiply-adds (the kernel is launched with fp fusion
off; :func:`_div`'s two explicit FMAs are part of its exact division).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import cache_args, check, check_cache, check_tensor, interpreting, num_sms, pow2
from .block_scores import normalize_scores, probe_args, probe_scores

EPS = tl.constexpr(1e-6)  # quant.EPS: the smallest step
_BIG = tl.constexpr(3.4028234663852886e38)  # float32 max, the neutral element of masked min/max as in quant.py
_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: y + M holds rint(y) (half-to-even) in its low bits (_codes)


@functools.lru_cache(maxsize=16)
def reciprocal32(x: float) -> float:
    """``1 / x`` rounded to float32 as IEEE division does (``div_rn(1, x)``), as a Python float."""
    return (torch.ones((), dtype=torch.float32) / torch.tensor(x, dtype=torch.float32)).item()


@triton.jit
def _tile_channels(D: tl.constexpr, PL: tl.constexpr):
    """The channels of a tile's columns ``[D/PL, PL]``: ``[i, j]`` is channel ``i + j * D/PL``."""
    return tl.arange(0, D // PL)[:, None] + tl.arange(0, PL)[None, :] * (D // PL)


@triton.jit
def _load_tile(x_ptr, stride_x_tok, tok, tv, D: tl.constexpr, PL: tl.constexpr, FP32: tl.constexpr = True):
    """Rows ``tok`` of one head as fp32 ``[N_PAD, D/PL, PL]``: element ``[., i, j]`` is channel ``j * D/PL + i``,
    so the ``PL`` channels one byte of low-width codes holds (paged.pack_row) share the last axis (this order
    and ``[N_PAD, PL, D/PL]`` compile to nearly the same SASS: ``sass_compress.py``). Padded rows load 0. Without
    ``FP32``: in the tensor's dtype."""
    ch = _tile_channels(D, PL)
    x = tl.load(x_ptr + tok[:, None, None] * stride_x_tok + ch[None, :, :], mask=tv[:, None, None], other=0.0)
    if FP32:
        x = x.to(tl.float32)
    return x, ch


@triton.jit
def _prefetch_rows(x_ptr, stride_x_tok, x_tok, N: tl.constexpr, N_PAD: tl.constexpr, D: tl.constexpr):
    """``prefetch.global.L1`` of the block's ``N`` rows of one head (one address per 128-byte line): no register
    holds them and nothing waits on them; the loads that follow find them in L1."""
    BITS: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth
    LINES: tl.constexpr = max(D * BITS // 1024, 1)
    t = tl.arange(0, N_PAD)
    t = tl.where(t < N, t, 0)
    p = x_ptr + (x_tok + t)[:, None] * stride_x_tok + (tl.arange(0, LINES) * (D // LINES))[None, :]
    tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _load_block(x_ptr, stride_x_tok, tok, tv, N_PAD: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                PL: tl.constexpr):  # fmt: skip
    """Rows ``tok`` (``[N_PAD]``; ``tv``: which exist, the others load 0) of one head, the whole block in one load, as
    ``[N_PAD / R, R, D/PL, PL]`` in the tensor's dtype (half the registers of fp32): ``[a, r, i, j]`` is row
    ``a * R + r``, channel ``j * D/PL + i`` (the tiles' order, :func:`_load_tile`). Every row is in flight at
    once, where a tile loop waits a memory latency per tile. Loaded as ``[N_PAD, D/PL, PL]``, whose layout is a
    tile's repeated down the rows, then split: the first axis is in each thread's registers, so a reduction over
    it is the thread's own and a condition on it alone a constant per register (a 4-d load gets that axis across
    lanes)."""
    x, ch = _load_tile(x_ptr, stride_x_tok, tok, tv, D, PL, False)
    return tl.reshape(x, (N_PAD // R, R, D // PL, PL))


@triton.jit
def _quant_params(mn, mx, QMAX, RQMAX):
    """fp16 ``(step, mn)`` of the range ``[mn, mx]`` on ``QMAX + 1`` levels (``quant.EPS`` the smallest step).
    The division by ``QMAX`` is :func:`_div` with ``RQMAX = div_rn(1, QMAX)`` rounded on the host
    (:func:`reciprocal32`): equal to ``div_rn`` for every range (a subnormal range, where ``_div`` may be 1 ulp
    off, gives a quotient far below ``EPS``; an infinite one is kept), without ``div_rn``'s slow-path branch at
    each of the thread's elements."""
    a = mx - mn
    q = tl.where(a == float("inf"), a, _div(a, -QMAX, RQMAX))
    return tl.maximum(q, EPS).to(tl.float16), (mn + 0.0).to(tl.float16)  # a zero minimum is +0 (quant.py)


@triton.jit
def _div(a, nb, rb, SIGNED_ZERO: tl.constexpr = True):
    """``a / b`` rounded as IEEE division from ``nb = -b`` and ``rb = div_rn(1, b)``, for a divisor shared by many
    dividends: ``q = a * rb`` then one Markstein correction ``q + (a - q b) * rb`` (two FMAs; no per-element
    reciprocal, no slow-path branch as in ``div_rn``). The residual is ``fma(q, nb, a)``: ``-q`` would cost an
    instruction per element (with fp fusion off a negation is ``0 - q``, which ptxas does not fold into the FMA),
    ``-b`` is one per divisor. For a positive divisor (every caller's) equal to ``div_rn`` for every dividend that
    is zero (sign kept) or normal (checked on 8 M random pairs over every positive fp16 divisor); a subnormal
    dividend can be 1 ulp off, at quotients below 2^-100 that round to the same codes and fp16 parameters
    (tests/kernels). The correction turns ``-0`` into ``+0``; ``SIGNED_ZERO`` or's the dividend's sign bit back
    (the quotient's sign for a positive divisor, so only a zero's changes); without it, for quotients only rounded
    to integer codes, where the sign of a zero does not matter, one LOP3 fewer per element."""
    q = a * rb
    q = tl.fma(tl.fma(q, nb, a), rb, q)
    if SIGNED_ZERO:
        q = (q.to(tl.int32, bitcast=True) | (a.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32, bitcast=True)
    return q


@triton.jit
def _codes(x, mn16, step16, rstep, qmax):
    """``rint((x - mn) / step)`` clamped to ``[0, qmax]`` (operands broadcast to ``x``; ``rstep`` =
    ``div_rn(1, step)``; a zero quotient's sign does not reach the code), in the low 8 bits of an int32: the
    bits of ``y + 1.5 * 2^23``, whose float addition rounds ``y`` half-to-even to an integer kept in the low
    mantissa bits (bits 8 and up hold the constant's, which packing into bytes drops). Clamping before
    rounding gives the same codes (the bounds are integers) and no conversion instruction."""
    y = _div(x - mn16.to(tl.float32), -step16.to(tl.float32), rstep, False)
    return (tl.minimum(tl.maximum(y, 0.0), qmax) + _RINT_MAGIC).to(tl.int32, bitcast=True)


@triton.jit
def _store_packed(code, member, row, cache_u8_ptr, off, BITS: tl.constexpr, N_PAD: tl.constexpr, D: tl.constexpr,
                  PL: tl.constexpr):  # fmt: skip
    """Pack a code tile ``[N_PAD, D/PL, PL]`` (channel ``j * D/PL + i``) at ``BITS`` bits and store the rows of
    ``member`` at page rows ``row`` of the region at byte offset ``off``. Byte ``b`` of a row holds channels
    ``b + a * D/P`` at bit ``a * BITS`` (``P = 8 // BITS`` codes per byte); with ``j = a * (PL/P) + jj`` the byte
    of channel ``(i, a, jj)`` is ``jj * D/PL + i``: split ``j``, sum over ``a`` (disjoint bits: an or). A code is
    the low 8 bits of its int32 (:func:`_codes`): the bits above them never carry into the byte kept."""
    P: tl.constexpr = 8 // BITS
    c4 = tl.reshape(code, (N_PAD, D // PL, P, PL // P))
    packed = tl.sum(c4 << (tl.arange(0, P) * BITS)[None, None, :, None], axis=2).to(tl.uint8)
    # runs of 8 bytes, what a thread holds of a row (4 lanes a row at 2 warps, R 16): the store goes out from the
    # code tile's layout (STG.64), not moved to 16-byte runs through shared memory first (two barriers a tile)
    byte = tl.max_contiguous(tl.arange(0, D // PL), 8)[:, None] + tl.arange(0, PL // P)[None, :] * (D // PL)
    RB: tl.constexpr = D * BITS // 8
    tl.store(cache_u8_ptr + off + row[:, None, None] * RB + byte[None, :, :], packed, mask=member[:, None, None])


@triton.jit
def _top(sm, t, tv, thr, cnt, cum, S: tl.constexpr):
    """Tokens among the ``S`` largest scores ``sm``, ties to the earlier token (the twin's stable descending
    sort): every token above the ``S``-th largest score ``thr``, then the earliest tokens equal to it until
    ``S`` are taken (``cnt``: how many are above it, ``cum``: inclusive prefix count of the ties)."""
    if S == 0:
        return t < 0
    return (sm > thr) & tv | ((sm == thr) & tv & (cum <= S - cnt))


@triton.jit
def _page_rows(s, t, tv, SK: tl.constexpr, SV: tl.constexpr, N_PAD: tl.constexpr):
    """``(key salient, value salient, page row)`` of every token from one bitonic sort of the scores (O(N log^2 N),
    not the O(N^2) rank of every token): tiers A (both salient), B (one), C (none), each in token order
    (layout.py); a token's row = the sizes of the earlier tiers + its place in its tier (prefix sums). Every
    reduction and scan serves the key and the value sets at once, their counts packed in one integer (a
    reduction across warps costs a shared-memory round trip and barriers whatever it carries): the two
    thresholds are the only terms of the two halves of one int64 sum; the tie and tier counts fields of an
    int32."""
    tl.static_assert(N_PAD < 1024, "tier counts are packed in 10-bit fields")
    sm = tl.where(tv, s, float("-inf"))
    srt = tl.sort(sm, descending=True)
    bits = srt.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    both = tl.sum(tl.where(t == SK - 1, bits << 32, 0) + tl.where(t == SV - 1, bits, 0), axis=0)
    thr_k = (both >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    thr_v = both.to(tl.int32).to(tl.float32, bitcast=True)
    above = ((sm > thr_k) & tv).to(tl.int32) + (((sm > thr_v) & tv).to(tl.int32) << 16)
    ties = tl.cumsum(((sm == thr_k) & tv).to(tl.int32) + (((sm == thr_v) & tv).to(tl.int32) << 16), axis=0)
    cnt = tl.sum(above, axis=0)
    ksal = _top(sm, t, tv, thr_k, cnt & 0xFFFF, ties & 0xFFFF, SK)
    vsal = _top(sm, t, tv, thr_v, cnt >> 16, ties >> 16, SV)
    tier = (ksal & vsal).to(tl.int32) + (((ksal ^ vsal) & tv).to(tl.int32) << 10)
    tier += ((tv & ~(ksal | vsal)).to(tl.int32) << 20)
    n = tl.sum(tier, axis=0)
    cum = tl.cumsum(tier, axis=0)
    na = n & 0x3FF
    nb = (n >> 10) & 0x3FF
    row = tl.where(ksal & vsal, (cum & 0x3FF) - 1,
                   tl.where((ksal ^ vsal) & tv, na + ((cum >> 10) & 0x3FF) - 1, na + nb + (cum >> 20) - 1))
    return ksal, vsal, row


@triton.jit
def _compress_store_kernel(
    key_ptr, value_ptr,  # [num_blocks * N, H, D] (or staging slots [num_slots * N, H, D])
    stride_x_tok, stride_x_head,  # same strides for key and value (checked by the launcher)
    scores_ptr, stride_s_blk, stride_s_tok, stride_s_head,  # SCORES 0/1: read; 3: the probe scores written
    count_ptr, stride_cnt_blk,  # SCORES 1: the score is divided by max(count[b * stride_cnt_blk + t], 1)
    pq_ptr, stride_pq_blk, stride_pq_probe, stride_pq_head,  # SCORES 2/3: probe queries [S, P, num_heads, D]
    off_ptr, stride_off,  # SCORES 2/3: int32 [E, P], the probe offsets of each entry's block
    qk_scale,
    block_ids_ptr,  # [E] int; a negative id: nothing to write (fixed-size work lists)
    src_ptr,  # FROM_SLOTS: int [E], the staging slot holding block e (its K/V rows, scores, probe queries)
    work_ptr,  # int32 [E, H, N_PAD] scratch: the token of each page row, reread per row tile
    tiles_ptr,  # key dtype [E, H, 4, R, D] scratch: running min / max tiles, reduced per channel from there
    red_ptr,  # fp32 [E, H, 3, D] scratch: per-channel reciprocals of the key steps and the value normalizer
    sk_rows, sv_rows, n_rows,  # SK, SV, N_PAD as run-time loop bounds: ptxas unrolls constant-trip tile loops
    cache_u8_ptr, cache_f16_ptr,  # kv_cache as uint8 and as fp16
    stride_c_block, stride_c_head,  # bytes
    N: tl.constexpr, N_PAD: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BH: tl.constexpr,
    BL: tl.constexpr, SK: tl.constexpr, SV: tl.constexpr,
    K_HI_OFF: tl.constexpr, K_LO_OFF: tl.constexpr, V_HI_OFF: tl.constexpr, V_LO_OFF: tl.constexpr,
    K_PAR_OFF: tl.constexpr, V_NORM_OFF: tl.constexpr, V_TOK_OFF: tl.constexpr, MASK_OFF: tl.constexpr,
    FROM_SLOTS: tl.constexpr, SCORES: tl.constexpr,
    P: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, NORMALIZER: tl.constexpr, DOT_FP32: tl.constexpr,
    RQ_H: tl.constexpr, RQ_L: tl.constexpr,  # reciprocal32(2^BH - 1), reciprocal32(2^BL - 1)
    PROGRAMS: tl.constexpr,  # per (block, KV head), axis 2: 1 (keys and values), 2 (0 the keys, 1 the values)
    ASM: tl.constexpr,  # inline PTX (not in the interpreter): the L1 prefetch of a first pass's rows, packed min / max
):  # fmt: skip
    e = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    page = tl.load(block_ids_ptr + e).to(tl.int64)
    if page < 0:
        return
    page_off = page * stride_c_block + head * stride_c_head
    src = e
    if FROM_SLOTS:
        src = tl.load(src_ptr + e).to(tl.int64)
    t = tl.arange(0, N_PAD)
    tv = t < N
    # one program quantizes the keys and the values, or (PROGRAMS 2) part 0 the keys and part 1 the values, each
    # ranking the block (same scores, same rows, same bitmap bytes) in its own scratch; a constexpr, so that the
    # unsplit kernel has no branch on the part and the split one is compiled (and allocates registers) apart
    part = 0
    if PROGRAMS > 1:
        part = tl.program_id(2)
    sidx = (e * tl.num_programs(1) + head) * PROGRAMS + part
    work = work_ptr + sidx * N_PAD
    # -- saliency: the block rule's probe scores (SCORES 2/3), or given scores ----
    if SCORES >= 2:
        s = probe_scores(key_ptr + src * N * stride_x_tok + head * stride_x_head, stride_x_tok,
                         pq_ptr + src * stride_pq_blk, stride_pq_probe, stride_pq_head, off_ptr + e * stride_off,
                         head, qk_scale, N, N_PAD, P, G, ROWS, D, DOT_FP32)  # fmt: skip
        # the sums leave the dot's layout (32 tokens a lane) through the scratch row: normalized and ranked
        # with a few tokens a lane (block_scores.normalize_scores)
        tl.store(work + t, s.to(tl.int32, bitcast=True))
        tl.debug_barrier()
        s = tl.load(work + t).to(tl.float32, bitcast=True)
        s = normalize_scores(s, t, off_ptr + e * stride_off, N, P, NORMALIZER)
        if SCORES == 3:
            tl.store(scores_ptr + src * stride_s_blk + t * stride_s_tok + head * stride_s_head, s, mask=tv)
    else:
        s = tl.load(scores_ptr + src * stride_s_blk + t * stride_s_tok + head * stride_s_head, mask=tv, other=0.0)
        s = s.to(tl.float32)
        if SCORES == 1:
            cnt = tl.load(count_ptr + src * stride_cnt_blk + t, mask=tv, other=1.0).to(tl.float32)
            s = tl.math.div_rn(s, tl.maximum(cnt, 1.0))
    if ASM:  # the rows of this program's first pass, asked of L1 now: they arrive while the block is ranked
        if part == 0:  # (one program: the keys', the first pass it runs)
            _prefetch_rows(key_ptr + head * stride_x_head, stride_x_tok, src * N, N, N_PAD, D)
        else:
            _prefetch_rows(value_ptr + head * stride_x_head, stride_x_tok, src * N, N, N_PAD, D)
    ksal, vsal, row = _page_rows(s, t, tv, SK, SV, N_PAD)
    if part == 0:  # (PROGRAMS 2: the keys' program; the values' ranks the same block)
        _store_bitmaps(ksal, vsal, cache_u8_ptr, page_off, N, N_PAD, MASK_OFF)
    # the row tiles below walk the page rows: a register tensor cannot be sliced, so the token of each page row
    # takes a round trip through a scratch row the program alone writes and reads (L1/L2)
    tiles = tiles_ptr + sidx * (4 * R * D)
    red = red_ptr + sidx * (3 * D)
    if SCORES >= 2:
        tl.debug_barrier()  # every lane has read its scores from the scratch row
    _store_in_place(work + row, t.to(tl.int32), tv, ASM)
    tl.debug_barrier()
    x_tok = src * N  # the block's first row in key / value
    hoff = page_off // 2
    if part == 0:
        _compress_keys(key_ptr + head * stride_x_head, stride_x_tok, x_tok, work, tiles, red, cache_u8_ptr,
                       cache_f16_ptr, page_off, hoff, sk_rows, n_rows, N, N_PAD, R, D, BH, BL, SK, PROGRAMS == 1,
                       K_HI_OFF, K_LO_OFF, K_PAR_OFF, RQ_H, RQ_L, ASM)  # fmt: skip
    if PROGRAMS == 1 or part > 0:
        _compress_values(value_ptr + head * stride_x_head, stride_x_tok, x_tok, work, tiles, red, cache_u8_ptr,
                         cache_f16_ptr, page_off, hoff, sv_rows, n_rows, N, N_PAD, R, D, BH, BL, SV,
                         V_HI_OFF, V_LO_OFF, V_NORM_OFF, V_TOK_OFF, RQ_H, RQ_L, ASM)  # fmt: skip


@triton.jit
def _tile_tokens(work, r0, N: tl.constexpr, R: tl.constexpr):
    """The tokens at page rows ``r0 .. r0 + R`` (from the scratch row; 0 past the block). A loop loads the next
    tile's while it quantizes the current one, so that no tile waits on this load before its own."""
    rr = r0 + tl.arange(0, R)
    return tl.load(work + rr, mask=rr < N, other=0)


@triton.jit
def _page_tile(x_ptr, stride_x_tok, x_tok, tok, r0, N: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
               PL: tl.constexpr):  # fmt: skip
    """Page rows ``r0 .. r0 + R`` of the block: the fp32 tile ``[R, D/PL, PL]`` (:func:`_load_tile`) of their
    tokens ``tok`` (:func:`_tile_tokens`), the page rows and whether each exists (only a padded block has rows
    that do not)."""
    rr = r0 + tl.arange(0, R)
    rv = rr < N
    x, ch = _load_tile(x_ptr, stride_x_tok, x_tok + tok, rv, D, PL)
    return x, rr, rv


@triton.jit
def _first_tile(x_ptr, stride_x_tok, x_tok, work, r0, N: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                PL: tl.constexpr):  # fmt: skip
    """A tile loop's start: the tile at page rows ``r0 ..`` (:func:`_page_tile`) and the tokens of the one after
    it (:func:`_next_tile` loads that tile while the loop works on this one)."""
    x, rr, rv = _page_tile(x_ptr, stride_x_tok, x_tok, _tile_tokens(work, r0, N, R), r0, N, R, D, PL)
    return x, rr, rv, _tile_tokens(work, r0 + R, N, R)


@triton.jit
def _next_tile(x_ptr, stride_x_tok, x_tok, work, tok, r0, N: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
               PL: tl.constexpr):  # fmt: skip
    """In the iteration of the tile at page rows ``r0``: the next tile (rows ``r0 + R ..``, its tokens ``tok``
    loaded one iteration before; past the loop's end a tile of the next group or padding, unused) and the tokens
    of the one after it, loaded before the current tile is used, so that its latency overlaps that work."""
    x, rr, rv = _page_tile(x_ptr, stride_x_tok, x_tok, tok, r0 + R, N, R, D, PL)
    return x, rr, rv, _tile_tokens(work, r0 + 2 * R, N, R)


@triton.jit
def _compress_keys(x_ptr, stride_x_tok, x_tok, work, tiles, red, cache_u8_ptr, cache_f16_ptr, page_off, hoff,
                   sk_rows, n_rows, N: tl.constexpr, N_PAD: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                   BH: tl.constexpr, BL: tl.constexpr, SK: tl.constexpr, PARAMS_IN_REGISTERS: tl.constexpr,
                   K_HI_OFF: tl.constexpr, K_LO_OFF: tl.constexpr, K_PAR_OFF: tl.constexpr, RQ_H: tl.constexpr,
                   RQ_L: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """ZC-3: channelwise ``(step, mn)`` per precision group from the block's rows in page-row order, loaded at once
    (:func:`_load_block`), then the codes of each tile of page rows packed into its group's region. Page rows
    ``0 .. SK-1`` are the salient group and ``R`` divides ``SK``, so the groups split the block's first axis (a
    constant condition per register, no per-element choice) and every code tile is of one group (one set of
    parameters, one packing, whole rows stored)."""
    PL: tl.constexpr = 8 // BL  # the tile's channel order: the low width's, the one with more codes per byte
    pr = tl.arange(0, N_PAD)
    x = _load_block(x_ptr, stride_x_tok, x_tok + tl.load(work + pr, mask=pr < N, other=0), pr < N, N_PAD, R, D,
                    PL)  # fmt: skip
    # each group's elementwise min / max over the row tiles (a thread's own registers), then per channel through
    # the scratch (_group_ranges), where the few lanes that hold a channel compute its parameters
    sal = (tl.arange(0, N_PAD // R) < SK // R)[:, None, None, None]
    reg = ~sal
    if N < N_PAD:  # padded rows load 0: keep them out of the range
        reg = reg & tl.reshape(pr < N, (N_PAD // R, R))[:, :, None, None]
    # bf16 / fp16 pairs, unconverted: exact as the fp32 min / max below (up to 8 row tiles, the default tiles' count:
    # at 16 and more, e.g. the short tiles of odd quotas, the transposed block spills, sm_90 SASS)
    if ASM and x.dtype != tl.float32 and N_PAD // R <= 8:
        mn, mx, mn_r, mx_r = _group_ranges(_rows_reduce(tl.where(sal, x, float("inf")), False, N_PAD // R),
                                           _rows_reduce(tl.where(sal, x, float("-inf")), True, N_PAD // R),
                                           _rows_reduce(tl.where(reg, x, float("inf")), False, N_PAD // R),
                                           _rows_reduce(tl.where(reg, x, float("-inf")), True, N_PAD // R),
                                           tiles, R, D, PL)  # fmt: skip
    else:
        x = x.to(tl.float32)
        mn, mx, mn_r, mx_r = _group_ranges(tl.min(tl.where(sal, x, _BIG), axis=0),
                                           tl.max(tl.where(sal, x, -_BIG), axis=0),
                                           tl.min(tl.where(reg, x, _BIG), axis=0),
                                           tl.max(tl.where(reg, x, -_BIG), axis=0), tiles, R, D, PL)  # fmt: skip
    has_s: tl.constexpr = SK > 0
    has_r: tl.constexpr = SK < N
    step_s, mn16_s, rstep_s = _key_params(mn, mx, has_s, cache_f16_ptr, hoff + K_PAR_OFF // 2, red, D, BH, RQ_H)
    step_r, mn16_r, rstep_r = _key_params(mn_r, mx_r, has_r, cache_f16_ptr, hoff + K_PAR_OFF // 2 + 2 * D, red + D,
                                          D, BL, RQ_L)  # fmt: skip
    # the code tiles take each channel's parameters in their own layout: read back from where they were stored (one
    # L2 round trip after the barrier) or, PARAMS_IN_REGISTERS, moved there from the lanes that computed them
    # (through shared memory; more instructions, no round trip: faster where a program's keys and values run in one
    # program, slower where they are split, H100 2026-12-06, h100_trace_compress_009faed.log)
    tl.debug_barrier()
    ch = _tile_channels(D, PL)
    if has_s:
        if PARAMS_IN_REGISTERS:
            step, mn16, rstep = _tile_vec(step_s, D, PL), _tile_vec(mn16_s, D, PL), _tile_vec(rstep_s, D, PL)
        else:
            step = tl.load(cache_f16_ptr + hoff + K_PAR_OFF // 2 + ch)[None, :, :]
            mn16 = tl.load(cache_f16_ptr + hoff + K_PAR_OFF // 2 + D + ch)[None, :, :]
            rstep = tl.load(red + ch)[None, :, :]
        x, rr, rv, tok = _first_tile(x_ptr, stride_x_tok, x_tok, work, 0, N, R, D, PL)
        for r0 in range(0, sk_rows, R):
            xn, rrn, rvn, tok = _next_tile(x_ptr, stride_x_tok, x_tok, work, tok, r0, N, R, D, PL)
            code = _codes(x, mn16, step, rstep, (1 << BH) - 1.0)
            _store_packed(code, rv, rr, cache_u8_ptr, page_off + K_HI_OFF, BH, R, D, PL)
            x, rr, rv = xn, rrn, rvn
    if has_r:
        if PARAMS_IN_REGISTERS:
            step, mn16, rstep = _tile_vec(step_r, D, PL), _tile_vec(mn16_r, D, PL), _tile_vec(rstep_r, D, PL)
        else:
            step = tl.load(cache_f16_ptr + hoff + K_PAR_OFF // 2 + 2 * D + ch)[None, :, :]
            mn16 = tl.load(cache_f16_ptr + hoff + K_PAR_OFF // 2 + 3 * D + ch)[None, :, :]
            rstep = tl.load(red + D + ch)[None, :, :]
        x, rr, rv, tok = _first_tile(x_ptr, stride_x_tok, x_tok, work, sk_rows, N, R, D, PL)
        for r0 in range(sk_rows, n_rows, R):
            xn, rrn, rvn, tok = _next_tile(x_ptr, stride_x_tok, x_tok, work, tok, r0, N, R, D, PL)
            code = _codes(x, mn16, step, rstep, (1 << BL) - 1.0)
            _store_packed(code, rv, rr - SK, cache_u8_ptr, page_off + K_LO_OFF, BL, R, D, PL)
            x, rr, rv = xn, rrn, rvn


@triton.jit
def _pair(a, b, MAX: tl.constexpr):
    """Elementwise min (``MAX``: max) of two bf16 or fp16 tensors, two elements an instruction (``min.bf16x2``):
    the fp32 min / max of the same values, without converting them."""
    OP: tl.constexpr = ("max" if MAX else "min") + (".bf16x2" if a.dtype == tl.bfloat16 else ".f16x2")
    return tl.inline_asm_elementwise(OP + " $0, $1, $2;", "=r,r,r", [a, b], dtype=a.dtype, is_pure=True, pack=2)


@triton.jit
def _rows_reduce(x, MAX: tl.constexpr, T: tl.constexpr):
    """Min (``MAX``: max) over the first axis (``T``, a power of two, in each thread's registers) of a 16-bit
    ``[T, R, D/PL, PL]``, pairwise (:func:`_pair`): that axis moved last, halved ``log2 T`` times."""
    tl.static_assert(T <= 8, "more row tiles spill (sm_90 SASS): _compress_keys takes the fp32 path there")
    y = tl.permute(x, (1, 2, 3, 0))
    for i in tl.static_range(3):
        if (T >> i) > 1:
            a, b = tl.split(tl.reshape(y, (y.shape[0], y.shape[1], y.shape[2], T >> (i + 1), 2)))
            y = _pair(a, b, MAX)
    return tl.reshape(y, (y.shape[0], y.shape[1], y.shape[2]))


@triton.jit
def _channel_reduce(tile, tiles, slot, MAX: tl.constexpr, R: tl.constexpr, D: tl.constexpr, PL: tl.constexpr):
    """Min (or max) over the rows of a running tile ``[R, D/PL, PL]``, as ``[D]`` in channel order: the tile
    goes to area ``slot`` of the scratch as ``R`` rows of ``D`` and comes back in the layout of a plain
    ``[R, D]`` load, where a lane holds several rows of a few channels (reduced in registers), instead of being
    reduced in place, where a lane holds one row of 32 channels (every channel across 16 lanes, then the
    channel's parameters repeated by each of them)."""
    rr = tl.arange(0, R)
    ch = _tile_channels(D, PL)
    tl.store(tiles + slot * R * D + rr[:, None, None] * D + ch[None, :, :], tile.to(tiles.dtype.element_ty))
    tl.debug_barrier()
    full = tl.load(tiles + slot * R * D + rr[:, None] * D + tl.arange(0, D)[None, :]).to(tl.float32)
    if MAX:
        return tl.max(full, axis=0)
    return tl.min(full, axis=0)


@triton.jit
def _group_ranges(mn_s, mx_s, mn_r, mx_r, tiles, R: tl.constexpr, D: tl.constexpr, PL: tl.constexpr):
    """:func:`_channel_reduce` of the keys' four running tiles (min / max of the salient and of the regular group)
    at once: the four go to the scratch's four areas, one barrier (not four), and each comes back and is reduced.
    Returns the four ``[D]``."""
    rr = tl.arange(0, R)
    at = rr[:, None, None] * D + _tile_channels(D, PL)[None, :, :]
    ty: tl.constexpr = tiles.dtype.element_ty
    tl.store(tiles + at, mn_s.to(ty))
    tl.store(tiles + R * D + at, mx_s.to(ty))
    tl.store(tiles + 2 * R * D + at, mn_r.to(ty))
    tl.store(tiles + 3 * R * D + at, mx_r.to(ty))
    tl.debug_barrier()
    # the four loads before any reduction: each reduction crosses the warps through shared memory behind a barrier,
    # which a load after it could not be moved above (four round trips to L2, not one)
    full = rr[:, None] * D + tl.arange(0, D)[None, :]
    a = tl.load(tiles + full)
    b = tl.load(tiles + R * D + full)
    c = tl.load(tiles + 2 * R * D + full)
    d = tl.load(tiles + 3 * R * D + full)
    return (tl.min(a.to(tl.float32), axis=0), tl.max(b.to(tl.float32), axis=0), tl.min(c.to(tl.float32), axis=0),
            tl.max(d.to(tl.float32), axis=0))


@triton.jit
def _key_params(mn, mx, HAS: tl.constexpr, cache_f16_ptr, par, rstep_ptr, D: tl.constexpr, BITS: tl.constexpr,
                RQ: tl.constexpr):  # fmt: skip
    """A key group's fp16 ``(step, mn)`` per channel from its ``[D]`` min / max (a group with no rows gets
    ``(EPS, 0)``, as quant.py's masked min/max of an empty group) stored at fp16 offset ``par``, and
    ``div_rn(1, step)`` at ``rstep_ptr``; returns the three ``[D]``."""
    step, mn16 = _quant_params(tl.where(HAS, mn, 0.0), tl.where(HAS, mx, 0.0), (1 << BITS) - 1.0, RQ)
    d = tl.arange(0, D)
    rstep = tl.math.div_rn(1.0, step.to(tl.float32))
    tl.store(cache_f16_ptr + par + d, step)
    tl.store(cache_f16_ptr + par + D + d, mn16)
    tl.store(rstep_ptr + d, rstep)
    return step, mn16, rstep


@triton.jit
def _tile_vec(v, D: tl.constexpr, PL: tl.constexpr):
    """A per-channel ``[D]`` in a tile's channel order, ``[1, D/PL, PL]`` (``[0, i, j]`` channel ``j * D/PL + i``)."""
    return tl.trans(tl.reshape(v, (PL, D // PL)))[None, :, :]


@triton.jit
def _compress_values(x_ptr, stride_x_tok, x_tok, work, tiles, red, cache_u8_ptr, cache_f16_ptr, page_off, hoff,
                     sv_rows, n_rows, N: tl.constexpr, N_PAD: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                     BH: tl.constexpr, BL: tl.constexpr, SV: tl.constexpr, V_HI_OFF: tl.constexpr,
                     V_LO_OFF: tl.constexpr, V_NORM_OFF: tl.constexpr, V_TOK_OFF: tl.constexpr, RQ_H: tl.constexpr,
                     RQ_L: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """ZC-2: ``c = sqrt(max |x|)`` per channel over the block's rows, loaded at once in token order
    (:func:`_load_block`), then per row tile of page rows (``R`` divides ``SV``, so a tile is of one group) the
    tokenwise ``(step, mn)`` of ``x / c`` and the codes packed into the group's region."""
    PL: tl.constexpr = 8 // BL
    t = tl.arange(0, N_PAD)
    blk = _load_block(x_ptr, stride_x_tok, x_tok + t, t < N, N_PAD, R, D, PL)
    amax = tl.max(tl.abs(blk.to(tl.float32)), axis=0)  # over the row tiles; padded rows load 0: neutral for max |x|
    c = tl.math.sqrt_rn(_channel_reduce(amax, tiles, 0, True, R, D, PL)).to(tl.float16)  # (after the keys' barrier)
    c = tl.where(c > 0, c, 1.0).to(tl.float16)  # quant.channel_normalizer: c that rounds to 0 becomes 1
    d = tl.arange(0, D)
    tl.store(cache_f16_ptr + hoff + V_NORM_OFF // 2 + d, c)
    tl.store(red + 2 * D + d, tl.math.div_rn(1.0, c.to(tl.float32)))
    tl.debug_barrier()
    ch = _tile_channels(D, PL)
    cf = tl.load(cache_f16_ptr + hoff + V_NORM_OFF // 2 + ch).to(tl.float32)[None, :, :]
    rc = tl.load(red + 2 * D + ch)[None, :, :]
    ncf = -cf  # _div's negated divisor
    x, rr, rv, tok = _first_tile(x_ptr, stride_x_tok, x_tok, work, 0, N, R, D, PL)
    for r0 in range(0, sv_rows, R):
        xn, rrn, rvn, tok = _next_tile(x_ptr, stride_x_tok, x_tok, work, tok, r0, N, R, D, PL)
        _value_rows(_div(x, ncf, rc), rr, rv, cache_u8_ptr, cache_f16_ptr, page_off + V_HI_OFF, hoff, rr,
                    N, R, D, PL, BH, V_TOK_OFF, RQ_H, ASM)  # fmt: skip
        x, rr, rv = xn, rrn, rvn
    x, rr, rv, tok = _first_tile(x_ptr, stride_x_tok, x_tok, work, sv_rows, N, R, D, PL)
    for r0 in range(sv_rows, n_rows, R):
        xn, rrn, rvn, tok = _next_tile(x_ptr, stride_x_tok, x_tok, work, tok, r0, N, R, D, PL)
        _value_rows(_div(x, ncf, rc), rr, rv, cache_u8_ptr, cache_f16_ptr, page_off + V_LO_OFF, hoff, rr - SV,
                    N, R, D, PL, BL, V_TOK_OFF, RQ_L, ASM)  # fmt: skip
        x, rr, rv = xn, rrn, rvn


@triton.jit
def _value_rows(xn, rr, rv, cache_u8_ptr, cache_f16_ptr, off, hoff, region_row, N: tl.constexpr, R: tl.constexpr,
                D: tl.constexpr, PL: tl.constexpr, BITS: tl.constexpr, V_TOK_OFF: tl.constexpr,
                RQ: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """Tokenwise ``(step, mn)`` of the normalized rows ``xn`` (page rows ``rr``) on ``BITS`` bits, stored with
    the rows' codes at rows ``region_row`` of the region at byte offset ``off``."""
    qmax: tl.constexpr = (1 << BITS) - 1.0
    step, mn16 = _quant_params(tl.min(tl.min(xn, axis=2), axis=1), tl.max(tl.max(xn, axis=2), axis=1), qmax, RQ)
    par = cache_f16_ptr + hoff + V_TOK_OFF // 2 + rr[:, None] + N * tl.arange(0, 2)[None, :]
    _store_in_place(par, tl.join(step, mn16), tl.join(rv, rv), ASM)
    rstep = tl.math.div_rn(1.0, step.to(tl.float32))
    code = _codes(xn, mn16[:, None, None], step[:, None, None], rstep[:, None, None], qmax)
    _store_packed(code, rv, region_row, cache_u8_ptr, off, BITS, R, D, PL)


@triton.jit
def _store_in_place(ptr, x, mask, ASM: tl.constexpr):
    """``tl.store(ptr, x, mask)`` of 16- or 32-bit ``x``; with ``ASM`` an ``st.global`` per element from the layout
    ``x`` has: ``tl.store`` moves a tensor whose addresses are no contiguous runs in it (a reduction's result,
    repeated in the lanes that share its row; a scatter) to another layout through shared memory first, two
    barriers. For a few bytes a program: the per-row parameters of a value tile, the token of each page row."""
    if ASM:
        W: tl.constexpr = x.dtype.primitive_bitwidth
        tl.static_assert(W == 16 or W == 32, "16- or 32-bit elements")
        ST: tl.constexpr = "st.global.b16" if W == 16 else "st.global.b32"
        REG: tl.constexpr = "=r,l,h,r" if W == 16 else "=r,l,r,r"
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p " + ST + " [$1], $2; mov.b32 $0, 0; }", REG,
            [ptr.to(tl.int64, bitcast=True), x.to(tl.int16 if W == 16 else tl.int32, bitcast=True), mask.to(tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def _store_bitmaps(ksal, vsal, cache_u8_ptr, page_off, N: tl.constexpr, N_PAD: tl.constexpr,
                   MASK_OFF: tl.constexpr):  # fmt: skip
    """Salient bitmaps in token order (bit t % 8 of byte t // 8)."""
    bit = tl.arange(0, 8)
    kbits = tl.sum(tl.reshape(ksal.to(tl.int32), (N_PAD // 8, 8)) << bit[None, :], axis=1).to(tl.uint8)
    vbits = tl.sum(tl.reshape(vsal.to(tl.int32), (N_PAD // 8, 8)) << bit[None, :], axis=1).to(tl.uint8)
    mb = tl.arange(0, N_PAD // 8)
    # one store of both maps: one layout conversion (through shared memory, two barriers) instead of two
    off = tl.join(mb, mb + N // 8)
    tl.store(cache_u8_ptr + page_off + MASK_OFF + off, tl.join(kbits, vbits), mask=tl.join(mb, mb) < N // 8)


def tile_rows(rows_per_tile: int, num_salient_k: int, num_salient_v: int) -> int:
    """The rows of a tile: the largest power of two <= ``rows_per_tile`` that divides both salient quotas, so
    every tile of page rows is of one key and one value group (page layout v2 quotas are multiples of 16 rows;
    an odd quota, of a block size that is no multiple of 16, gives smaller tiles)."""
    r = rows_per_tile
    for s in (num_salient_k, num_salient_v):
        if s:
            r = min(r, s & -s)
    return r


def compress_store(
    key: torch.Tensor,
    value: torch.Tensor,
    scores: torch.Tensor | None,
    block_ids: torch.Tensor,
    kv_cache: torch.Tensor,
    layout,
    num_warps: int | None = None,
    probe_query: torch.Tensor | None = None,
    probe_offsets: torch.Tensor | None = None,
    normalizer="probe_nnz",
    saliency="normalized",
    scale: float | None = None,
    rows_per_tile: int | None = None,
    programs: int | None = None,
) -> None:
    """Quantize complete blocks and write their pages into ``kv_cache`` (in place).

    Parameters
    ----------
    key, value : ``[num_new_blocks * block_size, num_kv_heads, head_size]`` bf16/fp16/fp32, post-RoPE;
        rows ``i * block_size ...`` form block ``i``; same strides.
    scores : ``[num_new_blocks * block_size, num_kv_heads]`` float, saliency per token (higher = salient); with
        ``probe_query``: None, or an fp32 tensor of that shape that receives the scores the kernel computed.
    block_ids : ``[num_new_blocks]`` int32/int64, destination page of each block.
    kv_cache : ``uint8 [num_blocks, num_kv_heads, >= layout.page_bytes]``, 16-byte aligned page strides.
    layout : ``zipcache_vllm.engine.layout.PageLayout`` (read, not imported).
    num_warps : per program (see ``programs``; default 2).
    probe_query, probe_offsets : ``[num_new_blocks, num_probes, num_heads, head_size]`` and int32
        ``[num_new_blocks, num_probes]``: score each block by its probes in the same kernel (the block rule,
        ``block_scores.probe_scores``; ``normalizer``, ``saliency``, ``scale`` as ``block_probe_scores``), so
        neither the scores nor a second read of the keys go through HBM.
    rows_per_tile : rows of the block quantized at a time (a power of two; default: 32 tile elements per
        thread, 16 rows at head size 128 and 2 warps), lowered to divide the salient quotas (:func:`tile_rows`).
    programs : per block and KV head: 1 quantizes its keys and values; 2, one program the keys and one the
        values (``split_kv`` before 2026-12-06), each ranking the block (with ``probe_query``, scoring it): each
        a shorter instruction stream. Default (None): 2 where those programs are one wave at 2 warps (a prompt of
        up to ~4k tokens of 8 KV heads on 132 SMs), else 1.

    Example
    -------
    >>> lay = PageLayout(block_size=128, head_size=128)                          # doctest: +SKIP
    >>> compress_store(k, v, scores, torch.tensor([3, 7]), kv_cache, lay)      # doctest: +SKIP
    """
    n, d = layout.block_size, layout.head_size
    dev = key.device
    check_tensor(key, "key", 3, (torch.bfloat16, torch.float16, torch.float32), dev)
    check_tensor(value, "value", 3, (key.dtype,), dev)
    check(
        value.shape == key.shape and value.stride() == key.stride(),
        "key and value must match in shape/strides",
    )
    check(key.shape[2] == d, f"head_size {key.shape[2]} != layout.head_size {d}")
    nb, h = block_ids.numel(), key.shape[1]
    check(key.shape[0] == nb * n, f"key has {key.shape[0]} tokens, expected {nb} blocks x {n}")
    if probe_query is None or scores is not None:
        check_tensor(scores, "scores", 2, (torch.float32, torch.float16, torch.bfloat16), dev, last_contiguous=False)
        check(tuple(scores.shape) == (nb * n, h), f"scores must be [{nb * n}, {h}], got {tuple(scores.shape)}")
    check_tensor(block_ids, "block_ids", 1, (torch.int32, torch.int64), dev)
    check_cache(kv_cache, layout, h, dev)
    probes = None
    if probe_query is not None:
        probes = (probe_query, probe_offsets, normalizer, saliency, scale)
        probe_key = key.as_strided((nb, n, h, d), (n * key.stride(0), key.stride(0), key.stride(1), 1))
    if nb == 0:
        return
    s_strides = (0, 0, 0) if scores is None else (scores.stride(0) * n, scores.stride(0), scores.stride(1))
    _launch(key, value, scores, *s_strides, None, 0, block_ids, None, kv_cache, layout, num_warps, rows_per_tile,
            probes, probe_key if probes else None, programs)  # fmt: skip


def compress_slots(
    tail_key: torch.Tensor,
    tail_value: torch.Tensor,
    scores: torch.Tensor | None,
    score_count: torch.Tensor | None,
    slots: torch.Tensor,
    block_ids: torch.Tensor,
    kv_cache: torch.Tensor,
    layout,
    num_warps: int | None = None,
    probe_query: torch.Tensor | None = None,
    probe_offsets: torch.Tensor | None = None,
    normalizer="probe_nnz",
    saliency="normalized",
    scale: float | None = None,
    rows_per_tile: int | None = None,
) -> None:
    """:func:`compress_store` of blocks that wait complete in bf16 staging slots, for a fixed-size work list
    (graph-capturable: no host sync, no data-dependent shapes).

    Entry ``i`` compresses slot ``slots[i]`` (``tail_key / tail_value [num_slots, block_size, num_kv_heads,
    head_size]``) into page ``block_ids[i]``; entries with a negative block id do nothing. Scores: ``scores
    [num_slots, block_size, num_kv_heads]`` fp32, divided by ``max(score_count[slot, t], 1)`` (``score_count
    [num_slots, block_size]``, IEEE division as the twin's) unless ``score_count`` is None; a scores tensor
    with slot stride 0 gives every block the same scores (the random-saliency ablation). With ``probe_query
    [num_slots, num_probes, num_heads, head_size]`` and ``probe_offsets`` int32 ``[num_entries, num_probes]``
    the kernel scores each block by its probes instead (``scores``: None, or receives them per slot).

    Twin: ``zipcache_vllm.engine.paged.compress_slots``.
    """
    n, d = layout.block_size, layout.head_size
    dev = tail_key.device
    check_tensor(tail_key, "tail_key", 4, (torch.bfloat16, torch.float16, torch.float32), dev)
    check_tensor(tail_value, "tail_value", 4, (tail_key.dtype,), dev)
    check(
        tail_key.is_contiguous() and tail_value.is_contiguous() and tail_key.shape == tail_value.shape,
        "tail_key and tail_value must be contiguous and of one shape",
    )
    check(
        tuple(tail_key.shape[1:]) == (n, kv_cache.shape[1], d),
        f"tail_key must be [num_slots, {n}, {kv_cache.shape[1]}, {d}], got {tuple(tail_key.shape)}",
    )
    h = tail_key.shape[2]
    if probe_query is None or scores is not None:
        check_tensor(scores, "scores", 3, (torch.float32,), dev)
        check(tuple(scores.shape[1:]) == (n, h), f"scores must be [num_slots, {n}, {h}], got {tuple(scores.shape)}")
    if score_count is not None:
        check(probe_query is None, "score_count divides given scores: not with probe_query")
        check_tensor(score_count, "score_count", 2, (torch.float32,), dev)
        check(score_count.shape[1] == n, f"score_count must be [num_slots, {n}]")
    check_tensor(slots, "slots", 1, (torch.int32, torch.int64), dev)
    check_tensor(block_ids, "block_ids", 1, (torch.int32, torch.int64), dev)
    check(slots.numel() == block_ids.numel(), "slots and block_ids must have one entry per block")
    check_cache(kv_cache, layout, h, dev)
    if block_ids.numel() == 0:
        return
    probes = None if probe_query is None else (probe_query, probe_offsets, normalizer, saliency, scale)
    s_strides = (0, 0, 0) if scores is None else tuple(scores.stride())
    _launch(tail_key.view(-1, h, d), tail_value.view(-1, h, d), scores, *s_strides, score_count,
            0 if score_count is None else score_count.stride(0), block_ids, slots, kv_cache, layout, num_warps,
            rows_per_tile, probes, tail_key)  # fmt: skip


def _default_rows(num_warps: int, d: int, n_pad: int) -> int:
    """Rows per tile for 32 tile elements per thread: the measured best (16 per thread is 2-3x slower:
    ``bench_compress.py``)."""
    return min(n_pad, max(1, 1 << (1024 * num_warps // d).bit_length() - 1))


def _launch(key, value, scores, stride_s_blk, stride_s_tok, stride_s_head, score_count, stride_cnt_blk, block_ids,
            slots, kv_cache, layout, num_warps, rows_per_tile, probes, probe_key, programs=None) -> None:  # fmt: skip
    n, d = layout.block_size, layout.head_size
    h = key.shape[1]
    e = block_ids.numel()
    n_pad = pow2(n)
    if probes is None:
        mode = 0 if score_count is None else 1
        pq, offsets = key, block_ids.view(e, 1)  # unread
        pargs = {"qk_scale": 1.0, "P": 1, "G": 1, "ROWS": 16, "NORMALIZER": 0, "DOT_FP32": False}
    else:
        pq, offsets, normalizer, saliency, scale = probes
        check(isinstance(offsets, torch.Tensor), "probe_query needs probe_offsets (int32 [entries, num_probes])")
        mode = 2 if scores is None else 3
        if mode == 3:
            check(scores.dtype == torch.float32, "scores receives the probe scores: it must be float32")
        pargs = probe_args(probe_key, pq, offsets, e, normalizer, saliency, scale)
        del pargs["N"], pargs["N_PAD"], pargs["D"]
    if programs is None:
        # a prompt's blocks: where the programs are less than a wave (e.g. 256 for a 4k prompt of 8 KV heads on
        # 132 SMs), a program for the keys and one for the values, 2 warps each, so that each warp's stream is
        # shorter (H100, 56b69e9, spike_compress_ways.py, scored in compress: 4k 28.2 us against 31.0 in one
        # program and 30.0 at 4 warps x 32 rows, the default before; 8k 62.0 against 52.2: two waves)
        default = num_warps is None and rows_per_tile is None and slots is None and not interpreting()
        programs = 2 if default and e * h <= 2 * num_sms(key.device) else 1
    check(programs in (1, 2), f"programs must be 1 or 2, got {programs!r}")
    warps = num_warps or (1 if interpreting() else 2)
    r = rows_per_tile or _default_rows(warps, d, n_pad)
    check(r & (r - 1) == 0 and r <= n_pad, f"rows_per_tile must be a power of two <= {n_pad}, got {r}")
    r = tile_rows(r, layout.num_salient_k, layout.num_salient_v)
    parts = programs
    work = torch.empty(e * h * parts * n_pad, dtype=torch.int32, device=key.device)
    tiles = torch.empty(e * h * parts * 4 * r * d, dtype=key.dtype, device=key.device)
    red = torch.empty(e * h * parts * 3 * d, dtype=torch.float32, device=key.device)
    _compress_store_kernel[(e, h, parts)](
        key, value, key.stride(0), key.stride(1),
        key if scores is None else scores, stride_s_blk, stride_s_tok, stride_s_head,
        key if score_count is None else score_count, stride_cnt_blk,
        pq, pq.stride(0), pq.stride(1), pq.stride(2),
        offsets, offsets.stride(0),
        block_ids_ptr=block_ids, src_ptr=block_ids if slots is None else slots,
        work_ptr=work, tiles_ptr=tiles, red_ptr=red,
        sk_rows=layout.num_salient_k, sv_rows=layout.num_salient_v, n_rows=n_pad,
        **cache_args(kv_cache),
        N=n, N_PAD=n_pad, R=r, D=d, BH=layout.bits_high, BL=layout.bits_low,
        SK=layout.num_salient_k, SV=layout.num_salient_v,
        K_HI_OFF=layout.k_hi_off, K_LO_OFF=layout.k_lo_off, V_HI_OFF=layout.v_hi_off, V_LO_OFF=layout.v_lo_off,
        K_PAR_OFF=layout.k_param_off, V_NORM_OFF=layout.v_norm_off, V_TOK_OFF=layout.v_tok_off,
        MASK_OFF=layout.mask_off, FROM_SLOTS=slots is not None, SCORES=mode,
        RQ_H=reciprocal32((1 << layout.bits_high) - 1), RQ_L=reciprocal32((1 << layout.bits_low) - 1),
        PROGRAMS=programs, ASM=not interpreting(), num_warps=warps, enable_fp_fusion=False, **pargs,
    )  # fmt: skip
