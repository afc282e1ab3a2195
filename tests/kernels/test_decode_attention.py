"""decode_attention kernel vs its torch twin on the same (dequantized) pages, and split-K consistency."""

import math

import pytest
import torch
from _data import make_seqs, make_seqs_kv
from conftest import DEVICE, tolerance
from zipcache_vllm.kernels.decode_attention import decode_attention

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.method import quant

pytestmark = pytest.mark.interpret

GQA = [(2, 1), (1, 3), (2, 4), (1, 8)]  # (num_kv_heads, query heads per KV head)
# odd lengths: a sequence with no page, one with exactly one page and a 1-token tail, one with a long tail
LENGTHS = {16: [(37, 0), (17, 0), (5, 0)], 128: [(2 * 128 + 97, 0), (129, 0), (54, 0)]}


def _compare(layout, h, g, lengths, **kw):
    cache, bt, sl, tk, tv, ts, tl_ = make_seqs(layout, h, lengths, DEVICE)
    q = torch.randn(len(lengths), h * g, layout.head_size).bfloat16().to(DEVICE)
    ref = paged.decode_attention(
        q.cpu(), cache.cpu(), layout, bt.cpu(), sl.cpu(), tk.cpu(), tv.cpu(), ts.cpu(), tl_.cpu()
    )
    out = torch.full(q.shape, float("nan"), device=DEVICE)  # poisoned: every element must be written
    decode_attention(q, cache, layout, bt, sl, tk, tv, ts, tl_, out=out, **kw)
    torch.testing.assert_close(out.cpu(), ref, **tolerance(), msg=lambda m: f"{layout}: {m}")
    return out


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("h, g", GQA)
def test_decode_matches_twin(block_size, head_size, h, g):
    _compare(PageLayout(block_size, head_size), h, g, LENGTHS[block_size])


@pytest.mark.parametrize("num_splits", [1, 2, 8])
def test_split_k_merge(num_splits):
    """More splits than pages (empty splits) must still merge exactly."""
    layout = PageLayout(16, 64)
    _compare(layout, 2, 4, [(16 * 5 + 3, 0), (16 * 2, 0)], num_splits=num_splits)


@pytest.mark.parametrize("r, rv, bh, bl", [(0.8, 0.2, 4, 2), (0.25, 0.5, 8, 4), (0.0, 1.0, 4, 2)])
def test_other_layouts(r, rv, bh, bl):
    layout = PageLayout(32, 64, bits_high=bh, bits_low=bl, salient_ratio=r, value_salient_ratio=rv)
    _compare(layout, 1, 4, [(32 * 3 + 7, 0), (40, 0)])


BITS = 8  # the bound below assumes 8-bit codes (2**8 - 1 steps per group)


