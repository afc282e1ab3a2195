"""Plain-torch twins of the paged kernels: the spec the Triton kernels match, and the CPU path of the backend.

Lengths of one sequence ``s`` (vLLM's names; ``N = block_size``)::

    |<------------------------------ seq_lens[s] ------------------------------>|
    |<--- compressed: pages block_table[s, :P] --->|<- tail ->|<-- query_len -->|
    |   P = (seq_lens[s] - query_len - tail_lens[s]) / N    |  bf16    | new tokens (prefill chunk;
    |   pages in page row order (layout.py)        | staging  |  decode: 0, the new token is in the tail)

* **pages** ``kv_cache: uint8 [num_blocks, num_kv_heads, page_bytes]`` (any strides on the first two dims,
  the last contiguous; a vLLM ``[num_blocks, num_kv_heads, block_size, state_content_bytes]`` view reshaped),
  written once per complete block by :func:`compress_store`.
* **tail**: tokens not yet compressed, bf16, in a staging buffer ``tail_key / tail_value [num_slots,
  block_size, num_kv_heads, head_size]``; sequence ``s`` owns slot ``tail_slots[s]`` and its first
  ``tail_lens[s]`` rows.
* **new tokens** of a prefill chunk: ``key / value [num_tokens, num_kv_heads, head_size]`` rows
  ``query_start_loc[s] .. query_start_loc[s + 1] - 1``.

Every page of a sequence precedes all its queries, so pages are attended without a mask and in any row order;
the tail too; the new tokens causally. Attention runs in float32 here; GQA maps query head ``h`` to KV head
``h // (num_heads // num_kv_heads)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..method import params8
from ..method.config import Normalizer, Saliency, Selection
from ..method.quant import pack_bits, quantize_channelwise_mixed, quantize_cst_mixed, unpack_bits
from ..method.saliency import block_saliency, select_salient
from .layout import NUM_SCALES, PageLayout

__all__ = [
    "pack_row",
    "unpack_row",
    "compress_store",
    "compress_slots",
    "page_order",
    "page_params",
    "dequantize_pages",
    "decode_attention",
    "block_probe_scores",
    "prefill_attention",
]


# --------------------------------------------------------------------------------------------- packing
def pack_row(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a row of ``D`` codes as pages store them: :func:`quant.pack_bits` over the channel order in which
    byte ``i`` holds channels ``i, i + D/m, i + 2D/m, ...`` (``m = 8 // bits`` values per byte, value ``j`` at
    bit ``j * bits``), the half/quarter packing of the released ZipCache code (method doc §2).

    Unpacking a byte column block then yields a contiguous block of channels, so the kernels split every row
    into four contiguous channel quarters with shifts and masks only (no interleaving shuffles).
    """
    m = 8 // bits
    d = codes.shape[-1]
    return pack_bits(codes.reshape(*codes.shape[:-1], m, d // m).transpose(-1, -2).reshape(codes.shape), bits)


def unpack_row(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_row`: ``[..., D * bits / 8]`` bytes -> ``[..., D]`` uint8 codes."""
    m = 8 // bits
    vals = unpack_bits(packed, bits)
    d = vals.shape[-1]
    return vals.reshape(*vals.shape[:-1], d // m, m).transpose(-1, -2).reshape(vals.shape)


# --------------------------------------------------------------------------------------------- compress
def page_order(scores: torch.Tensor, layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Salient masks and page row order of blocks from their scores.

    ``scores [..., block_size]`` -> ``(key_salient, value_salient, perm)``: bool masks in token order
    (per-block quota, ties to the earlier token) and ``perm [..., block_size]`` int64 with ``perm[i]`` = the
    token stored in page row ``i`` (tier A, then B, then C, each in token order; layout.py).
    """
    n = layout.block_size
    ks = select_salient(scores, layout.salient_ratio, Selection.QUOTA, n)
    vs = select_salient(scores, layout.v_salient_ratio, Selection.QUOTA, n)
    tier = (~ks).long() + (~vs).long()
    pos = torch.arange(n, device=scores.device)
    perm = torch.argsort(tier * n + pos, dim=-1)
    return ks, vs, perm


def _u8(x: torch.Tensor) -> torch.Tensor:
    """int8 -> the same bytes as uint8."""
    return x.contiguous().view(torch.uint8)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16 [..., m] -> uint8 [..., 2m] (little-endian, as the kernels read the same memory)."""
    return x.contiguous().view(torch.uint8)


def compress_store(
    key: torch.Tensor,
    value: torch.Tensor,
    scores: torch.Tensor,
    block_ids: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: PageLayout,
) -> None:
    """Quantize complete blocks and write them into their pages (in place).

    Parameters
    ----------
    key, value : ``[num_new_blocks * block_size, num_kv_heads, head_size]`` (bf16/fp16/fp32), post-RoPE;
        rows ``i * block_size .. (i + 1) * block_size - 1`` form block ``i``.
    scores : ``[num_new_blocks * block_size, num_kv_heads]`` saliency of each token (higher = salient).
    block_ids : ``[num_new_blocks]`` int, the page each block is written to.
    kv_cache : ``uint8 [num_blocks, num_kv_heads, >= layout.page_bytes]``; bytes outside the page's regions
        (alignment gaps, padding) are left untouched.
    """
    n, d = layout.block_size, layout.head_size
    nb = block_ids.numel()
    h = key.shape[1]
    x = key.reshape(nb, n, h, d).permute(0, 2, 1, 3).float()  # [B, H, N, D]
    v = value.reshape(nb, n, h, d).permute(0, 2, 1, 3).float()
    s = scores.reshape(nb, n, h).permute(0, 2, 1).float()
    ks, vs, perm = page_order(s, layout)
    sk, sv, bh, bl = layout.num_salient_k, layout.num_salient_v, layout.bits_high, layout.bits_low

    if layout.param_bits == 8:
        (k_hi, k_lo), kst = params8.quantize_channelwise_mixed_u8(x, ks, bh, bl)
        c, v_hi, v_lo, vst = params8.quantize_cst_mixed_u8(v, vs, bh, bl)
    else:
        k_hi, k_lo = quantize_channelwise_mixed(x, ks, bh, bl)
        c, v_hi, v_lo = quantize_cst_mixed(v, vs, bh, bl)

    def rows(codes: torch.Tensor) -> torch.Tensor:  # codes in page row order
        return codes.gather(2, perm.unsqueeze(-1).expand_as(codes))

    page = kv_cache[block_ids.long(), :, : layout.page_bytes].clone()  # [B, H, page_bytes]

    def put(off: int, data: torch.Tensor) -> None:
        data = data.reshape(nb, h, -1)
        page[:, :, off : off + data.shape[-1]] = data

    put(layout.k_hi_off, pack_row(rows(k_hi.codes)[:, :, :sk], bh))
    put(layout.k_lo_off, pack_row(rows(k_lo.codes)[:, :, sk:], bl))
    put(layout.v_hi_off, pack_row(rows(v_hi.codes)[:, :, :sv], bh))
    put(layout.v_lo_off, pack_row(rows(v_lo.codes)[:, :, sv:], bl))
    vmask = vs.unsqueeze(-1)

    def by_row(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:  # per-token parameter of the own group
        return torch.where(vmask, hi, lo).squeeze(-1).gather(2, perm)  # [B, H, N], page row order

    if layout.param_bits == 8:
        put(layout.k_param_off, torch.cat([kst["k_high_step_code"], _u8(kst["k_high_zero"]),
                                           kst["k_low_step_code"], _u8(kst["k_low_zero"])], dim=-1))
        put(layout.v_norm_off, vst["v_c_code"])
        put(layout.v_tok_off, torch.cat([by_row(vst["v_high_step_code"], vst["v_low_step_code"]),
                                         _u8(by_row(vst["v_high_zero"], vst["v_low_zero"]))], dim=-1))
        scales = [kst["k_high_scale"], kst["k_low_scale"], vst["v_c_scale"], vst["v_high_scale"],
                  vst["v_low_scale"]]
        put(layout.scale_off, _bytes(torch.cat([t.reshape(nb, h, 1) for t in scales], dim=-1)))
    else:
        kpar = torch.cat([k_hi.step, k_hi.mn, k_lo.step, k_lo.mn], dim=-1)  # [B, H, 1, 4D] fp16
        put(layout.k_param_off, _bytes(kpar))
        put(layout.v_norm_off, _bytes(c))
        put(layout.v_tok_off, _bytes(torch.cat([by_row(v_hi.step, v_lo.step), by_row(v_hi.mn, v_lo.mn)], dim=-1)))
    put(layout.mask_off, torch.cat([pack_bits(ks.to(torch.uint8), 1), pack_bits(vs.to(torch.uint8), 1)], -1))
    kv_cache[block_ids.long(), :, : layout.page_bytes] = page


def compress_slots(
    tail_key: torch.Tensor,
    tail_value: torch.Tensor,
    scores: torch.Tensor,
    score_count: torch.Tensor | None,
    slots: torch.Tensor,
    block_ids: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: PageLayout,
) -> None:
    """:func:`compress_store` of complete blocks waiting in staging slots, from a fixed-size work list.

    Entry ``i`` compresses slot ``slots[i]`` of ``tail_key / tail_value [num_slots, block_size, num_kv_heads,
    head_size]`` into page ``block_ids[i]``; a negative block id means nothing to do. The score of token ``t``
    is ``scores[slot, t] / max(score_count[slot, t], 1)`` (``scores [num_slots or 1, block_size,
    num_kv_heads]``; a first dim of 1 gives every block the same scores; ``score_count`` None: no division).
    """
    keep = (block_ids >= 0).nonzero().flatten()
    if keep.numel() == 0:
        return
    src = slots[keep].long()
    h, d = tail_key.shape[2], tail_key.shape[3]
    sc = scores.expand(tail_key.shape[0], -1, -1)[src]
    if score_count is not None:
        sc = sc / score_count[src].clamp(min=1.0).unsqueeze(-1)
    compress_store(tail_key[src].reshape(-1, h, d), tail_value[src].reshape(-1, h, d), sc.reshape(-1, h),
                   block_ids[keep], kv_cache, layout)


# --------------------------------------------------------------------------------------------- dequantize
def _f16(page: torch.Tensor, off: int, count: int) -> torch.Tensor:
    return page[..., off : off + 2 * count].contiguous().view(torch.float16).float()


def page_params(page: torch.Tensor, layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float32 quantization parameters of pages ``page [..., >= page_bytes]`` (uint8), either format:
    ``kp [..., 4, D]`` (key step and mn of the salient group, then of the regular one, per channel), ``c [...,
    D]`` (value normalizers), ``tp [..., 2, N]`` (value step and mn of each page row)."""
    n, d = layout.block_size, layout.head_size
    if layout.param_bits == 16:
        return (_f16(page, layout.k_param_off, 4 * d).unflatten(-1, (4, d)), _f16(page, layout.v_norm_off, d),
                _f16(page, layout.v_tok_off, 2 * n).unflatten(-1, (2, n)))
    sc = _f16(page, layout.scale_off, NUM_SCALES)  # [..., 5]: S_k_hi, S_k_lo, S_c, S_v_hi, S_v_lo
    kb = page[..., layout.k_param_off : layout.k_param_off + 4 * d].unflatten(-1, (2, 2, d))  # group, code/zero
    kstep = params8.decode_code(kb[..., 0, :], sc[..., 0:2, None])  # [..., 2, D]
    kmn = -_i8(kb[..., 1, :]) * kstep
    kp = torch.stack([kstep[..., 0, :], kmn[..., 0, :], kstep[..., 1, :], kmn[..., 1, :]], dim=-2)
    c = params8.decode_code(page[..., layout.v_norm_off : layout.v_norm_off + d], sc[..., 2:3])
    row_scale = torch.where(torch.arange(n, device=page.device) < layout.num_salient_v, sc[..., 3:4], sc[..., 4:5])
    tstep = params8.decode_code(page[..., layout.v_tok_off : layout.v_tok_off + n], row_scale)
    tmn = -_i8(page[..., layout.v_tok_off + n : layout.v_tok_off + 2 * n]) * tstep
    return kp, c, torch.stack([tstep, tmn], dim=-2)


def _i8(x: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> their int8 values as float32."""
    return x.contiguous().view(torch.int8).float()


def dequantize_pages(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: PageLayout, order: str = "token"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``key, value [len(block_ids), block_size, num_kv_heads, head_size]`` of pages.

    ``order="token"`` puts rows back in token order (from the bitmaps); ``order="page"`` keeps page row order.
    """
    if order not in ("token", "page"):
        raise ValueError(f"order must be 'token' or 'page', got {order!r}")
    n, d = layout.block_size, layout.head_size
    sk, sv, bh, bl = layout.num_salient_k, layout.num_salient_v, layout.bits_high, layout.bits_low
    page = kv_cache[block_ids.long(), :, : layout.page_bytes]  # [B, H, P]
    nb, h = page.shape[:2]

    def codes(off: int, rows_: int, bits: int) -> torch.Tensor:
        raw = page[..., off : off + rows_ * d * bits // 8].reshape(nb, h, rows_, d * bits // 8)
        return unpack_row(raw, bits).float()

    kp, c, tp = page_params(page, layout)
    kp = kp.unsqueeze(-2)  # [B, H, 4, 1, D]
    k = torch.cat(
        [
            codes(layout.k_hi_off, sk, bh) * kp[:, :, 0] + kp[:, :, 1],
            codes(layout.k_lo_off, n - sk, bl) * kp[:, :, 2] + kp[:, :, 3],
        ],
        dim=2,
    )
    c = c.unsqueeze(2)  # [B, H, 1, D]
    tp = tp.unsqueeze(-1)  # [B, H, 2, N, 1]
    vq = torch.cat([codes(layout.v_hi_off, sv, bh), codes(layout.v_lo_off, n - sv, bl)], dim=2)
    v = c * (vq * tp[:, :, 0] + tp[:, :, 1])
    if order == "token":
        masks = unpack_bits(page[..., layout.mask_off : layout.mask_off + 2 * (n // 8)], 1).bool()
        ks, vs = masks[..., :n], masks[..., n:]
        tier = (~ks).long() + (~vs).long()
        perm = torch.argsort(tier * n + torch.arange(n, device=page.device), dim=-1)
        inv = torch.argsort(perm, dim=-1).unsqueeze(-1).expand(nb, h, n, d)
        k, v = k.gather(2, inv), v.gather(2, inv)
    return k.permute(0, 2, 1, 3).contiguous(), v.permute(0, 2, 1, 3).contiguous()


# --------------------------------------------------------------------------------------------- attention
def _seq_kv(kv_cache, layout, block_table, s, num_pages, tail_key, tail_value, tail_slot, tail_len):
    """Float32 [L, H, D] keys/values of sequence s: its pages (page order), then its tail."""
    ids = block_table[s, :num_pages]
    k, v = dequantize_pages(kv_cache, ids, layout, order="page")
    h, d = k.shape[2], k.shape[3]
    k, v = k.reshape(-1, h, d), v.reshape(-1, h, d)
    if tail_len:
        k = torch.cat([k, tail_key[tail_slot, :tail_len].float()])
        v = torch.cat([v, tail_value[tail_slot, :tail_len].float()])
    return k, v


def _probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [Tq, Hq, D], k [L, H, D], mask [Tq, L] (True = visible) -> softmax rows [Hq, Tq, L] (fp32)."""
    g = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(g, dim=1).transpose(0, 1)  # [Hq, L, D]
    logits = torch.matmul(q.float().transpose(0, 1), kk.transpose(1, 2)) * scale  # [Hq, Tq, L]
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """q [Tq, Hq, D], k/v [L, H, D], mask [Tq, L] (True = visible) -> out [Tq, Hq, D], probs [Hq, Tq, L]."""
    probs = _probs(q, k, mask, scale)
    vv = v.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(0, 1)
    return torch.matmul(probs, vv).transpose(0, 1), probs


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: PageLayout,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    tail_key: torch.Tensor,
    tail_value: torch.Tensor,
    tail_slots: torch.Tensor,
    tail_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One query token per sequence over its pages and tail: ``out [num_seqs, num_heads, head_size]`` fp32.

    ``query [num_seqs, num_heads, head_size]``; ``block_table [num_seqs, max_blocks]``; ``seq_lens``,
    ``tail_slots``, ``tail_lens [num_seqs]`` (the tail already holds the current token); sequence ``s`` has
    ``(seq_lens[s] - tail_lens[s]) / block_size`` pages. Twin of the decode kernels.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    n = layout.block_size
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    for s in range(query.shape[0]):
        tl_ = int(tail_lens[s])
        num_pages = (int(seq_lens[s]) - tl_) // n
        k, v = _seq_kv(kv_cache, layout, block_table, s, num_pages, tail_key, tail_value, int(tail_slots[s]), tl_)
        out[s] = _attend(query[s : s + 1], k, v, None, scale)[0][0]
    return out


def block_probe_scores(
    key: torch.Tensor,
    probe_query: torch.Tensor,
    offsets: torch.Tensor,
    src: torch.Tensor,
    out: torch.Tensor,
    normalizer: Normalizer | str = Normalizer.PROBE_NNZ,
    saliency: Saliency | str = Saliency.NORMALIZED,
    scale: float | None = None,
) -> torch.Tensor:
    """Twin of ``kernels/block_scores.block_probe_scores``: the block rule's scores of complete blocks
    (:func:`~zipcache_vllm.method.saliency.block_saliency`), from a fixed-size work list.

    Entry ``e`` scores the block of ``key[src[e]] [block_size, num_kv_heads, head_size]`` by its probe queries
    ``probe_query[src[e]] [num_probes, num_heads, head_size]`` at ``offsets[e] [num_probes]`` and writes
    ``out[src[e]] [block_size, num_kv_heads]`` (fp32); entries with ``src[e] < 0`` do nothing. Returns ``out``.
    """
    keep = (src >= 0).nonzero().flatten()
    if keep.numel():
        rows = src[keep].long()
        out[rows] = block_saliency(probe_query[rows], key[rows], offsets[keep], normalizer, saliency, scale)
    return out


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: PageLayout,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tail_key: torch.Tensor,
    tail_value: torch.Tensor,
    tail_slots: torch.Tensor,
    tail_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """A chunk of new queries per sequence under the block rule: ``out [num_tokens, num_heads, head_size]``
    fp32. Twin of ``kernels/prefill_attention``.

    A query at position ``p`` sees the pages of the blocks before its own (``p // block_size``) and the rows
    of its own block up to ``p``: the tail staged before the chunk, then the chunk's tokens. (The kernel reads
    the pages dequantized to the dtype of ``key`` on the GPU: one rounding more.)

    Parameters
    ----------
    query : ``[num_tokens, num_heads, head_size]``; key, value : ``[num_tokens, num_kv_heads, head_size]``,
        the chunk's own tokens (post-RoPE). query_start_loc : ``[num_seqs + 1]`` int.
    seq_lens : ``[num_seqs]``: tokens of the sequence including this chunk.
    tail_* : as :func:`decode_attention`; ``tail_lens[s]`` (= ``ctx % block_size``, ``ctx`` the tokens before
        the chunk) tokens precede the chunk; block table row ``s`` holds the pages of the first ``(seq_lens[s] -
        1) // block_size`` blocks (those of the blocks the chunk completes included).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    n = layout.block_size
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    for s in range(seq_lens.numel()):
        q0, q1 = int(query_start_loc[s]), int(query_start_loc[s + 1])
        ql, sl, t0 = q1 - q0, int(seq_lens[s]), int(tail_lens[s])
        if ql == 0:
            continue
        ctx = sl - ql
        num_pages = (sl - 1) // n
        if num_pages > block_table.shape[1]:
            raise ValueError(f"sequence {s} reads {num_pages} pages, block_table has {block_table.shape[1]}")
        pk, pv = dequantize_pages(kv_cache, block_table[s, :num_pages], layout, order="page")
        kk = torch.cat([pk.flatten(0, 1), tail_key[int(tail_slots[s]), :t0].float(), key[q0:q1].float()])
        vv = torch.cat([pv.flatten(0, 1), tail_value[int(tail_slots[s]), :t0].float(), value[q0:q1].float()])
        pos = torch.arange(ctx, sl, device=query.device).view(-1, 1)
        own = torch.div(pos, n, rounding_mode="floor") * n
        page_pos = torch.arange(num_pages * n, device=query.device).view(1, -1)  # block of a page row: // n
        x = torch.arange(ctx - t0, sl, device=query.device).view(1, -1)
        mask = torch.cat([page_pos < own, (x >= own) & (x <= pos)], dim=1)
        # SDPA (no [Hq, Tq, L] probability tensor); 4-D inputs take torch's fused CPU kernel
        qh, kh, vh = (y.transpose(0, 1).unsqueeze(0) for y in (query[q0:q1].float(), kk, vv))
        o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=True, attn_mask=mask)
        out[q0:q1] = o[0].transpose(0, 1)
    return out
