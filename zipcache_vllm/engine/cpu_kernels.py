"""CPU kernel (numba) for the decode step: attention read straight from the compressed pages.

The torch path (:func:`zipcache_vllm.engine.cpu_decode.decode_attend` with ``kernels="torch"``) dequantizes every page
of every row into fp32 keys/values for every layer and step, then runs a dozen torch ops; in a busy vLLM CPU
worker both the bytes and the op count cost. :func:`decode_rows` does a whole layer's decode rows in one call
and reads the codes where they lie, with the quantization parameters folded into the query and the
probabilities (the algebra of the Triton decode kernel):

* keys, channelwise per precision group g (ZC-3): ``q . k_t = sum_c (q_c step_g[c]) code_t[c] + q . mn_g``;
* values, CST (ZC-2): ``sum_t p_t v_t = norm * (sum_t (p_t step_t) code_t + sum_t p_t mn_t)``;

then the bf16 tail and the row's own new token, one softmax per query head. Layout and packing:
:mod:`zipcache_vllm.engine.layout` (byte ``i`` of a row holds channels ``i + j * D / m`` at bit ``j * bits``,
``m = 8 // bits``). The fp16 page parameters are widened to fp32 inside (bit by bit: numba has no float16);
one-byte parameters (``param_bits = 8``) are decoded as :func:`zipcache_vllm.engine.paged.page_params` does
(:func:`_key_params`, :func:`_value_params`).
Results equal the torch twin up to fp32 summation order (tests/engine/test_step.py).

No vLLM import; numba is optional (the ``cpu`` extra installs it): :func:`available` says whether it imports.
Threads: one, or torch's OpenMP worker threads where numba and torch share one OpenMP runtime
(:func:`decode_threads`; the (row, KV head) pairs are shared among them, each computed as on one thread).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np
import torch

from ..method import params8
from .layout import PageLayout

try:  # numba is an optional dependency: without it the torch path runs
    import numba
except ImportError:  # pragma: no cover - exercised on machines without numba
    numba = None


def available() -> bool:
    return numba is not None


def _unpack_bits(pg, off, row0, rows, bits, buf):
    """Codes of ``rows`` consecutive page rows starting at byte ``off`` of ``pg`` (one page, uint8) into rows
    ``row0 ..`` of ``buf [n, D]`` (fp32, channel order). Loops ordered so that the inner one vectorizes."""
    d = buf.shape[1]
    m = 8 // bits
    nb = d // m
    mask = (1 << bits) - 1
    for t in range(rows):
        row = pg[off + t * nb : off + (t + 1) * nb]  # 1-D views: the inner loop vectorizes (~4x)
        dst = buf[row0 + t]
        for j in range(m):
            sh = j * bits
            for i in range(nb):
                dst[j * nb + i] = np.float32((row[i] >> sh) & mask)


def _unpack_rows(pg, off, row0, rows, bits, buf):
    """:func:`_unpack_bits` with the code width as a literal (a constant shift and mask vectorize; ~10x)."""
    if bits == 2:
        _unpack_bits(pg, off, row0, rows, 2, buf)
    elif bits == 4:
        _unpack_bits(pg, off, row0, rows, 4, buf)
    else:
        _unpack_bits(pg, off, row0, rows, 8, buf)


def _bf16_row(src, dst, bits):
    """bf16 values (their int16 bit patterns) ``src [D]`` -> fp32 ``dst [D]`` (``bits``: uint32 scratch)."""
    for c in range(src.shape[0]):
        bits[c] = np.uint32(np.uint16(src[c])) << np.uint32(16)
    dst[:] = bits.view(np.float32)


def _f16(pg, off, count, dst):
    """``count`` fp16 values at byte ``off`` of ``pg`` (little-endian, 2-byte aligned) -> fp32 ``dst``, exact
    (numba has no float16 type): the bits are rebiased branch-free; subnormals, infinities and NaN included."""
    half = pg[off : off + 2 * count].view(np.uint16)
    out = dst.view(np.uint32)
    for i in range(count):
        h = np.uint32(half[i])
        e = h & np.uint32(0x7C00)
        m = h & np.uint32(0x3FF)
        s = (h & np.uint32(0x8000)) << np.uint32(16)
        normal = s | ((e + np.uint32(0x1C000)) << np.uint32(13)) | (m << np.uint32(13))
        special = s | np.uint32(0x7F800000) | (m << np.uint32(13))
        out[i] = special if e == np.uint32(0x7C00) else normal
    for i in range(count):
        h = np.uint32(half[i])
        if h & np.uint32(0x7C00) == 0:  # zero or subnormal: m * 2**-24
            v = np.float32(h & np.uint32(0x3FF)) * np.float32(2.0**-24)
            dst[i] = -v if h & np.uint32(0x8000) else v


_STEP_TABLE = params8.STEP_TABLE.numpy()  # fp32 [256]: one-byte parameter codes -> multiples of the region scale


def _int8(b):
    """A page byte read as int8, as fp32."""
    z = np.int32(b)
    return np.float32(z - 256 if z > 127 else z)


def _key_params(pg, k_param_off, scale_off, param_bits, kp, sbuf):
    """Key (step, mn) of both precision groups -> fp32 ``kp [4, D]`` (step_hi, mn_hi, step_lo, mn_lo), from fp16
    parameters or one-byte codes under their scales (paged.page_params; ``sbuf``: fp32 scratch of 5)."""
    d = kp.shape[1]
    if param_bits == 16:
        _f16(pg, k_param_off, 4 * d, kp.reshape(4 * d))
        return
    _f16(pg, scale_off, 5, sbuf)
    for g in range(2):
        s = sbuf[g]
        base = k_param_off + 2 * g * d
        for c in range(d):
            st = s * _STEP_TABLE[pg[base + c]]
            kp[2 * g, c] = st
            kp[2 * g + 1, c] = -_int8(pg[base + d + c]) * st


def _value_params(pg, v_norm_off, v_tok_off, scale_off, param_bits, sv, norm, vt, sbuf):
    """Value normalizers -> ``norm [D]`` and each page row's (step, mn) -> ``vt [2, N]`` (fp32), either format."""
    d, n = norm.shape[0], vt.shape[1]
    if param_bits == 16:
        _f16(pg, v_norm_off, d, norm)
        _f16(pg, v_tok_off, 2 * n, vt.reshape(2 * n))
        return
    _f16(pg, scale_off, 5, sbuf)
    for c in range(d):
        norm[c] = sbuf[2] * _STEP_TABLE[pg[v_norm_off + c]]
    for t in range(n):
        st = (sbuf[3] if t < sv else sbuf[4]) * _STEP_TABLE[pg[v_tok_off + t]]
        vt[0, t] = st
        vt[1, t] = -_int8(pg[v_tok_off + n + t]) * st


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 in two parts (the first exact in 9 bits: k * _LN2_HI is exact)
_LN2_LO = np.float32(-2.12194440e-4)


