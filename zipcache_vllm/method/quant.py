"""ZipCache quantizers in plain PyTorch: the spec the Triton kernels must match bit for bit.

Equation labels (ZC-1 ... ZC-3) refer to ``shared/design/zipcache-method.md``.

Conventions shared by every quantizer here and by the kernels:

* arithmetic in float32; ``step`` and ``mn`` (the real-valued zero point) are rounded to ``PARAM_DTYPE``
  (float16) *before* the codes are computed, so that dequantization uses exactly the stored parameters;
* ``step = max((max - min) / (2**bits - 1), EPS)`` (the epsilon guard: a constant group gets codes 0 and
  reconstructs as ``mn``, exactly for every value float16 represents);
* ``code = clamp(round_half_even((x - mn) / step), 0, 2**bits - 1)`` with IEEE division;
* dequantization ``x_hat = code * step + mn`` in float32.

Codes are packed along the last dimension, ``8 // bits`` consecutive values per byte, value ``j`` of a byte at
bit offset ``j * bits`` (little-endian inside the byte).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARAM_DTYPE = torch.float16
EPS = 1e-6  # smallest step; well above float16's smallest subnormal (6e-8), so step never rounds to 0
SUPPORTED_BITS = (1, 2, 4, 8)
_FP16_MAX = 65504.0


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """Raise ``ValueError`` if ``x`` holds NaN/inf or values float16 parameters cannot represent."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} holds {bad} NaN/inf value(s); refusing to quantize non-finite data")
    if x.numel() and x.abs().max().item() > _FP16_MAX:
        raise ValueError(
            f"{what} holds a value of magnitude {x.abs().max().item():.3g} > {_FP16_MAX}: quantization "
            "parameters are float16 and cannot represent it"
        )


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


# --------------------------------------------------------------------------------------------- ZC-1 core
def params_from_range(mn: torch.Tensor, mx: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, mn) in ``PARAM_DTYPE`` from float32 min/max (ZC-1 with the epsilon guard). A zero minimum is stored
    as +0 (``mn + 0``): which zero a minimum over zeros of both signs returns is the reduction's order (torch's CPU
    vector width, numba's loop, the GPU's min instructions), and the codes and dequantized values are the same for
    either, so the page's bytes do not depend on it."""
    qmax = float(2**bits - 1)
    step = torch.clamp((mx.float() - mn.float()) / qmax, min=EPS).to(PARAM_DTYPE)
    if not torch.isfinite(step).all():
        raise ValueError(f"a {bits}-bit step exceeds the float16 range ({_FP16_MAX}): the group's range is too wide")
    return step, (mn.float() + 0.0).to(PARAM_DTYPE)


