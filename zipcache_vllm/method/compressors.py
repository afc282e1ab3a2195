"""Segment compressors: how one method turns a chunk of K/V into stored tensors, and back.

A *segment* is a run of consecutive tokens of one layer, ``[b, num_kv_heads, n, head_size]``, compressed once
and never re-quantized. Every method of the evaluation harness is a :class:`Compressor`; the streaming cache
(:mod:`zipcache_vllm.hf.cache`) decides *when* segments are cut. Bytes are always measured from the stored
tensors (:attr:`Segment.stored`), never computed from a formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import params8, quant, rotation
from .config import Granularity, KeyScheme, Saliency, ZipCacheConfig
from .saliency import random_scores, select_salient


@dataclass
class Segment:
    """Stored tensors of one compressed segment plus what is needed to rebuild K and V."""

    num_tokens: int
    stored: dict[str, torch.Tensor] = field(default_factory=dict)
    k: torch.Tensor | None = None  # dequantized keys [b, h, n, d] (float32), a working copy, not counted
    v: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored.values())


class Compressor:
    """Base class. ``segment_len`` = tokens per decode-time segment; ``prefill_all`` = compress the whole
    prompt at prefill (else only multiples of ``segment_len``, the rest waits in the bf16 window)."""

    name = "base"
    needs_saliency = False
    prefill_all = True
    segment_len: int | None = 1  # None: never compress (the bf16 baseline)

    def compress(self, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor | None) -> Segment:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.name}


# ------------------------------------------------------------------------------------------------- bf16
class NoCompression(Compressor):
    """bf16 cache: every token stays in the window."""

    name = "bf16"
    segment_len = None


# ------------------------------------------------------------------------------------ int-N per token-head
class TokenwiseCompressor(Compressor):
    """Uniform asymmetric int-N per (token, KV head), as vLLM's ``int4/int8_per_token_head`` granularity
    (without its Hadamard rotation). Every token is quantized right after the step that wrote it."""

    prefill_all = True
    segment_len = 1

    def __init__(self, bits: int):
        quant.check_bits(bits)
        self.bits = bits
        self.name = f"int{bits}"

    def compress(self, k, v, scores=None):
        seg = Segment(k.shape[2])
        parts = []
        for name, x in (("k", k), ("v", v)):
            q = quant.quantize(x, self.bits, dim=-1)
            seg.stored[f"{name}_codes"] = quant.pack_bits(q.codes, self.bits)
            seg.stored[f"{name}_step"], seg.stored[f"{name}_mn"] = q.step, q.mn
            parts.append(q.dequantize())
        seg.k, seg.v = parts
        return seg

    def describe(self):
        return {"method": self.name, "bits": self.bits, "granularity": "per token-head"}


# --------------------------------------------------------------------------------------------- KIVI
class KiviCompressor(Compressor):
    """KIVI: keys per channel in groups of ``group_size`` tokens, values per token in groups of ``group_size``
    channels, the newest tokens (fewer than ``residual``) kept in bf16; a full residual is quantized at once."""

    prefill_all = False

    def __init__(self, bits: int, group_size: int = 32, residual: int = 128):
        quant.check_bits(bits)
        if residual % group_size:
            raise ValueError(f"residual ({residual}) must be a multiple of group_size ({group_size})")
        self.bits, self.group_size, self.segment_len = bits, group_size, residual
        self.name = f"kivi{bits}"

    def compress(self, k, v, scores=None):
        seg = Segment(k.shape[2])
        gs = self.group_size
        qk = quant.quantize_groupwise(k, self.bits, gs, dim=-2)
        d = v.shape[-1]
        qv = quant.quantize_groupwise(v, self.bits, gs if d % gs == 0 else d, dim=-1)
        for name, q in (("k", qk), ("v", qv)):
            seg.stored[f"{name}_codes"] = quant.pack_bits(q.codes, self.bits)
            seg.stored[f"{name}_step"], seg.stored[f"{name}_mn"] = q.step, q.mn
        seg.k = quant.dequantize_groupwise(qk, gs, dim=-2)
        seg.v = quant.dequantize_groupwise(qv, gs if d % gs == 0 else d, dim=-1)
        return seg

    def describe(self):
        return {"method": self.name, "bits": self.bits, "group_size": self.group_size, "residual": self.segment_len}


# ------------------------------------------------------------------------------------------- ZipCache
def _gather(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of ``x [b, h, n, c]`` where ``mask [b, h, n]``; every (b, h) selects the same count."""
    b, h, _, c = x.shape
    return x[mask].view(b, h, -1, c)


def _scatter(high: torch.Tensor, low: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.empty(*mask.shape, high.shape[-1], dtype=high.dtype, device=high.device)
    out[mask] = high.reshape(-1, high.shape[-1])
    out[~mask] = low.reshape(-1, low.shape[-1])
    return out


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    n = mask.shape[-1]
    pad = (-n) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad))
    return quant.pack_bits(m, 1)