def _exp_inplace(x, scratch):
    """``x[i] = exp(x[i])`` for ``x <= 0`` (logits minus their maximum), vectorizable: ``exp(x) = 2**k *
    exp(r)``, ``k = round(x / ln 2)``, ``|r| <= ln 2 / 2``, ``exp(r)`` by its Taylor series to degree 7
    (truncation < 6e-9 relative), ``2**k`` built in the exponent bits (``scratch``: uint32, ``x.size``).
    Max relative error 7.4e-8 (~1 ulp) against float64 over [-87, 0]; below -87 the result stays ~1.6e-38
    instead of underflowing (nothing next to the maximum's 1.0). numba's scalar ``np.exp`` (no SVML here)
    was 80 % of a SmolLM2 page's softmax: 1.46 -> 0.27 us per (page, KV head). Compiled without ``reassoc``
    so that the two-part reduction stays in that order."""
    for i in range(x.shape[0]):
        v = max(x[i], np.float32(-87.0))
        k = np.floor(v * _LOG2E + np.float32(0.5))
        r = (v - k * _LN2_HI) - k * _LN2_LO
        p = np.float32(1.0 / 5040.0)
        p = p * r + np.float32(1.0 / 720.0)
        p = p * r + np.float32(1.0 / 120.0)
        p = p * r + np.float32(1.0 / 24.0)
        p = p * r + np.float32(1.0 / 6.0)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        x[i] = p * r + np.float32(1.0)
        scratch[i] = np.uint32(np.int32(k) + 127) << np.uint32(23)
    scale = scratch[: x.shape[0]].view(np.float32)
    for i in range(x.shape[0]):
        x[i] *= scale[i]


