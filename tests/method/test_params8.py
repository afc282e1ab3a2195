"""One-byte quantization parameters (method/params8.py): stored steps never finer than the exact step, codes in
range, the reconstruction within one stored step, fewer bytes than fp16 parameters."""

from __future__ import annotations

import pytest
import torch

from zipcache_vllm.method import params8
from zipcache_vllm.method.compressors import ZipCacheCompressor
from zipcache_vllm.method.config import ZipCacheConfig


def test_log_code_rounds_steps_up_by_at_most_one_code():
    x = torch.rand(4, 64) * 10 + 1e-3
    s, e, dec = params8.log_code_up(x, dims=(-1,))
    assert e.dtype == torch.uint8 and s.shape == (4, 1)
    assert (dec >= x).all()
    assert (dec <= x * 2 ** (1 / params8.LOG_STEPS) * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_zero_point_params_cover_the_range(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 128, 64, generator=g)
    x[..., 7] += 50.0  # a channel far from zero: the zero point needs a larger step there
    mask = torch.rand(2, 3, 128, generator=g) < 0.5
    (hi, lo), stored = params8.quantize_channelwise_mixed_u8(x, mask, bits, bits)
    assert stored["k_high_zero"].dtype == torch.int8 and stored["k_high_step_code"].dtype == torch.uint8
    for q, m in ((hi, mask), (lo, ~mask)):
        err = (q.dequantize() - x).abs()
        bound = q.step.expand_as(x)  # clamped zero-point rounding: within one stored step
        assert (err[m] <= bound[m] * (1 + 1e-5)).all()


def test_compressor_stores_fewer_bytes_and_reconstructs_close_to_fp16_parameters():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 3, 128, 64, generator=g)
    k[..., 3] *= 20
    v = torch.randn(1, 3, 128, 64, generator=g)
    scores = torch.rand(1, 3, 128, generator=g)
    out = {}
    for pb in (16, 8):
        seg = ZipCacheCompressor(ZipCacheConfig.load("vllm", param_bits=pb)).compress(k, v, scores)
        rel = [((a - b).pow(2).sum() / b.pow(2).sum()).item() for a, b in ((seg.k, k), (seg.v, v))]
        out[pb] = (seg.nbytes, rel)
    # fp16: 8 D + 2 D + 4 N bytes of parameters per head; one byte: 4 D + D + 2 N + scales
    assert out[16][0] - out[8][0] >= 3 * (4 * 64 + 64 + 2 * 128) - 3 * 12
    for r16, r8 in zip(out[16][1], out[8][1], strict=True):
        assert r8 < 1.25 * r16  # a coarser step (<= 4.4 %) and integer zero points: a small cost


def test_the_plugin_refuses_one_byte_parameters():
    from zipcache_vllm.plugin import settings

    with pytest.raises(ValueError, match="param_bits 8"):
        settings.resolve_config(128, {"zipcache": {"param_bits": 8}})
