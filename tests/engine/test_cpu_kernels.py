"""Pieces of the numba CPU decode (zipcache_vllm.engine.cpu_kernels); the whole step is tested against the torch path
and the reference in tests/engine/test_step.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

numba = pytest.importorskip("numba")
from zipcache_vllm.engine import cpu_kernels  # noqa: E402


def test_fp16_to_fp32_is_exact_for_every_bit_pattern():
    """Page parameters are fp16 (numba has none): all 65,536 patterns, subnormals, infinities and NaN."""
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    want = patterns.view(torch.float16).float().numpy()
    raw = patterns.numpy().view(np.uint8).copy()
    got = np.empty(65536, dtype=np.float32)
    cpu_kernels._f16(raw, 0, 65536, got)
    np.testing.assert_array_equal(got, want)  # NaN == NaN here; -0.0 vs 0.0 below
    number = ~np.isnan(want)  # a NaN's sign does not matter (quantization parameters are checked finite)
    assert np.array_equal(np.signbit(got[number]), np.signbit(want[number]))


def test_bf16_rows_widen_exactly():
    x = torch.randn(64, dtype=torch.float32).bfloat16()
    dst = np.empty(64, dtype=np.float32)
    cpu_kernels._bf16_row(x.view(torch.int16).numpy(), dst, np.empty(64, dtype=np.uint32))
    np.testing.assert_array_equal(dst, x.float().numpy())


def test_warmup_compiles_the_signature_the_step_uses():
    """The backend compiles the kernel at start-up; the step must then hit the same signature (no second
    compile in the first request): both pass C-contiguous arrays of the same dtypes."""
    from zipcache_vllm.engine.layout import PageLayout
    from zipcache_vllm.method.config import ZipCacheConfig

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as while vLLM builds the model's layers
    try:
        cpu_kernels.warmup(PageLayout.from_config(ZipCacheConfig.load("vllm", block_size=16), 32), 2, 3)
    finally:
        torch.set_default_dtype(default)
    assert len(cpu_kernels._decode_rows.signatures) == 1
