"""zipcache_attention on CPU against a dense reference that keeps every sequence in token order.

The reference holds, per sequence, the dequantized pages of its complete blocks (compressed with the same
scores it computes itself from full fp32 probability matrices) and the bf16 rest; it attends with a causal
mask in fp32. Batches are driven like vLLM drives the backend: a block allocator, block tables, slot mappings,
rows reordered between steps, mixed prefill chunks and decodes, blocks completing mid-chunk, a finished
request's blocks reused by a new one.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.block_manager import BlockManager
from zipcache_vllm.engine.decode import DecodeBatch
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.engine.staging import Staging
from zipcache_vllm.engine.step import prepare_step, zipcache_attention
from zipcache_vllm.method import rotation
from zipcache_vllm.method.config import Saliency, ZipCacheConfig
from zipcache_vllm.method.saliency import block_probe_offsets, block_saliency, num_block_probes, random_scores

# block size and head size (small: the twins are plain torch); 32-token blocks so that the per-block salient
# quotas (multiples of 16 rows, page layout v2) are neither 0 nor the whole block: saliency decides the pages
N, D = 32, 32
NUM_BLOCKS, NUM_SLOTS = 40, 6


class RefSeq:
    """One sequence of the dense reference: every token's bf16 query, key and value in token order, and the
    dequantized complete blocks."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int = D):
        self.q = torch.zeros(0, num_heads, head_size)
        self.k = torch.zeros(0, num_kv_heads, head_size)  # bf16 values as fp32, token order
        self.v = torch.zeros(0, num_kv_heads, head_size)
        self.ck = torch.zeros(0, num_kv_heads, head_size)  # dequantized complete blocks, token order
        self.cv = torch.zeros(0, num_kv_heads, head_size)

    def __len__(self):
        return self.k.shape[0]


