"""The attention state machine of the paged kernels, as ``@triton.jit`` device functions: online softmax,
one page tile (codes with the dequantization folded into q and the output), a dense tile (bf16 tail and new
tokens), the walks over a sequence's pages and tail, and the final row normalization. Operand loading and
host-side checks live in ``_common.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import dot_operand, load_quarters


@triton.jit
def softmax_step(s, m_i, l_i):
    """Online softmax on log2-domain scores ``s [M, T]``: (p, alpha, m_new, l_new); rescale acc by alpha."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0, not NaN
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def attend_page_tile(
    q0, q1, q2, q3,  # [M, D/4] query quarters (raw, unscaled)
    a0, a1, a2, a3, m_i, l_i,  # running output quarters [M, D/4] fp32, row max and row sum (log2 domain)
    cache_u8_ptr, cache_f16_ptr,  # the same page memory as uint8 and as fp16
    page_off,  # int64 byte offset of the page
    qk_scale,  # softmax scale * log2(e)
    VALID: tl.constexpr, ROWS: tl.constexpr,  # one tile of layout.attention_tiles(): ROWS rows, VALID real
    KB: tl.constexpr, K_OFF: tl.constexpr, K_PAR: tl.constexpr,  # key bits, codes and (step, mn) offsets
    VB: tl.constexpr, V_OFF: tl.constexpr, V_TOK: tl.constexpr,  # value bits, codes and per-token params
    D: tl.constexpr, N: tl.constexpr, V_NORM_OFF: tl.constexpr, DOT_FP32: tl.constexpr, ASM: tl.constexpr,
):
    """One tile of page rows, dequantization folded into q and the output (method doc §10):

    ``q . k_t = sum_c (q_c step_c) code_tc + sum_c q_c mn_c`` (keys, per-channel group parameters);
    ``sum_t p_t v_t = c * (sum_t (p_t step_t) code_t + sum_t p_t mn_t)`` (values, CST with per-token params).
    """
    Q: tl.constexpr = D // 4
    r = tl.arange(0, ROWS)
    rmask = r < VALID
    dq = tl.arange(0, Q)
    hoff = page_off // 2
    # -- scores: q folded with the key group's step, bias from its min ----
    kp = cache_f16_ptr + hoff + K_PAR // 2 + dq
    f0, f1, f2, f3 = q0.to(tl.float32), q1.to(tl.float32), q2.to(tl.float32), q3.to(tl.float32)
    bias = (tl.sum(f0 * tl.load(kp + D).to(tl.float32)[None, :], axis=1)
            + tl.sum(f1 * tl.load(kp + D + Q).to(tl.float32)[None, :], axis=1)
            + tl.sum(f2 * tl.load(kp + D + 2 * Q).to(tl.float32)[None, :], axis=1)
            + tl.sum(f3 * tl.load(kp + D + 3 * Q).to(tl.float32)[None, :], axis=1)) * qk_scale
    k0, k1, k2, k3 = load_quarters(cache_u8_ptr + page_off + K_OFF + r * (D * KB // 8), rmask, KB, D, DOT_FP32, ASM)
    s = tl.dot(dot_operand(f0 * (tl.load(kp).to(tl.float32) * qk_scale)[None, :], DOT_FP32), tl.trans(k0))
    s = tl.dot(dot_operand(f1 * (tl.load(kp + Q).to(tl.float32) * qk_scale)[None, :], DOT_FP32), tl.trans(k1), s)
    s = tl.dot(dot_operand(f2 * (tl.load(kp + 2 * Q).to(tl.float32) * qk_scale)[None, :], DOT_FP32),
               tl.trans(k2), s)
    s = tl.dot(dot_operand(f3 * (tl.load(kp + 3 * Q).to(tl.float32) * qk_scale)[None, :], DOT_FP32),
               tl.trans(k3), s)
    s = tl.where(rmask[None, :], s + bias[:, None], float("-inf"))
    p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
    # -- values: p folded with the per-token step; c applied to the tile's sum ----
    vstep = tl.load(cache_f16_ptr + hoff + V_TOK // 2 + r, mask=rmask, other=0.0).to(tl.float32)
    vmn = tl.load(cache_f16_ptr + hoff + V_TOK // 2 + N + r, mask=rmask, other=0.0).to(tl.float32)
    pw = dot_operand(p * vstep[None, :], DOT_FP32)
    pm = tl.sum(p * vmn[None, :], axis=1)[:, None]
    v0, v1, v2, v3 = load_quarters(cache_u8_ptr + page_off + V_OFF + r * (D * VB // 8), rmask, VB, D, DOT_FP32, ASM)
    cn = cache_f16_ptr + hoff + V_NORM_OFF // 2 + dq
    a0 = a0 * alpha[:, None] + (tl.dot(pw, v0) + pm) * tl.load(cn).to(tl.float32)[None, :]
    a1 = a1 * alpha[:, None] + (tl.dot(pw, v1) + pm) * tl.load(cn + Q).to(tl.float32)[None, :]
    a2 = a2 * alpha[:, None] + (tl.dot(pw, v2) + pm) * tl.load(cn + 2 * Q).to(tl.float32)[None, :]
    a3 = a3 * alpha[:, None] + (tl.dot(pw, v3) + pm) * tl.load(cn + 3 * Q).to(tl.float32)[None, :]
    return a0, a1, a2, a3, m_i, l_i


@triton.jit
def attend_page(
    q0, q1, q2, q3, a0, a1, a2, a3, m_i, l_i, cache_u8_ptr, cache_f16_ptr, page_off, qk_scale,
    TILES: tl.constexpr,  # layout.attention_tiles()
    D: tl.constexpr, N: tl.constexpr, V_NORM_OFF: tl.constexpr, DOT_FP32: tl.constexpr, ASM: tl.constexpr,
):
    """All rows of one page, tile by tile (the tiles are compile-time constants)."""
    for i in tl.static_range(len(TILES)):
        a0, a1, a2, a3, m_i, l_i = attend_page_tile(
            q0, q1, q2, q3, a0, a1, a2, a3, m_i, l_i, cache_u8_ptr, cache_f16_ptr, page_off, qk_scale,
            TILES[i][0], TILES[i][1], TILES[i][2], TILES[i][3], TILES[i][4], TILES[i][5], TILES[i][6],
            TILES[i][7], D, N, V_NORM_OFF, DOT_FP32, ASM,
        )
    return a0, a1, a2, a3, m_i, l_i


@triton.jit
def _dense_dot(x, y, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(x.to(tl.float32), y.to(tl.float32))
    else:
        return tl.dot(x.to(y.dtype), y)


@triton.jit
def attend_dense_tile(
    q0, q1, q2, q3, a0, a1, a2, a3, m_i, l_i,
    k_ptr, v_ptr,  # [T] pointers to the first element of each key / value row (bf16)
    tmask,  # [T] rows that exist
    visible,  # [M, T] scores to keep
    qk_scale, D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """A tile of bf16 keys/values (the tail, or the new tokens of a chunk)."""
    Q: tl.constexpr = D // 4
    kp = k_ptr[:, None] + tl.arange(0, Q)[None, :]
    m = tmask[:, None]
    s = _dense_dot(q0, tl.trans(tl.load(kp, mask=m, other=0.0)), DOT_FP32)
    s += _dense_dot(q1, tl.trans(tl.load(kp + Q, mask=m, other=0.0)), DOT_FP32)
    s += _dense_dot(q2, tl.trans(tl.load(kp + 2 * Q, mask=m, other=0.0)), DOT_FP32)
    s += _dense_dot(q3, tl.trans(tl.load(kp + 3 * Q, mask=m, other=0.0)), DOT_FP32)
    s = tl.where(visible, s * qk_scale, float("-inf"))
    p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
    vp = v_ptr[:, None] + tl.arange(0, Q)[None, :]
    a0 = a0 * alpha[:, None] + _dense_dot(p, tl.load(vp, mask=m, other=0.0), DOT_FP32)
    a1 = a1 * alpha[:, None] + _dense_dot(p, tl.load(vp + Q, mask=m, other=0.0), DOT_FP32)
    a2 = a2 * alpha[:, None] + _dense_dot(p, tl.load(vp + 2 * Q, mask=m, other=0.0), DOT_FP32)
    a3 = a3 * alpha[:, None] + _dense_dot(p, tl.load(vp + 3 * Q, mask=m, other=0.0), DOT_FP32)
    return a0, a1, a2, a3, m_i, l_i


@triton.jit
def init_state(M: tl.constexpr, D: tl.constexpr):
    """Empty attention state of ``M`` rows: output quarters ``[M, D/4]`` fp32, row max -inf, row sum 0."""
    return (tl.zeros([M, D // 4], dtype=tl.float32), tl.zeros([M, D // 4], dtype=tl.float32),
            tl.zeros([M, D // 4], dtype=tl.float32), tl.zeros([M, D // 4], dtype=tl.float32),
            tl.full([M], float("-inf"), dtype=tl.float32), tl.zeros([M], dtype=tl.float32))


@triton.jit
def attend_pages(
    q0, q1, q2, q3, a0, a1, a2, a3, m_i, l_i,
    bt_ptr,  # the sequence's block-table row (int32 page ids)
    p_lo, p_hi,  # pages p_lo .. p_hi - 1 of the row
    cache_u8_ptr, cache_f16_ptr, stride_c_block,
    head_off,  # int64 byte offset of the KV head in a page (kvh * stride_c_head)
    qk_scale, TILES: tl.constexpr, D: tl.constexpr, N: tl.constexpr, V_NORM_OFF: tl.constexpr,
    DOT_FP32: tl.constexpr, ASM: tl.constexpr,
):
    """A range of a sequence's pages, page after page (all visible)."""
    for p in range(p_lo, p_hi):
        page = tl.load(bt_ptr + p).to(tl.int64)
        a0, a1, a2, a3, m_i, l_i = attend_page(
            q0, q1, q2, q3, a0, a1, a2, a3, m_i, l_i, cache_u8_ptr, cache_f16_ptr,
            page * stride_c_block + head_off, qk_scale, TILES, D, N, V_NORM_OFF, DOT_FP32, ASM,
        )
    return a0, a1, a2, a3, m_i, l_i


@triton.jit
def attend_tail(
    q0, q1, q2, q3, a0, a1, a2, a3, m_i, l_i,
    tk_ptr, tv_ptr,  # first tail key / value of the sequence and KV head
    stride_t_tok, tail_len, qk_scale, TAIL_ROWS: tl.constexpr, D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """The ``tail_len`` bf16 tail tokens of a sequence, ``TAIL_ROWS`` at a time (all visible)."""
    for t0 in range(0, tail_len, TAIL_ROWS):
        t = t0 + tl.arange(0, TAIL_ROWS)
        tmask = t < tail_len
        a0, a1, a2, a3, m_i, l_i = attend_dense_tile(
            q0, q1, q2, q3, a0, a1, a2, a3, m_i, l_i, tk_ptr + t * stride_t_tok, tv_ptr + t * stride_t_tok,
            tmask, tmask[None, :], qk_scale, D, DOT_FP32,
        )
    return a0, a1, a2, a3, m_i, l_i


@triton.jit
def finish_rows(a0, a1, a2, a3, l_i):
    """Output quarters divided by the row sum, and ``log2(l_i)``; a row that saw no key (``l_i == 0``) gets
    zeros and 0 (its log-sum-exp, base 2, is ``m_i + log2(l_i)``)."""
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    inv = 1.0 / safe_l[:, None]
    return a0 * inv, a1 * inv, a2 * inv, a3 * inv, tl.log2(safe_l)
# fmt: on
