"""The decode step as vLLM's CUDA builder runs it: 32 layers captured once in a CUDA graph, replayed over steps
in which sequences grow, blocks complete and are compressed, sequences finish and new ones take their rows
(their freed blocks reused), with vLLM's padding rows; every output, page and staged tail equals eager
execution of the same steps, bit for bit. GPU only (graph capture needs CUDA)."""

from __future__ import annotations

import random

import pytest
import torch

from zipcache_vllm.engine.block_manager import default_num_slots
from zipcache_vllm.engine.builder import StepBuilder
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.engine.staging import Staging
from zipcache_vllm.engine.step import zipcache_attention
from zipcache_vllm.engine.synthetic import admit, template_pages
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.method.saliency import num_block_probes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LAYERS, H, HQ, D, N = 32, 8, 32, 128, 128  # LLaMA3-8B attention geometry
ROWS, LIVE, NUM_BLOCKS, WIDTH = 8, 6, 400, 40


class Side:
    """One engine state: pages and staging of every layer, its StepBuilder, a device block table."""

    def __init__(self, layout, templates, cfg):
        self.num_slots = default_num_slots(ROWS)
        dev = "cuda"
        self.kv = [torch.zeros(NUM_BLOCKS, H, layout.page_bytes, dtype=torch.uint8, device=dev) for _ in range(LAYERS)]
        p = num_block_probes(cfg, N)
        self.staging = [Staging.allocate(self.num_slots + 1, N, H, D, HQ, p, device=dev) for _ in range(LAYERS)]
        self.builder = StepBuilder(self.num_slots, N, ROWS, dev, engine_decode=True, config=cfg)
        self.block_table = torch.zeros(ROWS, WIDTH, dtype=torch.int32, device=dev)
        self.templates = templates

    def admit(self, row, table, context_len, seed):
        admit(self.builder.block_manager, table, context_len, self.kv, self.staging, self.templates, seed)

    def attend(self, step, qs, ks, vs, outs, layout, cfg):
        dummy = torch.zeros(ROWS + 1, dtype=torch.int32, device="cuda")
        for layer in range(LAYERS):
            zipcache_attention(qs[layer], ks[layer], vs[layer], self.kv[layer], self.block_table, dummy[:ROWS], dummy,
                               dummy, self.staging[layer], step, layout, cfg, layer_idx=layer, scale=D**-0.5,
                               out=outs[layer], kernels="triton")


def test_captured_decode_step_replays_like_eager():
    cfg = ZipCacheConfig.load("vllm", block_size=N)
    layout = PageLayout.from_config(cfg, D)
    templates = [template_pages(16, H, layout, "cuda", seed=i) for i in range(LAYERS)]
    eager, graph = Side(layout, templates, cfg), Side(layout, templates, cfg)
    rng = random.Random(0)
    free = list(range(1, NUM_BLOCKS))
    rng.shuffle(free)
    seqs = []  # [table, length] per live row

    def new_seq(row, seed, length):
        table = [free.pop() for _ in range(WIDTH)]
        for side in (eager, graph):
            side.admit(row, table, length, seed)
        return [table, length]

    for row, length in enumerate([N - 3, 2 * N - 1, 17 * N + 120, 5 * N + 60, 9 * N, 30]):  # tails near full
        seqs.append(new_seq(row, row, length))
    # capture: warm up eagerly on dummy rows (compiles the kernels), then record 32 layers
    shape = lambda *s: torch.zeros(LAYERS, ROWS, *s, dtype=torch.bfloat16, device="cuda")  # noqa: E731
    qs, ks, vs, outs = shape(HQ, D), shape(H, D), shape(H, D), shape(HQ, D)
    cap = graph.builder.build_for_capture(ROWS, graph.block_table)
    graph.attend(cap, qs, ks, vs, outs, layout, cfg)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graph.attend(cap, qs, ks, vs, outs, layout, cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    completed = finished = 0
    for i in range(48):
        if i in (15, 31):  # a sequence finishes; its blocks go back and a new request takes its row
            row = 2 if i == 15 else 0
            free.extend(seqs[row][0])
            seqs[row] = new_seq(row, 100 + i, N - 10 if i == 15 else 3 * N - 5)
            finished += 1
        live = LIVE if i < 40 else LIVE - 2  # the last steps run with more padding rows
        qsl = torch.tensor(list(range(live + 1)) + [live] * (ROWS - live), dtype=torch.int32)
        seq_lens = torch.tensor([s[1] + 1 for s in seqs[:live]] + [0] * (ROWS - live), dtype=torch.int32)
        rows = [s[0] for s in seqs[:live]] + [[0] * WIDTH] * (ROWS - live)
        completed += sum((s[1] + 1) % N == 0 for s in seqs[:live])
        for side in (eager, graph):
            side.block_table.copy_(torch.tensor(rows, dtype=torch.int32))
        step_e = eager.builder.build(qsl, seq_lens, rows, eager.block_table)
        graph.builder.build(qsl, seq_lens, rows, graph.block_table)  # refills the buffers the graph reads
        q = torch.randn(LAYERS, ROWS, HQ, D, generator=gen, device="cuda").bfloat16()
        k = (torch.randn(LAYERS, ROWS, H, D, generator=gen, device="cuda") * 2).bfloat16()
        v = torch.randn(LAYERS, ROWS, H, D, generator=gen, device="cuda").bfloat16()
        want = torch.zeros_like(outs)
        eager.attend(step_e, q, k, v, want, layout, cfg)
        qs.copy_(q)
        ks.copy_(k)
        vs.copy_(v)
        g.replay()
        assert torch.equal(outs[:, :live], want[:, :live]), f"step {i}: graph output differs from eager"
        assert torch.isfinite(want[:, :live].float()).all()
        for s in seqs[:live]:
            s[1] += 1
    torch.cuda.synchronize()
    assert completed >= 4 and finished == 2
    for layer in range(LAYERS):
        assert torch.equal(graph.kv[layer], eager.kv[layer]), f"pages of layer {layer} differ"
        for name in ("key", "value", "probe_query"):
            a = getattr(graph.staging[layer], name)[: graph.num_slots]
            b = getattr(eager.staging[layer], name)[: eager.num_slots]
            assert torch.equal(a, b), f"staging {name} of layer {layer} differs"
