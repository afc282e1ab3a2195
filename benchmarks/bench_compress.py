"""``kernels/compress_store`` on one GPU: the compression of a prompt's complete blocks, per ``num_warps``,
against a copy of the same bf16 keys and values (the memory floor) and, optionally, an
earlier version of the kernel loaded from a file, side by side in one run.

    git show 242854b:kernels/compress_store.py > kernels/_compress_store_base.py   # optional baseline
    PYTHONPATH=. python benchmarks/bench_compress.py --baseline kernels/_compress_store_base.py \\
        --commit $(git rev-parse --short HEAD) --out benchmarks/results/h200_compress.json

LLaMA3-8B KV geometry (8 KV heads, head size 128), the ``vllm`` preset (block 128), a prompt of ``--contexts``
tokens: ``context / 128`` blocks x 8 heads pages. Times: median of CUDA-graph replays (``_timing.graph_time_us``).
``gbps`` counts the bf16 keys and values read plus the page bytes written.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import sys

import torch

from benchmarks._timing import graph_time_us
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.engine.ops import kernel_module
from zipcache_vllm.method.config import ZipCacheConfig

H, D = 8, 128


def _load(path: str):
    spec = importlib.util.spec_from_file_location("zipcache_vllm.kernels._compress_store_base", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def case(context: int, warps: list[int], current, base, reps: int) -> dict:
    layout = PageLayout.from_config(ZipCacheConfig.load("vllm", block_size=128), D)
    nb = context // layout.block_size
    g = torch.Generator(device="cuda").manual_seed(0)
    k = (torch.randn(nb * 128, H, D, device="cuda", generator=g) * torch.linspace(0.5, 3, D, device="cuda")).bfloat16()
    v = torch.randn(nb * 128, H, D, device="cuda", generator=g).bfloat16()
    scores = torch.rand(nb * 128, H, device="cuda", generator=g)
    ids = torch.arange(1, nb + 1, device="cuda", dtype=torch.int32)
    cache = torch.zeros(nb + 1, H, layout.page_bytes, dtype=torch.uint8, device="cuda")
    moved = 2 * k.numel() * 2 + nb * H * layout.page_bytes
    rec = {"kernel": "compress_store", "context": context, "blocks": nb, "num_kv_heads": H, "head_size": D,
           "page_bytes": layout.page_bytes, "bytes_moved": moved}  # fmt: skip
    rec["copy_us"] = graph_time_us(lambda: (k.clone(), v.clone()), reps)
    ref = None
    rec["configs"] = []
    for w in warps:
        t = graph_time_us(lambda w=w: current.compress_store(k, v, scores, ids, cache, layout, num_warps=w), reps)
        rec["configs"].append({"num_warps": w, "time_us": t})
        ref = cache.clone() if ref is None else ref
        assert torch.equal(cache, ref), "pages differ between num_warps settings"
    best = min(rec["configs"], key=lambda r: r["time_us"])
    rec["time_us"], rec["best_num_warps"] = best["time_us"], best["num_warps"]
    rec["gbps"] = moved / rec["time_us"] / 1e3
    if base is not None:
        cache.zero_()
        rec["baseline_time_us"] = graph_time_us(lambda: base.compress_store(k, v, scores, ids, cache, layout), reps)
        rec["baseline_pages_equal"] = bool(torch.equal(cache, ref))
        rec["speedup"] = rec["baseline_time_us"] / rec["time_us"]
    print(json.dumps(rec), flush=True)
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--num-warps", default="2,4,8,16")
    ap.add_argument("--baseline", default=None, help="an earlier compress_store.py to time side by side")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_compress.py needs a CUDA GPU")
    base = _load(a.baseline) if a.baseline else None
    current = kernel_module("compress_store")
    warps = [int(w) for w in a.num_warps.split(",")]
    records = [case(int(c), warps, current, base, a.reps) for c in a.contexts.split(",")]
    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": a.commit,
           "date": datetime.date.today().isoformat(), "command": "python " + " ".join(map(shlex.quote, sys.argv)),
           "records": records}  # fmt: skip
    cfgs = [f"{r['num_warps']} warps us" for r in records[0]["configs"]]
    print("\n| context | pages | copy us | " + " | ".join(cfgs) + " | baseline us | speedup |")
    print("|---|---|---|" + "---|" * len(cfgs) + "---|---|")
    for r in records:
        ts = " | ".join(f"{x['time_us']:.1f}" for x in r["configs"])
        base_us, speedup = r.get("baseline_time_us", 0), r.get("speedup", 0)
        print(f"| {r['context']} | {r['blocks'] * H} | {r['copy_us']:.1f} | {ts} | {base_us:.1f} | {speedup:.2f}x |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