def _dot_rows(buf, lo, hi, qs, g, dst, col, scale, bias):
    """``dst[gi, col + t - lo] = (qs[gi] . buf[t] + bias[gi]) * scale`` for rows ``lo <= t < hi``. Eight rows per
    pass (eight reductions share each load of ``qs``): a SmolLM2 page (128 x 64, g = 3) 1.10 us with one row
    per pass, 0.65 with four, 0.55 with eight (two query heads x four rows: the same)."""
    d = buf.shape[1]
    t = lo
    while t + 8 <= hi:
        r0, r1, r2, r3 = buf[t], buf[t + 1], buf[t + 2], buf[t + 3]
        r4, r5, r6, r7 = buf[t + 4], buf[t + 5], buf[t + 6], buf[t + 7]
        for gi in range(g):
            qrow = qs[gi]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
            for c in range(d):
                x = qrow[c]
                a0 += x * r0[c]
                a1 += x * r1[c]
                a2 += x * r2[c]
                a3 += x * r3[c]
                a4 += x * r4[c]
                a5 += x * r5[c]
                a6 += x * r6[c]
                a7 += x * r7[c]
            b, o = bias[gi], col + t - lo
            dst[gi, o] = (a0 + b) * scale
            dst[gi, o + 1] = (a1 + b) * scale
            dst[gi, o + 2] = (a2 + b) * scale
            dst[gi, o + 3] = (a3 + b) * scale
            dst[gi, o + 4] = (a4 + b) * scale
            dst[gi, o + 5] = (a5 + b) * scale
            dst[gi, o + 6] = (a6 + b) * scale
            dst[gi, o + 7] = (a7 + b) * scale
        t += 8
    while t < hi:
        row = buf[t]
        for gi in range(g):
            qrow = qs[gi]
            a = np.float32(0.0)
            for c in range(d):
                a += qrow[c] * row[c]
            dst[gi, col + t - lo] = (a + bias[gi]) * scale
        t += 1


def _weighted_codes(pg, off, rows, bits, w, col, g, acc):
    """``acc[gi, c] += sum_t w[gi, col + t] * code[t, c]`` over ``rows`` page rows of ``bits``-bit codes at byte
    ``off`` of ``pg``, read straight from the bytes: four rows per pass, one code plane (shift) at a time, so
    each accumulator segment is loaded and stored once per four rows and the codes never go through a buffer.
    SmolLM2 value page (32 rows at 4 bits, 96 at 2; g = 3): 0.93 us, against 0.55 (unpack) + 0.70 (four
    buffered rows per pass) or 0.55 + 2.0 (one row per pass, before)."""
    d = acc.shape[1]
    m = 8 // bits
    nb = d // m
    mask = (1 << bits) - 1
    t = 0
    while t + 4 <= rows:
        r0 = pg[off + t * nb : off + (t + 1) * nb]
        r1 = pg[off + (t + 1) * nb : off + (t + 2) * nb]
        r2 = pg[off + (t + 2) * nb : off + (t + 3) * nb]
        r3 = pg[off + (t + 3) * nb : off + (t + 4) * nb]
        for gi in range(g):
            w0, w1, w2, w3 = w[gi, col + t], w[gi, col + t + 1], w[gi, col + t + 2], w[gi, col + t + 3]
            for j in range(m):
                sh = j * bits
                a = acc[gi, j * nb : (j + 1) * nb]
                for i in range(nb):
                    a[i] += (w0 * np.float32((r0[i] >> sh) & mask) + w1 * np.float32((r1[i] >> sh) & mask)
                             + w2 * np.float32((r2[i] >> sh) & mask) + w3 * np.float32((r3[i] >> sh) & mask))
        t += 4
    while t < rows:
        r0 = pg[off + t * nb : off + (t + 1) * nb]
        for gi in range(g):
            w0 = w[gi, col + t]
            for j in range(m):
                sh = j * bits
                a = acc[gi, j * nb : (j + 1) * nb]
                for i in range(nb):
                    a[i] += w0 * np.float32((r0[i] >> sh) & mask)
        t += 1


def _weighted_rows(buf, rows, w, col, g, acc):
    """``acc[gi, c] += sum_t w[gi, col + t] * buf[t, c]`` over the first ``rows`` fp32 rows of ``buf`` (the bf16
    tail, widened), four rows per pass as :func:`_weighted_codes` (each accumulator row loaded and stored once
    per four rows)."""
    d = acc.shape[1]
    t = 0
    while t + 4 <= rows:
        r0, r1, r2, r3 = buf[t], buf[t + 1], buf[t + 2], buf[t + 3]
        for gi in range(g):
            w0, w1, w2, w3 = w[gi, col + t], w[gi, col + t + 1], w[gi, col + t + 2], w[gi, col + t + 3]
            a = acc[gi]
            for c in range(d):
                a[c] += w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c]
        t += 4
    while t < rows:
        r0 = buf[t]
        for gi in range(g):
            w0 = w[gi, col + t]
            a = acc[gi]
            for c in range(d):
                a[c] += w0 * r0[c]
        t += 1


