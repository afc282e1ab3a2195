"""The CUDA metadata builder and forward, driven through vLLM 0.32's own API on the CPU.

No GPU vLLM run is possible here (vLLM 0.32 for CUDA needs torch 2.13); what can be checked without one:
the builder declares the graph support and batch reordering vLLM reads, implements
``build_for_cudagraph_capture`` as vLLM calls it, and its steps (decodes through the engine's decode step,
vLLM's padded graph batches, mixed batches) give the same attention and pages as the CPU builder on the same
requests. The captured step itself runs on an H200 in tests/kernels/test_decode_graph.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from zipcache_vllm.engine.layout import PageLayout  # noqa: E402
from zipcache_vllm.plugin import backend  # noqa: E402

N, H, HQ, D = 32, 2, 6, 64
NUM_BLOCKS = 24


@pytest.fixture
def vllm_config(monkeypatch):
    cfg = VllmConfig()
    cfg.cache_config.block_size = N
    cfg.scheduler_config.max_num_seqs = 8
    object.__setattr__(cfg, "model_config", SimpleNamespace(dtype=torch.bfloat16, get_num_layers=lambda p: 1))
    monkeypatch.setattr(backend, "reserve_staging", lambda *a, **k: None)  # no KV budget to take it from
    monkeypatch.setattr(backend, "_state", {})
    monkeypatch.setattr(backend, "dummy_slots", lambda: 1)  # a CUDA host's staging: the CUDA builder's dummy slot
    return cfg


def _spec():
    return FullAttentionSpec(block_size=N, num_kv_heads=H, head_size=D, dtype=torch.bfloat16)


def test_cuda_builder_declares_what_vllm_reads(vllm_config):
    assert backend.ZipCacheCudaAttentionBackend.get_builder_cls() is backend.ZipCacheCudaMetadataBuilder
    b = backend.ZipCacheCudaMetadataBuilder(_spec(), ["l0"], vllm_config, torch.device("cpu"))
    support = b.get_cudagraph_support(vllm_config, _spec())
    assert support == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    assert b.reorder_batch_threshold == 1  # decodes first
    cpu = backend.ZipCacheMetadataBuilder(_spec(), ["l0"], vllm_config, torch.device("cpu"))
    assert cpu.get_cudagraph_support(vllm_config, _spec()) == AttentionCGSupport.NEVER


class Side:
    """One builder + impl pair over its own KV cache, fed vLLM's CommonAttentionMetadata."""

    def __init__(self, builder_cls, vllm_config, layout):
        with set_current_vllm_config(vllm_config):
            self.builder = builder_cls(_spec(), ["model.layers.0.self_attn.attn"], vllm_config, torch.device("cpu"))
            self.impl = backend.ZipCacheAttentionImpl(HQ, D, D**-0.5, H, None, None, "auto")
        self.kv_cache = torch.zeros(NUM_BLOCKS, H, N, layout.state_content_bytes, dtype=torch.uint8)
        self.layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")

    def step(self, cm, q, k, v, capture_first=False):
        if capture_first:  # vLLM captures graphs between steps: capture metadata must not disturb the plan
            self.builder.build_for_cudagraph_capture(cm)
        md = self.builder.build(0, cm)
        out = torch.zeros_like(q)
        self.impl.forward(self.layer, q, k, v, self.kv_cache, md, out)
        return out


def _metadata(ctx_lens, qlens, tables, pad_to=0):
    """vLLM's CommonAttentionMetadata of one step; ``pad_to`` adds graph padding rows (query length 0, seq_len
    0, null block table rows, padded tokens)."""
    real = len(qlens)
    n = max(real, pad_to)
    qsl = [0]
    for ql in qlens:
        qsl.append(qsl[-1] + ql)
    tokens = qsl[-1] + (n - real)  # one padded token per padded row (uniform decode)
    qsl += [qsl[-1]] * (n - real)
    seq = [c + q for c, q in zip(ctx_lens, qlens, strict=True)] + [0] * (n - real)
    width = max(len(t) for t in tables)
    bt = torch.zeros(n, width, dtype=torch.int32)
    slots = []
    for i, (c, ql, t) in enumerate(zip(ctx_lens, qlens, tables, strict=True)):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        slots += [t[p // N] * N + p % N for p in range(c, c + ql)]
    slots += [-1] * (n - real)
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl_t, query_start_loc_cpu=qsl_t.clone(), seq_lens=torch.tensor(seq, dtype=torch.int32),
        num_reqs=n, num_actual_tokens=tokens, max_query_len=max(qlens), max_seq_len=max(seq),
        block_table_tensor=bt, slot_mapping=torch.tensor(slots, dtype=torch.int64),
    )


def test_cuda_builder_steps_match_the_cpu_builder(vllm_config):
    """Prefill, then decode steps as vLLM runs them under graphs (padded to 4 rows, a capture build between
    steps), blocks completing during decode, and a mixed step with a new prompt behind the decodes."""
    with set_current_vllm_config(vllm_config):
        layout = PageLayout.from_config(backend.resolve_config(N), D)
    cpu = Side(backend.ZipCacheMetadataBuilder, vllm_config, layout)
    cuda = Side(backend.ZipCacheCudaMetadataBuilder, vllm_config, layout)
    gen = torch.Generator().manual_seed(0)
    tables = {"a": [3, 7, 1], "b": [5, 2], "c": [9, 11]}
    lens = {"a": 0, "b": 0, "c": 0}
    schedule = [[("a", 40), ("b", 20)]] + [[("a", 1), ("b", 1)]] * 14 + [[("a", 1), ("b", 1), ("c", 33)]]
    schedule += [[("b", 1), ("a", 1), ("c", 1)]] * 12
    for i, work in enumerate(schedule):
        names = [w[0] for w in work]
        qlens = [w[1] for w in work]
        ctx = [lens[n] for n in names]
        t = sum(qlens)
        decode_only = all(ql == 1 for ql in qlens)
        pad = 4 if decode_only else 0
        rows = max(t, pad)
        q = torch.randn(rows, HQ, D, generator=gen).bfloat16()
        k = (torch.randn(rows, H, D, generator=gen) * torch.linspace(0.5, 3, D)).bfloat16()
        v = torch.randn(rows, H, D, generator=gen).bfloat16()
        want = cpu.step(_metadata(ctx, qlens, [tables[n] for n in names]), q[:t], k[:t], v[:t])
        got = cuda.step(_metadata(ctx, qlens, [tables[n] for n in names], pad_to=pad), q, k, v,
                        capture_first=decode_only and i % 3 == 0)
        torch.testing.assert_close(got[:t].float(), want.float(), atol=2e-2, rtol=2e-2, msg=f"step {i}: {work}")
        for n, ql in work:
            lens[n] += ql
    assert lens == {"a": 67, "b": 47, "c": 45}
    for name, blocks in (("a", tables["a"][:2]), ("b", tables["b"][:1]), ("c", tables["c"][:1])):
        ids = torch.tensor(blocks)
        ours = cuda.kv_cache.flatten(2)[ids]
        ref = cpu.kv_cache.flatten(2)[ids]
        same = (ours == ref).float().mean().item()
        assert same > 0.97, f"pages of {name}: {same:.1%} of bytes equal"  # fp32 sums in another order
