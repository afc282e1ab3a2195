"""One-byte quantization parameters: the compact page parameters (``param_bits = 8``), one definition for the
harness (:mod:`zipcache_vllm.method.compressors`), the page twin (:mod:`zipcache_vllm.engine.paged`) and the
numba kernels (:mod:`zipcache_vllm.engine.cpu_compress`, :mod:`zipcache_vllm.engine.cpu_kernels`).

fp16 parameters cost per page and KV head ``8 * head_size`` bytes of key (step, mn) per channel and precision
group, ``2 * head_size`` of value normalizers and ``4 * block_size`` of value (step, mn) per token: 9.25 bytes
per token and head at head size 64, next to 48 bytes of codes. Here each parameter takes one byte, under one
fp16 *scale* ``S`` per region (a precision group's key steps, the value normalizers, a precision group's value
token steps):

* a positive parameter ``x`` (a **step**, the value **normalizer** ``c``) is the code ``e`` in ``0..255`` with
  ``x_q = S * STEP_TABLE[e]``, ``STEP_TABLE[e] = 2 ** (-e / 16)`` in fp32: the *largest* ``e`` with ``x_q >= x``
  (so a stored step is never finer than the exact one, and at most ``2 ** (1/16)`` = 4.4 % coarser; values
  below ``S * 2**-15.9`` get ``e = 255``). ``S`` is the smallest fp16 value ``>=`` the region's largest ``x``
  (1 when that is 0). The products are fp32 multiplications of fp32 table entries, so the encoder is a table
  search (no ``log2``) and every implementation finds the same codes;
* a minimum ``mn`` is an integer zero point ``z`` (int8): ``mn_q = -z * step_q`` with ``z = round(-mn /
  step_q)`` clamped to ``[-128, 127]``; the step is first raised to ``|mn| / 127`` so the zero point fits.

Parameters are coded *before* the codes are computed (as with fp16), so dequantization uses exactly what is
stored; codes are clamped to ``[0, 2**bits - 1]`` (the zero point's rounding can push the range's top half a
step out). Decoding is the table lookup and one fp32 multiply (``mn_q`` one more).
"""

from __future__ import annotations

import torch

from .quant import EPS, Quantized, check_finite, encode, group_range

LOG_STEPS = 16  # codes per octave: 256 codes span 16 octaves below the region's scale
ZERO_MAX = 127  # int8 zero point
STEP_TABLE = torch.exp2(-torch.arange(256, dtype=torch.float64) / LOG_STEPS).float()  # fp32 [256]