def _weighted_code_rows(pg, off, rows, bits, w, col, g, acc):
    """:func:`_weighted_codes` with the code width as a literal (constant shifts and masks, as _unpack_rows)."""
    if bits == 2:
        _weighted_codes(pg, off, rows, 2, w, col, g, acc)
    elif bits == 4:
        _weighted_codes(pg, off, rows, 4, w, col, g, acc)
    else:
        _weighted_codes(pg, off, rows, 8, w, col, g, acc)


def _scratch(threads, n, d, g, width):
    """Scratch arrays of :func:`_decode_pair`, one set per thread (leading dimension ``threads``)."""
    return (
        np.empty((threads, n, d), dtype=np.float32),  # buf: a page's key codes, widened
        np.empty((threads, n + 1, d), dtype=np.float32),  # tbuf: the bf16 tail and the new token, widened
        np.empty((threads, d), dtype=np.uint32),  # bits
        np.empty((threads, 2, g, d), dtype=np.float32),  # qs: query times key step, per precision group
        np.empty((threads, 2, g), dtype=np.float32),  # bias: query . key min, per precision group
        np.empty((threads, g, width), dtype=np.float32),  # probs
        np.empty((threads, width), dtype=np.uint32),  # scratch of _exp_inplace
        np.empty((threads, g, d), dtype=np.float32),  # acc
        np.empty((threads, g, d), dtype=np.float32),  # part
        np.empty((threads, g, n), dtype=np.float32),  # ws: probability times value step, per page row
        np.empty((threads, g), dtype=np.float32),  # bsum
        np.empty((threads, 4, d), dtype=np.float32),  # kp: step_hi, mn_hi, step_lo, mn_lo
        np.empty((threads, d), dtype=np.float32),  # norm
        np.empty((threads, 2, n), dtype=np.float32),  # vt: value step, mn per page row
    )


def _decode_pair(r, h, tid, sc, pages, page_ids, page_start, q, tail_key, tail_value, tail_slot, tail_start, new_key,
                 new_value, scale, n, sk, sv, k_hi_off, k_lo_off, v_hi_off, v_lo_off, k_param_off, v_norm_off,
                 v_tok_off, bits_high, bits_low, param_bits, scale_off, out):
    """Row ``r``, KV head ``h`` of :func:`_decode_rows` with thread ``tid``'s scratch ``sc`` (:func:`_scratch`)."""
    g, d = q.shape[2], q.shape[3]
    buf, tbuf, bits, qs, bias, probs = sc[0][tid], sc[1][tid], sc[2][tid], sc[3][tid], sc[4][tid], sc[5][tid]
    scratch, acc, part, ws, bsum, kp = sc[6][tid], sc[7][tid], sc[8][tid], sc[9][tid], sc[10][tid], sc[11][tid]
    norm, vt = sc[12][tid], sc[13][tid]
    zero = np.zeros(g, dtype=np.float32)
    sbuf = np.empty(5, dtype=np.float32)
    num_pages = page_start[r + 1] - page_start[r]
    tl = tail_start[r + 1] - tail_start[r]
    wp = num_pages * n
    length = wp + tl + 1
    qr = q[r, h]
    # logits: pages (codes; step and min folded into the query), tail, the new token
    for p in range(num_pages):
        pg = pages[page_ids[page_start[r] + p], h]
        _unpack_rows(pg, k_hi_off, 0, sk, bits_high, buf)
        _unpack_rows(pg, k_lo_off, sk, n - sk, bits_low, buf)
        _key_params(pg, k_param_off, scale_off, param_bits, kp, sbuf)
        for part_i in range(2):
            step, mn = kp[2 * part_i], kp[2 * part_i + 1]
            for gi in range(g):
                a = np.float32(0.0)
                for c in range(d):
                    qs[part_i, gi, c] = qr[gi, c] * step[c]
                    a += qr[gi, c] * mn[c]
                bias[part_i, gi] = a
        _dot_rows(buf, 0, sk, qs[0], g, probs, p * n, scale, bias[0])
        _dot_rows(buf, sk, n, qs[1], g, probs, p * n + sk, scale, bias[1])
    for t in range(tl):
        _bf16_row(tail_key[tail_slot[r], t, h], tbuf[t], bits)
    _bf16_row(new_key[r, h], tbuf[tl], bits)
    _dot_rows(tbuf, 0, tl + 1, qr, g, probs, wp, scale, zero)
    # softmax over the row
    for gi in range(g):
        row = probs[gi, :length]
        m = row[0]
        for x in range(1, length):
            m = max(m, row[x])
        for x in range(length):
            row[x] -= m
        _exp_inplace(row, scratch)
        total = np.float32(0.0)
        for x in range(length):
            total += row[x]
        inv = np.float32(1.0) / total
        for x in range(length):
            row[x] *= inv
    # P @ V: pages (codes; norm, step and min folded into the weights), tail, the new token
    acc[:] = 0.0
    for p in range(num_pages):
        pg = pages[page_ids[page_start[r] + p], h]
        _value_params(pg, v_norm_off, v_tok_off, scale_off, param_bits, sv, norm, vt, sbuf)
        for gi in range(g):
            prow = probs[gi, p * n : (p + 1) * n]
            a = np.float32(0.0)
            for t in range(n):
                a += prow[t] * vt[1, t]
                ws[gi, t] = prow[t] * vt[0, t]
            bsum[gi] = a
        part[:] = 0.0
        _weighted_code_rows(pg, v_hi_off, sv, bits_high, ws, 0, g, part)
        _weighted_code_rows(pg, v_lo_off, n - sv, bits_low, ws, sv, g, part)
        for gi in range(g):
            for c in range(d):
                acc[gi, c] += norm[c] * (part[gi, c] + bsum[gi])
    for t in range(tl):
        _bf16_row(tail_value[tail_slot[r], t, h], tbuf[t], bits)
    _bf16_row(new_value[r, h], tbuf[tl], bits)
    _weighted_rows(tbuf, tl + 1, probs, wp, g, acc)
    for gi in range(g):
        for c in range(d):
            out[r, h, gi, c] = acc[gi, c]


