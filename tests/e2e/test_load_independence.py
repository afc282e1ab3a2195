"""Greedy answers do not depend on the load (issue 13 item 3): the same prompts sent alone, as 8 copies at once,
and mixed with 16 other prompts, against a zipcache server and the stock server (vLLM without zipcache) in the
same test. Every request carries its own ``cache_salt``, so prefix caching (on in both servers) shares nothing
and every copy is computed under that load: chunk boundaries (512 tokens per step), batch composition and
queueing (16 sequences at most) move with it.

Stock vLLM is not batch-invariant either (its CPU kernels round differently for other batch shapes), so the
check is that zipcache's answers to a prompt diverge (from the prompt's most common answer over its 10 runs) no
more often than stock's; the counts are printed. Measured (2-core CPU, 2026-12-04): before the CPU prefill
attention gave each prompt row one arithmetic whatever the chunking (687010e) zipcache 8 of 30 vs stock 3 of
30 (the test was an expected failure); at 687010e zipcache 1 vs stock 2, twice.

The counts are small and both servers now diverge only where vLLM's own kernels round differently under another
batch shape, so two runs of equal rate differ by a count or two: the check allows zipcache ``NOISE`` more than
stock (it still fails on the old rule's 8 vs 3, and on any divergence rate clearly above stock's). Where a
zipcache answer splits, ``benchmarks/trace_load_divergence.py`` traces both runs and tells whether the first
differing row entered in the ZipCache attention or before it (2026-12-05, a short prompt alone vs 8 copies:
before it, in the MLP's down projection, whose CPU GEMM rounds a row differently with other rows beside it:
``benchmarks/probe_gemm_batch_invariance.py``; docs/vllm-plugin.md, *Determinism*).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from pathlib import Path

MODEL = "smollm2"
MAX_TOKENS = 48
NOISE = 2  # divergent answers (of 30) that two servers of equal divergence rate differ by in one run
PROSE = (Path(__file__).resolve().parents[2] / "data" / "prose.txt").read_text()
_salt = itertools.count()


def _prompt(start: int, chars: int, question: str) -> str:
    return f"{PROSE[start : start + chars]}\n\nQuestion: {question}\nAnswer:"


# targets of about 170, 420 and 700 tokens: every one spans blocks, the longest is chunked even alone
TARGETS = [_prompt(0, 700, "what happens in this passage?"), _prompt(5000, 1800, "who is speaking?"),
           _prompt(12000, 3000, "summarise the passage in one sentence.")]
OTHERS = [_prompt(20000 + 900 * i, 300 + 160 * i, "what comes next?") for i in range(16)]


async def _one(client, prompt: str) -> list[int]:
    r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True,
                                                    "cache_salt": f"salt-{next(_salt)}"})
    return list(r.choices[0].token_ids)


async def _runs(server) -> dict:
    client = server.async_client(timeout=1500)
    alone = [await _one(client, p) for p in TARGETS]
    copies = [await asyncio.gather(*(_one(client, p) for _ in range(8))) for p in TARGETS]
    mixed = await asyncio.gather(*(_one(client, p) for p in [*OTHERS[:8], *TARGETS, *OTHERS[8:]]))
    mixed = mixed[8 : 8 + len(TARGETS)]
    return {"alone": alone, "copies": copies, "mixed": mixed}


def _divergences(runs: dict) -> tuple[int, int, list]:
    """Per prompt, its 10 answers (alone, 8 copies, mixed): how many differ from the prompt's most common answer
    (summed), how many answers, and the distinct answers per prompt. A solo run that rounds differently from
    every loaded run counts once, not nine times; pages that depend on the chunking (the old rule: 4-5
    different answers among 8 copies) count many times."""
    bad, total, distinct = 0, 0, []
    for i, solo in enumerate(runs["alone"]):
        answers = [tuple(solo), *(tuple(a) for a in runs["copies"][i]), tuple(runs["mixed"][i])]
        mode = Counter(answers).most_common(1)[0][0]
        bad += sum(a != mode for a in answers)
        total += len(answers)
        distinct.append(len(set(answers)))
    return bad, total, distinct


def test_zipcache_diverges_no_more_than_stock_under_load(zipcache_server, stock_server):
    results = {}
    for name, server in (("stock", stock_server), ("zipcache", zipcache_server)):
        runs = asyncio.run(asyncio.wait_for(_runs(server), timeout=2400))
        assert all(len(a) == MAX_TOKENS for a in runs["alone"])
        results[name] = _divergences(runs)
    for name, (bad, total, distinct) in results.items():
        print(f"\n{name}: {bad} of {total} answers differ from their prompt's most common answer; distinct answers "
              f"per prompt {distinct}")
    assert results["zipcache"][0] <= results["stock"][0] + NOISE, results