def group_range(xf: torch.Tensor, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over tokens (``dim=-2``, kept) of ``xf [..., tokens, channels]`` among the tokens where
    ``member [..., tokens]`` is set; (0, 0) for a group with no tokens."""
    m = member.unsqueeze(-1)
    big = torch.finfo(torch.float32).max
    mn = torch.where(m, xf, big).amin(dim=-2, keepdim=True)
    mx = torch.where(m, xf, -big).amax(dim=-2, keepdim=True)
    empty = ~m.any(dim=-2, keepdim=True)
    return torch.where(empty, torch.zeros_like(mn), mn), torch.where(empty, torch.zeros_like(mx), mx)


def encode(x: torch.Tensor, step: torch.Tensor, mn: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (uint8, unpacked) of ``x`` for broadcastable stored parameters ``step``/``mn``."""
    qmax = float(2**bits - 1)
    q = torch.round((x.float() - mn.float()) / step.float())
    return q.clamp_(0.0, qmax).to(torch.uint8)


def decode(codes: torch.Tensor, step: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """float32 ``codes * step + mn``."""
    return codes.float() * step.float() + mn.float()


@dataclass
class Quantized:
    """Unpacked codes with their parameters; ``dim`` lists the reduced dimensions (kept with size 1)."""

    codes: torch.Tensor  # uint8, shape of x
    step: torch.Tensor  # PARAM_DTYPE, x's shape with reduced dims of size 1
    mn: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        return decode(self.codes, self.step, self.mn)


def quantize(x: torch.Tensor, bits: int, dim: int | tuple[int, ...]) -> Quantized:
    """Uniform asymmetric quantization (ZC-1) with min/max taken over ``dim``.

    ``dim=-1`` is tokenwise when rows are tokens; ``dim=-2`` is channelwise for ``[..., tokens, channels]``.
    """
    check_bits(bits)
    check_finite(x)
    xf = x.float()
    mn = xf.amin(dim=dim, keepdim=True)
    mx = xf.amax(dim=dim, keepdim=True)
    step, mn16 = params_from_range(mn, mx, bits)
    return Quantized(encode(xf, step, mn16, bits), step, mn16, bits)


def quantize_groupwise(x: torch.Tensor, bits: int, group_size: int, dim: int = -1) -> Quantized:
    """Groups of ``group_size`` consecutive elements along ``dim``; the size of ``dim`` must divide evenly."""
    dim = dim % x.dim()
    n = x.shape[dim]
    if n % group_size:
        raise ValueError(f"dimension {dim} of size {n} is not a multiple of group_size={group_size}")
    shape = list(x.shape)
    grouped = x.reshape(*shape[:dim], n // group_size, group_size, *shape[dim + 1 :])
    q = quantize(grouped, bits, dim=dim + 1)
    return Quantized(q.codes.reshape(shape), q.step, q.mn, bits)


def dequantize_groupwise(q: Quantized, group_size: int, dim: int = -1) -> torch.Tensor:
    dim = dim % q.codes.dim()
    shape = list(q.codes.shape)
    n = shape[dim]
    codes = q.codes.reshape(*shape[:dim], n // group_size, group_size, *shape[dim + 1 :])
    return decode(codes, q.step, q.mn).reshape(shape)


# --------------------------------------------------------------------------------------------- ZC-2 CST
def channel_normalizer(x: torch.Tensor, token_dim: int = -2) -> torch.Tensor:
    """c_i = sqrt(max_t |X_{t,i}|) over ``token_dim`` (kept, size 1), stored as ``PARAM_DTYPE``.

    An all-zero channel gets c = 1 (any c reconstructs it; 1 avoids 0/0).
    """
    amax = x.float().abs().amax(dim=token_dim, keepdim=True)
    c = torch.sqrt(amax).to(PARAM_DTYPE)
    # A channel whose normalizer rounds to 0 in float16 (max|x| < ~1e-15, or all zeros) keeps c = 1.
    return torch.where(c > 0, c, torch.ones_like(c))


@dataclass
class CSTQuantized:
    """Channel-separable tokenwise codes (ZC-2): X ~ c * (codes * step + mn), step/mn per token row."""

    q: Quantized
    c: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.q.dequantize() * self.c.float()


def quantize_cst(x: torch.Tensor, bits: int, c: torch.Tensor | None = None) -> CSTQuantized:
    """CST of ``x [..., tokens, channels]``: divide channels by c, then quantize each token row (ZC-2)."""
    check_finite(x)
    if c is None:
        c = channel_normalizer(x)
    return CSTQuantized(quantize(x.float() / c.float(), bits, dim=-1), c)


# --------------------------------------------------------------------------------------------- packing
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2**bits along the last dim, ``8 // bits`` per byte (value j at bit j*bits)."""
    check_bits(bits)
    per = 8 // bits
    n = codes.shape[-1]
    if n % per:
        raise ValueError(f"last dimension {n} must be a multiple of {per} to pack {bits}-bit codes")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if bits == 8:
        return codes.clone()
    c = codes.reshape(*codes.shape[:-1], n // per, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    check_bits(bits)
    if bits == 8:
        return packed.clone()
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    vals = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def packed_nbytes(n_values: int, bits: int) -> int:
    return n_values * bits // 8


# --------------------------------------------------------------------------------------------- ZC-3 mixed
def quantize_channelwise_mixed(
    x: torch.Tensor, salient: torch.Tensor, bits_high: int, bits_low: int
) -> tuple[Quantized, Quantized]:
    """Keys, ZC-3: channelwise min/max per precision group.

    ``x [..., tokens, channels]``, ``salient [..., tokens]`` bool. Returns the (high, low) quantizations of the
    whole tensor; the caller keeps the high codes of salient tokens and the low codes of the others. A group
    with no tokens gets parameters (EPS, 0) that are never used.
    """
    check_finite(x)
    xf = x.float()
    out = []
    for bits, mask in ((bits_high, salient), (bits_low, ~salient)):
        mn, mx = group_range(xf, mask)
        step, mn16 = params_from_range(mn, mx, bits)
        out.append(Quantized(encode(xf, step, mn16, bits), step, mn16, bits))
    return out[0], out[1]


def quantize_cst_mixed(
    x: torch.Tensor, salient: torch.Tensor, bits_high: int, bits_low: int
) -> tuple[torch.Tensor, Quantized, Quantized]:
    """Values, ZC-2 per group: ONE normalizer c over all tokens, then tokenwise at bits_high / bits_low.

    Returns ``(c, high, low)``; token t uses ``high`` if ``salient[..., t]`` else ``low``.
    """
    check_finite(x)
    c = channel_normalizer(x)
    xn = x.float() / c.float()
    return c, quantize(xn, bits_high, dim=-1), quantize(xn, bits_low, dim=-1)


def select_mixed(high: torch.Tensor, low: torch.Tensor, salient: torch.Tensor) -> torch.Tensor:
    """Pick per token (dim -2) from two dequantized tensors by the salient mask."""
    return torch.where(salient.unsqueeze(-1), high, low)


# --------------------------------------------------------------------------------------------- ZC-4
def paper_ratio(salient_ratio: float, tokens: int, channels: int = 4096, batch: int = 8,
                bits_high: int = 4, bits_low: int = 2, mixed_params: bool = True) -> float:
    """The paper's analytic compression ratio ZC-4 (counts fp16 parameters, not the streaming window).

    ``channels`` is hd (KV heads x head size); ``mixed_params`` selects P = 5hd + 2bl (else 3hd + 2bl).
    """
    r = salient_ratio
    n = 2 * batch * tokens * channels
    p = (5 if mixed_params else 3) * channels + 2 * batch * tokens
    return n * 16 / (n * (r * bits_high + (1 - r) * bits_low) + 16 * p)
