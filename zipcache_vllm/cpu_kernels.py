"""CPU kernels (numba) for the decode step: attention read straight from the compressed pages.

The torch path (:func:`zipcache_vllm.attention._decode_attend` with ``kernels="torch"``) dequantizes every page
of every row into fp32 keys/values for every layer and step; on a 2-core CPU that costs ~6 ns per value and
grows with the context. These two loops read the codes where they lie and fold the quantization parameters
into the query and the probabilities (the same algebra as the Triton decode kernel):

* keys, channelwise per precision group g (ZC-3): ``q . k_t = sum_c (q_c step_g[c]) code_t[c] + q . mn_g``;
* values, CST (ZC-2): ``sum_t p_t v_t = norm * (sum_t (p_t step_t) code_t + sum_t p_t mn_t)``.

Layout and packing: :mod:`zipcache_vllm.layout` (byte ``i`` of a row holds channels ``i + j * D / m`` at bit
``j * bits``, ``m = 8 // bits``). The fp16 page parameters are widened to fp32 by torch before the call (a few
hundred bytes per page). Results equal the torch twin up to fp32 summation order (tests/unit/test_attention_fn.py).

No vLLM import; numba is optional (the ``cpu`` extra installs it): :func:`available` says whether it imports.
Each loop runs its (page, head) or (row, head) items in parallel (numba's ``workqueue`` threads, not a second
OpenMP runtime); torch and numba never run at the same time.
"""

from __future__ import annotations

import numpy as np
import torch

from .layout import PageLayout

try:  # numba is an optional dependency: without it the torch path runs
    import numba
    from numba import prange

    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"  # no second OpenMP runtime next to torch's
except ImportError:  # pragma: no cover - exercised on machines without numba
    numba = None
    prange = range


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


def _page_logits(pages, page_ids, page_row, page_start, q, k_params, scale, n, sk, k_hi_off, k_lo_off, bits_high,
                 bits_low, logits):
    """logits ``[R, W, H, G]`` (page order at positions ``p * n + row`` of each row) from q ``[R, H, G, D]``.

    Page ``j`` (``page_ids[j]``) belongs to row ``page_row[j]``, whose pages start at ``page_start[row]``;
    ``k_params [P, H, 4, D]``: step_hi, mn_hi, step_lo, mn_lo. One (page, head) per parallel iteration."""
    num_kv_heads, g, d = q.shape[1], q.shape[2], q.shape[3]
    for jh in prange(page_ids.shape[0] * num_kv_heads):
        j = jh // num_kv_heads
        h = jh % num_kv_heads
        r = page_row[j]
        base = (j - page_start[r]) * n
        buf = np.empty((n, d), dtype=np.float32)
        qs = np.empty((g, d), dtype=np.float32)
        bias = np.empty(g, dtype=np.float32)
        pg = pages[page_ids[j], h]
        _unpack_rows(pg, k_hi_off, 0, sk, bits_high, buf)
        _unpack_rows(pg, k_lo_off, sk, n - sk, bits_low, buf)
        for part in range(2):
            step = k_params[j, h, 2 * part]
            mn = k_params[j, h, 2 * part + 1]
            for gi in range(g):
                acc = np.float32(0.0)
                for c in range(d):
                    qs[gi, c] = q[r, h, gi, c] * step[c]
                    acc += q[r, h, gi, c] * mn[c]
                bias[gi] = acc
            lo, hi = (0, sk) if part == 0 else (sk, n)
            for t in range(lo, hi):
                row = buf[t]
                for gi in range(g):
                    qrow = qs[gi]
                    acc = np.float32(0.0)
                    for c in range(d):
                        acc += qrow[c] * row[c]
                    logits[r, base + t, h, gi] = (acc + bias[gi]) * scale


