"""Prefill time of one long prompt through vLLM's real server, stock vs zipcache (the figure of docs/vllm-plugin.md).

    python benchmarks/bench_prefill_serve.py [--prompt-words 1500] [--repeats 3] [--backends auto,zipcache]

Starts each server with ``make serve``'s flags (benchmarks/compare_serve.py), sends one warm-up prompt, then
times ``--repeats`` prompts of ``--prompt-words`` words with ``max_tokens=1`` (prefill plus one decode step),
stops the server by its PID and prints the median per backend last. ``zipcache+sdpa``: the zipcache server with
``ZIPCACHE_CPU_PREFILL=sdpa`` (the engine's own masked-SDPA prefill instead of vLLM's CPU kernel), for an A/B.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import one, prompt  # noqa: E402
from compare_serve import REPO, server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-words", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="auto,zipcache", help="auto (stock), zipcache, zipcache+sdpa")
    args = ap.parse_args()
    (REPO / "out").mkdir(exist_ok=True)
    medians = {}
    for name in args.backends.split(","):
        backend, _, prefill = name.partition("+")
        os.environ["ZIPCACHE_CPU_PREFILL"] = prefill or "vllm"  # read by the server's worker
        with server(backend, 32, REPO / "out" / f"bench_prefill_{name}.log") as (port, _proc):
            async def ask(text, port=port):  # one client per prompt, closed inside its event loop
                async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=900,
                                              max_retries=0) as client:
                    await one(client, "smollm2", text, 1)

            asyncio.run(ask(prompt(args.prompt_words, 999)))  # warm-up
            times = []
            for i in range(args.repeats):
                t = time.perf_counter()
                asyncio.run(ask(prompt(args.prompt_words, i)))
                times.append(time.perf_counter() - t)
                print(f"{name}: {times[-1]:.2f} s", flush=True)
            medians[name] = statistics.median(times)
    print(f"\nprefill of {args.prompt_words} words, median of {args.repeats}: "
          + ", ".join(f"{'stock' if k == 'auto' else k} {v:.2f} s" for k, v in medians.items()))


if __name__ == "__main__":
    main()
