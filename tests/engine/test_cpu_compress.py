"""The numba compressor (zipcache_vllm.engine.cpu_compress) writes every byte of a page as the torch twin
paged.compress_store does: codes, parameters (fp16, or one byte under fp16 scales), bitmaps, and leaves the bytes
between the regions alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

numba = pytest.importorskip("numba")
from zipcache_vllm.engine import cpu_compress, paged  # noqa: E402
from zipcache_vllm.engine.layout import PageLayout  # noqa: E402
from zipcache_vllm.method.config import ZipCacheConfig  # noqa: E402


def _preset(name):
    c = ZipCacheConfig.load(name)
    return c.bits_high, c.bits_low, c.salient_ratio, c.value_salient_ratio


# (bits_high, bits_low, salient_ratio, value_salient_ratio): the shipped presets (`vllm`: the plugin's default,
# `paged`: r = 0.6 on both, `kv2` / `kv4`: no salient token / every token salient), then 8-bit codes, 2/2 bits
# with separate shares, and keys all salient with no salient value (a key precision group with no tokens)
PRESETS = {name: _preset(name) for name in ("vllm", "paged", "kv2", "kv4")} | {
    "8/4": (8, 4, 0.6, None), "2/2 0.5/0.25": (2, 2, 0.5, 0.25), "1.0/0.0": (4, 2, 1.0, 0.0)}


def _both(key, value, scores, block_ids, layout, num_pages=9, seed=0):
    """Run twin and kernel on the same cache filled with random bytes; return both caches."""
    g = torch.Generator().manual_seed(seed)
    h = key.shape[1]
    cache = torch.randint(0, 256, (num_pages, h, layout.page_bytes + 24), generator=g, dtype=torch.uint8)
    want, got = cache.clone(), cache.clone()
    paged.compress_store(key, value, scores, block_ids, want, layout)
    cpu_compress.compress_store(key, value, scores, block_ids, got, layout)
    return want, got


def _assert_same_bytes(want, got):
    diff = (want != got).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} bytes differ, first at (page, head, byte) {diff[:5].tolist()}"


def _random_blocks(nb, n, h, d, dtype, g):
    key = (torch.randn(nb * n, h, d, generator=g) * 3 + torch.randn(1, h, d, generator=g) * 4).to(dtype)
    value = torch.randn(nb * n, h, d, generator=g).to(dtype)
    scores = torch.rand(nb * n, h, generator=g)
    return key, value, scores


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("n", [16, 48, 128])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("param_bits", [16, 8])  # fp16 or one-byte parameters
def test_random_blocks_are_bit_identical(preset, n, d, param_bits):
    bh, bl, r, rv = PRESETS[preset]
    layout = PageLayout(block_size=n, head_size=d, bits_high=bh, bits_low=bl, salient_ratio=r, value_salient_ratio=rv,
                        param_bits=param_bits)
    g = torch.Generator().manual_seed(n * d)
    key, value, scores = _random_blocks(3, n, 3, d, torch.bfloat16, g)
    _assert_same_bytes(*_both(key, value, scores, torch.tensor([7, 2, 4]), layout))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_dtypes(dtype):
    layout = PageLayout(block_size=32, head_size=64, salient_ratio=0.8, value_salient_ratio=0.2)
    key, value, scores = _random_blocks(2, 32, 2, 64, dtype, torch.Generator().manual_seed(1))
    _assert_same_bytes(*_both(key, value, scores, torch.tensor([1, 5]), layout))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("n", [16, 48, 128])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("param_bits", [16, 8])  # fp16 or one-byte parameters
def test_ties_constants_subnormals_and_signed_zeros(preset, n, d, param_bits):
    """The edge cases of quant.py's conventions, in two blocks of 3 KV heads (SmolLM2's), head sizes 64 / 128:
    tied scores (quota by token order), rounding ties (half-integer grids: round half to even), constant and
    all-zero channels (step EPS, normalizer 1), fp32 subnormals and values at fp16's subnormal range (keys'
    minima, values' normalizers), zeros of both signs as a group's minimum (the sign of the stored fp16 min),
    magnitudes near 65504."""
    bh, bl, r, rv = PRESETS[preset]
    h = 3
    layout = PageLayout(block_size=n, head_size=d, bits_high=bh, bits_low=bl, salient_ratio=r, value_salient_ratio=rv,
                        param_bits=param_bits)
    g = torch.Generator().manual_seed(3)
    key = torch.randn(2 * n, h, d, generator=g)
    value = torch.randn(2 * n, h, d, generator=g)
    grid = torch.randint(0, 31, (2 * n, h), generator=g).float() / 2  # 0, 0.5, .., 15: codes at exact ties
    key[:, :, 0], value[:, :, 0] = grid, grid
    key[:, :, 1] = 3.25  # constant channel
    value[:, :, 1] = 0.0  # all-zero value channel: normalizer 1
    key[:, :, 2] = torch.randn(2 * n, h, generator=g) * 1e-40  # fp32 subnormals
    value[:, :, 2] = torch.randn(2 * n, h, generator=g) * 1e-6  # fp16 subnormal range
    key[:, :, 3] = (torch.rand(2 * n, h, generator=g) * 2 - 1) * 65504  # up to fp16's max
    key[:, :, 4] = torch.randn(2 * n, h, generator=g) * 1e-6  # minima among fp16's subnormals
    value[:, :, 3] = torch.randn(2 * n, h, generator=g) * 1e-31  # normalizer below fp16's range: 1
    value[:, :, 4] = torch.randn(2 * n, h, generator=g) * 1e-10  # normalizer an fp16 subnormal
    value[:, :, d - 1] = -2.5  # constant value channel (negative)
    sign = torch.randint(0, 2, (2 * n, h, 8), generator=g).bool()
    zeros = torch.where(sign, -0.0, 0.0)
    key[:, :, 8:16] = torch.where(torch.rand(2 * n, h, 8, generator=g) < 0.3, zeros, key[:, :, 8:16].abs() + 0.1)
    value[:, 0] = value[:, 0].abs()  # rows whose minimum is a zero of either sign
    value[:, 0, 20:40] = zeros.repeat(1, 1, 3)[:, 0, :20]
    value[5, 1] = torch.where(sign[5, 1].repeat(d // 8), -0.0, 0.0)  # an all-zero row
    scores = (torch.randint(0, 4, (2 * n, h), generator=g).float() / 7).contiguous()  # many ties
    scores[n:, 2] = 0.25  # a block of equal scores
    _assert_same_bytes(*_both(key, value, scores, torch.tensor([3, 0]), layout))


@pytest.mark.parametrize("n, d, num_kv_heads, preset", [(8, 16, 1, "vllm"), (24, 80, 2, "paged"),
                                                        (16, 128, 8, "vllm"), (128, 128, 1, "kv4"),
                                                        (40, 48, 5, "8/4"), (128, 64, 4, "kv2")])
@pytest.mark.parametrize("param_bits", [16, 8])  # fp16 or one-byte parameters
def test_odd_shapes(n, d, num_kv_heads, preset, param_bits):
    """Block sizes that are not multiples of 16 (quotas by ceil, tiers of odd sizes), head sizes 16 / 48 / 80,
    one to eight KV heads (MQA to GQA 8), one block to five."""
    bh, bl, r, rv = PRESETS[preset]
    layout = PageLayout(block_size=n, head_size=d, bits_high=bh, bits_low=bl, salient_ratio=r, value_salient_ratio=rv,
                        param_bits=param_bits)
    nb = 1 + n % 5
    key, value, scores = _random_blocks(nb, n, num_kv_heads, d, torch.bfloat16, torch.Generator().manual_seed(n + d))
    block_ids = torch.randperm(9, generator=torch.Generator().manual_seed(d))[:nb]
    _assert_same_bytes(*_both(key, value, scores, block_ids, layout))


def test_nan_scores_rank_as_the_twins():
    """NaN scores (torch's sort ranks them first, numpy's last) leave the twin's pages."""
    layout = PageLayout(block_size=32, head_size=64, salient_ratio=0.5, value_salient_ratio=0.5)
    key, value, scores = _random_blocks(2, 32, 2, 64, torch.bfloat16, torch.Generator().manual_seed(5))
    scores[[0, 7, 40], [0, 1, 1]] = float("nan")
    _assert_same_bytes(*_both(key, value, scores, torch.tensor([2, 6]), layout))


