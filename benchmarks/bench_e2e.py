"""End-to-end decode step of a LLaMA3-8B-shaped model (random weights) with three transformers caches.

    PYTHONPATH=. python benchmarks/bench_e2e.py --layers 32 --commit $(git rev-parse --short HEAD) \
        --out benchmarks/results/h200_e2e.json

Model: ``LlamaForCausalLM`` from a config with LLaMA3-8B's shapes (hidden 4096, 32 query / 8 KV heads of 128,
MLP 14336, vocab 128256), ``--layers`` decoder layers, random bf16 weights. Caches, batch ``--batch`` (8),
prompts of ``--contexts`` tokens (4096 and 32768, random ids):

* ``dynamic``: ``DynamicCache``, bf16, attention ``sdpa`` (transformers' SDPA with ``enable_gqa``);
* ``quanto``: ``QuantizedCache(backend="quanto", nbits=4)`` (defaults: axis 0, group 64, 128 bf16 residual
  tokens), attention ``sdpa``. quanto's CUDA ``unpack`` lives in a C++/CUDA extension that it compiles on first
  use (minutes, all of quanto's kernels); this script binds ``quanto::unpack`` to quanto's own pure-torch
  implementation instead, so the cache runs as plain torch ops (the unpack is a few element-wise passes);
* ``zipcache``: :class:`zipcache_vllm.hf.paged_cache.PagedZipCache` (``paged`` preset: block 128, r = 0.6, 4/2 bits),
  attention ``zipcache_paged``: Triton decode kernel over the pages + bf16 tail, probe scores, compress/store.

Per context, every cache first runs once unmeasured (Triton compiles a kernel per specialization of its integer
arguments; the pass's wall time is kept in ``first_pass_s``; ``--no-first-pass`` runs one short zipcache case
instead, timed as ``zipcache_warmup_s``, which may leave a longer prompt's compiles inside the measurement).
Per case: one prefill (CUDA events; ``logits_to_keep=1``), then ``--warmup`` + ``--steps`` single-token decode
steps fed with the same fixed random tokens for every cache (CUDA events around each ``model(...)`` call;
median over ``--rounds`` rounds, the cache order reversed every round), the host time to issue one step (no
sync: when it equals the step time, the step is bound by Python/launch overhead, not by the GPU),
``torch.cuda.max_memory_allocated`` over prefill and over decode, the cache's own bytes, and the cosine
similarity of the first decode step's logits with ``dynamic``'s (random weights over many layers amplify any
perturbation: a loose figure) and, at ``--ref-contexts``, with ``hf_cache.ZipCache`` (the torch reference of the
same semantics: this one should be close to 1). A ``floor`` row (dynamic cache, 128 context) gives the step
time without attention cost (weights, norms, lm_head, launch overhead).

Writes JSON (``--out``), prints one Markdown table last. ``--tiny`` runs a miniature on CPU (smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from zipcache_vllm.hf import cache as hf_cache  # noqa: E402
from zipcache_vllm.hf import paged_cache as hf_paged
from zipcache_vllm.method.config import ZipCacheConfig  # noqa: E402

GiB = 1024**3


def llama3_8b_config(layers: int, tiny: bool = False) -> LlamaConfig:
    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build_model(cfg: LlamaConfig, device: torch.device):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(torch.bfloat16).eval()


# --------------------------------------------------------------------------------------------- quanto
def _py_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's default (pure torch) ``quanto::unpack``."""
    parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
    return torch.cat(parts).to(torch.uint8)


def quanto_without_jit() -> str:
    """Bind quanto's extension ``unpack`` to the pure-torch version (no C++/CUDA build at first use)."""
    import optimum.quanto
    from optimum.quanto.library.extensions import extension

    for ext in extension._extensions.values():
        if ext._lib is None:
            ext._lib = types.SimpleNamespace(unpack=_py_unpack)
    return getattr(optimum.quanto, "__version__", "?")


