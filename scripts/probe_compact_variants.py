"""Harness probes behind docs/accuracy.md, *Value rotation and the compact preset*: variants of the one-byte
parameters and of the rotation that are not config keys, run through ``zipcache-eval`` unchanged otherwise.

    python scripts/probe_compact_variants.py VARIANT -- retrieval --model smollm2-135m --threads 1 \
        --tasks-file data/retrieval_passkey_n12.jsonl --methods zipcache-vllm:param_bits=8 --output OUT.json

VARIANT (applies to every ZipCache method of the run):

* ``keys-rotated``: keys quantized in the Hadamard basis too (the methods should set ``value_rotation=true``);
* ``keys-u8-only`` / ``values-u8-only``: one-byte parameters for one tensor, fp16 for the other
  (the methods set ``param_bits=8``);
* ``zero-int16``: one-byte steps with zero points of int16 range (the step is not raised to ``|mn| / 127``);
* ``keys-fp16-min``: keys keep an fp16 minimum and take a one-byte step (``param_bits=8``);
* ``none``: the harness as is.
"""

from __future__ import annotations

import sys

import torch

from zipcache_vllm.method import params8, quant, rotation
from zipcache_vllm.method.compressors import ZipCacheCompressor
from zipcache_vllm.method.quant import EPS, Quantized, encode

VARIANTS = ("keys-rotated", "keys-u8-only", "values-u8-only", "zero-int16", "keys-fp16-min", "none")


def _keys_fp16_min(x, salient, bits_high, bits_low):
    xf, out, stored = x.float(), [], {}
    for tag, bits, mask in (("high", bits_high, salient), ("low", bits_low, ~salient)):
        mn, mx = quant.group_range(xf, mask)
        mn16 = mn.half().float()
        step = torch.clamp((mx - mn16) / float(2**bits - 1), min=EPS)
        scale = params8.scale_up(step.amax(-1, keepdim=True))
        e, step_q = params8.code_up(step, scale)
        out.append(Quantized(encode(xf, step_q, mn16, bits), step_q, mn16, bits))
        stored.update({f"k_{tag}_step_code": e, f"k_{tag}_mn": mn.half(), f"k_{tag}_scale": scale.half()})
    return (out[0], out[1]), stored


def apply(variant: str) -> None:
    keys = ZipCacheCompressor._keys
    if variant == "keys-rotated":
        ZipCacheCompressor._keys = lambda self, k, mask, stored: rotation.rotate(
            keys(self, rotation.rotate(k.float()), mask, stored))
    elif variant == "values-u8-only":  # keys with fp16 parameters
        def fp16_keys(self, k, mask, stored):
            c = self.config
            hi, lo = quant.quantize_channelwise_mixed(k, mask, c.bits_high, c.bits_low)
            return quant.select_mixed(hi.dequantize(), lo.dequantize(), mask)
        ZipCacheCompressor._keys = fp16_keys
    elif variant == "keys-u8-only":  # values with fp16 parameters
        def fp16_values(self, name, x, mask, stored):
            c = self.config
            norm, hi, lo = quant.quantize_cst_mixed(x, mask, c.bits_high, c.bits_low)
            return quant.select_mixed(hi.dequantize(), lo.dequantize(), mask) * norm.float()
        ZipCacheCompressor._cst_plain = fp16_values
    elif variant == "zero-int16":
        params8.ZERO_MAX = 32767
    elif variant == "keys-fp16-min":
        params8.quantize_channelwise_mixed_u8 = _keys_fp16_min


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in VARIANTS or sys.argv[2] != "--":
        sys.exit(f"usage: probe_compact_variants.py {{{','.join(VARIANTS)}}} -- ZIPCACHE-EVAL ARGS")
    apply(sys.argv[1])
    from zipcache_vllm.eval.cli import main as eval_main

    eval_main(sys.argv[3:])


if __name__ == "__main__":
    main()
