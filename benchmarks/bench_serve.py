"""Tokens/s of a running OpenAI-compatible server at 1 and N concurrent streams (greedy, ignore_eos).

    python benchmarks/bench_serve.py --port 8000 --streams 1,8 --max-tokens 128 [--prompt-tokens 200]

Prints one JSON line per concurrency: aggregate generated tokens/s over the wall time of the batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import openai

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "a",
    "small",
    "bird",
    "sings",
    "in",
    "the",
    "old",
    "oak",
    "tree",
]


def prompt(num_words: int, i: int) -> str:
    return f"Story {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(num_words))


async def one(client, model, text, max_tokens):
    r = await client.completions.create(
        model=model, prompt=text, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    return r.usage.completion_tokens


async def run(args, streams: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"http://{args.host}:{args.port}/v1", api_key="x", timeout=900)
    await one(client, args.model, prompt(8, 0), 4)  # warm-up
    t = time.perf_counter()
    done = await asyncio.gather(
        *(one(client, args.model, prompt(args.prompt_words, i), args.max_tokens) for i in range(streams))
    )
    wall = time.perf_counter() - t
    return {"streams": streams, "tokens": sum(done), "seconds": round(wall, 2), "tok_per_s": round(sum(done) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=16)
    args = ap.parse_args()
    for s in (int(x) for x in args.streams.split(",")):
        print(json.dumps(asyncio.run(run(args, s))), flush=True)


if __name__ == "__main__":
    main()
