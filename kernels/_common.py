"""Shared pieces of the paged kernels: input checks and ``@triton.jit`` device functions.

Page layout: see ``zipcache_vllm/layout.py`` (kernels only read the attributes of the layout object they are
given, they never import it). Quantization conventions: ``zipcache_vllm/quant.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)
LOG2E_C = tl.constexpr(LOG2E)  # the same, readable inside @triton.jit
LN2_C = tl.constexpr(0.6931471805599453)


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1): dots then run on fp32 operands, because the
    interpreter multiplies bf16 bit patterns as integers (triton issue #11584)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(
    x: torch.Tensor, name: str, ndim: int, dtypes: tuple[torch.dtype, ...], device=None, last_contiguous=True
) -> None:
    check(isinstance(x, torch.Tensor), f"{name} must be a tensor")
    check(x.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    check(x.dtype in dtypes, f"{name} must have dtype in {dtypes}, got {x.dtype}")
    check(
        not last_contiguous or x.numel() == 0 or x.stride(-1) == 1,
        f"{name} must be contiguous in its last dim",
    )
    if device is not None:
        check(x.device == device, f"{name} is on {x.device}, expected {device}")


def check_cache(kv_cache: torch.Tensor, layout, num_kv_heads: int, device) -> None:
    check_tensor(kv_cache, "kv_cache", 3, (torch.uint8,), device)
    check(kv_cache.shape[1] == num_kv_heads, f"kv_cache has {kv_cache.shape[1]} heads, expected {num_kv_heads}")
    check(
        kv_cache.shape[2] >= layout.page_bytes,
        f"kv_cache pages hold {kv_cache.shape[2]} bytes < {layout.page_bytes}",
    )
    check(
        kv_cache.stride(0) % 16 == 0 and kv_cache.stride(1) % 16 == 0,
        "kv_cache page strides must be multiples of 16 bytes",
    )
    check(kv_cache.data_ptr() % 16 == 0, "kv_cache must be 16-byte aligned")


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: keep grids small


# --------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def dot_operand(x, DOT_FP32: tl.constexpr):
    """fp32 under the interpreter, fp16 on the GPU (tensor cores; the folded q*step and p*step operands
    have 11 mantissa bits in fp16 against 8 in bf16)."""
    if DOT_FP32:
        return x.to(tl.float32)
    else:
        return x.to(tl.float16)


@triton.jit
def load_codes(
    row_ptr,  # uint8 pointers [ROWS] to the first byte of each row (packed along channels, quant.pack_bits)
    rmask,  # [ROWS] rows that exist
    BITS: tl.constexpr,
    ROWS: tl.constexpr,
    D: tl.constexpr,
    GATHER: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Code values ``[ROWS, D]`` of a tile of page rows, as dot operands.

    GATHER=False loads each byte once and interleaves its fields with ``tl.join``/``reshape``; GATHER=True
    loads byte ``c // (8 / BITS)`` for every channel ``c`` (the repeats hit L1) and shifts, which needs no
    shuffles. On the GPU the fp16 value is built from its bits (``0x6400 | code`` is 1024 + code, exact), so
    no integer-to-float conversion runs.
    """
    PER: tl.constexpr = 8 // BITS
    if GATHER:
        c = tl.arange(0, D)
        b = tl.load(row_ptr[:, None] + (c // PER)[None, :], mask=rmask[:, None], other=0)
        c = (b >> ((c % PER) * BITS).to(tl.uint8)[None, :]) & ((1 << BITS) - 1)
    else:
        b = tl.load(row_ptr[:, None] + tl.arange(0, D // PER)[None, :], mask=rmask[:, None], other=0)
        if BITS == 8:
            c = b
        elif BITS == 4:
            c = tl.join(b & 15, b >> 4).reshape(ROWS, D)
        else:  # 2 bits: byte i holds channels 4i + (0, 1, 2, 3) at bits (0, 2, 4, 6)
            c = tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6)).reshape(ROWS, D)
    if DOT_FP32:
        return c.to(tl.float32)
    else:
        return (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def online_softmax_step(s, acc, m_i, l_i):
    """Online softmax on log2-domain scores ``s [M, T]``: returns (p, rescaled acc, m_new, l_new)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0, not NaN
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_new = l_i * alpha + tl.sum(p, axis=1)
    return p, acc * alpha[:, None], m_new, l_new


@triton.jit
def attend_page_tile(
    q,  # [M, D] raw query rows (unscaled), kept in their load dtype to save registers
    acc,
    m_i,
    l_i,  # running output [M, D] fp32, row max [M] and row sum [M] (log2 domain)
    cache_u8_ptr,
    cache_f16_ptr,  # the same page memory as uint8 and as fp16
    page_off,  # int64 byte offset of the page
    qk_scale,  # softmax scale * log2(e)
    VALID: tl.constexpr,
    ROWS: tl.constexpr,  # one tile of layout.attention_tiles(): ROWS rows, VALID real
    KB: tl.constexpr,
    K_OFF: tl.constexpr,
    K_PAR: tl.constexpr,  # key bits, codes and (step, mn) offsets
    VB: tl.constexpr,
    V_OFF: tl.constexpr,
    V_TOK: tl.constexpr,  # value bits, codes and per-token params
    D: tl.constexpr,
    N: tl.constexpr,  # block_size
    V_NORM_OFF: tl.constexpr,
    GATHER: tl.constexpr,  # code unpacking variant, see load_codes
    DOT_FP32: tl.constexpr,
):
    """One tile of page rows, dequantization folded into q and the output (method doc §10):

    ``q . k_t = sum_c (q_c step_c) code_tc + sum_c q_c mn_c`` (keys, per-channel group parameters);
    ``sum_t p_t v_t = c * (sum_t (p_t step_t) code_t + sum_t p_t mn_t)`` (values, CST with per-token params).
    """
    r = tl.arange(0, ROWS)
    rmask = r < VALID
    dk = tl.arange(0, D)
    hoff = page_off // 2
    # -- scores: q folded with the key group's step; bias from its min ----
    kstep = tl.load(cache_f16_ptr + hoff + K_PAR // 2 + dk).to(tl.float32)
    kmn = tl.load(cache_f16_ptr + hoff + K_PAR // 2 + D + dk).to(tl.float32)
    qf = q.to(tl.float32)
    qs = dot_operand(qf * (kstep * qk_scale)[None, :], DOT_FP32)
    bias = tl.sum(qf * kmn[None, :], axis=1) * qk_scale
    kq = load_codes(cache_u8_ptr + page_off + K_OFF + r * (D * KB // 8), rmask, KB, ROWS, D, GATHER, DOT_FP32)
    s = tl.dot(qs, tl.trans(kq)) + bias[:, None]
    s = tl.where(rmask[None, :], s, float("-inf"))
    p, acc, m_i, l_i = online_softmax_step(s, acc, m_i, l_i)
    # -- values: p folded with the per-token step; c applied to the tile's sum ----
    vstep = tl.load(cache_f16_ptr + hoff + V_TOK // 2 + r, mask=rmask, other=0.0).to(tl.float32)
    vmn = tl.load(cache_f16_ptr + hoff + V_TOK // 2 + N + r, mask=rmask, other=0.0).to(tl.float32)
    cn = tl.load(cache_f16_ptr + hoff + V_NORM_OFF // 2 + dk).to(tl.float32)
    vq = load_codes(cache_u8_ptr + page_off + V_OFF + r * (D * VB // 8), rmask, VB, ROWS, D, GATHER, DOT_FP32)
    pv = tl.dot(dot_operand(p * vstep[None, :], DOT_FP32), vq)
    pv += tl.sum(p * vmn[None, :], axis=1)[:, None]
    return acc + pv * cn[None, :], m_i, l_i


@triton.jit
def attend_page(
    q,
    acc,
    m_i,
    l_i,
    cache_u8_ptr,
    cache_f16_ptr,
    page_off,
    qk_scale,  # as attend_page_tile
    TILES: tl.constexpr,  # layout.attention_tiles()
    D: tl.constexpr,
    N: tl.constexpr,
    V_NORM_OFF: tl.constexpr,
    GATHER: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """All rows of one page, tile by tile (the tiles are compile-time constants)."""
    for i in tl.static_range(len(TILES)):
        acc, m_i, l_i = attend_page_tile(
            q, acc, m_i, l_i, cache_u8_ptr, cache_f16_ptr, page_off, qk_scale,
            TILES[i][0], TILES[i][1], TILES[i][2], TILES[i][3], TILES[i][4], TILES[i][5], TILES[i][6],
            TILES[i][7], D, N, V_NORM_OFF, GATHER, DOT_FP32,
        )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def attend_dense_tile(q, acc, m_i, l_i, k, v, visible, qk_scale, DOT_FP32: tl.constexpr):
    """bf16 keys/values ``k, v [T, D]`` (tail or new tokens); ``visible [M, T]`` masks scores."""
    if DOT_FP32:  # noqa: SIM108 (a constexpr branch)
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        s = tl.dot(q.to(k.dtype), tl.trans(k))
    s = tl.where(visible, s * qk_scale, float("-inf"))
    p, acc, m_i, l_i = online_softmax_step(s, acc, m_i, l_i)
    if DOT_FP32:
        acc += tl.dot(p, v.to(tl.float32))
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return acc, m_i, l_i
