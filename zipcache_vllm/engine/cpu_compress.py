"""CPU kernel (numba) for :func:`zipcache_vllm.engine.paged.compress_store`: complete blocks quantized into their
pages in one pass, every byte equal to the torch twin's.

The twin runs ~40 torch ops per call on ``[blocks, heads, block_size, head_size]`` tensors (masked min/max,
division, rounding, ``gather`` into page row order, ``pack_bits`` through int32 copies): 8.4 ms per layer for
the 12 blocks of a 1,550-token SmolLM2 prompt on one thread, a sixth of the prefill. Here each (block, KV head)
is one pass over its 128 x 64 keys and values: rank the scores, min/max, codes, bytes.

The conventions are :mod:`zipcache_vllm.method.quant`'s, reproduced operation by operation (so the result is
the twin's bit for bit, not merely close): fp32 arithmetic with IEEE division (compiled without fastmath, so
no reciprocal, contraction or reassociation), ``step = max((max - min) / (2**bits - 1), EPS)``, both
parameters rounded to fp16 (round to nearest even, :func:`_f16_bits`; with one-byte parameters coded as
:mod:`zipcache_vllm.method.params8` does, :func:`_store_params_u8`) *before* the codes ``clamp(
round_half_even((x - mn) / step), 0, 2**bits - 1)``; quota selection by a stable descending sort (ties to the
earlier token), page rows in tier order (layout.py), a zero minimum stored as +0 (``mn + 0``, not fast-math:
the sign of a minimum over zeros of both signs would be the loop order's).

Keys and values that the twin refuses (NaN, infinities, ``|x| > 65504``) and NaN scores are detected before
anything is written; :func:`compress_store` then calls the twin, which raises its ``ValueError`` (or ranks the
NaN scores as torch's sort does). Shapes, dtypes and block ids are checked before the call (the kernel does not
check bounds); what does not fit goes to the twin too. One thread (vLLM's OpenMP threads
own the cores). No vLLM import; numba is optional (:func:`zipcache_vllm.engine.cpu_kernels.available`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..method import params8
from . import paged
from .cpu_kernels import _f16  # inlined: numba's cache keys on this file alone, touch it after changing _f16
from .layout import PageLayout

try:  # numba is an optional dependency: without it the torch twin runs
    import numba
except ImportError:  # pragma: no cover - exercised on machines without numba
    numba = None

_EPS = np.float32(1e-6)  # quant.EPS as torch's clamp sees it (the scalar cast to the tensor's fp32)
_F16_MAX = np.float32(65504.0)
_STEP_TABLE = params8.STEP_TABLE.numpy()  # fp32 [256]: one-byte parameter codes -> multiples of the region scale


def _f16_bits(b):
    """fp32 bits ``b`` (uint32) -> the bits of the nearest fp16 (ties to even; overflow to infinity, subnormals,
    NaN), as ``torch.Tensor.half`` (numba has no float16)."""
    sign = np.uint32((b >> np.uint32(16)) & np.uint32(0x8000))
    a = b & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf, NaN (quiet)
        return np.uint16(sign | np.uint32(0x7C00) | (np.uint32(0x200) if a > np.uint32(0x7F800000) else np.uint32(0)))
    if a >= np.uint32(0x477FF000):  # >= 65520: rounds to infinity
        return np.uint16(sign | np.uint32(0x7C00))
    if a < np.uint32(0x38800000):  # below 2**-14: an fp16 subnormal (or zero)
        if a < np.uint32(0x33000000):  # below 2**-25: zero
            return np.uint16(sign)
        e = a >> np.uint32(23)
        m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
        s = np.uint32(126) - e  # value / 2**-24 = m >> s, 1 <= s <= 24
        q = m >> s
        rem = m & ((np.uint32(1) << s) - np.uint32(1))
        half = np.uint32(1) << (s - np.uint32(1))
        if rem > half or (rem == half and (q & np.uint32(1))):
            q += np.uint32(1)
        return np.uint16(sign | q)
    h = (a >> np.uint32(13)) - np.uint32(112 << 10)
    rem = a & np.uint32(0x1FFF)
    if rem > np.uint32(0x1000) or (rem == np.uint32(0x1000) and (h & np.uint32(1))):
        h += np.uint32(1)
    return np.uint16(sign | h)


def _store_f16(src, pg, off, dst):
    """fp32 ``src [m]`` rounded to fp16 (:func:`_f16_bits`), written little-endian at byte ``off`` of ``pg``;
    ``dst [m]`` gets their fp32 values (what dequantization reads)."""
    bits = src.view(np.uint32)
    half = pg[off : off + 2 * src.shape[0]].view(np.uint16)
    for i in range(src.shape[0]):
        half[i] = _f16_bits(bits[i])
    _f16(pg, off, src.shape[0], dst)


def _row_minmax(row):
    """``(min(row), max(row))`` as values (a zero's sign aside: the caller stores ``mn + 0``); compiled with
    ``nnan``/``nsz`` so that the reductions vectorize (the inputs are checked finite)."""
    mn = row[0]
    mx = row[0]
    for c in range(1, row.shape[0]):
        mn = min(mn, row[c])
        mx = max(mx, row[c])
    return mn, mx


def _pack_bits(codes, bits, dst, off, tmp):
    """One page row of codes (channel order) -> ``len(codes) * bits / 8`` bytes at ``dst[off:]`` (paged.pack_row:
    byte ``i`` holds channels ``i + j * D / m`` at bit ``j * bits``), one plane at a time (vectorizes)."""
    d = codes.shape[0]
    m = 8 // bits
    nb = d // m
    for i in range(nb):
        tmp[i] = codes[i]
    for j in range(1, m):
        sh = np.uint8(j * bits)
        for i in range(nb):
            tmp[i] |= np.uint8(codes[j * nb + i] << sh)
    dst[off : off + nb] = tmp[:nb]


def _pack(codes, bits, dst, off, tmp):
    """:func:`_pack_bits` with the code width as a literal (constant shifts unroll and vectorize)."""
    if bits == 2:
        _pack_bits(codes, 2, dst, off, tmp)
    elif bits == 4:
        _pack_bits(codes, 4, dst, off, tmp)
    else:
        _pack_bits(codes, 8, dst, off, tmp)


def _steps(mn, mx, bits, step):
    """``step = max((mx - mn) / (2**bits - 1), EPS)`` in fp32, elementwise (quant.params_from_range)."""
    q = np.float32(2**bits - 1)
    for i in range(mn.shape[0]):
        x = (mx[i] - mn[i]) / q
        step[i] = x if x > _EPS else _EPS


def _encode(x, mn, step, qmax, codes):
    """``codes[c] = clamp(round_half_even((x[c] - mn[c]) / step[c]), 0, qmax)`` (quant.encode, IEEE division)."""
    for c in range(x.shape[0]):
        q = np.rint((x[c] - mn[c]) / step[c])
        q = q if q > np.float32(0.0) else np.float32(0.0)
        q = q if q < qmax else qmax
        codes[c] = np.uint8(q)


def _encode_row(x, mn, step, qmax, codes):
    """:func:`_encode` with one (mn, step) for the row (a value token)."""
    for c in range(x.shape[0]):
        q = np.rint((x[c] - mn) / step)
        q = q if q > np.float32(0.0) else np.float32(0.0)
        q = q if q < qmax else qmax
        codes[c] = np.uint8(q)


def _store_scale(m, pg, off, one):
    """The smallest fp16 value ``>= m`` (``m >= 0``; 1 when ``m`` is 0) written at byte ``off`` of ``pg``;
    returns it as fp32 (params8.scale_up; ``one``: fp32 scratch of one element)."""
    one[0] = m
    hb = _f16_bits(one.view(np.uint32)[0])
    pg[off : off + 2].view(np.uint16)[0] = hb
    _f16(pg, off, 1, one)
    if one[0] < m:
        pg[off : off + 2].view(np.uint16)[0] = hb + np.uint16(1)
        _f16(pg, off, 1, one)
    if one[0] == np.float32(0.0):
        pg[off : off + 2].view(np.uint16)[0] = np.uint16(0x3C00)
        one[0] = np.float32(1.0)
    return one[0]


def _code_up(x, s, table):
    """The largest ``e`` in 0..255 with ``s * table[e] >= x`` (0 when none): params8.code_up by bisection (the
    products do not increase with ``e``)."""
    if s * table[255] >= x:
        return 255
    lo, hi = 0, 255
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if s * table[mid] >= x:
            lo = mid
        else:
            hi = mid
    return lo


def _store_params_u8(mn, step, pg, code_off, zero_off, scale_off, table, one):
    """One-byte (step, mn) of a region (params8.params_u8): ``step`` (fp32, ``max(range / qmax, EPS)``) is raised
    to ``|mn| / 127``, coded up under the region's scale (written at ``scale_off``), the zero point
    ``z = round(-mn / step_q)`` clamped to int8; codes at ``code_off``, zero points at ``zero_off``. ``step`` and
    ``mn`` get the decoded values (``step_q``, ``-z * step_q``)."""
    m = np.float32(0.0)
    for i in range(step.shape[0]):
        r = abs(mn[i]) / np.float32(127.0)
        step[i] = r if r > step[i] else step[i]
        m = step[i] if step[i] > m else m
    s = _store_scale(m, pg, scale_off, one)
    for i in range(step.shape[0]):
        e = _code_up(step[i], s, table)
        sq = s * table[e]
        z = np.rint(-mn[i] / sq)
        z = z if z > np.float32(-128.0) else np.float32(-128.0)
        z = z if z < np.float32(127.0) else np.float32(127.0)
        z = z + np.float32(0.0)  # no negative zero
        pg[code_off + i] = np.uint8(e)
        pg[zero_off + i] = np.uint8(np.int32(z) & np.int32(0xFF))
        step[i] = sq
        mn[i] = -z * sq


def _count_out_of_range(a):
    """Entries of 1-D ``a`` that are NaN, infinite or beyond fp16's range (quant.check_finite refuses them)."""
    bad = 0
    for i in range(a.shape[0]):
        bad += 0 if abs(a[i]) <= _F16_MAX else 1
    return bad


def _count_nan(a):
    """NaN entries of 1-D ``a`` (scores: torch's stable sort ranks NaN above everything, numpy's below)."""
    bad = 0
    for i in range(a.shape[0]):
        bad += 0 if a[i] == a[i] else 1
    return bad


def _compress_blocks(key, value, scores, block_ids, pages, n, sk, sv, bits_high, bits_low, k_hi_off, k_lo_off,
                     v_hi_off, v_lo_off, k_param_off, v_norm_off, v_tok_off, mask_off, param_bits, scale_off,
                     table):
    """Quantize ``len(block_ids)`` blocks of fp32 ``key, value [B * n, H, D]`` with ``scores [B * n, H]`` into
    ``pages [num_blocks, H, page_bytes]`` (uint8, in place);
    ``param_bits`` 16 (fp16 parameters) or 8 (one-byte, scales at ``scale_off``, ``table``: params8.STEP_TABLE). Returns
    1 (nothing written) when a key or value is not finite or beyond fp16's range or a score is NaN, else 0."""
    nb = block_ids.shape[0]
    num_kv_heads, d = key.shape[1], key.shape[2]
    if (_count_out_of_range(key.reshape(-1)) or _count_out_of_range(value.reshape(-1))
            or _count_nan(scores.reshape(-1))):
        return 1
    bh, bl = bits_high, bits_low
    qh, ql = np.float32(2**bh - 1), np.float32(2**bl - 1)
    neg = np.empty(n, dtype=np.float32)
    ks = np.empty(n, dtype=np.bool_)
    vs = np.empty(n, dtype=np.bool_)
    perm = np.empty(n, dtype=np.int64)
    codes = np.empty(d, dtype=np.uint8)
    tmp = np.empty(d, dtype=np.uint8)
    kmn = np.empty((2, d), dtype=np.float32)  # min / max per precision group, then the stored parameters
    kmx = np.empty((2, d), dtype=np.float32)
    kst = np.empty((2, d), dtype=np.float32)
    amax = np.empty(d, dtype=np.float32)
    cnorm = np.empty(d, dtype=np.float32)
    xn = np.empty((n, d), dtype=np.float32)
    tmn = np.empty(n, dtype=np.float32)  # value rows' min / max, then the stored parameters (page row order)
    tmx = np.empty(n, dtype=np.float32)
    tst = np.empty(n, dtype=np.float32)
    fbuf = np.empty(max(n, d), dtype=np.float32)
    one = np.empty(1, dtype=np.float32)
    for b in range(nb):
        for h in range(num_kv_heads):
            t0 = b * n  # rows key[t0 + t, h]: 1-D C-contiguous views (a [n, D] slice would not be: no SIMD)
            pg = pages[block_ids[b], h]
            # salient sets: stable descending order of the scores (ties to the earlier token), quotas sk / sv
            for t in range(n):
                neg[t] = -scores[t0 + t, h]
            order = np.argsort(neg, kind="mergesort")
            for r in range(n):
                ks[order[r]] = r < sk
                vs[order[r]] = r < sv
            i = 0
            for tier in range(3):  # page rows: tier 0 (both salient), 1, 2, each in token order
                for t in range(n):
                    if (not ks[t]) + (not vs[t]) == tier:
                        perm[i] = t
                        i += 1
            # keys (ZC-3): channelwise min/max per precision group (a zero minimum stored as +0)
            kmn[:] = np.inf
            kmx[:] = -np.inf
            for t in range(n):
                g = 0 if ks[t] else 1
                row, mn_, mx_ = key[t0 + t, h], kmn[g], kmx[g]
                for c in range(d):
                    xv = row[c]
                    mn_[c] = xv if xv <= mn_[c] else mn_[c]
                    mx_[c] = xv if xv >= mx_[c] else mx_[c]
            for g in range(2):
                if (sk == 0) if g == 0 else (sk == n):  # an empty group: (EPS, 0), never read
                    kmn[g] = 0.0
                    kmx[g] = 0.0
                for c in range(d):
                    kmn[g, c] += np.float32(0.0)
                _steps(kmn[g], kmx[g], bh if g == 0 else bl, fbuf[:d])
                if param_bits == 16:
                    _store_f16(fbuf[:d], pg, k_param_off + 4 * g * d, kst[g])
                    _store_f16(kmn[g], pg, k_param_off + (4 * g + 2) * d, kmn[g])
                else:
                    _store_params_u8(kmn[g], fbuf[:d], pg, k_param_off + 2 * g * d, k_param_off + (2 * g + 1) * d,
                                     scale_off + 2 * g, table, one)
                    kst[g, :] = fbuf[:d]
            for r in range(n):
                if r < sk:
                    _encode(key[t0 + perm[r], h], kmn[0], kst[0], qh, codes)
                    _pack(codes, bh, pg, k_hi_off + r * d * bh // 8, tmp)
                else:
                    _encode(key[t0 + perm[r], h], kmn[1], kst[1], ql, codes)
                    _pack(codes, bl, pg, k_lo_off + (r - sk) * d * bl // 8, tmp)
            # values (ZC-2): one normalizer per channel over the block, then tokenwise min/max per token
            amax[:] = 0.0
            for t in range(n):
                row = value[t0 + t, h]
                for c in range(d):
                    a = abs(row[c])
                    amax[c] = a if a > amax[c] else amax[c]
            for c in range(d):
                amax[c] = np.sqrt(amax[c])
            if param_bits == 16:
                _store_f16(amax, pg, v_norm_off, cnorm)
                for c in range(d):
                    if cnorm[c] == np.float32(0.0):  # a zero channel (or one below fp16's range): normalizer 1
                        cnorm[c] = np.float32(1.0)
                        pg[v_norm_off + 2 * c] = np.uint8(0)
                        pg[v_norm_off + 2 * c + 1] = np.uint8(0x3C)
            else:  # coded up under one scale (params8.channel_normalizer_u8): a zero channel keeps a tiny c
                m = np.float32(0.0)
                for c in range(d):
                    m = amax[c] if amax[c] > m else m
                s = _store_scale(m, pg, scale_off + 4, one)
                for c in range(d):
                    e = _code_up(amax[c], s, table)
                    pg[v_norm_off + c] = np.uint8(e)
                    cnorm[c] = s * table[e]
            for t in range(n):
                row, dst = value[t0 + t, h], xn[t]
                for c in range(d):
                    dst[c] = row[c] / cnorm[c]
            for r in range(n):  # tokenwise min / max, in page row order
                row = xn[perm[r]]
                mn, mx = _row_minmax(row)
                tmn[r] = mn + np.float32(0.0)  # a zero minimum is +0 (quant.params_from_range)
                tmx[r] = mx
            _steps(tmn[:sv], tmx[:sv], bh, fbuf[:sv])
            _steps(tmn[sv:], tmx[sv:], bl, fbuf[sv:])
            if param_bits == 16:
                _store_f16(fbuf[:n], pg, v_tok_off, tst)
                _store_f16(tmn, pg, v_tok_off + 2 * n, tmn)
            else:  # one scale per precision group, over the group's own rows
                _store_params_u8(tmn[:sv], fbuf[:sv], pg, v_tok_off, v_tok_off + n, scale_off + 6, table, one)
                _store_params_u8(tmn[sv:], fbuf[sv:n], pg, v_tok_off + sv, v_tok_off + n + sv, scale_off + 8,
                                 table, one)
                tst[:] = fbuf[:n]
            for r in range(n):
                if r < sv:
                    _encode_row(xn[perm[r]], tmn[r], tst[r], qh, codes)
                    _pack(codes, bh, pg, v_hi_off + r * d * bh // 8, tmp)
                else:
                    _encode_row(xn[perm[r]], tmn[r], tst[r], ql, codes)
                    _pack(codes, bl, pg, v_lo_off + (r - sv) * d * bl // 8, tmp)
            # bitmaps in token order: keys, then values
            for i in range(n // 8):
                mk = np.uint32(0)
                mv = np.uint32(0)
                for j in range(8):
                    mk |= np.uint32(ks[8 * i + j]) << np.uint32(j)
                    mv |= np.uint32(vs[8 * i + j]) << np.uint32(j)
                pg[mask_off + i] = np.uint8(mk)
                pg[mask_off + n // 8 + i] = np.uint8(mv)
    return 0


if numba is not None:
    _f16_bits = numba.njit(cache=True, inline="always")(_f16_bits)
    _store_f16 = numba.njit(cache=True, inline="always")(_store_f16)
    _steps = numba.njit(cache=True, inline="always")(_steps)
    _store_scale = numba.njit(cache=True, inline="always")(_store_scale)
    _code_up = numba.njit(cache=True, inline="always")(_code_up)
    _store_params_u8 = numba.njit(cache=True, inline="always")(_store_params_u8)
    # fast-math reductions: called, not inlined in numba's IR, so only its instructions carry the flags
    _row_minmax = numba.njit(cache=True, fastmath={"nnan", "ninf", "nsz"})(_row_minmax)
    _pack_bits = numba.njit(cache=True, inline="always")(_pack_bits)
    _pack = numba.njit(cache=True, inline="always")(_pack)
    _encode = numba.njit(cache=True, inline="always")(_encode)
    _encode_row = numba.njit(cache=True, inline="always")(_encode_row)
    _count_out_of_range = numba.njit(cache=True)(_count_out_of_range)
    _count_nan = numba.njit(cache=True)(_count_nan)
    _compress_blocks = numba.njit(cache=True)(_compress_blocks)  # no fastmath: IEEE division, no contraction


def compress_store(key, value, scores, block_ids, kv_cache, layout: PageLayout) -> None:
    """:func:`zipcache_vllm.engine.paged.compress_store` (same arguments, same bytes) in one numba call; the
    twin itself when numba is missing, on non-CPU tensors, for inputs it refuses (it raises: non-finite
    values, shapes that do not match ``layout`` or ``kv_cache``, block ids outside it; the kernel does not
    check bounds) and for NaN scores (the twin's sort decides where they rank)."""
    if numba is None or kv_cache.device.type != "cpu" or block_ids.numel() == 0:
        paged.compress_store(key, value, scores, block_ids, kv_cache, layout)
        return
    n, num_blocks = layout.block_size, block_ids.numel()
    num_kv_heads, d = key.shape[-2], key.shape[-1]
    if (
        d != layout.head_size
        or key.numel() != num_blocks * n * num_kv_heads * d
        or value.shape != key.shape
        or scores.numel() != num_blocks * n * num_kv_heads
        or kv_cache.dim() != 3
        or kv_cache.shape[1] != num_kv_heads
        or kv_cache.shape[2] < layout.page_bytes
        or kv_cache.stride(-1) != 1
        or kv_cache.dtype != torch.uint8
        or int(block_ids.min()) < 0
        or int(block_ids.max()) >= kv_cache.shape[0]
    ):
        paged.compress_store(key, value, scores, block_ids, kv_cache, layout)  # it raises (or stores what it accepts)
        return
    k = key.reshape(-1, num_kv_heads, d).float().contiguous()
    v = value.reshape(-1, num_kv_heads, d).float().contiguous()
    s = scores.reshape(-1, num_kv_heads).float().contiguous()
    bad = _compress_blocks(
        k.numpy(), v.numpy(), s.numpy(), block_ids.long().contiguous().numpy(), kv_cache.numpy(), n,
        layout.num_salient_k, layout.num_salient_v, layout.bits_high, layout.bits_low, layout.k_hi_off,
        layout.k_lo_off, layout.v_hi_off, layout.v_lo_off, layout.k_param_off, layout.v_norm_off, layout.v_tok_off,
        layout.mask_off, layout.param_bits, layout.scale_off, _STEP_TABLE,
    )
    if bad:
        paged.compress_store(key, value, scores, block_ids, kv_cache, layout)  # raises the twin's ValueError, or
        # orders NaN scores as torch does


def warmup(layout: PageLayout, num_kv_heads: int) -> None:
    """Compile (or load from numba's cache) :func:`_compress_blocks` before the first request: one all-zero
    block. ~12 s the first time on a 2-core CPU, well under 1 s from the cache."""
    n, d = layout.block_size, layout.head_size
    z = torch.zeros(n, num_kv_heads, d, dtype=torch.float32, device="cpu")  # explicit: vLLM's default is bf16
    cache = torch.zeros(2, num_kv_heads, layout.page_bytes, dtype=torch.uint8, device="cpu")
    compress_store(z, z, torch.zeros(n, num_kv_heads, dtype=torch.float32, device="cpu"),
                   torch.ones(1, dtype=torch.int64, device="cpu"), cache, layout)
