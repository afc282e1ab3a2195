"""Prefill time of one long prompt through vLLM's real server, stock vs zipcache (the figure of docs/vllm-plugin.md).

    python benchmarks/bench_prefill_serve.py [--prompt-words 1500] [--repeats 3]

Starts each server with ``make serve``'s flags (benchmarks/compare_serve.py), sends one warm-up prompt, then
times ``--repeats`` prompts of ``--prompt-words`` words with ``max_tokens=1`` (prefill plus one decode step),
stops the server by its PID and prints the median per backend last.
"""

from __future__ import annotations

import argparse
import asyncio
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
    args = ap.parse_args()
    (REPO / "out").mkdir(exist_ok=True)
    medians = {}
    for backend in ("auto", "zipcache"):
        with server(backend, 32, REPO / "out" / f"bench_prefill_{backend}.log") as port:
            def client():
                return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=900,
                                          max_retries=0)

            asyncio.run(one(client(), "smollm2", prompt(args.prompt_words, 999), 1))  # warm-up
            times = []
            for i in range(args.repeats):
                t = time.perf_counter()
                asyncio.run(one(client(), "smollm2", prompt(args.prompt_words, i), 1))
                times.append(time.perf_counter() - t)
                print(f"{backend}: {times[-1]:.2f} s", flush=True)
            medians[backend] = statistics.median(times)
    stock, zipcache = medians["auto"], medians["zipcache"]
    print(f"\nprefill of {args.prompt_words} words: stock {stock:.2f} s, zipcache {zipcache:.2f} s")


if __name__ == "__main__":
    main()
