"""One-byte quantization parameters: the proposed compact page parameters, measured in the harness only.

Page layout v2 stores every quantization parameter in fp16: per page and KV head ``8 * head_size`` bytes of key
(step, mn) per channel and precision group, ``2 * head_size`` of value normalizers and ``4 * block_size`` of
value (step, mn) per token: 9.25 bytes per token and head at head size 64, next to 48 bytes of codes. Here each
parameter takes one byte, with one fp16 scale per region:

* **step**, an 8-bit log code ``e``: ``step = S * 2 ** (-e / 16)`` with ``S`` the region's largest step (fp16,
  rounded up), ``e`` rounded *down* so the stored step is never smaller than the exact one (a step at most
  ``2 ** (1/16)`` = 4.4 % coarser; steps below ``S * 2**-16`` are raised to it);
* **mn** as an integer zero point ``z`` (int8): ``mn = -z * step`` (ZC-1's integer zero point). When the range
  lies far from zero (``|mn| > 127 * step``) the step is raised to ``|mn| / 127``;
* the value **normalizer** ``c``: an 8-bit log code rounded to nearest (the codes are computed with the stored
  ``c``, so its rounding costs nothing but a different split of the magnitude).

Parameters are rounded *before* the codes are computed (as with fp16), so dequantization uses exactly what is
stored; codes are clamped to ``[0, 2**bits - 1]`` (the zero point's rounding can push the range's top half a
step out). Not a page format yet: the kernels, the CPU decode and the page twins read fp16 parameters
(``docs/performance.md``, "Page layout and capacity", says what each needs). ``ZipCacheConfig.param_bits = 8``
selects it in the harness; the vLLM plugin refuses it.
"""

from __future__ import annotations

import torch

from .quant import EPS, Quantized, channel_normalizer, check_finite, encode

LOG_STEPS = 16  # log codes per octave: 256 codes span 16 octaves below the region's scale
ZERO_MAX = 127  # int8 zero point


def _region_scale(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """fp16 max of ``x`` over ``dims`` (kept), rounded up to an fp16 value >= the max, as float32."""
    s = x.amax(dim=dims, keepdim=True)
    s16 = s.to(torch.float16).float()
    up = (s16 * (1 + 2.0**-10)).to(torch.float16).float()  # the next fp16 up (10 mantissa bits)
    return torch.where(s16 < s, up, s16)


def log_code_up(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x > 0`` -> (region scale fp32, codes uint8, decoded >= x except below the code range)."""
    s = _region_scale(x, dims)
    e = torch.floor(-LOG_STEPS * torch.log2(x / s)).clamp(0, 255)
    dec = s * torch.exp2(-e / LOG_STEPS)
    # float error at a code boundary: step back one code if the decoded value fell below x
    low = (dec < x) & (e > 0)
    e = torch.where(low, e - 1, e)
    dec = s * torch.exp2(-e / LOG_STEPS)
    return s, e.to(torch.uint8), dec


def log_code_nearest(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = _region_scale(x, dims)
    e = torch.round(-LOG_STEPS * torch.log2(x / s)).clamp(0, 255)
    return s, e.to(torch.uint8), s * torch.exp2(-e / LOG_STEPS)


def params_u8(mn: torch.Tensor, mx: torch.Tensor, bits: int, dims: tuple[int, ...]):
    """(step, mn) as stored one-byte codes of float32 ranges; one scale per region over ``dims``.

    Returns ``(step, mn, stored)`` with float32 ``step``/``mn`` (the decoded values the codes use) and
    ``stored`` = {"step_code": uint8, "zero": int8, "scale": fp16}.
    """
    qmax = float(2**bits - 1)
    step = torch.clamp((mx - mn) / qmax, min=EPS)
    step = torch.maximum(step, mn.abs() / ZERO_MAX)
    s, e, step_q = log_code_up(step, dims)
    z = torch.round(-mn / step_q).clamp(-ZERO_MAX - 1, ZERO_MAX)
    mn_q = -z * step_q
    return step_q, mn_q, {"step_code": e, "zero": z.to(torch.int8), "scale": s.to(torch.float16)}


def quantize_channelwise_mixed_u8(x, salient, bits_high, bits_low):
    """:func:`quant.quantize_channelwise_mixed` with one-byte parameters (one scale per group and head).

    ``x [b, h, tokens, channels]``. Returns ``((high, low), stored)``."""
    check_finite(x)
    xf = x.float()
    out, stored = [], {}
    big = torch.finfo(torch.float32).max
    for tag, bits, mask in (("high", bits_high, salient), ("low", bits_low, ~salient)):
        m = mask.unsqueeze(-1)
        mn = torch.where(m, xf, big).amin(dim=-2, keepdim=True)
        mx = torch.where(m, xf, -big).amax(dim=-2, keepdim=True)
        empty = ~m.any(dim=-2, keepdim=True)
        mn = torch.where(empty, torch.zeros_like(mn), mn)
        mx = torch.where(empty, torch.zeros_like(mx), mx)
        step, mn_q, parts = params_u8(mn, mx, bits, dims=(-1,))
        out.append(Quantized(encode(xf, step, mn_q, bits), step, mn_q, bits))
        stored.update({f"k_{tag}_{k}": v for k, v in parts.items()})
    return (out[0], out[1]), stored


def quantize_cst_mixed_u8(x, salient, bits_high, bits_low, name: str = "v"):
    """:func:`quant.quantize_cst_mixed` with one-byte parameters: ``c`` (one scale per head), per-token
    (step, zero) of each group (one scale per group and head). Returns ``(c, high, low, stored)``; the caller
    keeps the per-token parameters of each token's own group (``stored`` holds them for all tokens: slice)."""
    check_finite(x)
    c16 = channel_normalizer(x).float()
    sc, ce, c = log_code_nearest(c16, dims=(-1,))
    xn = x.float() / c
    stored = {f"{name}_c_code": ce, f"{name}_c_scale": sc.to(torch.float16)}
    out = []
    for tag, bits, mask in (("high", bits_high, salient), ("low", bits_low, ~salient)):
        mn = xn.amin(dim=-1, keepdim=True)
        mx = xn.amax(dim=-1, keepdim=True)
        # the region scale is the largest step among the group's own tokens
        step = torch.clamp((mx - mn) / float(2**bits - 1), min=EPS)
        step = torch.maximum(step, mn.abs() / ZERO_MAX)
        member = mask.unsqueeze(-1)
        s = _region_scale(torch.where(member, step, torch.zeros_like(step)), dims=(-2, -1))
        s = torch.where(s > 0, s, torch.ones_like(s))
        e = torch.floor(-LOG_STEPS * torch.log2(step / s)).clamp(0, 255)
        dec = s * torch.exp2(-e / LOG_STEPS)
        e = torch.where((dec < step) & (e > 0), e - 1, e)
        step_q = s * torch.exp2(-e / LOG_STEPS)
        z = torch.round(-mn / step_q).clamp(-ZERO_MAX - 1, ZERO_MAX)
        mn_q = -z * step_q
        out.append(Quantized(encode(xn, step_q, mn_q, bits), step_q, mn_q, bits))
        stored.update({f"{name}_{tag}_step_code": e.to(torch.uint8), f"{name}_{tag}_zero": z.to(torch.int8),
                       f"{name}_{tag}_scale": s.to(torch.float16)})
    return c, out[0], out[1], stored
