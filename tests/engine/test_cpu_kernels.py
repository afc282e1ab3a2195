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


def test_bf16_rounding_matches_torch():
    """fp32 -> bf16 (the CPU prefill's dequantized pages): random values, ties to even either way, values that
    round up into the next binade and to infinity, subnormals, signed zeros, infinities and NaN."""
    gen = torch.Generator().manual_seed(0)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F7FFFFF, 0x7F7FFFFF, 0x7F7F8000, 0x00008000,
                         0x00018000, 0x80000001, 0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 0xFFFFFFFF],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)  # fmt: skip
    x = torch.cat([torch.randn(4096, generator=gen) * 10 ** torch.randint(-30, 30, (4096,), generator=gen).float(),
                   ties, torch.tensor([0.0, -0.0])])
    got = np.empty(x.numel(), dtype=np.uint16)
    cpu_kernels._round_bf16(x.numpy(), got)
    want = x.bfloat16()
    got = torch.from_numpy(got.view(np.int16)).view(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))  # bit for bit, zeros' signs too


@pytest.mark.parametrize("head_size, bits, block_size", [(64, (4, 2), 128), (128, (4, 2), 32), (32, (8, 4), 32),
                                                         (128, (2, 2), 32)])
@pytest.mark.parametrize("param_bits", [16, 8])
def test_dequantize_pages_bf16_equals_the_torch_dequantization(head_size, bits, block_size, param_bits):
    """The numba dequantization of the CPU prefill (pages to bf16 rows for vLLM's kernel) equals the torch one
    rounded to bf16, bit for bit, pages in any order and repeated."""
    from zipcache_vllm.engine import paged
    from zipcache_vllm.engine.cpu_decode import dequantize_pages_cpu
    from zipcache_vllm.engine.layout import PageLayout

    n = block_size
    lay = PageLayout(block_size=n, head_size=head_size, bits_high=bits[0], bits_low=bits[1], salient_ratio=0.75,
                     value_salient_ratio=0.25, param_bits=param_bits)
    gen = torch.Generator().manual_seed(head_size)
    k = (torch.randn(5 * n, 3, head_size, generator=gen) * torch.linspace(0.5, 4, head_size)).bfloat16()
    v = torch.randn(5 * n, 3, head_size, generator=gen).bfloat16()
    cache = torch.zeros(7, 3, lay.page_bytes, dtype=torch.uint8)
    paged.compress_store(k, v, torch.rand(5 * n, 3, generator=gen), torch.tensor([6, 1, 3, 2, 5]), cache, lay)
    ids = torch.tensor([3, 6, 5, 3, 1])
    want = dequantize_pages_cpu(cache, ids, lay)
    got = cpu_kernels.dequantize_pages_bf16(cache, ids, lay)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16 and g.shape == w.shape
        assert torch.equal(g.view(torch.int16), w.bfloat16().view(torch.int16))


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
    assert len(cpu_kernels._dequantize_pages.signatures) == 1


def test_exp_is_within_one_ulp_of_float64():
    """The vectorizable exp of the softmax (logits minus their maximum, so x <= 0): ~1 ulp over the range where
    fp32 is normal; far below it stays a negligible tiny positive number instead of underflowing."""
    x = np.concatenate([np.linspace(-87, 0, 400_001), [-0.0, -1e-30, -88.0, -1e4, -np.inf]]).astype(np.float32)
    got = x.copy()
    cpu_kernels._exp_inplace(got, np.empty(x.size, dtype=np.uint32))
    want = np.exp(x.astype(np.float64))
    normal = x >= -87
    rel = np.abs(got[normal] - want[normal]) / want[normal]
    assert rel.max() < 2e-7, rel.max()
    assert np.all((got[~normal] >= 0) & (got[~normal] < 2e-38))


@pytest.mark.parametrize("lo, hi", [(0, 16), (0, 1), (3, 6), (5, 20), (0, 7)])  # whole passes of eight, remainders
@pytest.mark.parametrize("g", [1, 3])  # GQA ratios
def test_dot_rows(lo, hi, g):
    """The key dot products, eight rows per pass plus the remainder, against numpy."""
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 16, (20, 64)).astype(np.float32)
    qs = rng.standard_normal((g, 64)).astype(np.float32)
    bias = rng.standard_normal(g).astype(np.float32)
    dst = np.full((g, 24), np.nan, dtype=np.float32)
    cpu_kernels._dot_rows(buf, lo, hi, qs, g, dst, 2, np.float32(0.125), bias)
    want = (qs.astype(np.float64) @ buf[lo:hi].T + bias[:, None]) * 0.125
    np.testing.assert_allclose(dst[:, 2 : 2 + hi - lo], want, rtol=1e-5, atol=1e-5)
    assert np.isnan(dst[:, :2]).all() and np.isnan(dst[:, 2 + hi - lo :]).all()