def _half_step(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Largest |x_hat - x| for x in [lo, hi] quantized as ``quant.py`` does: the nearest point of the grid
    ``mn + k * step`` (k = 0 .. 2**bits - 1, ``step, mn`` rounded to fp16), clamped at both ends."""
    step, mn = (t.float() for t in quant.params_from_range(lo, hi, bits))
    top = mn + (2**bits - 1) * step
    return torch.maximum(torch.maximum(step / 2, mn - lo), hi - top) * (1 + 1e-5)  # 1e-5: fp32 rounding


def _dequant_bounds(key, value, scores, layout, bits):
    """Per-element bounds ``dk, dv`` on |dequantized - original| for the quantizer's groups at ``bits``:
    keys channelwise per (page, KV head, channel, salient group), values ``c * (x / c)`` with the per-channel
    normalizer ``c`` and tokenwise groups (page, KV head, token). Token-order ``[blocks * N, H, D]`` like K/V."""
    n, d, h = layout.block_size, layout.head_size, key.shape[1]
    nb = key.shape[0] // n
    k = key.float().reshape(nb, n, h, d).transpose(1, 2)  # [B, H, N, D]
    v = value.float().reshape(nb, n, h, d).transpose(1, 2)
    ks, _, _ = paged.page_order(scores.reshape(nb, n, h).transpose(1, 2), layout)
    dk = torch.zeros_like(k)
    for m in (ks.unsqueeze(-1), ~ks.unsqueeze(-1)):
        lo = torch.where(m, k, math.inf).amin(-2, keepdim=True)
        hi = torch.where(m, k, -math.inf).amax(-2, keepdim=True)
        dk = torch.where(m, _half_step(lo, hi, bits), dk)  # an empty group is never selected
    c = quant.channel_normalizer(v).float()
    dv = c * _half_step((v / c).amin(-1, keepdim=True), (v / c).amax(-1, keepdim=True), bits)
    back = lambda t: t.transpose(1, 2).reshape(nb * n, h, d)  # noqa: E731
    return back(dk), back(dv)


def test_bf16_output_close_to_dense_attention():
    """8-bit pages vs dense float32 attention over the ORIGINAL bf16 keys/values (not the dequantized pages):
    the difference must stay within a bound derived from the 8-bit quantization step.

    Derivation (per query head; ``j`` runs over a sequence's tokens, ``c`` over channels):

    1. Per element. A group with range [lo, hi] is coded on the grid ``mn + k * step``, k = 0 .. 255, with
       ``step = fp16((hi - lo) / 255)``, ``mn = fp16(lo)``, rounding to the nearest point and clamping, so
       ``|x_hat - x| <= delta = max(step / 2, mn - lo, hi - (mn + 255 step))`` (the last two terms only cover
       the fp16 rounding of the parameters at the group's ends; in practice ``delta = step / 2``). Keys:
       groups are (page, KV head, channel, salient or not) over the page's tokens -> ``dK[j, c]``. Values:
       ``v / c_ch`` with ``c_ch = sqrt(max_t |v|)`` (fp16) per channel, groups (page, KV head, token) over
       channels, so ``dV[j, c] = c_ch * delta``. Tail tokens are stored in bf16 as given: ``dK = dV = 0``.
    2. Logits. ``|s_hat_j - s_j| = scale |q . (k_hat_j - k_j)| <= e_j := scale * sum_c |q_c| dK[j, c]``;
       ``e = max_j e_j``.
    3. Softmax. ``p_hat_j / p_j = exp(s_hat_j - s_j) / sum_i p_i exp(s_hat_i - s_i)`` lies in
       ``[exp(-e_j - e), exp(e_j + e)]``, so ``|p_hat_j - p_j| <= p_j (exp(e_j + e) - 1)``.
    4. Output. As ``sum p_hat = sum p = 1``: ``o_hat - o = sum_j (p_hat_j - p_j)(v_j - o) + sum_j p_hat_j
       (v_hat_j - v_j)``, hence per channel
       ``|o_hat_c - o_c| <= sum_j p_j (exp(e_j + e) - 1) |v_jc - o_c| + sum_j p_j exp(e_j + e) dV[j, c]``.

    The right side uses only the original K/V and q (float32). The kernel may differ from the exact
    dequantized attention by its own rounding, the ``tolerance()`` of the twin comparisons (fp32 under the
    interpreter; fp16/bf16 operands on the GPU), which is added. The bound is worst case (all rounding
    errors aligned with q); at this shape (seed 0) the 8-bit error reaches at most 0.42 of it, while 4-bit
    pages (step 255/15 = 17x larger; ``bits_high=bits_low=4`` in the layout, bound unchanged) exceed it on
    115 of the 1024 outputs, by up to 4.96x: the test can fail.
    """
    layout = PageLayout(16, 64, bits_high=BITS, bits_low=BITS)
    h, g, n, d = 2, 4, layout.block_size, layout.head_size
    lengths = [(16 * 4 + 2, 0), (16 * 2 + 5, 0)]
    (cache, bt, sl, tk, tv, ts, tl_), (key, value, scores) = make_seqs_kv(layout, h, lengths, DEVICE)
    q = torch.randn(len(lengths), h * g, d).bfloat16().to(DEVICE)
    out = decode_attention(q, cache, layout, bt, sl, tk, tv, ts, tl_, out=torch.empty(q.shape, device=DEVICE))
    out, q, bt, tk, tv = out.cpu(), q.cpu().float(), bt.cpu(), tk.cpu().float(), tv.cpu().float()
    dk, dv = _dequant_bounds(key, value, scores, layout, bits=BITS)
    tol = tolerance()
    scale = d**-0.5
    ratios = []  # error / allowed, every output element
    for s, (length, _) in enumerate(lengths):
        blocks, tail, slot = bt[s, : length // n].long(), length % n, int(ts[s])

        def seq(x, t, blocks=blocks, tail=tail, slot=slot):  # [L, H * g, D]: pages, then tail; per query head
            rows = x.view(-1, n, h, d)[blocks].reshape(-1, h, d).float()
            return torch.cat([rows, t[slot, :tail] if t is not None else rows.new_zeros(tail, h, d)])

        k, v = (seq(x, t).repeat_interleave(g, 1) for x, t in ((key, tk), (value, tv)))
        dks, dvs = (seq(x, None).repeat_interleave(g, 1) for x in (dk, dv))
        p = torch.softmax(scale * torch.einsum("lhd,hd->hl", k, q[s]), dim=-1)  # [H * g, L]
        o = torch.einsum("hl,lhd->hd", p, v)
        e_j = scale * torch.einsum("lhd,hd->hl", dks, q[s].abs())
        grow = e_j + e_j.amax(-1, keepdim=True)
        bound = torch.einsum("hl,lhd->hd", p * torch.expm1(grow), (v - o).abs()) + torch.einsum(
            "hl,lhd->hd", p * grow.exp(), dvs
        )
        ratios.append((out[s] - o).abs() / (bound + tol["atol"] + tol["rtol"] * o.abs()))
    r = torch.cat(ratios)
    assert bool((r <= 1).all()), (
        f"{(r > 1).sum().item()} of {r.numel()} outputs exceed the 8-bit bound, max error / bound {r.max():.2f}"
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"max_tile_rows": 128, "split_tiles": False},
        {"max_tile_rows": 32},
        {"max_tile_rows": 16, "asm_unpack": False},
        {"asm_unpack": False, "split_tiles": False, "num_warps": 2},
    ],
)
def test_launch_options(kw):
    """The launch options the benchmark sweeps compute the same function."""
    layout = PageLayout(128, 64)
    _compare(layout, 2, 4, [(128 * 2 + 7, 0), (130, 0)], **kw)