def ref_step(seq: RefSeq, q, k, v, cfg: ZipCacheConfig, layout: PageLayout, scale: float):
    """Append; compress every block that became complete (scored by its own probes, the block rule); attend:
    query ``p`` over the dequantized blocks before its own and the bf16 tokens of its own block up to ``p``."""
    ctx, ql = len(seq), q.shape[0]
    if cfg.value_rotation:  # the engine stages and compresses bf16(v H), and rotates the outputs back
        v = rotation.rotate(v.bfloat16())
    seq.q = torch.cat([seq.q, q.float()])
    seq.k = torch.cat([seq.k, k.float()])
    seq.v = torch.cat([seq.v, v.float()])
    n, h = layout.block_size, k.shape[1]
    while len(seq) - seq.ck.shape[0] >= n:
        a = seq.ck.shape[0]
        if cfg.saliency is Saliency.RANDOM:  # the ablation: one draw, the same for every block
            s = random_scores(cfg, 1, h, n)[0].T
        else:
            off = block_probe_offsets(cfg, n, a // n)
            s = block_saliency(seq.q[a + off].unsqueeze(0), seq.k[a : a + n].unsqueeze(0), off.unsqueeze(0),
                               cfg.normalizer, cfg.saliency, scale)[0]
        cache = torch.zeros(1, h, layout.page_bytes, dtype=torch.uint8)
        paged.compress_store(
            seq.k[a : a + n].bfloat16(), seq.v[a : a + n].bfloat16(), s, torch.tensor([0]), cache, layout
        )
        dk, dv = paged.dequantize_pages(cache, torch.tensor([0]), layout)
        seq.ck = torch.cat([seq.ck, dk[0]])
        seq.cv = torch.cat([seq.cv, dv[0]])
    hq = q.shape[1]
    g = hq // h
    out = torch.empty(ql, hq, q.shape[2])
    for i, p in enumerate(range(ctx, ctx + ql)):
        start = p // n * n
        keys = torch.cat([seq.ck[:start], seq.k[start : p + 1]])
        vals = torch.cat([seq.cv[:start], seq.v[start : p + 1]])
        kk, vv = keys.repeat_interleave(g, 1).transpose(0, 1), vals.repeat_interleave(g, 1).transpose(0, 1)
        probs = torch.softmax(torch.matmul(q[i].float().unsqueeze(1), kk.transpose(1, 2)) * scale, -1)  # [Hq, 1, L]
        out[i] = torch.matmul(probs, vv)[:, 0]
    return rotation.rotate(out) if cfg.value_rotation else out


class Engine:
    """What vLLM does around the backend: block allocation, block tables, slot mappings, one layer."""

    def __init__(self, cfg, num_heads, num_kv_heads, layer_idx=3, batched=True, kernels="torch", device="cpu",
                 head_size=D, engine_decode=False, paged_attention=None):
        self.cfg, self.hq, self.h, self.layer_idx = cfg, num_heads, num_kv_heads, layer_idx
        self.d = head_size
        self.batched = batched  # one-token rows in the batched torch pass (else: every row via the twin)
        self.kernels = kernels  # "triton": the Triton kernels (CUDA, or the interpreter on CPU)
        self.paged_attention = paged_attention  # CPU chunks through this kernel (vLLM's: the backend's choice)
        self.dev = torch.device(device)
        self.n = n = cfg.block_size
        self.layout = PageLayout.from_config(cfg, head_size)
        # vLLM's view [num_blocks, H, N, C], flattened to pages as the backend does
        c = self.layout.page_bytes // n
        self.kv_view = torch.zeros(NUM_BLOCKS, num_kv_heads, n, c, dtype=torch.uint8, device=self.dev)
        # engine_decode: leading one-token rows through the engine's decode step (as the CUDA backend runs them),
        # with one more staging slot for padded rows
        p = num_block_probes(cfg, n)
        self.decode_batch = DecodeBatch(8, n, NUM_SLOTS, self.dev, num_probes=p) if engine_decode else None
        self.staging = Staging.allocate(NUM_SLOTS + engine_decode, n, num_kv_heads, head_size, num_heads, p,
                                        device=self.dev)
        self.bm = BlockManager(NUM_SLOTS, n)
        self.free = list(range(1, NUM_BLOCKS))  # block 0 is vLLM's null block
        random.Random(0).shuffle(self.free)
        self.blocks: dict[str, list[int]] = {}
        self.ref: dict[str, RefSeq] = {}
        self.scale = head_size**-0.5

    def finish(self, name):
        self.free.extend(self.blocks.pop(name))
        del self.ref[name]

    def step(self, work: list[tuple[str, int]], gen: torch.Generator, tokens=None):
        """``work``: (sequence, new tokens) in batch order. Returns (out, reference out) per token. ``tokens``:
        a function ``(name, start, count) -> (q, k, v)`` that fixes each position's inputs (default: random)."""
        rows, ctx_lens, qlens, slots = [], [], [], []
        for name, ql in work:
            if name not in self.ref:
                self.ref[name], self.blocks[name] = RefSeq(self.hq, self.h, self.d), []
            ctx = len(self.ref[name])
            need = -(-(ctx + ql) // self.n)
            while len(self.blocks[name]) < need:
                self.blocks[name].append(self.free.pop())
            b = self.blocks[name]
            slots += [b[p // self.n] * self.n + p % self.n for p in range(ctx, ctx + ql)]
            rows.append(b)
            ctx_lens.append(ctx)
            qlens.append(ql)
        width = max(len(r) for r in rows)
        block_table = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, r in enumerate(rows):
            block_table[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
        qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
        seq_lens = torch.tensor([c + q for c, q in zip(ctx_lens, qlens, strict=True)], dtype=torch.int32)
        t = int(qsl[-1])
        d = self.d
        if tokens is None:
            q = torch.randn(t, self.hq, d, generator=gen).bfloat16()
            k = (torch.randn(t, self.h, d, generator=gen) * torch.linspace(0.5, 4, d)).bfloat16()
            v = torch.randn(t, self.h, d, generator=gen).bfloat16()
        else:
            parts = [tokens(name, c, ql) for (name, ql), c in zip(work, ctx_lens, strict=True)]
            q, k, v = (torch.cat(x) for x in zip(*parts, strict=True))
        plan = self.bm.plan(block_table.tolist(), ctx_lens, qlens)
        dev = self.dev
        step = prepare_step(plan, qsl.to(dev), seq_lens, block_table if self.batched and dev.type == "cpu" else None,
                            decode_batch=self.decode_batch, block_table_rows=block_table.tolist(),
                            device_block_table=block_table.to(dev), config=self.cfg)
        out = zipcache_attention(
            q.to(dev), k.to(dev), v.to(dev), self.kv_view.flatten(2), block_table.to(dev), seq_lens.to(dev),
            qsl.to(dev), torch.tensor(slots, device=dev), self.staging, step, self.layout, self.cfg,
            layer_idx=self.layer_idx, scale=self.scale, out=torch.empty(t, self.hq, d, dtype=torch.float32, device=dev),
            kernels=self.kernels, paged_attention=self.paged_attention,
        ).cpu()
        ref = torch.cat([
            ref_step(self.ref[name], q[qsl[i]:qsl[i + 1]], k[qsl[i]:qsl[i + 1]], v[qsl[i]:qsl[i + 1]],
                     self.cfg, self.layout, self.scale)
            for i, (name, _) in enumerate(work)
        ])
        return out, ref

    def check_pages(self, name, max_mismatch=0.0):
        """The pages of a sequence's complete blocks dequantize to the reference's blocks (with the kernels:
        all but ``max_mismatch`` of the values, as fp32 probe sums in another order can flip a near-tie)."""
        seq = self.ref[name]
        nb = seq.ck.shape[0] // self.n
        if nb == 0:
            return
        ids = torch.tensor(self.blocks[name][:nb])
        dk, dv = paged.dequantize_pages(self.kv_view.flatten(2).cpu(), ids, self.layout)
        for got, want, what in ((dk, seq.ck, "keys"), (dv, seq.cv, "values")):
            got = got.reshape(-1, self.h, self.d)
            if max_mismatch:
                bad = ((got - want).abs() > 1e-3 * (1 + want.abs())).float().mean().item()
                assert bad <= max_mismatch, f"{what} of {name}: {bad:.2%} differ"
            else:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{what} of {name}")


CONFIGS = {
    "paged": ZipCacheConfig.load("paged", block_size=N),
    # the plugin's preset (separate key and value shares), at shares that give 32-token blocks 16 / 0 salient rows
    "vllm": ZipCacheConfig.load("vllm", block_size=N, salient_ratio=0.7),
    "probe_nnz": ZipCacheConfig.load("paged", block_size=N, normalizer="probe_nnz", probe_recent=0.2),
    "accumulated": ZipCacheConfig.load("paged", block_size=N, saliency="accumulated", salient_ratio=0.3),
    "random": ZipCacheConfig.load("paged", block_size=N, saliency="random"),
    # the `compact` preset's page format and value rotation: one-byte parameters, values in the Hadamard basis
    "compact": ZipCacheConfig.load("vllm", block_size=N, salient_ratio=0.7, param_bits=8, value_rotation=True),
}


def run(engine: Engine, schedule, seed=0, atol=2e-4, rtol=1e-4, max_mismatch=0.0):
    gen = torch.Generator().manual_seed(seed)
    for work in schedule:
        out, ref = engine.step(work, gen)
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=f"step {work}")
    for name in engine.ref:
        engine.check_pages(name, max_mismatch)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("num_heads, num_kv_heads", [(6, 2), (3, 3)])  # GQA 3:1 (SmolLM2's ratio), MHA
@pytest.mark.parametrize("batched, kernels, engine", [(True, "torch", False), (True, "numba", False),
                                                     (False, "torch", False), (False, "torch", True)],
                         ids=["batched", "numba", "twin", "engine"])
def test_mixed_prefill_and_decode_batches(cfg_name, num_heads, num_kv_heads, batched, kernels, engine):
    if kernels == "numba":
        pytest.importorskip("numba")
    e = Engine(CONFIGS[cfg_name], num_heads, num_kv_heads, batched=batched, kernels=kernels, engine_decode=engine)
    run(e, [
        [("a", 37), ("b", 20)],  # a: 1 block + 5 staged; b: 20 staged
        [("b", 1), ("c", 32), ("a", 1)],  # c: exactly 1 block, nothing staged; rows reordered
        *[[("a", 1), ("b", 1), ("c", 1)] for _ in range(12)],  # b's block completes at decode step 11
        [("c", 1), ("a", 1)],  # b idle this step
        [("b", 1), ("a", 1), ("c", 1)],
    ])


@pytest.mark.parametrize("cfg_name", ["paged", "probe_nnz"])
@pytest.mark.parametrize("kernels", ["torch", "numba"])
def test_chunked_prefill_blocks_complete_mid_chunk(cfg_name, kernels):
    if kernels == "numba":
        pytest.importorskip("numba")
    e = Engine(CONFIGS[cfg_name], 6, 2, kernels=kernels)
    run(e, [
        [("a", 20)],  # 20 staged
        [("a", 20), ("b", 3)],  # tail 20 + 20 = block 0 complete mid-chunk, 8 staged
        [("b", 1), ("a", 30)],  # a: 8 + 30 -> block 1 complete, 6 staged
        *[[("a", 1), ("b", 1)] for _ in range(15)],
        *[[("a", 1)] for _ in range(12)],  # a single row (no padding) over pages and a tail, to a full block
    ])


def vllm_cpu_attention(block_size, head_size):
    """vLLM's CPU attention kernel as the step's paged attention (what the CPU backend hands it)."""
    pytest.importorskip("vllm._C", reason="needs vLLM's CPU build")
    from zipcache_vllm.plugin.cpu_attention import CpuPagedAttention

    return CpuPagedAttention(block_size, head_size)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("num_heads, num_kv_heads", [(6, 2), (3, 3)])
def test_vllm_cpu_kernel_attends_the_block_rule(cfg_name, num_heads, num_kv_heads):
    """The chunks through vLLM's CPU kernel, every block a pseudo-request over the dequantized pages and its raw
    rows (``engine/step.py::block_requests``): the reference's outputs within bf16 rounding (pages rounded to
    bf16 before attention, outputs bf16; measured max error 0.016 at outputs up to ~2), pages exact. Mixed
    batches, blocks completing mid-chunk, a chunk over pages and a tail, two chunks in one call."""
    pytest.importorskip("numba")
    e = Engine(CONFIGS[cfg_name], num_heads, num_kv_heads, kernels="numba",
               paged_attention=vllm_cpu_attention(N, D))
    run(e, [
        [("a", 37), ("b", 20)],  # a: 1 block + 5 staged; b: 20 staged
        [("b", 1), ("c", 32), ("a", 1)],
        *[[("a", 1), ("b", 1), ("c", 1)] for _ in range(12)],  # b's block completes at decode step 11
        [("a", 40), ("c", 70), ("b", 1)],  # two chunks over pages and tails, blocks completing mid-chunk
        [("d", 1), ("b", 1), ("a", 1)],  # a one-token prompt
    ], atol=2e-2, rtol=1e-2)


def test_finished_request_blocks_are_reused():
    e = Engine(CONFIGS["paged"], 6, 2)
    gen_steps = [[("a", 21), ("b", 9)], [("a", 1), ("b", 1)], [("a", 1), ("b", 1)]]
    run(e, gen_steps)
    e.finish("a")  # a's blocks (one with 7 staged tokens) go back to the allocator unannounced
    e.free.reverse()  # ... and are handed out first
    run(e, [[("c", 23), ("b", 1)], *[[("b", 1), ("c", 1)] for _ in range(10)]], seed=1)


def test_single_token_prompt_and_exact_block_prompt():
    e = Engine(CONFIGS["paged"], 6, 2)
    run(e, [[("a", 1), ("b", N)], [("a", 1), ("b", 1)], [("b", 1), ("a", 1)]])


@pytest.mark.parametrize("head_size, bits", [(64, (4, 2)), (32, (8, 4)), (128, (2, 2))])
def test_fast_cpu_dequantize_is_bit_exact(head_size, bits):
    from zipcache_vllm.engine.cpu_decode import dequantize_pages_cpu

    lay = PageLayout(block_size=32, head_size=head_size, bits_high=bits[0], bits_low=bits[1], salient_ratio=0.6)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(5 * 32, 3, head_size, generator=gen).bfloat16()
    v = torch.randn(5 * 32, 3, head_size, generator=gen).bfloat16()
    cache = torch.zeros(7, 3, lay.page_bytes, dtype=torch.uint8)
    paged.compress_store(k, v, torch.rand(5 * 32, 3, generator=gen), torch.tensor([6, 1, 3, 2, 5]), cache, lay)
    ids = torch.tensor([3, 6, 5])
    want = paged.dequantize_pages(cache, ids, lay, order="page")
    got = dequantize_pages_cpu(cache, ids, lay)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


@pytest.mark.gpu
@pytest.mark.interpret
@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a CUDA device or TRITON_INTERPRET=1 (set by tests/kernels when collected)")
@pytest.mark.parametrize("num_heads, num_kv_heads", [(6, 2)])  # GQA 3:1; one case (the interpreter is slow)
@pytest.mark.parametrize("cfg_name, engine", [("paged", False), ("vllm", False), ("vllm", True)])
def test_triton_path(num_heads, num_kv_heads, cfg_name, engine):
    """The same batches through the Triton kernels (CUDA: fp16 tensor-core dots, so a looser tolerance), at
    SmolLM2's head size (the kernels take 64 and 128); ``engine``: decode rows through the engine's decode step
    (the CUDA backend's path: decode kernel, probe scores, saliency update, compress from the slots)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    e = Engine(CONFIGS[cfg_name], num_heads, num_kv_heads, kernels="triton", device=device, head_size=64,
               engine_decode=engine)
    run(e, [
        [("a", 37), ("b", 20)],
        [("b", 1), ("c", 32), ("a", 1)],
        *[[("a", 1), ("b", 1), ("c", 1)] for _ in range(12)],
        [("a", 20), ("b", 1)],  # a chunk over pages and a tail, completing a block mid-chunk
        [("b", 1), ("a", 1), ("c", 1)],
    ], atol=2e-2, rtol=2e-2, max_mismatch=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefill_layers_do_not_wait_for_the_gpu():
    """vLLM runs prefill eagerly, layer after layer: once a step's metadata is built (its first layer), a layer's
    call must not synchronise with the GPU (no device-to-host read, no pageable host-to-device copy), or the
    host's per-layer work adds to the GPU's instead of overlapping it. A prompt, then a chunk over its pages
    and tail, with a decode row next to it."""
    cfg = ZipCacheConfig.load("vllm", block_size=128)
    h, hq, d, n = 2, 8, 128, 128
    layout = PageLayout.from_config(cfg, d)
    dev = "cuda"
    kv = torch.zeros(16, h, layout.page_bytes, dtype=torch.uint8, device=dev)
    staging = Staging.allocate(4, n, h, d, hq, num_block_probes(cfg, n), device=dev)
    bm = BlockManager(4, n)
    tables = [[1, 2, 3, 4], [5, 6]]

    def step_call(context_lens, query_lens):
        t = sum(query_lens)
        q = torch.randn(t, hq, d, device=dev, dtype=torch.bfloat16)
        k, v = torch.randn(2, t, h, d, device=dev, dtype=torch.bfloat16)
        plan = bm.plan(tables, context_lens, query_lens)
        starts = [0]
        for x in query_lens:
            starts.append(starts[-1] + x)
        qsl = torch.tensor(starts, dtype=torch.int32)
        spans = list(zip(context_lens, query_lens, strict=True))
        seq_lens = torch.tensor([c + x for c, x in spans], dtype=torch.int32)
        slots = torch.tensor([tables[s][p // n] * n + p % n for s, (c, x) in enumerate(spans) for p in range(c, c + x)],
                             device=dev)  # fmt: skip
        step = prepare_step(plan, qsl, seq_lens, device=torch.device(dev))
        bt = torch.tensor([r + [0] * (4 - len(r)) for r in tables], dtype=torch.int32, device=dev)
        args = (q, k, v, kv, bt, seq_lens.to(dev), qsl.to(dev), slots, staging, step, layout, cfg)
        return lambda: zipcache_attention(*args, layer_idx=0, kernels="triton")

    step_call([0, 0], [300, 200])()  # prompts: pages, tails
    layer = step_call([300, 200], [200, 1])  # a chunk over pages + tail, a decode row
    layer()  # the step's first layer builds its metadata (host-to-device copies allowed)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer()
        layer()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("head_size, bits, ratios", [(64, (8, 4), (0.6, None)), (128, (2, 2), (0.5, 0.25)),
                                                     (32, (4, 2), (0.8, 0.2))])
def test_numba_decode_reads_the_codes(head_size, bits, ratios):
    """The numba decode over the codes (zipcache_vllm.engine.cpu_kernels) against the reference, at other widths,
    head sizes and separate key/value salient shares; odd batch shapes (one row, rows without pages)."""
    pytest.importorskip("numba")
    cfg = ZipCacheConfig.load("paged", block_size=N, bits_high=bits[0], bits_low=bits[1], salient_ratio=ratios[0],
                              value_salient_ratio=ratios[1])
    e = Engine(cfg, 4, 2, kernels="numba", head_size=head_size)
    run(e, [
        [("a", 35), ("b", 3)],
        *[[("a", 1), ("b", 1)] for _ in range(14)],  # b completes its first block
        [("c", 5)],
        *[[("b", 1)] for _ in range(3)],  # a single row over pages and a tail
        [("c", 1), ("a", 1), ("b", 1)],
    ])


def test_numba_decode_leaves_the_same_pages_and_staging_as_torch():
    """Step by step, the numba path leaves the same pages and the same staged tokens and probe queries as the
    batched torch path: outputs alone would not see a wrong page while the outputs stay close."""
    pytest.importorskip("numba")
    engines = [Engine(CONFIGS["vllm"], 6, 2, kernels=kern) for kern in ("torch", "numba")]
    schedule = [[("a", 37), ("b", 20)], *[[("a", 1), ("b", 1)] for _ in range(14)], [("b", 1)], [("a", 1)]]
    gens = [torch.Generator().manual_seed(0) for _ in engines]
    for work in schedule:
        outs = [e.step(work, gen)[0] for e, gen in zip(engines, gens, strict=True)]
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
        a, b = (e.staging for e in engines)
        for name in ("key", "value", "probe_query"):
            assert torch.equal(getattr(b, name), getattr(a, name)), f"staging {name} after {work}"
        assert torch.equal(engines[1].kv_view, engines[0].kv_view)


def _fixed_tokens(num_heads, num_kv_heads, length, seed=7, head_size=D):
    """The q, k, v of every position of one prompt, fixed: a chunking of the prompt sees the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(length, num_heads, head_size, generator=gen).bfloat16()
    k = (torch.randn(length, num_kv_heads, head_size, generator=gen) * torch.linspace(0.5, 4, head_size)).bfloat16()
    v = torch.randn(length, num_kv_heads, head_size, generator=gen).bfloat16()
    return lambda name, start, count: (q[start : start + count], k[start : start + count], v[start : start + count])


class _Tokens:
    """Sequence ``a``: the fixed tokens; any other: random ones (the rest of the batch)."""

    def __init__(self, fixed, gen, head_size=D):
        self.fixed, self.gen, self.d = fixed, gen, head_size

    def __call__(self, name, start, count):
        if name == "a":
            return self.fixed(name, start, count)
        g, d = self.gen, self.d
        return (torch.randn(count, 6, d, generator=g).bfloat16(), torch.randn(count, 2, d, generator=g).bfloat16(),
                torch.randn(count, 2, d, generator=g).bfloat16())


CHUNKINGS = {
    "one chunk": [165],
    "chunks of 7": [7] * 23 + [4],
    "uneven chunks": [13, 1, 50, 17, 24, 60],
    "token by token": [1] * 165,
    "prefill 40, then decode": [40] + [1] * 125,
}


_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("cfg_name", ["vllm", "paged", "accumulated"])
@pytest.mark.parametrize("kernels, engine", [("torch", False), ("numba", False), ("torch", True),
                                             pytest.param("triton", True, marks=_CUDA)],
                         ids=["batched", "numba", "engine", "triton"])  # fmt: skip
def test_pages_do_not_depend_on_chunking_or_batch(cfg_name, kernels, engine):
    """The page of a block is a function of the tokens up to its end alone (block rule): a prompt prefilled in
    one chunk, in chunks of sizes that are not multiples of the block, token by token (decode), or prefill then
    decode, gives bit-identical pages, whatever else is in the batch (a second sequence of random tokens
    with other chunks). ``engine``: one-token rows through the engine's decode step (the CUDA backend's);
    ``triton``: the CUDA kernels (head size 64), where a prompt's blocks and decode-completed ones are scored by
    the same kernel (the pages then match the reference's up to near-ties of the fp32 probe sums)."""
    if kernels == "numba":
        pytest.importorskip("numba")
    length = 165  # 5 complete blocks of 32, 5 tokens staged
    gpu = kernels == "triton"
    hd = 64 if gpu else D
    pages = {}
    for label, chunks in CHUNKINGS.items():
        e = Engine(CONFIGS[cfg_name], 6, 2, kernels=kernels, engine_decode=engine, device="cuda" if gpu else "cpu",
                   head_size=hd)  # fmt: skip
        tokens = _Tokens(_fixed_tokens(6, 2, length, head_size=hd), torch.Generator().manual_seed(len(chunks)), hd)
        for i, c in enumerate(chunks):
            work = [("a", c)] + ([("noise", 1 + (i * 5) % 11)] if i % 3 else [])
            e.step(work, tokens.gen, tokens=tokens)
        blocks = torch.tensor(e.blocks["a"][: length // N])
        pages[label] = e.kv_view[blocks].cpu()
        e.check_pages("a", max_mismatch=0.02 if gpu else 0.0)  # and they are the reference's
    first = next(iter(pages))
    for label, got in pages.items():
        assert torch.equal(got, pages[first]), f"{label} vs {first}: the pages differ"


@pytest.mark.parametrize("kernels, block_size, length", [("torch", 128, 700), ("numba", 128, 700), ("numba", 256, 700),
                                                        ("vllm", 128, 700), ("vllm", 256, 700), ("vllm", 128, 2200)])
def test_prefill_outputs_do_not_depend_on_chunking_or_batch(kernels, block_size, length):
    """Not only the pages: the attention output of every prompt row is bit-identical however the prompt is
    chunked and whatever else is in the batch (here one-token decode rows of another sequence), at the served
    block size 128 and SmolLM2's heads (9 / 3 x 64). The CPU path gives every row the same arithmetic: the
    block's whole key extent and query rows in aligned groups. The test can fail: with the key extent ending at
    the chunk's end (the code before) rows from position 1 on differ in the last bits; with the extent fixed but
    the query rows as the chunk gives them (``_QUERY_GROUP = 1``), rows 13, 14, 382 and 383. vLLM rounds the
    output to bf16, where such a bit can flip and move a 2-bit code of the next layer. One-token chunks are
    decode rows, another kernel: not part of this. At block size 256 a whole block's rows would be one call of
    more than 192 rows (another tile in torch's CPU flash attention): calls take at most 128 rows. ``vllm``: the
    chunks through vLLM's CPU kernel (the served default), block-aligned groups of rows, a kernel call each: there
    the rest of the batch is also a chunk of another prompt; at 2,200 tokens (18 blocks) requests of the chunk's
    rows only, all in one call, gave other bits (vLLM's kernel tiles a request by its shape from ~16 blocks of
    context on)."""
    if kernels != "torch":
        pytest.importorskip("numba")
    paged_attention = vllm_cpu_attention(block_size, 64) if kernels == "vllm" else None
    cfg = ZipCacheConfig.load("vllm", block_size=block_size)
    hq, h, d = 9, 3, 64
    fixed = _fixed_tokens(hq, h, length, head_size=d)
    outs = {}
    for chunks in ([length], [13, 2, 250, 17, 100, length - 382], [33] * (length // 33) + [length % 33],
                   [200, 200, length - 400]):
        e = Engine(cfg, hq, h, kernels="numba" if kernels == "vllm" else kernels, head_size=d,
                   paged_attention=paged_attention)
        gen = torch.Generator().manual_seed(len(chunks))

        def tokens(name, start, count, gen=gen):
            if name == "a":
                return fixed(name, start, count)
            return tuple(torch.randn(count, x, d, generator=gen).bfloat16() for x in (hq, h, h))

        got = []
        for i, c in enumerate(chunks):
            noise = 1 if paged_attention is None else 1 + 37 * (i % 3)  # a decode row, or a chunk in the same call
            work = [("a", c)] + ([("noise", noise)] if i % 2 else [])
            got.append(e.step(work, gen, tokens=tokens)[0][:c])
        outs[tuple(chunks)] = torch.cat(got)
    first = outs[(length,)]
    for chunks, got in outs.items():
        rows = (got != first).flatten(1).any(1).nonzero().flatten().tolist()
        assert not rows, f"chunks {chunks[:6]}: rows {rows[:8]} differ from the one-chunk prefill"


@pytest.mark.parametrize("kernels", ["numba", "vllm"])
def test_decode_outputs_do_not_depend_on_batch(kernels):
    """One-token rows too (the CPU decode, which the prefill test above leaves out): a prompt served alone, then
    decoded token by token, gives bit-identical attention outputs at every position when copies of it run in
    the same steps, staggered by a step, with prompts of the copies in the decode steps, and in other row
    orders (served at block size 128 with SmolLM2's heads, bf16 outputs as vLLM hands them). ``vllm``: the
    chunks through vLLM's CPU kernel, decode rows through numba (the served default). Not the torch twins'
    batched decode (``ZIPCACHE_KERNELS=torch``, or no numba): it pads the rows of a step to one key width, so
    its matmuls and softmax reduce over another length with more rows in the step (measured here: "together"
    differs from the prompt alone at position 18); numba computes every (row, KV head) pair on its own."""
    pytest.importorskip("numba")
    paged_attention = vllm_cpu_attention(128, 64) if kernels == "vllm" else None
    cfg = ZipCacheConfig.load("vllm", block_size=128)
    hq, h, d, prompt, steps = 9, 3, 64, 9, 12
    fixed = _fixed_tokens(hq, h, prompt + steps + 1, head_size=d)

    def served(schedule, names):
        e = Engine(cfg, hq, h, kernels="numba" if kernels == "vllm" else kernels, head_size=d,
                   paged_attention=paged_attention)
        pos, got = dict.fromkeys(names, 0), {nm: {} for nm in names}
        for work in schedule:
            out, _ = e.step(work, None, tokens=lambda name, start, count: fixed("a", start, count))
            row = 0
            for nm, c in work:
                for j in range(c):
                    got[nm][pos[nm] + j] = out[row + j].bfloat16()
                pos[nm], row = pos[nm] + c, row + c
        return got

    alone = served([[("a0", prompt)]] + [[("a0", 1)]] * steps, ["a0"])["a0"]
    names = ["a0", "a1", "a2"]
    schedules = {
        "together": [[(nm, prompt) for nm in names]] + [[(nm, 1) for nm in names]] * steps,
        "staggered": [[("a0", prompt)], [("a0", 1), ("a1", prompt), ("a2", prompt)]]
                     + [[(nm, 1) for nm in names]] * (steps - 1),
        "reordered": [[("a1", prompt), ("a0", prompt)], [("a2", prompt), ("a0", 1), ("a1", 1)]]
                     + [[(nm, 1) for nm in reversed(names)]] * (steps - 1),
    }  # fmt: skip
    for label, schedule in schedules.items():
        got = served(schedule, names)
        for nm in names:
            bad = [p for p, x in got[nm].items() if not torch.equal(x, alone[p])]
            assert not bad, f"{label}: {nm} differs from the prompt alone at positions {bad[:8]}"


def test_block_ids_kept_per_slot_mapping():
    """The pages of a step's completed blocks are computed by the first layer and reused by the layers that get
    the same ``slot_mapping`` tensor; another tensor (other slots) is computed anew."""
    from types import SimpleNamespace

    from zipcache_vllm.engine.step import _block_ids

    cp = SimpleNamespace(last_tok=torch.tensor([3, 7]))
    sm = torch.arange(100, 108)
    ids = _block_ids(cp, sm, 4)
    assert ids.tolist() == [25, 26]
    assert _block_ids(cp, sm, 4) is ids
    other = torch.arange(200, 208)
    assert _block_ids(cp, other, 4).tolist() == [50, 51]