@pytest.mark.parametrize("rows", [16, 1, 3, 7])  # whole passes of four, remainders
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("g, head_size", [(1, 64), (3, 64), (3, 128)])
def test_weighted_code_rows(rows, bits, g, head_size):
    """The value sums read straight from the packed codes (layout: byte i of a row holds channels i + j * D / m
    at bit j * bits), against numpy on the unpacked codes."""
    rng = np.random.default_rng(0)
    m, d = 8 // bits, head_size
    codes = rng.integers(0, 2**bits, (rows, d))
    packed = np.zeros((rows, d // m), dtype=np.uint8)
    for j in range(m):
        packed |= (codes[:, j * (d // m) : (j + 1) * (d // m)] << (j * bits)).astype(np.uint8)
    pg = np.concatenate([np.zeros(32, dtype=np.uint8), packed.reshape(-1)])
    w = rng.standard_normal((g, rows + 5)).astype(np.float32)
    acc = rng.standard_normal((g, d)).astype(np.float32)
    want = acc + w[:, 5:].astype(np.float64) @ codes
    cpu_kernels._weighted_code_rows(pg, 32, rows, bits, w, 5, g, acc)
    np.testing.assert_allclose(acc, want, rtol=1e-5, atol=1e-4)


# one row per case of a decode row: no pages (an empty and a 1-token tail), one page (no tail, a 1-token tail),
# several pages with a tail, a tail one short of a block
CONTEXTS = lambda n: [0, 1, n, n + 1, 2 * n + n // 2 + 3, 3 * n - 1]  # noqa: E731


def _decode_case(preset, block_size, head_size, num_heads, num_kv_heads, param_bits=16):
    """One layer's decode rows (CONTEXTS) over random compressed pages: the arguments of decode_attend(_codes)
    without ``out``, and the output shape."""
    from zipcache_vllm.engine import paged
    from zipcache_vllm.engine.block_manager import StepPlan
    from zipcache_vllm.engine.cpu_decode import build_index
    from zipcache_vllm.engine.layout import PageLayout
    from zipcache_vllm.engine.staging import Staging
    from zipcache_vllm.method.config import ZipCacheConfig

    n, d, h, hq = block_size, head_size, num_kv_heads, num_heads
    lay = PageLayout.from_config(ZipCacheConfig.load(preset, block_size=n, param_bits=param_bits), d)
    ctx = CONTEXTS(n)
    rows = len(ctx)
    gen = torch.Generator().manual_seed(0)
    pages = [c // n for c in ctx]
    width = max(pages) + 1
    cache = torch.zeros(rows * width + 1, h, lay.page_bytes, dtype=torch.uint8)
    block_table = torch.zeros(rows, width, dtype=torch.int32)
    for r in range(rows):
        block_table[r] = torch.arange(1 + r * width, 1 + (r + 1) * width)
    ids = torch.cat([block_table[r, : pages[r]].long() for r in range(rows)])
    t = ids.numel() * n
    k = (torch.randn(t, h, d, generator=gen) * torch.linspace(0.5, 4, d)).bfloat16()
    v = torch.randn(t, h, d, generator=gen).bfloat16()
    paged.compress_store(k, v, torch.rand(t, h, generator=gen), ids, cache, lay)
    tails = [c % n for c in ctx]
    plan = StepPlan(tail_slots=[r if tails[r] else -1 for r in range(rows)], tail_lens=tails,
                    new_tail_lens=[(c + 1) % n for c in ctx], block_size=n)
    index = build_index(plan, list(range(rows)), list(range(rows + 1)), ctx, block_table)
    staging = Staging.allocate(rows, n, h, d, hq, 1)
    staging.key.copy_(torch.randn(staging.key.shape, generator=gen))
    staging.value.copy_(torch.randn(staging.value.shape, generator=gen))
    q = torch.randn(rows, hq, d, generator=gen).bfloat16()
    k1, v1 = torch.randn(2, rows, h, d, generator=gen).bfloat16()
    return (q, k1, v1, cache, staging, index, lay, d**-0.5), (rows, hq, d)


@pytest.mark.parametrize("preset", ["vllm", "paged"])  # keys 0.8 / values 0.2 salient; r = 0.6 for both
@pytest.mark.parametrize("block_size", [16, 128])  # block 16: quotas of 0 or 16 rows (a region is empty)
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(3, 3), (9, 3)])  # GQA 1 and 3 (SmolLM2's)
@pytest.mark.parametrize("param_bits", [16, 8])  # fp16 or one-byte page parameters
def test_decode_rows_matches_the_torch_path(preset, block_size, head_size, num_heads, num_kv_heads, param_bits):
    """decode_attend_codes (numba, codes) against decode_attend (torch, dequantized pages) on one layer's decode
    rows: equal up to fp32 summation order."""
    from zipcache_vllm.engine.cpu_decode import decode_attend, decode_attend_codes

    args, shape = _decode_case(preset, block_size, head_size, num_heads, num_kv_heads, param_bits)
    outs = []
    for fn in (decode_attend, decode_attend_codes):
        out = torch.full(shape, float("nan"))
        fn(*args, out)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("preset, block_size, head_size", [("vllm", 128, 64), ("paged", 16, 128)])
def test_parallel_decode_does_not_depend_on_its_threads(preset, block_size, head_size, monkeypatch):
    """The (row, KV head) pairs shared among numba's threads (_decode_rows_parallel): the same bits on one thread
    and on two (a pair is computed the same way by any thread), and the serial loop's values up to fp32
    rounding (the two drivers are compiled separately: 4e-7 apart here; a server runs one of them throughout)."""
    from zipcache_vllm.engine.cpu_decode import decode_attend_codes

    args, shape = _decode_case(preset, block_size, head_size, 9, 3)
    outs = []
    for driver_threads, numba_threads in ((1, 1), (2, 1), (2, 2)):
        monkeypatch.setattr(cpu_kernels, "_THREADS", driver_threads)
        numba.set_num_threads(numba_threads)
        out = torch.full(shape, float("nan"))
        decode_attend_codes(*args, out)
        outs.append(out)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert torch.equal(outs[1], outs[2])
    torch.testing.assert_close(outs[1], outs[0], atol=2e-6, rtol=1e-5)
    assert len(cpu_kernels._decode_rows_parallel.signatures) == 1


def test_decode_threads_share_torchs_openmp_runtime():
    """decode_threads' verdict is the truth about the runtime, checked by counting threads in a fresh process that
    imports torch first (as vLLM's worker does): where it grants 2 threads, a 2-thread numba parallel region runs
    on torch's OpenMP workers (no thread is added) and torch's runtime is left without nested parallelism (numba
    switches it on when its layer starts: SDPA 20-50x slower with it on, benchmarks/probe_openmp_nesting.py);
    where it keeps one thread (numba bound to a second libgomp, as on the H200 host of 2026-12-05), the same region
    adds the second runtime's threads.
    One thread asked, one given."""
    import subprocess
    import sys

    code = (
        "import os, numpy as np, torch, numba\n"
        "torch.set_num_threads(2)\n"
        "torch.nn.functional.softmax(torch.randn(256, 8192), -1)  # torch's OpenMP workers exist from here\n"
        "from zipcache_vllm.engine import cpu_kernels\n"
        "print(cpu_kernels.decode_threads(1)[0])\n"
        "n, why = cpu_kernels.decode_threads(2)\n"
        "@numba.njit(parallel=True)\n"
        "def f(a):\n"
        "    s = 0.0\n"
        "    for i in numba.prange(a.shape[0]):\n"
        "        s += a[i]\n"
        "    return s\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "numba.set_num_threads(2)\n"
        "f(np.ones(1 << 20))\n"
        "added = len(os.listdir('/proc/self/task')) - before\n"
        "omp = cpu_kernels._torch_openmp()\n"
        "print(n, added, omp.omp_get_max_active_levels(), omp.omp_get_nested(), why)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert lines[0] == "1", run.stdout + run.stderr
    n, added, levels, nested = map(int, lines[1].split()[:4])
    if n == 2:
        assert (added, levels, nested) == (0, 1, 0), run.stdout
    else:
        assert n == 1 and added > 0 and "another OpenMP runtime" in lines[1], run.stdout + run.stderr
