"""Compress complete blocks into mixed-precision pages: saliency ranking, ZC-3 keys, ZC-2 values, packing.

Twin: ``zipcache_vllm.engine.paged.compress_store``; every byte it writes (codes, fp16 parameters, bitmaps) is equal.
One program per (block, KV head, K or V); one program per precision group measured slower on the H200
(134 us against 111 us for the 32 blocks x 8 heads of a 4k prompt). Bit-exactness rests on the
conventions of ``zipcache_vllm/method/quant.py``: float32 min/max, IEEE division and square root (``div_rn`` /
``sqrt_rn``), parameters rounded to fp16 before the codes, round-half-to-even, and no fused multiply-add
(the kernel is launched with fp fusion off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cache_args, check, check_cache, check_tensor, pow2

EPS = tl.constexpr(1e-6)  # quant.EPS: the smallest step
_BIG = tl.constexpr(3.4028234663852886e38)  # float32 max, the neutral element of masked min/max as in quant.py
_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + M) - M rounds |y| < 2**22 half-to-even in fp32


@triton.jit
def _rint(y):
    return (y + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def _load_group(x_ptr, stride_x_tok, t, tv, BITS: tl.constexpr, D: tl.constexpr):
    """Rows ``t`` of one head as fp32 ``[N_PAD, PER, D/PER]`` with ``PER = 8 // BITS`` codes per byte: element
    ``[., j, i]`` is channel ``ch[j, i]`` (value ``j`` of byte ``i``, paged.pack_row); padded rows load 0."""
    PER: tl.constexpr = 8 // BITS
    ch = tl.arange(0, PER)[:, None] * (D // PER) + tl.arange(0, D // PER)[None, :]
    x = tl.load(x_ptr + t[:, None, None] * stride_x_tok + ch[None, :, :], mask=tv[:, None, None], other=0.0)
    return x.to(tl.float32), ch


@triton.jit
def _quant_params(mn, mx, BITS: tl.constexpr):
    """fp16 ``(step, mn)`` of the range ``[mn, mx]`` on ``2^BITS`` levels (``quant.EPS`` the smallest step)."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    return tl.maximum(tl.math.div_rn(mx - mn, QMAX * 1.0), EPS).to(tl.float16), mn.to(tl.float16)