def _width(page_start, tail_start, n):
    """The longest row's logits: its pages' tokens, its tail and its new token."""
    width = 1
    for r in range(page_start.shape[0] - 1):
        width = max(width, (page_start[r + 1] - page_start[r]) * n + tail_start[r + 1] - tail_start[r] + 1)
    return width


def _decode_rows(pages, page_ids, page_start, q, tail_key, tail_value, tail_slot, tail_start, new_key, new_value,
                 scale, n, sk, sv, k_hi_off, k_lo_off, v_hi_off, v_lo_off, k_param_off, v_norm_off, v_tok_off,
                 bits_high, bits_low, param_bits, scale_off, out):
    """One decode query per row over its pages (codes), its bf16 tail and its own new token, in one pass.

    Row ``r`` (query ``q[r] [H, G, D]`` fp32) reads the pages ``page_ids[page_start[r]:page_start[r + 1]]``
    (codes and parameters at the layout's offsets, fp16 or one-byte: ``param_bits``, ``scale_off``), the
    ``tail_start[r + 1] - tail_start[r]`` tokens of staging slot ``tail_slot[r]`` (``tail_key/value
    [slots, n, H, D]`` as int16 bf16 bits) and its own new token ``new_key/value[r] [H, D]`` (int16 bf16
    bits). Writes ``out [R, H, G, D]``. One thread, (row, KV head) pairs in order."""
    num_rows, num_kv_heads, g, d = q.shape
    sc = _scratch(1, n, d, g, _width(page_start, tail_start, n))
    for r in range(num_rows):
        for h in range(num_kv_heads):
            _decode_pair(r, h, 0, sc, pages, page_ids, page_start, q, tail_key, tail_value, tail_slot, tail_start,
                         new_key, new_value, scale, n, sk, sv, k_hi_off, k_lo_off, v_hi_off, v_lo_off, k_param_off,
                         v_norm_off, v_tok_off, bits_high, bits_low, param_bits, scale_off, out)


def _decode_rows_parallel(pages, page_ids, page_start, q, tail_key, tail_value, tail_slot, tail_start, new_key,
                          new_value, scale, n, sk, sv, k_hi_off, k_lo_off, v_hi_off, v_lo_off, k_param_off,
                          v_norm_off, v_tok_off, bits_high, bits_low, param_bits, scale_off, out, threads):
    """:func:`_decode_rows` with the (row, KV head) pairs shared among numba's ``threads`` threads (``prange``;
    each pair is computed exactly as in the serial loop, so the results are the same bits)."""
    num_rows, num_kv_heads, g, d = q.shape
    sc = _scratch(threads, n, d, g, _width(page_start, tail_start, n))  # threads: every id get_thread_id gives
    for i in numba.prange(num_rows * num_kv_heads):
        _decode_pair(i // num_kv_heads, i % num_kv_heads, numba.get_thread_id(), sc, pages, page_ids, page_start, q,
                     tail_key, tail_value, tail_slot, tail_start, new_key, new_value, scale, n, sk, sv, k_hi_off,
                     k_lo_off, v_hi_off, v_lo_off, k_param_off, v_norm_off, v_tok_off, bits_high, bits_low,
                     param_bits, scale_off, out)