def _page_values(pages, page_ids, page_start, probs, v_norm, v_tok, n, sv, v_hi_off, v_lo_off, bits_high,
                 bits_low, out):
    """out ``[R, H, G, D]`` = sum over the page rows of ``probs [R, W, H, G]`` times the dequantized values.

    ``v_norm [P, H, D]``, ``v_tok [P, H, 2, n]`` (step, mn per page row). One (row, head) per parallel
    iteration."""
    num_rows, num_kv_heads, g, d = out.shape
    for rh in prange(num_rows * num_kv_heads):
        r = rh // num_kv_heads
        h = rh % num_kv_heads
        buf = np.empty((n, d), dtype=np.float32)
        acc = np.empty((g, d), dtype=np.float32)
        bsum = np.empty(g, dtype=np.float32)
        out[r, h] = 0.0
        for j in range(page_start[r], page_start[r + 1]):
            base = (j - page_start[r]) * n
            pg = pages[page_ids[j], h]
            _unpack_rows(pg, v_hi_off, 0, sv, bits_high, buf)
            _unpack_rows(pg, v_lo_off, sv, n - sv, bits_low, buf)
            acc[:] = 0.0
            bsum[:] = 0.0
            for t in range(n):
                step = v_tok[j, h, 0, t]
                mn = v_tok[j, h, 1, t]
                row = buf[t]
                for gi in range(g):
                    w = probs[r, base + t, h, gi]
                    bsum[gi] += w * mn
                    ws = w * step
                    arow = acc[gi]
                    for c in range(d):
                        arow[c] += ws * row[c]
            for gi in range(g):
                for c in range(d):
                    out[r, h, gi, c] += v_norm[j, h, c] * (acc[gi, c] + bsum[gi])


if numba is not None:
    _unpack_bits = numba.njit(cache=True, fastmath=True, inline="always")(_unpack_bits)
    _unpack_rows = numba.njit(cache=True, fastmath=True, inline="always")(_unpack_rows)
    _page_logits = numba.njit(cache=True, fastmath=True)(_page_logits)
    _page_values = numba.njit(cache=True, fastmath=True)(_page_values)


def _f16(pages: torch.Tensor, off: int, count: int) -> torch.Tensor:
    return pages[..., off : off + 2 * count].contiguous().view(torch.float16).float()


class PageParams:
    """The fp32 parameters of the pages a step reads (gathered once per layer)."""

    def __init__(self, kv_cache: torch.Tensor, page_ids: torch.Tensor, layout: PageLayout):
        n, d = layout.block_size, layout.head_size
        sel = kv_cache.index_select(0, page_ids)
        p, h = sel.shape[:2]
        self.k = _f16(sel, layout.k_param_off, 4 * d).view(p, h, 4, d)
        self.v_norm = _f16(sel, layout.v_norm_off, d).view(p, h, d)
        self.v_tok = _f16(sel, layout.v_tok_off, 2 * n).view(p, h, 2, n)


def page_logits(kv_cache, page_ids, page_row, page_start, q, params: PageParams, layout: PageLayout, scale: float,
                logits: torch.Tensor) -> None:
    """Write the scaled logits of every page row of every decode row into ``logits [R, W, H, G]`` (fp32)."""
    _page_logits(
        kv_cache.numpy(), page_ids.numpy(), page_row.numpy(), page_start.numpy(), q.numpy(), params.k.numpy(),
        np.float32(scale), layout.block_size, layout.num_salient_k, layout.k_hi_off, layout.k_lo_off,
        layout.bits_high, layout.bits_low, logits.numpy(),
    )


def page_values(kv_cache, page_ids, page_start, probs, params: PageParams, layout: PageLayout,
                out: torch.Tensor) -> None:
    """``out [R, H, G, D]`` = the page part of ``probs @ V`` (fp32), from ``probs [R, W, H, G]``."""
    _page_values(
        kv_cache.numpy(), page_ids.numpy(), page_start.numpy(), probs.numpy(), params.v_norm.numpy(),
        params.v_tok.numpy(), layout.block_size, layout.num_salient_v, layout.v_hi_off, layout.v_lo_off,
        layout.bits_high, layout.bits_low, out.numpy(),
    )