class ZipCacheCompressor(Compressor):
    """ZipCache (method doc §3, §10): salient tokens at ``bits_high``, the rest at ``bits_low``; keys channelwise
    per precision group (ZC-3) or CST, values CST (ZC-2) with one normalizer c per channel over the segment.

    Stored per segment and KV head: high codes of the salient tokens, low codes of the regular ones (two dense
    regions, token order kept), fp16 parameters, and a 1-bit salient mask per token (per tensor when keys and
    values use different salient ratios).
    """

    needs_saliency = True

    def __init__(self, config: ZipCacheConfig, name: str = "zipcache"):
        self.config = config
        self.name = name
        block = config.granularity is Granularity.BLOCK
        self.prefill_all = not block
        self.segment_len = config.segment_len

    def _mask(self, scores: torch.Tensor, ratio: float) -> torch.Tensor:
        c = self.config
        return select_salient(scores, ratio, c.selection, c.block_size)

    def compress(self, k, v, scores):
        c = self.config
        if scores is None:
            raise ValueError("ZipCache needs per-token saliency scores to compress a segment")
        if c.saliency is Saliency.RANDOM:
            scores = random_scores(c, *scores.shape).to(scores.device)
        mask_k = self._mask(scores, c.salient_ratio)
        mask_v = mask_k if c.v_salient_ratio == c.salient_ratio else self._mask(scores, c.v_salient_ratio)
        seg = Segment(k.shape[2])
        seg.stored["k_salient_mask"] = _pack_mask(mask_k)
        if mask_v is not mask_k:
            seg.stored["v_salient_mask"] = _pack_mask(mask_v)
        seg.k = self._keys(k, mask_k, seg.stored)
        seg.v = self._cst("v", v, mask_v, seg.stored)
        return seg

    def _keys(self, k, mask, stored) -> torch.Tensor:
        c = self.config
        if c.key_scheme is KeyScheme.CST:
            return self._cst("k", k, mask, stored)
        if c.param_bits == 8:
            (hi, lo), params = params8.quantize_channelwise_mixed_u8(k, mask, c.bits_high, c.bits_low)
            stored["k_high"] = quant.pack_bits(_gather(hi.codes, mask), c.bits_high)
            stored["k_low"] = quant.pack_bits(_gather(lo.codes, ~mask), c.bits_low)
            stored.update(params)
            return quant.select_mixed(hi.dequantize(), lo.dequantize(), mask)
        hi, lo = quant.quantize_channelwise_mixed(k, mask, c.bits_high, c.bits_low)
        stored["k_high"] = quant.pack_bits(_gather(hi.codes, mask), c.bits_high)
        stored["k_low"] = quant.pack_bits(_gather(lo.codes, ~mask), c.bits_low)
        stored["k_high_step"], stored["k_high_mn"] = hi.step, hi.mn
        stored["k_low_step"], stored["k_low_mn"] = lo.step, lo.mn
        return quant.select_mixed(hi.dequantize(), lo.dequantize(), mask)

    def _cst(self, name, x, mask, stored) -> torch.Tensor:
        c = self.config
        if name == "v" and c.value_rotation:  # quantized in the Hadamard basis, reconstructed in the model's
            return rotation.rotate(self._cst_plain(name, rotation.rotate(x.float()), mask, stored))
        return self._cst_plain(name, x, mask, stored)

    def _cst_plain(self, name, x, mask, stored) -> torch.Tensor:
        c = self.config
        if c.param_bits == 8:
            return self._cst_u8(name, x, mask, stored)
        norm, hi, lo = quant.quantize_cst_mixed(x, mask, c.bits_high, c.bits_low)
        stored[f"{name}_c"] = norm
        stored[f"{name}_high"] = quant.pack_bits(_gather(hi.codes, mask), c.bits_high)
        stored[f"{name}_low"] = quant.pack_bits(_gather(lo.codes, ~mask), c.bits_low)
        for tag, q, m in (("high", hi, mask), ("low", lo, ~mask)):
            stored[f"{name}_{tag}_step"] = _gather(q.step, m)
            stored[f"{name}_{tag}_mn"] = _gather(q.mn, m)
        high = _gather(hi.dequantize(), mask)
        low = _gather(lo.dequantize(), ~mask)
        return _scatter(high, low, mask) * norm.float()

    def _cst_u8(self, name, x, mask, stored) -> torch.Tensor:
        c = self.config
        norm, hi, lo, params = params8.quantize_cst_mixed_u8(x, mask, c.bits_high, c.bits_low, name)
        stored[f"{name}_high"] = quant.pack_bits(_gather(hi.codes, mask), c.bits_high)
        stored[f"{name}_low"] = quant.pack_bits(_gather(lo.codes, ~mask), c.bits_low)
        for key, value in params.items():  # per-token codes: only each group's own tokens are stored
            if key.endswith(("_step_code", "_zero")):
                value = _gather(value, mask if "_high_" in key else ~mask)
            stored[key] = value
        high = _gather(hi.dequantize(), mask)
        low = _gather(lo.dequantize(), ~mask)
        return _scatter(high, low, mask) * norm

    def describe(self):
        return {"method": self.name, **self.config.to_dict()}