def _round_bf16(src, dst):
    """fp32 ``src [D]`` -> bf16 bit patterns ``dst [D]`` (uint16), round to nearest even as torch's ``.to``
    (NaN -> a quiet NaN)."""
    bits = src.view(np.uint32)
    for c in range(src.shape[0]):
        b = bits[c]
        if b & np.uint32(0x7FFFFFFF) > np.uint32(0x7F800000):
            dst[c] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
        else:
            dst[c] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def _dequantize_pages(pages, page_ids, n, sk, sv, k_hi_off, k_lo_off, v_hi_off, v_lo_off, k_param_off, v_norm_off,
                      v_tok_off, bits_high, bits_low, param_bits, scale_off, key_out, value_out):
    """The pages ``page_ids`` dequantized and rounded to bf16, in page row order: ``key_out, value_out [P, n, H,
    D]`` (uint16 bf16 bits). Keys ``mn_g + code * step_g`` per precision group, values ``(mn_t + code * step_t)
    * norm``: :func:`zipcache_vllm.engine.cpu_decode.dequantize_pages_cpu`'s fp32 arithmetic in the same order
    (no fused multiply-add: compiled without fastmath), so the same bf16 values."""
    d = key_out.shape[3]
    buf = np.empty((n, d), dtype=np.float32)
    row = np.empty(d, dtype=np.float32)
    kp = np.empty((4, d), dtype=np.float32)  # step_hi, mn_hi, step_lo, mn_lo
    norm = np.empty(d, dtype=np.float32)
    vt = np.empty((2, n), dtype=np.float32)  # value step, mn per page row
    sbuf = np.empty(5, dtype=np.float32)
    for p in range(page_ids.shape[0]):
        for h in range(pages.shape[1]):
            pg = pages[page_ids[p], h]
            _unpack_rows(pg, k_hi_off, 0, sk, bits_high, buf)
            _unpack_rows(pg, k_lo_off, sk, n - sk, bits_low, buf)
            _key_params(pg, k_param_off, scale_off, param_bits, kp, sbuf)
            for t in range(n):
                grp = 0 if t < sk else 2
                for c in range(d):
                    row[c] = kp[grp + 1, c] + buf[t, c] * kp[grp, c]
                _round_bf16(row, key_out[p, t, h])
            _unpack_rows(pg, v_hi_off, 0, sv, bits_high, buf)
            _unpack_rows(pg, v_lo_off, sv, n - sv, bits_low, buf)
            _value_params(pg, v_norm_off, v_tok_off, scale_off, param_bits, sv, norm, vt, sbuf)
            for t in range(n):
                step, mn = vt[0, t], vt[1, t]
                for c in range(d):
                    row[c] = (mn + buf[t, c] * step) * norm[c]
                _round_bf16(row, value_out[p, t, h])


if numba is not None:
    _unpack_bits = numba.njit(cache=True, fastmath=True, inline="always")(_unpack_bits)
    _unpack_rows = numba.njit(cache=True, fastmath=True, inline="always")(_unpack_rows)
    _bf16_row = numba.njit(cache=True, inline="always")(_bf16_row)
    _f16 = numba.njit(cache=True, inline="always")(_f16)
    _int8 = numba.njit(cache=True, inline="always")(_int8)
    _key_params = numba.njit(cache=True, inline="always")(_key_params)
    _value_params = numba.njit(cache=True, inline="always")(_value_params)
    # no reassoc: the reduction to [-ln 2 / 2, ln 2 / 2] must keep its order; called, not inlined in numba's IR,
    # so its instructions keep these flags when LLVM inlines it
    _exp_inplace = numba.njit(cache=True, fastmath={"nnan", "ninf", "nsz", "arcp", "contract", "afn"})(_exp_inplace)
    _dot_rows = numba.njit(cache=True, fastmath=True, inline="always")(_dot_rows)
    _weighted_codes = numba.njit(cache=True, fastmath=True, inline="always")(_weighted_codes)
    _weighted_code_rows = numba.njit(cache=True, fastmath=True, inline="always")(_weighted_code_rows)
    _weighted_rows = numba.njit(cache=True, fastmath=True, inline="always")(_weighted_rows)
    _scratch = numba.njit(cache=True, inline="always")(_scratch)
    _width = numba.njit(cache=True, inline="always")(_width)
    _decode_pair = numba.njit(cache=True, fastmath=True)(_decode_pair)
    _decode_rows = numba.njit(cache=True, fastmath=True)(_decode_rows)
    _decode_rows_parallel = numba.njit(cache=True, fastmath=True, parallel=True)(_decode_rows_parallel)
    _round_bf16 = numba.njit(cache=True, inline="always")(_round_bf16)
    # no fastmath: the same fp32 roundings as the torch dequantization (no contraction into fused multiply-adds)
    _dequantize_pages = numba.njit(cache=True)(_dequantize_pages)


