"""One-byte quantization parameters (method/params8.py): codes found by table search (the largest code whose
decoded value is not below the exact one), region scales rounded up, zero points covering the range, fewer bytes
than fp16 parameters, and the page twin storing exactly what the harness quantizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zipcache_vllm.method import params8
from zipcache_vllm.method.compressors import ZipCacheCompressor
from zipcache_vllm.method.config import ZipCacheConfig


def test_scale_up_is_the_smallest_fp16_not_below():
    m = torch.cat([torch.rand(1000) * 100, torch.tensor([0.0, 1e-6, 6e-8, 1.0, 65000.0])])
    s = params8.scale_up(m)
    assert (s >= m).all() and (s.to(torch.float16).float() == s).all()
    below = (s.to(torch.float16).view(torch.int16) - 1).view(torch.float16).float()
    assert ((below < m) | (m == 0)).all()  # one fp16 step less would be below m
    assert s[-5] == 1.0  # a zero region max gets scale 1


def test_codes_round_steps_up_by_at_most_one_code():
    x = torch.rand(4, 64) * 10 + 1e-3
    s = params8.scale_up(x.amax(-1, keepdim=True))
    e, dec = params8.code_up(x, s)
    assert e.dtype == torch.uint8
    assert (dec >= x).all()
    assert (dec <= x * 2 ** (1 / params8.LOG_STEPS) * (1 + 1e-6)).all()
    # the largest such code: one more would fall below x (unless at the end of the table)
    nxt = params8.decode_code((e.long() + 1).clamp(max=255), s)
    assert ((nxt < x) | (e == 255)).all()
    assert torch.equal(params8.decode_code(e, s.half()), dec)  # decoding from the stored fp16 scale


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


@pytest.mark.parametrize("head_size, ratios", [(64, (0.8, 0.2)), (128, (0.6, None)), (64, (1.0, 0.0)),
                                               (32, (0.0, 1.0))])
def test_page_twin_stores_what_the_harness_quantizes(head_size, ratios):
    """Pages of ``param_bits = 8`` (engine/paged.py) dequantize to the harness's one-byte quantization of the
    same blocks, bit for bit: one definition of the format."""
    from zipcache_vllm.engine import paged
    from zipcache_vllm.engine.layout import PageLayout
    from zipcache_vllm.method.quant import select_mixed

    n, nb, h, d = 128, 3, 2, head_size
    lay = PageLayout(n, d, salient_ratio=ratios[0], value_salient_ratio=ratios[1], param_bits=8)
    g = torch.Generator().manual_seed(d)
    k = torch.randn(nb * n, h, d, generator=g)
    k[:, :, 3] *= 30
    k[:, :, 5] += 20
    v = torch.randn(nb * n, h, d, generator=g)
    v[:, 1, 7] = 0  # a zero value channel
    scores = torch.rand(nb * n, h, generator=g)
    cache = torch.zeros(5, h, lay.page_bytes, dtype=torch.uint8)
    ids = torch.tensor([4, 0, 2])
    paged.compress_store(k, v, scores, ids, cache, lay)
    kd, vd = paged.dequantize_pages(cache, ids, lay)

    x, y = (t.reshape(nb, n, h, d).permute(0, 2, 1, 3) for t in (k, v))
    ks, vs, _ = paged.page_order(scores.reshape(nb, n, h).permute(0, 2, 1), lay)
    (hi, lo), _ = params8.quantize_channelwise_mixed_u8(x, ks, lay.bits_high, lay.bits_low)
    c, vhi, vlo, _ = params8.quantize_cst_mixed_u8(y, vs, lay.bits_high, lay.bits_low)
    assert torch.equal(kd, select_mixed(hi.dequantize(), lo.dequantize(), ks).permute(0, 2, 1, 3))
    assert torch.equal(vd, (select_mixed(vhi.dequantize(), vlo.dequantize(), vs) * c).permute(0, 2, 1, 3))


def test_the_plugin_refuses_one_byte_parameters_on_cuda(monkeypatch):
    from zipcache_vllm.plugin import settings

    assert settings.resolve_config(128, {"zipcache": {"param_bits": 8}}).param_bits == 8 or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="param_bits 8"):
        settings.resolve_config(128, {"zipcache": {"param_bits": 8}})


def test_the_triton_kernels_refuse_one_byte_pages():
    from zipcache_vllm.engine.layout import PageLayout
    from zipcache_vllm.engine.ops import KernelOps, check_layout

    triton = KernelOps(**{f.name: None for f in dataclasses.fields(KernelOps)} | {"name": "triton"})
    check_layout(triton, PageLayout(128, 64))
    with pytest.raises(NotImplementedError, match="param_bits=8"):
        check_layout(triton, PageLayout(128, 64, param_bits=8))
