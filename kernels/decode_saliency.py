"""The running saliency of the bf16 tails after a decode step, in one launch per layer (graph-capturable).

A decode row's query is the probe of its own one-token chunk (method doc ZC-7): the mass it gives each staged
tail token is added to that token's running ``score_sum`` and the token's ``score_count`` grows by one; the new
token (staged at row ``t0 = tail_lens[r]`` of the slot) starts with its own mass and a count of one. Rows past
``t0`` are left as they are: a tail row is always written before it is read.

Twin: ``zipcache_vllm.engine.paged.update_decode_saliency``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, check_tensor, pow2


@triton.jit
def _update_kernel(
    sum_ptr, stride_sum_slot, stride_sum_tok,  # fp32 [num_slots, N, H], head stride 1
    cnt_ptr, stride_cnt_slot,  # fp32 [num_slots, N]
    slots_ptr, tail_lens_ptr,  # int [num_rows]
    own_ptr, stride_own_row,  # fp32 [num_rows, H]
    tail_ptr, stride_tail_row, stride_tail_tok,  # fp32 [num_rows, >= N, H]
    N: tl.constexpr, N_PAD: tl.constexpr, H: tl.constexpr, H_PAD: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + r).to(tl.int64)
    t0 = tl.load(tail_lens_ptr + r)
    j = tl.arange(0, N_PAD)
    hh = tl.arange(0, H_PAD)
    old = j < t0
    new = j == t0
    m2 = (j < N)[:, None] & (hh < H)[None, :]
    sums = sum_ptr + slot * stride_sum_slot + j[:, None] * stride_sum_tok + hh[None, :]
    s = tl.load(sums, mask=m2 & old[:, None], other=0.0)
    mass = tl.load(tail_ptr + r * stride_tail_row + j[:, None] * stride_tail_tok + hh[None, :],
                   mask=m2 & old[:, None], other=0.0)  # fmt: skip
    own = tl.load(own_ptr + r * stride_own_row + hh, mask=hh < H, other=0.0)
    s = tl.where(new[:, None], own[None, :], s + mass)
    tl.store(sums, s, mask=m2 & (old | new)[:, None])
    cnt = cnt_ptr + slot * stride_cnt_slot + j
    c = tl.load(cnt, mask=old, other=0.0)
    tl.store(cnt, tl.where(new, 1.0, c + 1.0), mask=(old | new) & (j < N))


def update_decode_saliency(score_sum, score_count, slots, tail_lens, own, tail_mass) -> None:
    """Add a decode step's probe masses to the running saliency of the staged tails (in place).

    Parameters
    ----------
    score_sum : fp32 ``[num_slots, block_size, num_kv_heads]``; score_count : fp32 ``[num_slots, block_size]``.
    slots, tail_lens : int ``[num_rows]``: the slot of each decode row and its tail length before the step
        (``t0``; the new token sits at row ``t0``).
    own : fp32 ``[num_rows, num_kv_heads]``, the mass the row's query gives its own token.
    tail_mass : fp32 ``[num_rows, >= block_size, num_kv_heads]``, the mass of tail token ``j`` (read for
        ``j < t0`` only).
    """
    dev = score_sum.device
    check_tensor(score_sum, "score_sum", 3, (torch.float32,), dev)
    check_tensor(score_count, "score_count", 2, (torch.float32,), dev)
    num_rows, h = own.shape
    n = score_sum.shape[1]
    check(score_sum.shape[2] == h and tail_mass.shape[2] == h, "score_sum, own and tail_mass differ in heads")
    check(tail_mass.shape[0] == num_rows and tail_mass.shape[1] >= n, "tail_mass must be [num_rows, >= N, H]")
    check(own.stride(1) == 1 and tail_mass.stride(2) == 1, "own and tail_mass need head stride 1")
    check(slots.numel() == num_rows and tail_lens.numel() == num_rows, "one slot and tail length per row")
    if num_rows == 0:
        return
    _update_kernel[(num_rows,)](
        score_sum, score_sum.stride(0), score_sum.stride(1),
        score_count, score_count.stride(0),
        slots, tail_lens,
        own, own.stride(0),
        tail_mass, tail_mass.stride(0), tail_mass.stride(1),
        N=n, N_PAD=pow2(n), H=h, H_PAD=pow2(h), num_warps=4,
    )  # fmt: skip