_THREADS = 1  # threads of the numba decode: decode_threads() sets more where numba and torch share one OpenMP runtime
PARALLEL_MIN_PAGES = 24  # (page, KV head) pairs of a layer's decode below which one thread does it: the parallel
# region's wake-up and the uneven split of a few (row, KV head) pairs cost more than they save (served, one stream of
# ~650 tokens: 5 pages x 3 heads on two threads 4.57 s vs 4.33 on one for 128 tokens)
_numba_threads = [0]  # what numba.set_num_threads was last given (thread-local in numba; set from this thread)


def openmp_runtimes() -> list[str]:
    """Files of the GNU OpenMP runtimes (``libgomp``) mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]})
    except OSError:
        return []


def _torch_openmp():
    """The OpenMP API of the runtime torch's kernels run on (symbols looked up through ``libtorch_cpu``)."""
    return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))


def decode_threads(threads: int) -> tuple[int, str]:
    """Run the numba decode's (row, KV head) pairs on ``threads`` threads, if that is safe; returns ``(threads
    set, why)``. Safe means that numba's OpenMP layer runs on the OpenMP runtime torch runs on, so that its
    parallel regions use torch's (pinned) worker threads instead of a second pool spinning on the same cores.
    numba's ``omppool`` asks the loader for ``libgomp.so.1.0.0`` while torch's wheel ships ``libgomp.so.1``, so a
    second runtime may be mapped; what counts is where numba's OpenMP calls bind (the global scope, where torch's
    runtime usually comes first). The test is therefore functional: numba's layer switches nested parallelism on
    in its runtime when it starts; torch's runtime seeing that change means they are one. Nesting is then switched
    off again: in the shared runtime it lets torch's kernels nest parallel regions (SDPA 20-50x slower on 2 cores,
    benchmarks/probe_openmp_nesting.py; what made an earlier parallel decode slower as served, docs/vllm-plugin.md)."""
    global _THREADS
    _THREADS = 1
    if threads <= 1 or numba is None:
        return 1, "one thread requested" if numba is not None else "numba not installed"
    why = _shared_runtime(threads)
    if why:
        return 1, why
    _THREADS = min(threads, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(_THREADS)
    return _THREADS, "numba runs on torch's OpenMP runtime"


@functools.cache
def _shared_runtime(threads: int) -> str:
    """Empty if numba's OpenMP layer runs on torch's OpenMP runtime, else why not. Starts the layer (once per
    process) with a pool of at least ``threads``: numba sizes it by the CPUs the calling thread may run on, and
    vLLM's CPU worker pins its main thread to one core."""
    try:
        omp = _torch_openmp()
        from numba.np.ufunc import parallel

        if parallel._is_initialized:
            return "numba's threading layer started before this check"
        pool = max(numba.config.NUMBA_NUM_THREADS, threads)
        os.environ["NUMBA_NUM_THREADS"] = str(pool)  # numba re-reads its config from the environment
        numba.config.reload_config()
        parallel.NUM_THREADS = pool  # read at numba's import, used by the launch
        parallel.snt_check = parallel.gen_snt_check()  # set_num_threads' bound, also fixed at import
        numba.config.THREADING_LAYER = "omp"
        omp.omp_set_nested(0)
        parallel._launch_threads()
        layer = numba.threading_layer()
        shared = omp.omp_get_nested() == 1
        omp.omp_set_nested(0)
        omp.omp_set_max_active_levels(1)
    except (OSError, AttributeError, ImportError, ValueError, RuntimeError) as e:
        return f"numba's OpenMP layer is not available ({e})"
    if layer != "omp" or not shared:
        return f"numba's threading layer ({layer}) runs on another OpenMP runtime than torch ({openmp_runtimes()})"
    return ""


def decode_rows(kv_cache, page_ids, page_start, q, staging_key, staging_value, tail_slot, tail_start, key_rows,
                value_rows, layout: PageLayout, scale: float, out) -> None:
    """:func:`_decode_rows` on torch tensors (CPU): uint8 pages, bf16 staging, each row's new key/value
    ``[R, H, D]`` bf16, fp32 ``q`` and outputs. All arrays C-contiguous: one compiled signature. On
    :func:`decode_threads` threads (:func:`_decode_rows_parallel`) where more than one is set."""
    args = (
        kv_cache.numpy(), page_ids.numpy(), page_start.numpy(), q.numpy(), staging_key.view(torch.int16).numpy(),
        staging_value.view(torch.int16).numpy(), tail_slot.numpy(), tail_start.numpy(),
        key_rows.contiguous().view(torch.int16).numpy(), value_rows.contiguous().view(torch.int16).numpy(),
        np.float32(scale), layout.block_size, layout.num_salient_k, layout.num_salient_v, layout.k_hi_off,
        layout.k_lo_off, layout.v_hi_off, layout.v_lo_off, layout.k_param_off, layout.v_norm_off, layout.v_tok_off,
        layout.bits_high, layout.bits_low, layout.param_bits, layout.scale_off, out.numpy(),
    )  # fmt: skip
    if _THREADS > 1:  # scratch for every thread id numba may hand out (its pool size, not only ours)
        # the same bits on any number of threads (a pair is computed alike by any thread): the count may follow
        # the work without making a row's output depend on the rest of the batch
        threads = _THREADS if page_ids.shape[0] * q.shape[1] >= PARALLEL_MIN_PAGES else 1
        if _numba_threads[0] != threads:
            numba.set_num_threads(threads)
            _numba_threads[0] = threads
        _decode_rows_parallel(*args, max(_THREADS, numba.config.NUMBA_NUM_THREADS))
    else:
        _decode_rows(*args)


def dequantize_pages_bf16(kv_cache, page_ids, layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_dequantize_pages` on torch tensors: bf16 ``key, value [len(page_ids), block_size, num_kv_heads,
    head_size]`` in page row order, equal to ``cpu_decode.dequantize_pages_cpu(...)`` rounded to bf16."""
    h, n, d = kv_cache.shape[1], layout.block_size, layout.head_size
    key = torch.empty(page_ids.shape[0], n, h, d, dtype=torch.bfloat16)
    value = torch.empty_like(key)
    _dequantize_pages(
        kv_cache.numpy(), page_ids.numpy(), n, layout.num_salient_k, layout.num_salient_v, layout.k_hi_off,
        layout.k_lo_off, layout.v_hi_off, layout.v_lo_off, layout.k_param_off, layout.v_norm_off, layout.v_tok_off,
        layout.bits_high, layout.bits_low, layout.param_bits, layout.scale_off, key.view(torch.uint16).numpy(),
        value.view(torch.uint16).numpy(),
    )
    return key, value


def warmup(layout: PageLayout, num_kv_heads: int, num_queries_per_kv: int) -> None:
    """Compile (or load from numba's cache) :func:`_decode_rows` and :func:`_dequantize_pages` before the first
    request: one row over one all-zero page and a one-token tail. ~10 s the first time on a 2-core CPU, well
    under 1 s from the cache."""
    h, g, d, n = num_kv_heads, num_queries_per_kv, layout.head_size, layout.block_size

    def z(*shape, dtype=torch.float32):  # explicit dtypes: vLLM builds layers under a bf16 default dtype
        return torch.zeros(shape, dtype=dtype, device="cpu")

    idx = lambda *x: torch.tensor(x, dtype=torch.int64, device="cpu")  # noqa: E731
    bf16 = torch.bfloat16
    decode_rows(z(2, h, layout.page_bytes, dtype=torch.uint8), idx(1), idx(0, 1), z(1, h, g, d),
                z(1, n, h, d, dtype=bf16), z(1, n, h, d, dtype=bf16), idx(0), idx(0, 1), z(1, h, d, dtype=bf16),
                z(1, h, d, dtype=bf16), layout, 1.0, z(1, h, g, d))
    dequantize_pages_bf16(z(2, h, layout.page_bytes, dtype=torch.uint8), idx(1), layout)