def test_mismatched_shapes_and_block_ids_raise_as_the_twin():
    """What the kernel would write out of bounds (it does not check) goes to the twin, which raises."""
    layout = PageLayout(block_size=16, head_size=64, salient_ratio=0.8, value_salient_ratio=0.2)
    key, value, scores = _random_blocks(2, 16, 2, 64, torch.float32, torch.Generator().manual_seed(6))
    cache = torch.zeros(3, 2, layout.page_bytes, dtype=torch.uint8)
    cases = [
        (key, value, scores, torch.tensor([1, 3]), cache),  # block id past the cache
        (key, value, scores, torch.tensor([1]), cache),  # rows for two blocks, one id
        (key, value, scores, torch.tensor([0, 1]), cache[:, :1]),  # a cache with fewer KV heads
        (key[..., :48], value[..., :48], scores, torch.tensor([0, 1]), cache),  # head size not the layout's
    ]
    for i, (k, v, s, ids, c) in enumerate(cases):
        with pytest.raises((ValueError, RuntimeError, IndexError)):
            cpu_compress.compress_store(k, v, s, ids, c, layout)
        assert not cache.any(), f"case {i} wrote"
    want, got = cache.clone(), cache.clone()  # pages shorter than the layout's: whatever the twin does
    paged.compress_store(key, value, scores, torch.tensor([0, 2]), want[:, :, :-8], layout)
    cpu_compress.compress_store(key, value, scores, torch.tensor([0, 2]), got[:, :, :-8], layout)
    _assert_same_bytes(want, got)


