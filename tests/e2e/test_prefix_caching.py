"""Prefix caching on with zipcache (issue 13 item 2): a cached compressed block is reused exactly as a
recomputed one would be. A zipcache server with prefix caching on (vLLM's default) and a small KV pool
(``--num-gpu-blocks-override``, so that blocks are evicted and their ids reused) answers the same greedy
requests as a zipcache server with ``--no-enable-prefix-caching``, token for token: a system prompt shared
across requests, a multi-turn continuation whose second turn reuses blocks filled by the first turn's decode,
and a prefix evicted by other requests, recomputed, then hit again. vLLM's ``/metrics`` counters say that the
hits happened (and how many tokens). Requests are sent one at a time, so that the two servers see the same
batches except for what the cache skips.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

MODEL = "smollm2"
N = 128  # vLLM's CPU block size
PROSE = (Path(__file__).resolve().parents[2] / "data" / "prose.txt").read_text()
NUM_BLOCKS = 20  # 19 usable blocks of 128 tokens (one is vLLM's null block): room for one long request
ARGS = ("--kv-cache-backend", "zipcache", "--max-num-seqs", "4", "--max-num-batched-tokens", "512")


@pytest.fixture(scope="module")
def cached(e2e_tmp, start_server):
    with start_server(e2e_tmp, *ARGS, "--num-gpu-blocks-override", str(NUM_BLOCKS), name="prefix-on") as s:
        yield s


@pytest.fixture(scope="module")
def uncached(e2e_tmp, start_server):
    with start_server(e2e_tmp, *ARGS, "--no-enable-prefix-caching", name="prefix-off") as s:
        yield s


def counter(server, name: str) -> float:
    """A vLLM counter on /metrics (``vllm:<name>_total``), summed over its label sets."""
    vals = re.findall(rf"^vllm:{name}_total(?:\{{[^}}]*\}})? ([\d.e+-]+)$", server.get("/metrics"), re.M)
    assert vals, f"vllm:{name}_total is not on /metrics"
    return sum(float(v) for v in vals)


def tokenize(server, text: str) -> list[int]:
    import json
    import urllib.request

    req = urllib.request.Request(f"{server.base_url}/tokenize", data=json.dumps({"model": MODEL, "prompt": text})
                                 .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["tokens"]


def greedy(server, prompt_ids: list[int], max_tokens: int = 32) -> tuple[list[int], float]:
    """Greedy token ids of a prompt (ids), and the prefix-cache hit tokens it got (the counter's change)."""
    before = counter(server, "prefix_cache_hits")
    r = server.client().completions.create(model=MODEL, prompt=prompt_ids, max_tokens=max_tokens, temperature=0,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})
    return list(r.choices[0].token_ids), counter(server, "prefix_cache_hits") - before


def both(cached, uncached, prompt_ids, max_tokens=32):
    a, hits = greedy(cached, prompt_ids, max_tokens)
    b, none = greedy(uncached, prompt_ids, max_tokens)
    assert none == 0
    assert a == b, f"prefix caching changed the answer (hit {hits} tokens): {a} vs {b}"
    return a, hits


def test_shared_system_prompt(cached, uncached):
    system = tokenize(cached, "You are a careful reader. Here is the text:\n" + PROSE[30000:32400])  # ~4 blocks
    questions = ["Who speaks first?", "Where does it happen?", "What is the mood?", "Name one object."]
    hits = []
    for q in questions:
        _, h = both(cached, uncached, system + tokenize(cached, f"\nQuestion: {q}\nAnswer:"))
        hits.append(h)
    full = len(system) // N * N
    print(f"\nsystem prompt {len(system)} tokens; hit tokens per request: {hits}")
    assert hits[0] == 0 and all(h == full for h in hits[1:]), hits  # every later request reuses its full blocks


def test_multi_turn_continuation_reuses_blocks_filled_by_decode(cached, uncached):
    turn1 = tokenize(cached, "Read this and then continue it.\n" + PROSE[40000:41400])
    answer, _ = both(cached, uncached, turn1, max_tokens=160)  # the decode fills (and completes) a block
    assert (len(turn1) + len(answer)) // N > len(turn1) // N, "the first turn's decode completes no block"
    turn2 = turn1 + answer + tokenize(cached, "\nNow say in one sentence what happened.\n")
    _, hits = both(cached, uncached, turn2)
    print(f"\nturn 1: {len(turn1)} + {len(answer)} tokens; turn 2: {len(turn2)} tokens, {hits} hit")
    assert hits == (len(turn1) + len(answer)) // N * N, hits  # including the block completed during decode


def test_prefix_hit_after_eviction(cached, uncached):
    shared = tokenize(cached, "Context for the questions below.\n" + PROSE[50000:51600])  # ~3 blocks
    ask = lambda q: shared + tokenize(cached, f"\nQuestion: {q}\nAnswer:")  # noqa: E731
    both(cached, uncached, ask("What is described?"))
    # two long requests take every free block: the shared prefix's cached blocks are evicted and their ids reused
    for i in range(2):
        both(cached, uncached, tokenize(cached, PROSE[60000 + 9000 * i : 66500 + 9000 * i])[:1500], max_tokens=8)
    _, after_eviction = both(cached, uncached, ask("Who is mentioned?"))
    _, again = both(cached, uncached, ask("What happens last?"))
    full = len(shared) // N * N
    print(f"\nshared prefix {len(shared)} tokens: hit {after_eviction} after the eviction, then {again}")
    assert after_eviction < full, "nothing was evicted: the pool is larger than the test assumes"
    assert again == full
