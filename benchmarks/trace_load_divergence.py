"""Where does a greedy answer start to depend on the load? Trace the attention of one prompt served alone and
served as ``--copies`` concurrent copies, and find the first row that differs.

    python benchmarks/trace_load_divergence.py [--prompt "Write a short poem about the sea:"] [--copies 8] \\
        [--max-tokens 24] [--env ZIPCACHE_KERNELS=torch ...] [--backend auto] [--output results.json]

Starts ``zipcache-vllm serve`` (the bundled SmolLM2, ``make serve``'s flags, 127.0.0.1) twice with
``ZIPCACHE_TRACE_DIR`` set (every attention call's positions, q, k, v and output saved,
``zipcache_vllm/plugin/trace.py``): once for the prompt alone, once for the copies sent at once (each request
with its own ``cache_salt``, so the copies share no cached prefix). Prints whether the greedy answers agree and,
when a copy's attention rows differ from the solo run's, the first (position, layer) where they do and whether
the attention's *inputs* already differed there (the divergence entered in vLLM's own layers: projections,
norms, MLP, which run on the whole batch) or only its output (it entered in the ZipCache attention). Each server
is stopped by its PID. ~3 minutes on a 2-core CPU. ``--env`` sets more variables on both servers (another CPU
path); ``--backend auto`` runs stock vLLM instead (answers only: it has no ZipCache attention to trace).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).parent))
from compare_serve import server  # noqa: E402

from zipcache_vllm.plugin import envs, trace  # noqa: E402


async def _ask(port: int, prompt: str, max_tokens: int, copies: int) -> list[list[int]]:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=900, max_retries=0)
    done = await asyncio.gather(*(client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True, "cache_salt": f"trace-{i}"})
        for i in range(copies)))  # fmt: skip
    await client.close()
    return [list(r.choices[0].token_ids) for r in done]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", default="Write a short poem about the sea:")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for both servers (repeatable)")
    ap.add_argument("--backend", default="zipcache", choices=["zipcache", "auto"], help="auto: stock vLLM")
    ap.add_argument("--output", default=None, help="a JSON file for the result")
    a = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in a.env)
    tracing = a.backend == "zipcache"
    with tempfile.TemporaryDirectory(prefix="zipcache-trace-") as tmp:
        answers, traces = {}, {}
        for run, copies in (("alone", 1), ("copies", a.copies)):
            folder = Path(tmp) / run
            folder.mkdir()
            print(f"{run}: {a.backend} serving {copies} request(s) {extra or ''}...", flush=True)
            env = {**extra, **({envs.TRACE_DIR: str(folder)} if tracing else {})}
            with server(a.backend, max(copies, 1), Path(tmp) / f"{run}.log", env) as (port, _):
                answers[run] = asyncio.run(_ask(port, a.prompt, a.max_tokens, copies))
            traces[run] = trace.read(folder)
        solo = answers["alone"][0]
        same = sum(x == solo for x in answers["copies"])
        found = trace.first_divergence(traces["alone"], traces["copies"]) if tracing else None
    result = {"backend": a.backend, "env": extra, "prompt": a.prompt, "copies": a.copies,
              "max_tokens": a.max_tokens, "solo_answer": solo,
              "copies_equal_to_solo": same, "distinct_copy_answers": len({tuple(x) for x in answers["copies"]}),
              "first_divergence": found}  # fmt: skip
    print(f"\ngreedy answers: {same} of {a.copies} copies equal the prompt served alone "
          f"({result['distinct_copy_answers']} distinct among the copies)")
    if not tracing:
        print("(stock vLLM: no attention trace)")
    elif found is None:
        print("attention rows: every copy's rows equal the solo run's, bit for bit")
    else:
        print(f"first differing attention row: position {found['position']}, layer {found['layer']}: "
              f"{', '.join(f'{k} (max |diff| {v:g})' for k, v in found['differ'].items())}")
        print(f"  copy's batch {found['batch']}, solo batch {found['reference_batch']}")
        print(f"  -> the divergence entered {found['where']}"
              + (" (every earlier layer's attention output of this position agreed)"
                 if found["where"] == "outside attention" else ""))
    if a.output:
        Path(a.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