def make_quanto(cfg):
    from transformers import QuantizedCache

    return QuantizedCache(backend="quanto", config=cfg, nbits=4)


# --------------------------------------------------------------------------------------------- bytes
def _tensor_bytes(t) -> int:
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def cache_bytes(cache) -> int:
    if isinstance(cache, (hf_paged.PagedZipCache, hf_cache.CompressedCache)):
        return cache.nbytes()["total"]
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _tensor_bytes(getattr(layer, name, None))
    return total


# --------------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def run_case(model, cfg, kind: str, ids, feed, warmup: int, device, reference=None):
    """Prefill ``ids`` then decode ``feed`` tokens with one cache kind; returns the measured record."""
    tm = Timer(device)
    cuda = device.type == "cuda"
    b, n = ids.shape
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    if kind in ("dynamic", "floor"):
        cache, impl = DynamicCache(), "sdpa"
    elif kind == "quanto":
        cache, impl = make_quanto(cfg), "sdpa"
    elif kind == "zipcache_ref":  # the torch reference cache with the same semantics (correctness check)
        cache, impl = hf_cache.ZipCache(ZipCacheConfig.load("paged"), model_config=cfg), hf_cache.ATTN_IMPLEMENTATION
    elif kind == "zipcache":
        cache = hf_paged.PagedZipCache(ZipCacheConfig.load("paged"), model_config=cfg,
                                       reserve_len=n + feed.shape[0] + 1)
        impl = hf_paged.ATTN_IMPLEMENTATION
    else:
        raise ValueError(kind)
    model.set_attn_implementation(impl)
    rec = {"cache": kind, "batch": b, "context": n, "layers": cfg.num_hidden_layers}
    with torch.inference_mode():
        t0 = tm.mark()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        t1 = tm.mark()
        tm.sync()
        rec["prefill_ms"] = round(tm.ms(t0, t1), 2)
        rec["kv_gib"] = round(cache_bytes(cache) / GiB, 4)
        if cuda:
            rec["peak_prefill_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
            torch.cuda.reset_peak_memory_stats()
        del out
        marks, host, first = [], [], None
        for i in range(feed.shape[0]):
            h0 = time.perf_counter()
            a = tm.mark()
            out = model(input_ids=feed[i], past_key_values=cache, use_cache=True)
            marks.append((a, tm.mark()))
            host.append((time.perf_counter() - h0) * 1e3)
            if i == 0:
                first = out.logits[:, -1].float()
        w0 = time.perf_counter()
        tm.sync()
        drain = (time.perf_counter() - w0) * 1e3
    times = [tm.ms(a, c) for a, c in marks[warmup:]]
    rec["times_ms"] = [round(x, 3) for x in times]
    rec["host_ms"] = [round(x, 3) for x in host[warmup:]]
    rec["decode_ms"] = round(statistics.median(times), 3)
    rec["decode_ms_min"] = round(min(times), 3)
    rec["decode_ms_max"] = round(max(times), 3)
    rec["cpu_issue_ms"] = round(statistics.median(rec["host_ms"]), 3)  # host time to issue one step
    rec["drain_ms"] = round(drain, 2)  # GPU work still queued when the host finished issuing
    rec["steps"] = len(times)
    if cuda:
        rec["peak_decode_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
        rec["weights_gib"] = round(base / GiB, 3)
    if reference is not None:
        rec["logits_cos_vs_dynamic"] = round(torch.nn.functional.cosine_similarity(first, reference, dim=-1)
                                             .mean().item(), 5)
        rec["top1_vs_dynamic"] = round((first.argmax(-1) == reference.argmax(-1)).float().mean().item(), 3)
    if isinstance(cache, hf_paged.PagedZipCache):
        rec["zipcache_bytes"] = cache.nbytes()
        rec["capacity_vs_bf16"] = round(cache.layout.capacity_vs_bf16, 3)
    del cache
    return rec, first


def merge_rounds(recs: list[dict]) -> dict:
    """One record per case: median over the steps of every round; per-round medians kept."""
    out = dict(recs[0])
    times = [t for r in recs for t in r["times_ms"]]
    host = [t for r in recs for t in r["host_ms"]]
    out["times_ms"], out["host_ms"] = times, host
    out["decode_ms"] = round(statistics.median(times), 3)
    out["decode_ms_min"], out["decode_ms_max"] = min(times), max(times)
    out["decode_ms_rounds"] = [r["decode_ms"] for r in recs]
    out["cpu_issue_ms"] = round(statistics.median(host), 3)
    out["cpu_issue_ms_rounds"] = [r["cpu_issue_ms"] for r in recs]
    out["prefill_ms_rounds"] = [r["prefill_ms"] for r in recs]
    out["prefill_ms"] = round(statistics.median(out["prefill_ms_rounds"]), 2)
    out["steps"] = len(times)
    for k in ("peak_prefill_gib", "peak_decode_gib"):
        if k in out:
            out[k] = max(r[k] for r in recs)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--caches", nargs="+", default=["dynamic", "quanto", "zipcache"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-first-pass", dest="first_pass", action="store_false",
                   help="skip the unmeasured pass of every cache at every context before the measured rounds")
    p.add_argument("--rounds", type=int, default=2, help="repeat every case, cache order reversed each round")
    p.add_argument("--ref-contexts", type=int, nargs="*", default=[4096],
                   help="contexts where hf_cache.ZipCache (same semantics, torch) also runs once, as a check")
    p.add_argument("--commit", default="?")
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="miniature model on CPU (smoke test)")
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = llama3_8b_config(args.layers, tiny=args.tiny)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    info = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "commit": args.commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                  "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab": cfg.vocab_size,
                  "weights": "random bf16"},
        "batch": args.batch,
        "records": [],
        "errors": [],
        "first_pass_s": {},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if "quanto" in args.caches:
        try:
            info["optimum_quanto"] = quanto_without_jit()
        except Exception as e:  # recorded, the other caches still run
            info["errors"].append(f"quanto: {type(e).__name__}: {e}")
            args.caches = [c for c in args.caches if c != "quanto"]

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(info, indent=1) + "\n")

    gen = torch.Generator().manual_seed(1)
    v = cfg.vocab_size
    # with --no-first-pass, compile the kernels (and warm the allocator) outside the measurements by a short
    # zipcache run (it need not meet every specialization a longer prompt's kernels are compiled for)
    if "zipcache" in args.caches and not args.first_pass:
        w_ids = torch.randint(0, v, (args.batch, 300), generator=gen).to(device)
        w_feed = torch.randint(0, v, (4, args.batch, 1), generator=gen).to(device)
        t = time.perf_counter()
        run_case(model, cfg, "zipcache", w_ids, w_feed, 0, device)
        info["zipcache_warmup_s"] = round(time.perf_counter() - t, 1)
    feed = torch.randint(0, v, (args.warmup + args.steps, args.batch, 1), generator=gen).to(device)
    floor_ids = torch.randint(0, v, (args.batch, 128), generator=gen).to(device)
    run_case(model, cfg, "floor", floor_ids, feed, args.warmup, device)  # warms the host and the GPU clocks
    rec, _ = run_case(model, cfg, "floor", floor_ids, feed, args.warmup, device)
    info["records"].append(rec)
    print(json.dumps(rec), flush=True)
    for n in args.contexts:
        ids = torch.randint(0, v, (args.batch, n), generator=gen).to(device)
        ref, runs, firsts = None, {k: [] for k in args.caches}, {}
        if n in args.ref_contexts and "zipcache" in args.caches:
            try:
                rec, firsts["zipcache_ref"] = run_case(model, cfg, "zipcache_ref", ids, feed, args.warmup, device)
                runs["zipcache_ref"] = [rec]
                print(json.dumps({k: x for k, x in rec.items() if k not in ("times_ms", "host_ms")}), flush=True)
            except Exception as e:
                info["errors"].append(f"zipcache_ref @ {n}: {type(e).__name__}: {str(e)[:300]}")
        # one unmeasured pass per cache at this shape first: Triton compiles a kernel once per specialization
        # (the divisibility of its integer arguments); the pass's wall time is kept (a server's one-time start-up
        # cost, not prompt processing)
        for kind in args.caches if args.first_pass else ():
            t = time.perf_counter()
            try:
                run_case(model, cfg, kind, ids, feed, 0, device)
            except Exception as e:  # the measured rounds below record the error
                print(f"first pass {kind} @ {n}: {type(e).__name__}", flush=True)
            info["first_pass_s"][f"{kind}@{n}"] = round(time.perf_counter() - t, 1)
        for r in range(args.rounds):
            for kind in args.caches if r % 2 == 0 else args.caches[::-1]:
                try:
                    rec, first = run_case(model, cfg, kind, ids, feed, args.warmup, device,
                                          reference=None if kind == "dynamic" else ref)
                except Exception as e:  # e.g. out of memory: recorded, the run goes on
                    info["errors"].append(f"{kind} @ {n} round {r}: {type(e).__name__}: {str(e)[:300]}")
                    print("ERROR", info["errors"][-1], flush=True)
                    continue
                if kind == "dynamic" and ref is None:
                    ref = first
                firsts.setdefault(kind, first)
                runs[kind].append(rec)
                print(json.dumps({k: x for k, x in rec.items() if k not in ("times_ms", "host_ms")}), flush=True)
        for kind in runs:
            if runs[kind]:
                rec = merge_rounds(runs[kind])
                if kind == "zipcache" and "zipcache_ref" in firsts:
                    cos = torch.nn.functional.cosine_similarity(firsts["zipcache"], firsts["zipcache_ref"], dim=-1)
                    rec["logits_cos_vs_zipcache_ref"] = round(cos.mean().item(), 5)
                    agree = firsts["zipcache"].argmax(-1) == firsts["zipcache_ref"].argmax(-1)
                    rec["top1_vs_zipcache_ref"] = round(agree.float().mean().item(), 3)
                info["records"].append(rec)
        save()
    for rec in info["records"]:
        dyn = [r for r in info["records"] if r["cache"] == "dynamic" and r["context"] == rec["context"]]
        if dyn:
            rec["speedup_vs_dynamic"] = round(dyn[0]["decode_ms"] / rec["decode_ms"], 3)
    save()
    print(format_table(info))


def format_table(info: dict) -> str:
    lines = [
        (f"{info['gpu']}, {info['model']['layers']} layers of LLaMA3-8B shape, batch {info['batch']}, "
         f"commit {info['commit']}, {info['date']}"),
        ("| context | cache | decode step ms (median; per round) | vs DynamicCache | host ms to issue a step | "
         "prefill ms | KV cache GiB | peak GiB prefill | peak GiB decode | logits cos vs dynamic | "
         "logits cos vs zipcache_ref |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in info["records"]:
        rounds = r.get("decode_ms_rounds", [r["decode_ms"]])
        lines.append(
            f"| {r['context']} | {r['cache']} | {r['decode_ms']:.2f} ({', '.join(map(str, rounds))}) | "
            f"{r.get('speedup_vs_dynamic', '-')} | {r['cpu_issue_ms']:.1f} | "
            f"{r['prefill_ms']:.0f} | {r['kv_gib']:.2f} | {r.get('peak_prefill_gib', '-')} | "
            f"{r.get('peak_decode_gib', '-')} | {r.get('logits_cos_vs_dynamic', '-')} | "
            f"{r.get('logits_cos_vs_zipcache_ref', '-')} |"
        )
    for e in info["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
