"""The OpenAI-compatible server with ``--kv-cache-backend zipcache``: API shapes, chunked prefill, concurrency,
aborts, and vLLM's own KV capacity figure against stock bf16 at the same KV memory."""

from __future__ import annotations

import asyncio
import itertools
import re
from pathlib import Path

import pytest

from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.plugin import envs

MODEL = "smollm2"
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
LONG_TEXT = (Path(__file__).resolve().parents[2] / "data" / "prose.txt").read_text()


_salts = itertools.count()


def greedy(client, prompt: str, max_tokens: int = 24) -> str:
    """Greedy text, computed from scratch: a fresh ``cache_salt`` keeps the prefix cache out (a repeated prompt
    answered from cached blocks is tests/e2e/test_prefix_caching.py's subject, not these tests')."""
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  extra_body={"cache_salt": f"openai-{next(_salts)}"})
    return r.choices[0].text


@pytest.fixture(scope="module")
def client(zipcache_server):
    return zipcache_server.client()


@pytest.fixture(scope="module")
def baseline(client):
    """Greedy answers taken before the stress tests; the server must give the same ones afterwards."""
    long = LONG_TEXT[:3000] + "\n\nQuestion: who is the main character? Answer:"
    return {p: greedy(client, p) for p in ("The capital of France is", long)}


def test_startup_logs_the_layout_next_to_the_capacity(zipcache_server):
    log = zipcache_server.log_text()
    assert re.search(r"ZipCache layout: .* bytes/token/head vs 256 in bf16 -> [\d.]+x capacity", log)
    assert "ZipCache bf16 staging" in log and "prefix caching off" not in log  # on: vLLM's default
    assert zipcache_server.kv_cache_tokens() > 0


def test_completion(client, baseline):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0)
    c = r.choices[0]
    assert c.finish_reason in ("length", "stop") and c.text.strip()
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens == 5
    assert c.text[:24] == baseline["The capital of France is"][: len(c.text[:24])]


def test_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=32, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert "Paris" in r.choices[0].message.content


def test_streaming_matches_the_non_streamed_answer(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=32, temperature=0)
    parts, finish = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=32, temperature=0,
                                                stream=True):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content
    assert finish in ("stop", "length")


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=8, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(t) <= 4 for t in lp.top_logprobs)  # top 3 (+ the sampled token)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_n_greater_than_one(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0.9, n=3,
                                  seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.text for c in r.choices)


def test_chunked_prefill_of_a_prompt_longer_than_the_token_budget(client, baseline):
    long = [p for p in baseline if len(p) > 100][0]
    r = client.completions.create(model=MODEL, prompt=long, max_tokens=24, temperature=0,
                                  extra_body={"cache_salt": f"openai-{next(_salts)}"})
    assert r.usage.prompt_tokens > 512  # --max-num-batched-tokens 512: prefilled in chunks
    assert r.choices[0].text == baseline[long]


async def _stream(aclient, i: int, max_tokens: int) -> tuple[str, str | None]:
    text, finish = [], None
    stream = await aclient.completions.create(model=MODEL, prompt=f"Story {i}: " + LONG_TEXT[i * 300 : i * 300 + 600],
                                              max_tokens=max_tokens, temperature=0, stream=True)
    async for chunk in stream:
        text.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def test_16_concurrent_streams(zipcache_server):
    async def main():
        aclient = zipcache_server.async_client()
        return await asyncio.gather(*(_stream(aclient, i, 40) for i in range(16)))

    results = asyncio.run(asyncio.wait_for(main(), timeout=900))
    assert len(results) == 16
    assert all(finish in ("stop", "length") and text for text, finish in results)


def test_aborts_mid_stream_then_the_server_still_answers(zipcache_server, client, baseline):
    async def abort_after(i: int, chunks: int):
        aclient = zipcache_server.async_client()
        stream = await aclient.completions.create(model=MODEL, prompt=f"Tell a long story number {i}.",
                                                  max_tokens=400, temperature=0, stream=True)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen >= chunks:
                break
        await stream.close()  # the server sees the disconnect and aborts the request
        return seen

    async def main():
        return await asyncio.gather(*(abort_after(i, 3 + i) for i in range(4)))

    assert all(n >= 3 for n in asyncio.run(asyncio.wait_for(main(), timeout=600)))
    for prompt, want in baseline.items():
        assert greedy(client, prompt) == want


def test_kv_capacity_vs_stock_bf16(zipcache_server, stock_server):
    """vLLM's own figure; the layout bounds it (bf16 / page bytes), the bf16 staging is paid out of it."""
    z, b = zipcache_server.kv_cache_tokens(), stock_server.kv_cache_tokens()
    cfg = ZipCacheConfig.load(envs.DEFAULT_CONFIG)  # what the server runs without --zipcache-config
    layout_ratio = PageLayout.from_config(cfg.replace(block_size=128), 64).capacity_vs_bf16
    m = re.search(r"taken from the KV cache budget \(([\d.]+) -> ([\d.]+) GiB\)", zipcache_server.log_text())
    kv_share = float(m.group(2)) / float(m.group(1))
    ratio = z / b
    print(f"\nKV capacity: zipcache {z} tokens vs bf16 {b} tokens = {ratio:.2f}x "
          f"(layout {layout_ratio:.2f}x, {kv_share:.1%} of the budget left after staging)")
    assert ratio == pytest.approx(layout_ratio * kv_share, rel=0.02)
    # SmolLM2 (head size 64), preset `vllm`: 4.41x layout bound, minus 16+4 staging slots (5.5 % of 1 GiB). The
    # issue's 4.5x is out of reach here (docs/vllm-plugin.md, "Capacity"): this guards the figure we reach.
    assert ratio >= 4.1


def test_metrics_expose_the_compression_figures(zipcache_server):
    import importlib.metadata as md

    declared = [e.value for e in md.entry_points(group="vllm.stat_logger_plugins") if e.name == "zipcache"]
    assert declared == ["zipcache_vllm.plugin.metrics:ZipCacheStatLogger"], "reinstall the package (pip install -e .)"
    text = zipcache_server.get("/metrics")
    for name in ("bits_per_value", "salient_ratio", "capacity_ratio_vs_bf16", "kv_cache_tokens"):
        assert re.search(rf"^zipcache:{name}\S* [\d.e+]+$", text, re.M), name