@pytest.mark.parametrize("param_bits", [16, 8])
def test_zero_minimums_of_both_signs(param_bits):
    """Key channels and value rows whose minimum is a zero of both signs (at random places), of -0 only, of +0 only:
    the twin's bytes, and (fp16 parameters) every zero minimum stored as +0 (quant.params_from_range)."""
    layout = PageLayout(block_size=32, head_size=64, salient_ratio=0.5, param_bits=param_bits)
    g = torch.Generator().manual_seed(7)
    h, nb = 2, 3
    key = torch.rand(nb * 32, h, 64, generator=g) + 0.5
    zeros = torch.where(torch.rand(nb * 32, h, generator=g) < 0.5, -0.0, 0.0)
    key[:, :, 3], key[:, :, 4], key[:, :, 5] = zeros, -0.0, 0.0
    value = torch.rand(nb * 32, h, 64, generator=g) + 0.5
    where = torch.rand(nb * 32, h, 64, generator=g) < 0.3
    value[where] = torch.where(torch.rand(nb * 32, h, 64, generator=g) < 0.5, -0.0, 0.0)[where]
    scores = torch.rand(nb * 32, h, generator=g)
    want, got = _both(key, value, scores, torch.tensor([4, 0, 7]), layout)
    _assert_same_bytes(want, got)
    if param_bits == 16:
        kp = got[[4, 0, 7], :, layout.k_param_off : layout.k_param_off + 8 * 64].contiguous().view(torch.float16)
        kmn = kp.view(3, h, 4, 64)[:, :, 1::2, 3:6]  # both groups' mn of channels 3-5: all zero
        assert torch.all(kmn == 0) and not torch.signbit(kmn).any()
        vmn = got[[4, 0, 7], :, layout.v_tok_off : layout.v_tok_off + 4 * 32].contiguous().view(torch.float16)
        vmn = vmn.view(3, h, 2, 32)[:, :, 1]
        assert (vmn == 0).sum() > 20 and not torch.signbit(vmn).any()


def test_fp16_rounding_matches_torch():
    """fp32 -> fp16 (the parameters): ties to even, subnormals, overflow, on every pattern of a few exponents
    around the boundaries and random patterns elsewhere."""
    ranges = [np.arange(a, a + (1 << 23), dtype=np.uint32) for a in (0x33000000, 0x38000000, 0x38800000, 0x47000000,
                                                                      0x477F0000 - (1 << 22))]
    rnd = np.random.default_rng(0).integers(0, 1 << 32, 1 << 22, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate(ranges + [rnd, np.array([0, 0x80000000, 0x7F800000, 0x477FF000, 0x477FEFFF], np.uint32)])
    x = bits.view(np.float32)
    finite = np.isfinite(x)
    want = torch.from_numpy(x[finite]).half().view(torch.int16).numpy().view(np.uint16)
    got = _f16_all(x[finite])
    np.testing.assert_array_equal(got, want)


@numba.njit  # not cached: numba's cache would not see a change to cpu_compress._f16_bits (another file)
def _f16_all(x):
    out = np.empty(x.shape[0], dtype=np.uint16)
    bits = x.view(np.uint32)
    for i in range(x.shape[0]):
        out[i] = cpu_compress._f16_bits(bits[i])
    return out


def test_refused_inputs_raise_as_the_twin():
    layout = PageLayout(block_size=16, head_size=64, salient_ratio=0.8, value_salient_ratio=0.2)
    key, value, scores = _random_blocks(1, 16, 2, 64, torch.float32, torch.Generator().manual_seed(2))
    cache = torch.zeros(2, 2, layout.page_bytes, dtype=torch.uint8)
    for bad in (float("nan"), float("inf"), 7e4):
        k = key.clone()
        k[3, 1, 5] = bad
        with pytest.raises(ValueError):
            cpu_compress.compress_store(k, value, scores, torch.tensor([1]), cache, layout)
    assert not cache.any()  # nothing written


def test_warmup_compiles_the_signature_the_step_uses():
    """The backend compiles the kernel at start-up; the step's bf16 blocks must then hit the same signature."""
    from zipcache_vllm.engine.ops import kernel_ops

    layout = PageLayout(block_size=16, head_size=32, salient_ratio=0.8, value_salient_ratio=0.2)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as while vLLM builds the model's layers
    try:
        cpu_compress.warmup(layout, 2)
    finally:
        torch.set_default_dtype(default)
    key, value, scores = _random_blocks(2, 16, 2, 32, torch.bfloat16, torch.Generator().manual_seed(4))
    kernel_ops("numba").compress_store(key, value, scores, torch.tensor([1, 3]), torch.zeros(4, 2, layout.page_bytes,
                                       dtype=torch.uint8), layout)
    assert len(cpu_compress._compress_blocks.signatures) == 1