def scale_up(m: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value ``>= m`` (``m >= 0`` finite, below 65504), as float32; 0 becomes 1."""
    h = m.to(torch.float16)
    up = (h.view(torch.int16) + 1).view(torch.float16)  # the next fp16 up (positive values)
    s = torch.where(h.float() < m, up, h).float()
    return torch.where(s > 0, s, torch.ones_like(s))


def code_up(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x >= 0`` under its broadcast region ``scale`` -> (codes uint8, decoded float32): the largest ``e`` with
    ``scale * STEP_TABLE[e] >= x`` (0 when none, which a scale ``>= x`` rules out)."""
    table = STEP_TABLE.to(x.device)
    dec = scale.unsqueeze(-1) * table  # [..., 256], non-increasing in e
    e = ((dec >= x.unsqueeze(-1)).sum(-1) - 1).clamp(min=0)
    return e.to(torch.uint8), decode_code(e, scale)


def decode_code(e: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * STEP_TABLE[e]`` in float32 (``scale`` broadcast against ``e``)."""
    return scale.float() * STEP_TABLE.to(e.device)[e.long()]


def zero_point(mn: torch.Tensor, step_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 zero points, decoded ``mn_q = -z * step_q`` in float32)."""
    z = torch.round(-mn / step_q).clamp(-ZERO_MAX - 1, ZERO_MAX) + 0.0  # + 0.0: no negative zero
    return z.to(torch.int8), -z * step_q


def exact_steps(mn: torch.Tensor, mx: torch.Tensor, bits: int) -> torch.Tensor:
    """``max((mx - mn) / (2**bits - 1), EPS, |mn| / 127)`` in float32: the step before coding."""
    step = torch.clamp((mx - mn) / float(2**bits - 1), min=EPS)
    return torch.maximum(step, mn.abs() / ZERO_MAX)


def region_max(x: torch.Tensor, member: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Max of ``x >= 0`` over ``dims`` (kept) among ``member`` entries (0 where none)."""
    return torch.where(member, x, torch.zeros_like(x)).amax(dim=dims, keepdim=True)


def params_u8(mn: torch.Tensor, mx: torch.Tensor, bits: int, dims: tuple[int, ...], member=None):
    """(step, mn) as stored one-byte codes of float32 ranges; one scale per region over ``dims`` (among the
    ``member`` entries when given).

    Returns ``(step_q, mn_q, stored)`` with float32 ``step_q``/``mn_q`` (the decoded values the codes use) and
    ``stored`` = {"step_code": uint8, "zero": int8, "scale": fp16}.
    """
    step = exact_steps(mn, mx, bits)
    member = torch.ones_like(step, dtype=torch.bool) if member is None else member.expand_as(step)
    s = scale_up(region_max(step, member, dims))
    e, step_q = code_up(step, s)
    z, mn_q = zero_point(mn, step_q)
    return step_q, mn_q, {"step_code": e, "zero": z, "scale": s.to(torch.float16)}


def channel_normalizer_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZC-2's ``c = sqrt(max_t |x|)`` per channel of ``x [..., tokens, channels]``, coded up under one scale per
    ``[..., :, :]`` slice: (decoded c float32 [..., 1, D], codes uint8, scale fp16 [..., 1, 1])."""
    c = torch.sqrt(x.float().abs().amax(dim=-2, keepdim=True))
    s = scale_up(c.amax(dim=-1, keepdim=True))
    e, c_q = code_up(c, s)
    return c_q, e, s.to(torch.float16)


def quantize_channelwise_mixed_u8(x, salient, bits_high, bits_low):
    """:func:`quant.quantize_channelwise_mixed` with one-byte parameters (one scale per group and head).

    ``x [b, h, tokens, channels]``. Returns ``((high, low), stored)``."""
    check_finite(x)
    xf = x.float()
    out, stored = [], {}
    for tag, bits, mask in (("high", bits_high, salient), ("low", bits_low, ~salient)):
        mn, mx = group_range(xf, mask)
        step, mn_q, parts = params_u8(mn, mx, bits, dims=(-1,))
        out.append(Quantized(encode(xf, step, mn_q, bits), step, mn_q, bits))
        stored.update({f"k_{tag}_{k}": v for k, v in parts.items()})
    return (out[0], out[1]), stored


def quantize_cst_mixed_u8(x, salient, bits_high, bits_low, name: str = "v"):
    """:func:`quant.quantize_cst_mixed` with one-byte parameters: ``c`` (one scale per head), per-token
    (step, zero) of each group (one scale per group and head, over the group's own tokens). Returns ``(c, high,
    low, stored)``; the caller keeps the per-token parameters of each token's own group (``stored`` holds them
    for all tokens: slice)."""
    check_finite(x)
    c, ce, cs = channel_normalizer_u8(x)
    xn = x.float() / c
    stored = {f"{name}_c_code": ce, f"{name}_c_scale": cs}
    out = []
    for tag, bits, mask in (("high", bits_high, salient), ("low", bits_low, ~salient)):
        mn = xn.amin(dim=-1, keepdim=True)
        mx = xn.amax(dim=-1, keepdim=True)
        step_q, mn_q, parts = params_u8(mn, mx, bits, dims=(-2, -1), member=mask.unsqueeze(-1))
        out.append(Quantized(encode(xn, step_q, mn_q, bits), step_q, mn_q, bits))
        stored.update({f"{name}_{tag}_{k}": v for k, v in parts.items()})
    return c, out[0], out[1], stored
