"""Served decode tokens/s at equal KV memory on one GPU: ZipCache pages vs a bf16 cache, a LLaMA3-8B-shaped model.

    PYTHONPATH=. python benchmarks/bench_serving_gpu.py --commit $(git rev-parse --short HEAD) \\
        --out benchmarks/results/h200_serving.json
    PYTHONPATH=. python benchmarks/bench_serving_gpu.py --quick --out /tmp/serving.json   # 2 layers, smoke
    python benchmarks/bench_serving_gpu.py --plot-from benchmarks/results/h200_serving.json \\
        --plot docs/images/h200_serving.png                                               # no GPU needed

``kernels/`` must be importable as ``zipcache_vllm.kernels`` (``pip install -e .``, or on a bare machine a link
``ln -s ../kernels zipcache_vllm/kernels``).

**Model**: 32 layers of LLaMA3-8B shape (hidden 4096, 32 query / 8 KV heads of 128, SwiGLU 14336, vocab 128256),
random bf16 weights (16 GB), RMSNorm, RoPE; greedy sampling on the GPU (tokens never leave the device).

**Serving loop** (continuous batching of decodes): under a fixed KV memory budget (``--kv-budget-gib``, 40 GiB)
each cache runs as many concurrent sequences as the budget holds at the longest length a request reaches
(``context + decode_len``; ZipCache also pays its bf16 staging: one slot per sequence plus the plugin's spare
slots, and the dummy slot, in every layer). Every request has a ``context``-token prompt and decodes
``decode_len`` tokens; at the start the requests are staggered over their decode (as in a server that has run
for a while); a finished request leaves its row to a new one at once. Every step is one decode token for every
sequence, as one CUDA graph of the whole 32-layer forward:

* ``zipcache``: the vLLM backend's own code path: :class:`~zipcache_vllm.engine.builder.StepBuilder` (the
  staging plan and the decode rows' persistent metadata, once per step on the host), then
  :func:`zipcache_vllm.engine.step.zipcache_attention` per layer, i.e. the engine's decode step (decode kernel v2,
  staging of probe queries, block-rule scores and compression of the blocks that complete, from a fixed-size
  work list);
* ``bf16``: K/V in contiguous per-sequence rows of a bf16 cache and FlashAttention-2's varlen kernel (torch's
  ``_flash_attention_forward`` with ``seqused_k``), which reads only each sequence's tokens: at least as fast
  as any paged bf16 kernel can be. The run checks it against SDPA on contiguous K/V of equal lengths
  (``baseline_check``).

**Not measured**: prefill. An arriving request's context is written directly (ZipCache: pages copied from a
pool of compressed random blocks and a random bf16 tail, ``zipcache_vllm.engine.synthetic``; bf16: the data
left in its row), without attention; the GPU time of those copies falls inside ZipCache's steps, their host
time is reported apart (``admit_ms``). Prefill cost is the prefill issue's benchmark.

**Reported** per (context, cache): ``num_seqs``, ``decode_tokens_per_s`` (tokens over the wall time of the
measured steps), ``step_ms`` (median; ``step_ms_p99``), from CUDA events between consecutive step starts, so a
host that falls behind shows up; ``host_ms``: host time per step of metadata building and the graph launch
(median); ``cuda_graph`` true. Steps are pipelined as in vLLM: the host does not wait for a step's tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from zipcache_vllm.engine.block_manager import default_num_slots
from zipcache_vllm.engine.builder import StepBuilder
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.engine.staging import Staging
from zipcache_vllm.engine.step import zipcache_attention
from zipcache_vllm.engine.synthetic import admit, template_pages
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.method.saliency import num_block_probes

sys.path.insert(0, str(Path(__file__).parent))
from _timing import graph_time_us  # noqa: E402

GIB = 2**30


class Shape:
    def __init__(self, layers=32, hidden=4096, heads=32, kv_heads=8, head_size=128, inter=14336, vocab=128256):
        self.layers, self.hidden, self.heads, self.kv_heads = layers, hidden, heads, kv_heads
        self.head_size, self.inter, self.vocab = head_size, inter, vocab


class Model:
    """Random-weight LLaMA-shaped decoder for one-token steps; ``attention(layer, q, k, v) -> [B, Hq, D]``."""

    def __init__(self, s: Shape, max_pos: int, seed=0):
        self.s = s
        g = torch.Generator(device="cuda").manual_seed(seed)
        w = lambda *shape: (torch.randn(*shape, generator=g, device="cuda") * 0.02).bfloat16()  # noqa: E731
        qkv = (s.heads + 2 * s.kv_heads) * s.head_size
        self.embed = w(s.vocab, s.hidden)
        self.layers = [(w(s.hidden, qkv), w(s.heads * s.head_size, s.hidden), w(s.hidden, 2 * s.inter),
                        w(s.inter, s.hidden)) for _ in range(s.layers)]  # fmt: skip
        self.lm_head = w(s.hidden, s.vocab)
        inv = 1.0 / (500000.0 ** (torch.arange(0, s.head_size, 2, device="cuda").float() / s.head_size))
        ang = torch.arange(max_pos, device="cuda").float()[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos(), ang.sin()

    @staticmethod
    def _norm(x):
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()

    def _rope(self, x, cos, sin):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).bfloat16()

    def forward(self, tokens, positions, attention):
        s = self.s
        b = tokens.shape[0]
        x = self.embed[tokens]
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        for i, (wqkv, wo, wgu, wd) in enumerate(self.layers):
            qkv = self._norm(x) @ wqkv
            q = qkv[:, : s.heads * s.head_size].view(b, s.heads, s.head_size)
            k = qkv[:, s.heads * s.head_size : (s.heads + s.kv_heads) * s.head_size].view(b, s.kv_heads, s.head_size)
            v = qkv[:, (s.heads + s.kv_heads) * s.head_size :].view(b, s.kv_heads, s.head_size)
            o = attention(i, self._rope(q, cos, sin), self._rope(k, cos, sin), v.contiguous())
            x = x + o.reshape(b, -1) @ wo
            gate, up = (self._norm(x) @ wgu).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ wd
        tokens.copy_((self._norm(x) @ self.lm_head).argmax(-1))


# ------------------------------------------------------------------------------------------------ caches
class Upload:
    """int64 ``[rows, cols]`` device buffer refilled each step from two pinned host buffers used in turn (the
    host may run a step ahead of the GPU: a buffer is rewritten only after its last copy has run)."""

    def __init__(self, rows: int, cols: int):
        self.dev = torch.zeros(rows, cols, dtype=torch.int64, device="cuda")
        self.host = [torch.zeros(rows, cols, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.events = [None, None]
        self.turn = 0

    def put(self, rows) -> None:
        if self.events[self.turn] is not None:
            self.events[self.turn].synchronize()
        host = self.host[self.turn]
        host.copy_(torch.tensor(rows, dtype=torch.int64))
        self.dev.copy_(host, non_blocking=True)
        self.events[self.turn] = torch.cuda.Event()
        self.events[self.turn].record()
        self.turn ^= 1


class Bf16Cache:
    """Contiguous per-sequence K/V rows; decode attention by FlashAttention-2 varlen with ``seqused_k``."""

    def __init__(self, s: Shape, num_seqs: int, max_len: int):
        self.s, self.b, self.max_len = s, num_seqs, max_len
        shape = (num_seqs * max_len, s.kv_heads, s.head_size)
        g = torch.Generator(device="cuda").manual_seed(1)
        self.k = [torch.randn(shape, generator=g, device="cuda").bfloat16() for _ in range(s.layers)]
        self.v = [torch.randn(shape, generator=g, device="cuda").bfloat16() for _ in range(s.layers)]
        self.meta = Upload(2, num_seqs)  # write index, seqused_k
        self.cu_q = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
        self.cu_k = self.cu_q * max_len
        self.used = torch.zeros(num_seqs, dtype=torch.int32, device="cuda")
        self.write = self.meta.dev[0]

    @staticmethod
    def bytes_per_seq(s: Shape, max_len: int) -> int:
        return max_len * s.layers * 2 * s.kv_heads * s.head_size * 2

    def prepare(self, lengths):  # lengths before the step
        self.meta.put([[r * self.max_len + n for r, n in enumerate(lengths)], [n + 1 for n in lengths]])

    def attention(self, layer, q, k, v):
        self.k[layer].index_copy_(0, self.write, k)
        self.v[layer].index_copy_(0, self.write, v)
        self.used.copy_(self.meta.dev[1])
        return flash_varlen(q, self.k[layer], self.v[layer], self.cu_q, self.cu_k, self.max_len, self.used)


def flash_varlen(q, k, v, cu_q, cu_k, max_k, used):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 1, max_k, 0.0, False, False,
                                                   scale=q.shape[-1] ** -0.5, seqused_k=used)[0]


class ZipCache:
    """The vLLM backend's decode path: StepBuilder metadata + zipcache_attention per layer."""

    def __init__(self, s: Shape, num_seqs: int, max_len: int, cfg: ZipCacheConfig):
        self.s, self.b, self.cfg = s, num_seqs, cfg
        self.layout = PageLayout.from_config(cfg, s.head_size)
        n = self.layout.block_size
        self.width = -(-max_len // n)
        self.num_slots = default_num_slots(num_seqs)
        num_blocks = num_seqs * self.width + 1  # block 0: vLLM's null block
        self.kv = [torch.zeros(num_blocks, s.kv_heads, self.layout.page_bytes, dtype=torch.uint8, device="cuda")
                   for _ in range(s.layers)]  # fmt: skip
        p = num_block_probes(cfg, n)
        self.staging = [Staging.allocate(self.num_slots + 1, n, s.kv_heads, s.head_size, s.heads, p, device="cuda")
                        for _ in range(s.layers)]  # fmt: skip
        self.builder = StepBuilder(self.num_slots, n, num_seqs, "cuda", engine_decode=True, config=cfg)
        self.templates = [template_pages(32, s.kv_heads, self.layout, "cuda", seed=i) for i in range(s.layers)]
        self.block_table = torch.zeros(num_seqs, self.width, dtype=torch.int32, device="cuda")
        self.tables = [list(range(1 + r * self.width, 1 + (r + 1) * self.width)) for r in range(num_seqs)]
        self.block_table.copy_(torch.tensor(self.tables, dtype=torch.int32))
        self.qsl = torch.arange(num_seqs + 1, dtype=torch.int32)
        self.out = torch.empty(num_seqs, s.heads, s.head_size, dtype=torch.bfloat16, device="cuda")
        self.dummy = torch.zeros(num_seqs + 1, dtype=torch.int32, device="cuda")
        self.step = self.builder.build_for_capture(num_seqs, self.block_table)
        self.seed = 0

    @staticmethod
    def bytes_for(s: Shape, num_seqs: int, max_len: int, layout: PageLayout, cfg: ZipCacheConfig) -> int:
        pages = num_seqs * -(-max_len // layout.block_size) * s.layers * s.kv_heads * layout.page_bytes
        slots = (default_num_slots(num_seqs) + 1) * s.layers
        p = num_block_probes(cfg, layout.block_size)
        return pages + slots * Staging.bytes_per_slot(layout.block_size, s.kv_heads, s.head_size, s.heads, p)

    def admit(self, row, context_len):
        """A new request in ``row``: its blocks are the row's (vLLM would hand out others; same cost)."""
        self.seed += 1
        admit(self.builder.block_manager, self.tables[row], context_len, self.kv, self.staging, self.templates,
              self.seed)

    def prepare(self, lengths):
        seq_lens = torch.tensor(lengths, dtype=torch.int32) + 1
        self.builder.build(self.qsl, seq_lens, self.tables, self.block_table)

    def attention(self, layer, q, k, v):
        return zipcache_attention(q, k, v, self.kv[layer], self.block_table, self.dummy[:-1], self.dummy,
                                  self.dummy, self.staging[layer], self.step, self.layout, self.cfg,
                                  layer_idx=layer, scale=self.s.head_size**-0.5, out=self.out, kernels="triton")


# ------------------------------------------------------------------------------------------------ the loop
def fit(budget: int, per_seq) -> int:
    b = 0
    while per_seq(b + 1) <= budget:
        b += 1
    return b


def run_case(model: Model, s: Shape, cache_name: str, context: int, decode_len: int, budget: int, warmup: int,
             steps: int, cfg: ZipCacheConfig) -> dict:  # fmt: skip
    max_len = context + decode_len
    layout = PageLayout.from_config(cfg, s.head_size)
    if cache_name == "bf16":
        num_seqs = fit(budget, lambda b: b * Bf16Cache.bytes_per_seq(s, max_len))
        cache = Bf16Cache(s, num_seqs, max_len)
    else:
        num_seqs = fit(budget, lambda b: ZipCache.bytes_for(s, b, max_len, layout, cfg))
        cache = ZipCache(s, num_seqs, max_len, cfg)
    rng = random.Random(context)
    done = [rng.randrange(decode_len) for _ in range(num_seqs)]  # staggered: tokens decoded so far
    lengths = [context + d for d in done]
    if cache_name == "zipcache":
        for r in range(num_seqs):
            cache.admit(r, lengths[r])
    tokens = torch.randint(0, s.vocab, (num_seqs,), device="cuda")
    positions = Upload(1, num_seqs)
    graph = torch.cuda.CUDAGraph()
    cache.prepare(lengths)  # a real step's metadata for the warm-up run (compiles every kernel)
    model.forward(tokens, positions.dev[0], cache.attention)
    torch.cuda.synchronize()
    if cache_name == "zipcache":  # the warm-up step changed the staging: replay it as the first step instead
        cache.step = cache.builder.build_for_capture(num_seqs, cache.block_table)
    with torch.cuda.graph(graph):
        model.forward(tokens, positions.dev[0], cache.attention)
    torch.cuda.synchronize()
    if cache_name == "zipcache":
        lengths = [n + 1 for n in lengths]
        done = [d + 1 for d in done]
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(warmup + steps + 1)]
    host_ms, admit_ms, finished = [], [], 0
    t_begin = None
    for i in range(warmup + steps):
        if i >= 1:  # the host stays at most one step ahead of the GPU (as vLLM's async scheduling); waiting is not
            starts[i - 1].synchronize()  # host work, so it is left out of host_ms
        for r in range(num_seqs):  # finished requests leave their row to a new one
            if done[r] >= decode_len:
                ta = time.perf_counter()
                done[r], lengths[r] = 0, context
                if cache_name == "zipcache":
                    cache.admit(r, context)
                admit_ms.append((time.perf_counter() - ta) * 1e3)
                finished += 1
        t1 = time.perf_counter()
        positions.put([lengths])
        cache.prepare(lengths)
        starts[i].record()
        if i == warmup:
            t_begin = time.perf_counter()
        graph.replay()
        if i >= warmup:
            host_ms.append((time.perf_counter() - t1) * 1e3)
        lengths = [n + 1 for n in lengths]
        done = [d + 1 for d in done]
    starts[-1].record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t_begin
    step_ms = [starts[i].elapsed_time(starts[i + 1]) for i in range(warmup, warmup + steps)]
    gpu_total = starts[warmup].elapsed_time(starts[-1]) / 1e3
    rec = {
        "context": context, "cache": cache_name, "kv_budget_gib": budget / GIB, "num_seqs": num_seqs,
        "decode_len": decode_len, "steps": steps,
        "decode_tokens_per_s": num_seqs * steps / gpu_total,
        "decode_tokens_per_s_host_wall": num_seqs * steps / wall,
        "step_ms": statistics.median(step_ms), "step_ms_p99": sorted(step_ms)[min(len(step_ms) - 1,
                                                                                    int(0.99 * len(step_ms)))],
        "host_ms": statistics.median(host_ms), "host_ms_p99": sorted(host_ms)[int(0.99 * (len(host_ms) - 1))],
        "admit_ms": statistics.mean(admit_ms) if admit_ms else 0.0, "requests_finished": finished,
        "cuda_graph": True,
        "kv_bytes": (num_seqs * Bf16Cache.bytes_per_seq(s, max_len) if cache_name == "bf16"
                     else ZipCache.bytes_for(s, num_seqs, max_len, layout, cfg)),
    }  # fmt: skip
    if cache_name == "bf16":
        # the same batch at the loop's mean length: the baseline's attention against SDPA on contiguous K/V; the
        # bound replaces the former by the latter in every layer of every step (an upper bound for bf16)
        check = rec["baseline_check"] = baseline_check(s, num_seqs, context + decode_len // 2)
        saved_ms = max(0.0, check["varlen_flash_us"] - check["sdpa_us"]) * s.layers / 1e3
        rec["decode_tokens_per_s_sdpa_bound"] = num_seqs / ((gpu_total / steps) * 1e3 - saved_ms) * 1e3
    del graph, cache
    torch.cuda.empty_cache()
    return rec


def baseline_check(s: Shape, b: int, context: int) -> dict:
    """One layer's decode attention, ``b`` sequences of ``context`` tokens: the baseline's varlen FlashAttention
    against SDPA on contiguous K/V (``[b, heads, context, head_size]``), CUDA-graph replays, median of 20."""
    q = torch.randn(b, s.heads, s.head_size, device="cuda").bfloat16()
    k = torch.randn(b * context, s.kv_heads, s.head_size, device="cuda").bfloat16()
    v = torch.randn_like(k)
    cu_q = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    used = torch.full((b,), context, dtype=torch.int32, device="cuda")
    kk, vv = (x.view(b, context, s.kv_heads, s.head_size).transpose(1, 2) for x in (k, v))
    qq = q.view(b, s.heads, 1, s.head_size)

    def ours():
        return flash_varlen(q, k, v, cu_q, cu_q * context, context, used)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)

    a, ref = ours(), sdpa()
    err = (a.float() - ref.view(b, s.heads, s.head_size).float()).abs().max().item()
    res = {"batch": b, "context": context, "max_abs_err": err}
    for name, fn in (("varlen_flash_us", ours), ("sdpa_us", sdpa)):
        res[name] = graph_time_us(fn)
    return res


# ------------------------------------------------------------------------------------------------ report
def table(records) -> str:
    head = "| context | cache | sequences | decode tok/s | vs bf16 (SDPA bound) | step ms (median / p99) | host ms |"
    lines = [head + " graph |", "|---|---|---|---|---|---|---|---|"]
    base = {r["context"]: r.get("decode_tokens_per_s_sdpa_bound", r["decode_tokens_per_s"]) for r in records
            if r["cache"] == "bf16"}
    for r in records:
        ratio = r["decode_tokens_per_s"] / base[r["context"]] if r["context"] in base else float("nan")
        tps = f"{r['decode_tokens_per_s']:.0f}"
        if "decode_tokens_per_s_sdpa_bound" in r:
            tps += f" (bound {r['decode_tokens_per_s_sdpa_bound']:.0f})"
        lines.append(f"| {r['context']} | {r['cache']} | {r['num_seqs']} | {tps} | "
                     f"{ratio:.2f}x | {r['step_ms']:.2f} / {r['step_ms_p99']:.2f} | {r['host_ms']:.2f} | "
                     f"{'yes' if r['cuda_graph'] else 'no'} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = results["records"]
    contexts = sorted({r["context"] for r in recs})
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for j, (key, label) in enumerate((("decode_tokens_per_s", "decode tokens/s"), ("num_seqs", "sequences"))):
        for k, cache in enumerate(("bf16", "zipcache")):
            vals = [next((r[key] for r in recs if r["context"] == c and r["cache"] == cache), 0) for c in contexts]
            xs = [i + (k - 0.5) * 0.38 for i in range(len(contexts))]
            bars = ax[j].bar(xs, vals, 0.38, label=cache)
            ax[j].bar_label(bars, fmt="%.0f", fontsize=8)
            if cache == "bf16" and key == "decode_tokens_per_s":  # the baseline with SDPA-speed attention
                bound = [next((r.get("decode_tokens_per_s_sdpa_bound", 0) for r in recs
                               if r["context"] == c and r["cache"] == cache), 0) for c in contexts]
                ax[j].bar(xs, bound, 0.38, fill=False, hatch="//", edgecolor="tab:blue",
                          label="bf16, SDPA-speed attention (bound)")
        ax[j].set_xticks(range(len(contexts)), [f"{c // 1024}k context" for c in contexts])
        ax[j].set_ylabel(label)
        ax[j].legend()
    fig.suptitle(f"{results['gpu']}: {results['kv_budget_gib']:.0f} GiB of KV cache, LLaMA3-8B shape, "
                 f"commit {results['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--kv-budget-gib", type=float, default=40.0)
    ap.add_argument("--decode-len", type=int, default=256, help="tokens each request decodes")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="measured steps per (context, cache)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--preset", default="vllm", help="ZipCache preset (the plugin's default: vllm)")
    ap.add_argument("--quick", action="store_true", help="2 layers, 2 GiB, few steps: a smoke run")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--plot", default=None, help="PNG path")
    ap.add_argument("--plot-from", default=None, help="only plot (and print) an existing JSON")
    args = ap.parse_args(argv)
    if args.plot_from:
        with open(args.plot_from) as f:
            results = json.load(f)
        print(table(results["records"]))
        if args.plot:
            plot(results, args.plot)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_serving_gpu.py needs a CUDA GPU (graph capture, FlashAttention); use --plot-from here")
    if args.quick:
        args.layers, args.kv_budget_gib, args.steps, args.warmup = 2, 2.0, 8, 2
    s = Shape(layers=args.layers)
    contexts = [int(c) for c in args.contexts.split(",")]
    cfg = ZipCacheConfig.load(args.preset, block_size=128)
    budget = int(args.kv_budget_gib * GIB)
    layout = PageLayout.from_config(cfg, s.head_size)
    t0 = time.time()
    model = Model(s, max(contexts) + args.decode_len + 1)
    records = []
    for context in contexts:
        for cache in ("bf16", "zipcache"):
            rec = run_case(model, s, cache, context, args.decode_len, budget, args.warmup, args.steps, cfg)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    results = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": args.commit,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "kv_budget_gib": args.kv_budget_gib,
        "preset": args.preset, "layout": {k: getattr(layout, k) for k in ("block_size", "head_size", "bits_high",
                                                                       "bits_low", "num_salient_k", "num_salient_v",
                                                                       "page_bytes")},
        "model": vars(s), "seconds": time.time() - t0, "records": records,
    }  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.plot:
        plot(results, args.plot)
    print(table(records))
    ratios = {r["context"]: r["decode_tokens_per_s"] for r in records if r["cache"] == "zipcache"}
    for c in ratios:
        b = next(r for r in records if r["cache"] == "bf16" and r["context"] == c)
        print(f"context {c}: zipcache / bf16 decode tokens/s = {ratios[c] / b['decode_tokens_per_s']:.2f}x measured, "
              f"{ratios[c] / b['decode_tokens_per_s_sdpa_bound']:.2f}x against the SDPA bound")


if __name__ == "__main__":
    main()
