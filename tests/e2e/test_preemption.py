"""A KV pool so small that vLLM preempts: every request completes or errors cleanly, and the server then
answers as before (preempted requests recompute from token 0 and re-use blocks whose staging slots are stale).
"""

from __future__ import annotations

import asyncio
import re

import pytest

MODEL = "smollm2"
# 9 x 128 tokens (one is vLLM's null block): 8 usable blocks. 4 requests of ~130 prompt tokens fit at first
# (2 blocks each); at 256 tokens each needs a third block, so vLLM must preempt (and later recompute).
NUM_BLOCKS = 9
NUM_REQUESTS, MAX_TOKENS = 4, 150


@pytest.fixture(scope="module")
def tiny(e2e_tmp, start_server):
    args = ("--kv-cache-backend", "zipcache", "--num-gpu-blocks-override", str(NUM_BLOCKS), "--max-num-seqs", "8",
            "--max-num-batched-tokens", "512")
    with start_server(e2e_tmp, *args, name="tiny", max_model_len=1024) as s:
        yield s


def preemptions(server) -> float:
    m = re.search(r"^vllm:num_preemptions_total\{[^}]*\} ([\d.e+]+)$", server.get("/metrics"), re.M)
    return float(m.group(1)) if m else 0.0


def test_preemption_completes_every_request(tiny):
    client = tiny.client()
    probe = "The capital of France is"
    before = client.completions.create(model=MODEL, prompt=probe, max_tokens=16, temperature=0).choices[0].text
    assert tiny.kv_cache_tokens() == NUM_BLOCKS * 128

    async def one(aclient, i):
        try:
            r = await aclient.completions.create(
                model=MODEL, prompt=f"Request {i}. " + "Tell me about the sea and the sky. " * 14,
                max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
            return r.choices[0].finish_reason, r.usage.completion_tokens
        except Exception as e:  # a clean error is acceptable; a crash is not
            return "error", repr(e)

    async def main():
        aclient = tiny.async_client(timeout=1500)
        return await asyncio.gather(*(one(aclient, i) for i in range(NUM_REQUESTS)))

    results = asyncio.run(asyncio.wait_for(main(), timeout=1500))
    print(f"\nresults: {results}, preemptions: {preemptions(tiny)}")
    assert all(r[0] == "length" and r[1] == MAX_TOKENS for r in results), results
    assert preemptions(tiny) > 0, "the pool was meant to force preemption"
    assert tiny.healthy()
    after = client.completions.create(model=MODEL, prompt=probe, max_tokens=16, temperature=0).choices[0].text
    assert after == before
