"""Greedy agreement of two running servers (zipcache and stock vLLM) with the transformers engine.

    python benchmarks/agreement_vs_reference.py --zipcache-port 8771 --stock-port 8772 --dtype float32

Both servers must serve the bundled model in ``--dtype`` (for float32: the float32 model folder). Prompts: the
24 chat prompts of ``data/agreement_prompts.jsonl``, each with a passage of ``data/prose.txt`` in front (165-921
tokens). Prints the share of prompts whose first ``--steps`` greedy tokens are identical, for four pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import openai
import torch

DATA = Path(__file__).resolve().parents[1] / "data"


def prompts(tokenizer) -> list[list[int]]:
    prose = (DATA / "prose.txt").read_text()
    rows = [json.loads(line)["prompt"] for line in (DATA / "agreement_prompts.jsonl").read_text().splitlines()]
    out = []
    for i, p in enumerate(rows):
        passage = prose[i * 700 : i * 700 + 450 + 60 * i]
        text = p.replace("<|im_start|>user\n", f"<|im_start|>user\nRead this first:\n{passage}\n\n", 1)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def served(port: int, ids: list[list[int]], steps: int) -> list[list[int]]:
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=900)
    return [
        list(c.completions.create(model="smollm2", prompt=p, max_tokens=steps, temperature=0,
                                  extra_body={"return_token_ids": True}).choices[0].token_ids)
        for p in ids
    ]


def reference(hf, ids: list[list[int]], steps: int, zipcache: bool) -> list[list[int]]:
    from zipcache_vllm.eval import harness
    from zipcache_vllm.eval.methods import Method
    from zipcache_vllm.hf.cache import ZipCache
    from zipcache_vllm.method.config import ZipCacheConfig
    from zipcache_vllm.plugin import envs

    out = []
    for p in ids:
        cache = (ZipCache(ZipCacheConfig.load(envs.DEFAULT_CONFIG), model_config=hf.config) if zipcache
                 else Method.parse("bf16").make_cache(hf.config))
        toks, _, _ = harness.decode_steps(hf, torch.tensor(p), cache, steps)
        out.append(toks.tolist())  # the EOS is kept, as vLLM's token_ids keep it
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zipcache-port", type=int, required=True)
    ap.add_argument("--stock-port", type=int, required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    from zipcache_vllm.eval import harness

    hf = harness.load_model(None, args.dtype)
    ids = prompts(hf.tokenizer)
    got = {
        "zipcache vLLM": served(args.zipcache_port, ids, args.steps),
        "stock vLLM": served(args.stock_port, ids, args.steps),
        "zipcache transformers": reference(hf, ids, args.steps, True),
        "bf16 transformers": reference(hf, ids, args.steps, False),
    }
    pairs = [("zipcache vLLM", "zipcache transformers"), ("stock vLLM", "bf16 transformers"),
             ("zipcache vLLM", "stock vLLM"), ("zipcache transformers", "bf16 transformers")]
    lengths = [len(p) for p in ids]
    print(f"{len(ids)} prompts of {min(lengths)}-{max(lengths)} tokens, {args.dtype}, first {args.steps} tokens:")
    for a, b in pairs:
        same = sum(x == y for x, y in zip(got[a], got[b], strict=True))
        print(f"  {a} vs {b}: {same}/{len(ids)} identical")


if __name__ == "__main__":
    main()
