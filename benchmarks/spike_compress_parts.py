"""Spike: where a prompt's ``compress_store`` spends its time, by taking parts out of the kernel (the pages of the
cut variants are not valid: each time is a bound on what the part costs, not a kernel to ship).

    PYTHONPATH=. python -u benchmarks/spike_compress_parts.py [--contexts 4096,16384]

Variants are made from ``kernels/compress_store.py``'s source as it is (text substitutions, written next to it as
``kernels/_compress_store_parts_<name>.py``, removed at exit):

- ``no ranking``: page rows = token order (no sort, no prefix sums; the scores are not read);
- ``code passes only``: no ranking, and no first pass over the tiles (not the keys' min / max, not the values'
  max |x|; the per-channel reductions stay): what is left if a kernel ahead of it, e.g. the score kernel, which
  holds the block's keys already, handed over the page rows and the parameters;
- ``keys only`` / ``values only``: the other half's program returns after ranking;
- ``keys without first passes`` / ``values without first pass``: one half's first passes cut;
- ``ranking only``: both programs return after ranking and the bitmaps;
- ``empty``: every program returns at once, the floor of a launch after the score kernel.

Each is timed given scores at the default launch (2 programs where they are one wave), alone and after
``block_probe_scores`` in one graph (the engine step's path), next to the kernel itself and the score kernel
alone. The prompt of ``bench_compress.prompt_inputs`` (LLaMA3-8B KV geometry, ``vllm`` page),
CUDA-graph replays (``_timing.graph_time_us``).
"""

from __future__ import annotations

import argparse
import atexit
import os
from pathlib import Path

import torch

from benchmarks._timing import graph_time_us
from benchmarks.bench_compress import load_kernel_file, prompt_inputs, prompt_scorer
from zipcache_vllm.engine.ops import kernel_module

SRC = Path("kernels/compress_store.py")
RANKING = "    ksal, vsal, row = _page_rows(s, t, tv, SK, SV, N_PAD)\n"
KEYS = "    if part == 0:\n"
VALUES = "    if PROGRAMS == 1 or part > 0:\n"
NEXT = "        xn, rrn, rvn, tok = _next_tile(x_ptr, stride_x_tok, x_tok, work, tok, r0, N, R, D, PL)\n"
KEYS_PASS1_S = "    for r0 in range(0, sk_rows, R):\n" + NEXT + "        mn_s"
KEYS_PASS1_R = "    for r0 in range(sk_rows, n_rows, R):\n" + NEXT + "        if N < N_PAD:"
VALUES_PASS1 = "    for r0 in range(0, n_rows, R):\n        rr = r0 + tl.arange(0, R)\n"
CUTS = {
    "no ranking": {RANKING: "    ksal, vsal, row = t < SK, t < SV, t\n"},
    "code passes only": {
        RANKING: "    ksal, vsal, row = t < SK, t < SV, t\n",
        KEYS_PASS1_S: KEYS_PASS1_S.replace("range(0, sk_rows, R)", "range(0, 0, R)"),
        KEYS_PASS1_R: KEYS_PASS1_R.replace("range(sk_rows, n_rows, R)", "range(sk_rows, sk_rows, R)"),
        VALUES_PASS1: VALUES_PASS1.replace("range(0, n_rows, R)", "range(0, 0, R)"),
    },
    "keys only": {VALUES: "    if PROGRAMS == 0:\n"},
    "values only": {KEYS: "    if PROGRAMS == 0:\n"},
    "keys without first passes": {
        KEYS_PASS1_S: KEYS_PASS1_S.replace("range(0, sk_rows, R)", "range(0, 0, R)"),
        KEYS_PASS1_R: KEYS_PASS1_R.replace("range(sk_rows, n_rows, R)", "range(sk_rows, sk_rows, R)"),
    },
    "values without first pass": {VALUES_PASS1: VALUES_PASS1.replace("range(0, n_rows, R)", "range(0, 0, R)")},
    "ranking only": {KEYS: "    if PROGRAMS == 0:\n", VALUES: "    if PROGRAMS == 0:\n"},
    "empty": {"    if page < 0:\n        return\n": "    if page > -2:\n        return\n"},
}


def variant(name: str, cuts: dict):
    text = SRC.read_text()
    for old, new in cuts.items():
        if text.count(old) != 1:
            raise SystemExit(f"{name}: the kernel no longer has exactly one {old.strip()!r}: update the spike")
        text = text.replace(old, new)
    path = SRC.with_name(f"_compress_store_parts_{name.replace(' ', '_')}.py")
    path.write_text(text)
    atexit.register(os.remove, path)  # kept until the spike ends (Triton reads a function's source)
    return load_kernel_file(str(path), path.stem)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    mods = {"kernel": kernel_module("compress_store"), **{name: variant(name, cuts) for name, cuts in CUTS.items()}}
    for ctx in map(int, a.contexts.split(",")):
        _case(ctx, mods, a.reps)


def _case(ctx: int, mods: dict, reps: int) -> None:
    layout, k, v, off, pq, ids, cache = prompt_inputs(ctx)
    scores, score = prompt_scorer(layout, k, pq, off)
    print(f"{ctx} scores kernel alone: {graph_time_us(score, reps):.1f} us", flush=True)
    for name, mod in mods.items():

        def alone(mod=mod):
            mod.compress_store(k, v, scores, ids, cache, layout)

        def step(mod=mod):
            score()
            mod.compress_store(k, v, scores, ids, cache, layout)

        try:
            t1, t2 = graph_time_us(alone, reps), graph_time_us(step, reps)
            print(f"{ctx} compress ({name}): alone {t1:.1f} us, after the scores kernel {t2:.1f} us", flush=True)
        except Exception as e:  # noqa: BLE001 (a variant that fails to compile is reported, the spike goes on)
            print(f"{ctx} compress ({name}): failed ({type(e).__name__}: {e})", flush=True)

if __name__ == "__main__":
    main()