@triton.jit
def _store_codes(x, mn, step, member, row, cache_u8_ptr, page_off, BITS: tl.constexpr, D: tl.constexpr,
                 CODE_OFF: tl.constexpr):  # fmt: skip
    """Codes ``rint((x - mn) / step)`` clamped to ``[0, 2^BITS - 1]`` (``mn``, ``step`` fp32, broadcast to ``x``),
    packed as :func:`_load_group` reads them; the rows of ``member`` go to page row ``row`` of the region."""
    PER: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    i = tl.arange(0, D // PER)
    j = tl.arange(0, PER)
    y = tl.math.div_rn(x - mn, step)
    code = tl.minimum(tl.maximum(_rint(y), 0.0), QMAX * 1.0).to(tl.int32)
    packed = tl.sum(code << (j * BITS)[None, :, None], axis=1).to(tl.uint8)
    tl.store(
        cache_u8_ptr + page_off + CODE_OFF + row[:, None] * (D // PER) + i[None, :],
        packed,
        mask=member[:, None],
    )


@triton.jit
def _store_key_group(x_ptr, stride_x_tok, t, tv, member, row, cache_u8_ptr, cache_f16_ptr, page_off,
                     BITS: tl.constexpr, D: tl.constexpr, CODE_OFF: tl.constexpr, PAR_OFF: tl.constexpr):  # fmt: skip
    """ZC-3: channelwise (step, mn) over the group's tokens; codes of the group's rows into its region."""
    x, ch = _load_group(x_ptr, stride_x_tok, t, tv, BITS, D)
    m3 = member[:, None, None]
    mn = tl.min(tl.where(m3, x, _BIG), axis=0)
    mx = tl.max(tl.where(m3, x, -_BIG), axis=0)
    has = tl.sum(member.to(tl.int32), axis=0) > 0
    step, mn16 = _quant_params(tl.where(has, mn, 0.0), tl.where(has, mx, 0.0), BITS)
    hoff = page_off // 2
    tl.store(cache_f16_ptr + hoff + PAR_OFF // 2 + ch, step)
    tl.store(cache_f16_ptr + hoff + PAR_OFF // 2 + D + ch, mn16)
    _store_codes(x, mn16.to(tl.float32)[None, :, :], step.to(tl.float32)[None, :, :], member, row, cache_u8_ptr,
                 page_off, BITS, D, CODE_OFF)  # fmt: skip


@triton.jit
def _store_value_group(x_ptr, stride_x_tok, t, tv, member, slot, row, cache_u8_ptr, cache_f16_ptr, page_off,
                       BITS: tl.constexpr, D: tl.constexpr, N: tl.constexpr, CODE_OFF: tl.constexpr,
                       NORM_OFF: tl.constexpr, TOK_OFF: tl.constexpr, STORE_NORM: tl.constexpr):  # fmt: skip
    """ZC-2: c = sqrt(max |x|) per channel over all tokens, then per-token (step, mn) of x / c."""
    x, ch = _load_group(x_ptr, stride_x_tok, t, tv, BITS, D)
    amax = tl.max(tl.abs(x), axis=0)  # padded tokens load 0: neutral for max |x|
    c = tl.math.sqrt_rn(amax).to(tl.float16)
    c = tl.where(c > 0, c, 1.0).to(tl.float16)  # quant.channel_normalizer: c that rounds to 0 becomes 1
    hoff = page_off // 2
    if STORE_NORM:
        tl.store(cache_f16_ptr + hoff + NORM_OFF // 2 + ch, c)
    xn = tl.math.div_rn(x, c.to(tl.float32)[None, :, :])
    step, mn16 = _quant_params(tl.min(tl.min(xn, axis=2), axis=1), tl.max(tl.max(xn, axis=2), axis=1), BITS)
    tl.store(cache_f16_ptr + hoff + TOK_OFF // 2 + slot, step, mask=member)
    tl.store(cache_f16_ptr + hoff + TOK_OFF // 2 + N + slot, mn16, mask=member)
    _store_codes(xn, mn16.to(tl.float32)[:, None, None], step.to(tl.float32)[:, None, None], member, row,
                 cache_u8_ptr, page_off, BITS, D, CODE_OFF)  # fmt: skip


@triton.jit
def _compress_store_kernel(
    key_ptr,
    value_ptr,  # [num_new_blocks * N, H, D]
    stride_x_tok,
    stride_x_head,  # same strides for key and value (checked by the launcher)
    scores_ptr,
    stride_s_blk,
    stride_s_tok,
    stride_s_head,  # score of token t of block b, head h: scores_ptr[b * stride_s_blk + t * stride_s_tok + h * ...]
    count_ptr,
    stride_cnt_blk,  # NORMALIZE: the score is divided by max(count[b * stride_cnt_blk + t], 1) (IEEE division)
    block_ids_ptr,  # [num_new_blocks] int; a negative id: nothing to write (fixed-size work lists)
    src_ptr,  # FROM_SLOTS: int [num_new_blocks], the staging slot holding block i (its K/V rows and scores)
    cache_u8_ptr,
    cache_f16_ptr,  # kv_cache as uint8 and as fp16
    stride_c_block,
    stride_c_head,  # bytes
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    D: tl.constexpr,
    BH: tl.constexpr,
    BL: tl.constexpr,
    SK: tl.constexpr,
    SV: tl.constexpr,
    K_HI_OFF: tl.constexpr,
    K_LO_OFF: tl.constexpr,
    V_HI_OFF: tl.constexpr,
    V_LO_OFF: tl.constexpr,
    K_PAR_OFF: tl.constexpr,
    V_NORM_OFF: tl.constexpr,
    V_TOK_OFF: tl.constexpr,
    MASK_OFF: tl.constexpr,
    FROM_SLOTS: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    page = tl.load(block_ids_ptr + blk).to(tl.int64)
    if page < 0:
        return
    page_off = page * stride_c_block + head * stride_c_head
    src = blk
    if FROM_SLOTS:
        src = tl.load(src_ptr + blk).to(tl.int64)
    t = tl.arange(0, N_PAD)
    tv = t < N
    tok = src * N + t
    # -- rank: tokens with a larger score, or an equal score and a smaller index (stable descending sort) ----
    s = tl.load(scores_ptr + src * stride_s_blk + t * stride_s_tok + head * stride_s_head, mask=tv, other=0.0)
    s = s.to(tl.float32)
    if NORMALIZE:
        cnt = tl.load(count_ptr + src * stride_cnt_blk + t, mask=tv, other=1.0).to(tl.float32)
        s = tl.math.div_rn(s, tl.maximum(cnt, 1.0))
    later = t[None, :] < t[:, None]  # [t, u]: u comes before t
    ahead = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & later)
    rank = tl.sum((ahead & tv[None, :]).to(tl.int32), axis=1)
    ksal = (rank < SK) & tv
    vsal = (rank < SV) & tv
    # -- page row: tier (A both salient, B one, C none), then token order (layout.py) ----
    tier = (rank >= SK).to(tl.int32) + (rank >= SV).to(tl.int32)
    before = (tier[None, :] < tier[:, None]) | ((tier[None, :] == tier[:, None]) & later)
    row = tl.sum((before & tv[None, :]).to(tl.int32), axis=1)
    if tl.program_id(2) == 0:  # -- keys: one group per precision ----
        _store_keys(key_ptr + head * stride_x_head, stride_x_tok, tok, tv, ksal, row, cache_u8_ptr, cache_f16_ptr,
                    page_off, BH, BL, D, SK, K_HI_OFF, K_LO_OFF, K_PAR_OFF)  # fmt: skip
    else:  # -- values, and the bitmaps ----
        _store_values(value_ptr + head * stride_x_head, stride_x_tok, tok, tv, vsal, row, cache_u8_ptr, cache_f16_ptr,
                      page_off, BH, BL, D, N, SV, V_HI_OFF, V_LO_OFF, V_NORM_OFF, V_TOK_OFF)  # fmt: skip
        _store_bitmaps(ksal, vsal, cache_u8_ptr, page_off, N, N_PAD, MASK_OFF)


@triton.jit
def _store_keys(kx, stride_x_tok, tok, tv, ksal, row, cache_u8_ptr, cache_f16_ptr, page_off,
                BH: tl.constexpr, BL: tl.constexpr, D: tl.constexpr, SK: tl.constexpr,
                K_HI_OFF: tl.constexpr, K_LO_OFF: tl.constexpr, K_PAR_OFF: tl.constexpr):  # fmt: skip
    _store_key_group(kx, stride_x_tok, tok, tv, ksal, row, cache_u8_ptr, cache_f16_ptr, page_off,
                     BH, D, K_HI_OFF, K_PAR_OFF)  # fmt: skip
    _store_key_group(kx, stride_x_tok, tok, tv, tv & ~ksal, row - SK, cache_u8_ptr, cache_f16_ptr, page_off,
                     BL, D, K_LO_OFF, K_PAR_OFF + 4 * D)  # fmt: skip


@triton.jit
def _store_values(vx, stride_x_tok, tok, tv, vsal, row, cache_u8_ptr, cache_f16_ptr, page_off,
                  BH: tl.constexpr, BL: tl.constexpr, D: tl.constexpr, N: tl.constexpr, SV: tl.constexpr,
                  V_HI_OFF: tl.constexpr, V_LO_OFF: tl.constexpr, V_NORM_OFF: tl.constexpr,
                  V_TOK_OFF: tl.constexpr):  # fmt: skip
    _store_value_group(vx, stride_x_tok, tok, tv, vsal, row, row, cache_u8_ptr, cache_f16_ptr, page_off,
                       BH, D, N, V_HI_OFF, V_NORM_OFF, V_TOK_OFF, True)  # fmt: skip
    _store_value_group(vx, stride_x_tok, tok, tv, tv & ~vsal, row, row - SV, cache_u8_ptr, cache_f16_ptr,
                       page_off, BL, D, N, V_LO_OFF, V_NORM_OFF, V_TOK_OFF, False)  # fmt: skip


@triton.jit
def _store_bitmaps(ksal, vsal, cache_u8_ptr, page_off, N: tl.constexpr, N_PAD: tl.constexpr,
                   MASK_OFF: tl.constexpr):  # fmt: skip
    """Salient bitmaps in token order (bit t % 8 of byte t // 8)."""
    bit = tl.arange(0, 8)
    kbits = tl.sum(tl.reshape(ksal.to(tl.int32), (N_PAD // 8, 8)) << bit[None, :], axis=1).to(tl.uint8)
    vbits = tl.sum(tl.reshape(vsal.to(tl.int32), (N_PAD // 8, 8)) << bit[None, :], axis=1).to(tl.uint8)
    mb = tl.arange(0, N_PAD // 8)
    tl.store(cache_u8_ptr + page_off + MASK_OFF + mb, kbits, mask=mb < N // 8)
    tl.store(cache_u8_ptr + page_off + MASK_OFF + N // 8 + mb, vbits, mask=mb < N // 8)


def compress_store(
    key: torch.Tensor,
    value: torch.Tensor,
    scores: torch.Tensor,
    block_ids: torch.Tensor,
    kv_cache: torch.Tensor,
    layout,
    num_warps: int = 16,
) -> None:
    """Quantize complete blocks and write their pages into ``kv_cache`` (in place).

    Parameters
    ----------
    key, value : ``[num_new_blocks * block_size, num_kv_heads, head_size]`` bf16/fp16/fp32, post-RoPE;
        rows ``i * block_size ...`` form block ``i``; same strides.
    scores : ``[num_new_blocks * block_size, num_kv_heads]`` float, saliency per token (higher = salient).
    block_ids : ``[num_new_blocks]`` int32/int64, destination page of each block.
    kv_cache : ``uint8 [num_blocks, num_kv_heads, >= layout.page_bytes]``, 16-byte aligned page strides.
    layout : ``zipcache_vllm.engine.layout.PageLayout`` (read, not imported).
    num_warps : per program (one program per block, head and K or V).

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
    check_tensor(scores, "scores", 2, (torch.float32, torch.float16, torch.bfloat16), dev, last_contiguous=False)
    check(tuple(scores.shape) == (nb * n, h), f"scores must be [{nb * n}, {h}], got {tuple(scores.shape)}")
    check_tensor(block_ids, "block_ids", 1, (torch.int32, torch.int64), dev)
    check_cache(kv_cache, layout, h, dev)
    if nb == 0:
        return
    _launch(key, value, scores, scores.stride(0) * n, scores.stride(0), scores.stride(1), None, 0, block_ids,
            None, kv_cache, layout, num_warps)


def compress_slots(
    tail_key: torch.Tensor,
    tail_value: torch.Tensor,
    scores: torch.Tensor,
    score_count: torch.Tensor | None,
    slots: torch.Tensor,
    block_ids: torch.Tensor,
    kv_cache: torch.Tensor,
    layout,
    num_warps: int = 16,
) -> None:
    """:func:`compress_store` of blocks that wait complete in bf16 staging slots, for a fixed-size work list
    (graph-capturable: no host sync, no data-dependent shapes).

    Entry ``i`` compresses slot ``slots[i]`` (``tail_key / tail_value [num_slots, block_size, num_kv_heads,
    head_size]``) into page ``block_ids[i]``; entries with a negative block id do nothing. Scores: ``scores
    [num_slots, block_size, num_kv_heads]`` fp32, divided by ``max(score_count[slot, t], 1)`` (``score_count
    [num_slots, block_size]``, IEEE division as the twin's) unless ``score_count`` is None; a scores tensor
    with slot stride 0 gives every block the same scores (the random-saliency ablation).

    Twin: ``zipcache_vllm.engine.paged.compress_slots``.
    """
    n, d = layout.block_size, layout.head_size
    dev = tail_key.device
    check_tensor(tail_key, "tail_key", 4, (torch.bfloat16, torch.float16, torch.float32), dev)
    check_tensor(tail_value, "tail_value", 4, (tail_key.dtype,), dev)
    check(tail_key.is_contiguous() and tail_value.is_contiguous() and tail_key.shape == tail_value.shape,
          "tail_key and tail_value must be contiguous and of one shape")
    check(tuple(tail_key.shape[1:]) == (n, kv_cache.shape[1], d),
          f"tail_key must be [num_slots, {n}, {kv_cache.shape[1]}, {d}], got {tuple(tail_key.shape)}")
    h = tail_key.shape[2]
    check_tensor(scores, "scores", 3, (torch.float32,), dev)
    check(tuple(scores.shape[1:]) == (n, h), f"scores must be [num_slots, {n}, {h}], got {tuple(scores.shape)}")
    if score_count is not None:
        check_tensor(score_count, "score_count", 2, (torch.float32,), dev)
        check(score_count.shape[1] == n, f"score_count must be [num_slots, {n}]")
    check_tensor(slots, "slots", 1, (torch.int32, torch.int64), dev)
    check_tensor(block_ids, "block_ids", 1, (torch.int32, torch.int64), dev)
    check(slots.numel() == block_ids.numel(), "slots and block_ids must have one entry per block")
    check_cache(kv_cache, layout, h, dev)
    if block_ids.numel() == 0:
        return
    key = tail_key.view(-1, h, d)
    _launch(key, tail_value.view(-1, h, d), scores, scores.stride(0), scores.stride(1), scores.stride(2),
            score_count, 0 if score_count is None else score_count.stride(0), block_ids, slots, kv_cache, layout,
            num_warps)


def _launch(key, value, scores, stride_s_blk, stride_s_tok, stride_s_head, score_count, stride_cnt_blk, block_ids,
            slots, kv_cache, layout, num_warps) -> None:  # fmt: skip
    n, d = layout.block_size, layout.head_size
    h = key.shape[1]
    _compress_store_kernel[(block_ids.numel(), h, 2)](
        key_ptr=key,
        value_ptr=value,
        stride_x_tok=key.stride(0),
        stride_x_head=key.stride(1),
        scores_ptr=scores,
        stride_s_blk=stride_s_blk,
        stride_s_tok=stride_s_tok,
        stride_s_head=stride_s_head,
        count_ptr=scores if score_count is None else score_count,
        stride_cnt_blk=stride_cnt_blk,
        block_ids_ptr=block_ids,
        src_ptr=block_ids if slots is None else slots,
        **cache_args(kv_cache),
        N=n,
        N_PAD=pow2(n),
        D=d,
        BH=layout.bits_high,
        BL=layout.bits_low,
        SK=layout.num_salient_k,
        SV=layout.num_salient_v,
        K_HI_OFF=layout.k_hi_off,
        K_LO_OFF=layout.k_lo_off,
        V_HI_OFF=layout.v_hi_off,
        V_LO_OFF=layout.v_lo_off,
        K_PAR_OFF=layout.k_param_off,
        V_NORM_OFF=layout.v_norm_off,
        V_TOK_OFF=layout.v_tok_off,
        MASK_OFF=layout.mask_off,
        FROM_SLOTS=slots is not None,
        NORMALIZE=score_count is not None,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
