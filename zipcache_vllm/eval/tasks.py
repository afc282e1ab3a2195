"""Seeded synthetic retrieval tasks: passkey retrieval and LongEval-style line (fact) retrieval.

Each task is a dict with ``prompt`` (a raw string already formatted with the model's chat template, ending in
the assistant turn header), ``answer`` (the digits to find, as a string) and metadata (``kind``, ``seed``,
``index``, ``prompt_tokens``, and ``depth`` / ``context_tokens`` / ``num_lines`` / ``line_key`` as they
apply).
A generated text counts as correct when it contains ``answer`` (case-insensitively, see :func:`is_correct`).

Only the tokenizer is needed to build tasks (no vLLM, no model weights). ``calibrate`` additionally loads the
model with transformers to measure greedy accuracy with a plain ``DynamicCache``.

CLI::

    python -m zipcache_vllm.eval.tasks passkey --n 30 --context-tokens 1024 --seed 0 --output passkey.jsonl
    python -m zipcache_vllm.eval.tasks fact --n 30 --num-lines 20 --seed 0 --output fact.jsonl
    python -m zipcache_vllm.eval.tasks calibrate --kind passkey --sizes 512 1024 --n 20 --seed 0
    python -m zipcache_vllm.eval.tasks evaluate --input data/retrieval_passkey.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Neutral, digit-free filler sentences (written for this project). None mentions keys, numbers or registers.
# "simple": short plain statements in the spirit of the original passkey test (the needle stands out);
# "varied": small narrative sentences (harder: the bundled model tends to answer from the story instead).
SIMPLE_FILLER: tuple[str, ...] = (
    "The grass is green.", "The sky is blue.", "The sun is warm.", "The sea is calm.", "The road is long.",
    "The night is quiet.", "The snow is white.", "The wind is cold.", "The hills are far away.",
    "The trees are tall.", "The river is wide.", "The stones are grey.",
)
VARIED_FILLER: tuple[str, ...] = (
    "The grass is green and the sky is blue.",
    "A gentle wind moved through the tall trees at the edge of the field.",
    "The river ran slowly past the old stone mill.",
    "In the morning the market square filled with people buying bread and fruit.",
    "Clouds gathered over the hills and then drifted away to the east.",
    "The library was quiet except for the sound of turning pages.",
    "A small boat rocked against the wooden pier in the harbour.",
    "The baker opened his shop early and the smell of fresh loaves filled the street.",
    "Children played in the park while their parents talked on the benches.",
    "The road wound through the valley between fields of wheat.",
    "An old clock ticked steadily on the wall of the kitchen.",
    "Birds sang from the hedges as the sun rose over the village.",
    "The train left the station and disappeared into the tunnel.",
    "Rain tapped softly on the roof of the garden shed.",
    "The museum displayed paintings of ships, mountains and forests.",
    "A cat slept in a patch of sunlight on the windowsill.",
    "The teacher wrote a short poem on the blackboard.",
    "Snow covered the rooftops and the streets were silent.",
    "The lighthouse stood on the rocks at the end of the bay.",
    "Farmers brought their apples and pears to the autumn fair.",
    "The path through the forest was covered with fallen leaves.",
    "A kettle whistled in the kitchen and someone made a pot of tea.",
    "The bridge crossed the river where it was narrowest.",
    "Lanterns were hung along the street for the evening festival.",
    "The orchestra tuned their instruments before the concert began.",
    "Waves broke on the sand and washed back into the sea.",
    "The gardener planted rows of tulips along the fence.",
    "A long table was set for dinner with plates, cups and candles.",
    "The mountain peak was hidden behind a layer of white mist.",
    "Shops along the high street closed their shutters at dusk.",
    "A dog chased a ball across the lawn and brought it back.",
    "The old map showed roads, rivers and the borders of forgotten towns.",
    "Travellers rested at the inn before continuing their journey.",
    "The bell in the church tower rang across the quiet fields.",
    "Fresh flowers stood in a vase on the table by the window.",
    "The fisherman mended his nets while the gulls circled overhead.",
    "Leaves turned red and gold as the days grew shorter.",
    "A narrow staircase led up to a small room under the roof.",
    "The students walked together to the lecture hall.",
    "Smoke rose from the chimneys of the cottages on the hill.",
)
FILLERS: dict[str, tuple[str, ...]] = {"simple": SIMPLE_FILLER, "varied": VARIED_FILLER}

ADJECTIVES: tuple[str, ...] = (
    "amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "happy", "icy", "jolly",
    "kind", "lively", "misty", "noble", "orange", "proud", "quiet", "rapid", "silent", "tidy",
    "urban", "vivid", "witty", "young", "zesty", "ancient", "bitter", "clever", "daring", "early",
    "fierce", "golden", "hollow", "humble", "lucky", "modern", "narrow", "polite", "rural", "shiny",
    "smooth", "sturdy", "tender", "violet", "wooden", "bright", "cosy", "frosty", "grand", "loyal",
)

NOUNS: tuple[str, ...] = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
    "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "rocket", "saddle", "tunnel",
    "umbrella", "valley", "wagon", "yacht", "zebra", "basket", "castle", "desert", "feather", "glacier",
    "hammer", "insect", "jungle", "ladder", "mirror", "napkin", "oyster", "pillow", "rabbit", "signal",
    "teapot", "violin", "window", "bottle", "canyon", "forest", "marble", "pencil", "statue", "turnip",
)

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"

FACT_INTRO = (
    "Below is a record of lines I want you to remember. Each line begins with 'line' and a line name, "
    "and ends with the REGISTER_CONTENT of that line, which is a number. At the end of the record I will "
    "ask you for the REGISTER_CONTENT of one line. Now the record starts:"
)
FACT_LINE = "line {key}: REGISTER_CONTENT is {value}"
FACT_QUESTION = "Now the record is over. What is the REGISTER_CONTENT in line {key}?"


def chat_prompt(tokenizer: Any, user_message: str) -> str:
    """The raw prompt string for one user turn, ending with the assistant header."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
    )


def count_tokens(tokenizer: Any, text: str) -> int:
    """Token count of a raw (already templated) prompt, as a server tokenizes it (no extra specials)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _depths(n: int) -> list[float]:
    """``n`` needle depths evenly spread over [0, 1] (0.5 when ``n == 1``)."""
    if n == 1:
        return [0.5]
    return [i / (n - 1) for i in range(n)]


def _passkey_message(before: Sequence[str], needle: str, after: Sequence[str]) -> str:
    haystack = " ".join([*before, needle, *after])
    return f"{PASSKEY_INTRO}\n\n{haystack}\n\n{PASSKEY_QUESTION}"


def make_passkey_tasks(tokenizer: Any, n: int, context_tokens: int, seed: int = 0,
                       filler: str = "simple") -> list[dict]:
    """``n`` passkey tasks of about ``context_tokens`` prompt tokens, needle depth spread from 0% to 100%.

    The haystack is drawn (seeded) from the sentences of ``FILLERS[filler]``; the needle is
    ``"The pass key is 48213. Remember it. 48213 is the pass key."`` with a random 5-digit key, inserted at
    the sentence boundary nearest to ``depth`` of the haystack. The prompt length is matched to within one
    filler sentence of ``context_tokens``.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if filler not in FILLERS:
        raise ValueError(f"filler must be one of {sorted(FILLERS)}, got {filler!r}")
    sentences = FILLERS[filler]
    rng = random.Random(seed)
    sentence_tokens = {s: count_tokens(tokenizer, " " + s) for s in sentences}
    tasks = []
    for i, depth in enumerate(_depths(n)):
        key = str(rng.randint(10000, 99999))
        needle = PASSKEY_NEEDLE.format(key=key)
        overhead = count_tokens(tokenizer, chat_prompt(tokenizer, _passkey_message([], needle, [])))
        budget = context_tokens - overhead
        if budget < 0:
            raise ValueError(f"context_tokens={context_tokens} is below the overhead ({overhead} tokens)")
        hay: list[str] = []
        total = 0
        while True:
            s = rng.choice(sentences)
            while hay and s == hay[-1]:
                s = rng.choice(sentences)
            # stop at the sentence boundary closest to the budget
            if total + sentence_tokens[s] - budget > budget - total:
                break
            hay.append(s)
            total += sentence_tokens[s]
        cut = round(depth * len(hay))
        prompt = chat_prompt(tokenizer, _passkey_message(hay[:cut], needle, hay[cut:]))
        tasks.append({
            "prompt": prompt,
            "answer": key,
            "kind": "passkey",
            "seed": seed,
            "index": i,
            "depth": depth,
            "context_tokens": context_tokens,
            "filler": filler,
            "prompt_tokens": count_tokens(tokenizer, prompt),
        })
    return tasks


def make_fact_tasks(tokenizer: Any, n: int, num_lines: int, seed: int = 0) -> list[dict]:
    """``n`` LongEval-style line-retrieval tasks over ``num_lines`` lines each.

    Lines read ``"line <adjective>-<noun>: REGISTER_CONTENT is <number>"`` with distinct line names and
    distinct 5-digit numbers; the question asks for the REGISTER_CONTENT of one random line.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    max_lines = len(ADJECTIVES) * len(NOUNS)
    if not 1 <= num_lines <= max_lines:
        raise ValueError(f"num_lines must be in [1, {max_lines}]")
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        pairs = rng.sample(range(max_lines), num_lines)
        keys = [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]
        values = [str(v) for v in rng.sample(range(10000, 100000), num_lines)]
        target = rng.randrange(num_lines)
        record = "\n".join(FACT_LINE.format(key=k, value=v) for k, v in zip(keys, values, strict=True))
        message = f"{FACT_INTRO}\n\n{record}\n\n{FACT_QUESTION.format(key=keys[target])}"
        prompt = chat_prompt(tokenizer, message)
        tasks.append({
            "prompt": prompt,
            "answer": values[target],
            "kind": "fact",
            "seed": seed,
            "index": i,
            "num_lines": num_lines,
            "line_key": keys[target],
            "line_index": target,
            "depth": target / (num_lines - 1) if num_lines > 1 else 0.5,
            "prompt_tokens": count_tokens(tokenizer, prompt),
        })
    return tasks


def is_correct(answer: str, generated: str) -> bool:
    """The scoring rule: the answer appears in the generated text, case-insensitively."""
    return answer.lower() in generated.lower()


def write_jsonl(tasks: Iterable[dict], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps(task, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_tokenizer(model: str | None = None) -> Any:
    """The tokenizer of ``model`` (default: the bundled SmolLM2 folder), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from zipcache_vllm.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


def generate_hf(tasks: Sequence[dict], model: str | None = None, dtype: str = "bfloat16",
                max_new_tokens: int = 20, threads: int | None = None) -> list[str]:
    """Greedy completions of each task's prompt with transformers (CPU) and a plain ``DynamicCache``.

    ``threads`` sets torch's intra-op threads; 1 is much faster than 2 on a busy 2-core machine.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from zipcache_vllm.models import resolve_model

    if threads:
        torch.set_num_threads(threads)

    path = resolve_model(model, dtype)
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    outs = []
    with torch.inference_mode():
        for task in tasks:
            ids = tok(task["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
            gen = lm.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                past_key_values=DynamicCache(config=lm.config), pad_token_id=tok.pad_token_id,
            )
            outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs


def make_tasks(tokenizer: Any, kind: str, n: int, size: int, seed: int = 0, filler: str = "simple") -> list[dict]:
    """``kind`` is ``passkey`` (``size`` = context tokens) or ``fact`` (``size`` = number of lines)."""
    if kind == "passkey":
        return make_passkey_tasks(tokenizer, n, size, seed, filler)
    if kind == "fact":
        return make_fact_tasks(tokenizer, n, size, seed)
    raise ValueError(f"unknown task kind {kind!r}")


def calibrate(kind: str, sizes: Sequence[int], n: int, seed: int = 0, model: str | None = None,
              dtype: str = "bfloat16", max_new_tokens: int = 20, threads: int | None = 1,
              filler: str = "simple") -> list[dict]:
    """Accuracy of the model on ``n`` tasks of each size; prints a markdown table row per size."""
    tok = load_tokenizer(model)
    rows = []
    for size in sizes:
        tasks = make_tasks(tok, kind, n, size, seed, filler)
        t0 = time.time()
        outs = generate_hf(tasks, model, dtype, max_new_tokens, threads)
        secs = time.time() - t0
        hits = [is_correct(t["answer"], o) for t, o in zip(tasks, outs, strict=True)]
        row = {
            "kind": kind, "size": size, "n": n, "seed": seed, "dtype": dtype,
            "filler": filler if kind == "passkey" else None,
            "mean_prompt_tokens": sum(t["prompt_tokens"] for t in tasks) / n,
            "accuracy": sum(hits) / n, "seconds": secs,
            "misses": [{"answer": t["answer"], "depth": t["depth"], "output": o}
                       for t, o, h in zip(tasks, outs, hits, strict=True) if not h],
        }
        rows.append(row)
        label = f"{kind} ({filler})" if kind == "passkey" else kind
        print(f"| {label} | {size} | {row['mean_prompt_tokens']:.0f} | {n} | {sum(hits)}/{n} "
              f"| {row['accuracy']:.0%} | {secs:.0f} s |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m zipcache_vllm.eval.tasks",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("passkey", help="passkey retrieval tasks")
    pk.add_argument("--context-tokens", type=int, required=True, help="target prompt length in tokens")
    pk.add_argument("--filler", choices=sorted(FILLERS), default="simple", help="haystack sentences")
    fa = sub.add_parser("fact", help="LongEval-style line retrieval tasks")
    fa.add_argument("--num-lines", type=int, required=True)
    for sp in (pk, fa):
        sp.add_argument("--n", type=int, required=True)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--output", required=True, help="jsonl file to write")
        sp.add_argument("--model", default=None, help="tokenizer folder (default: the bundled model)")
    ca = sub.add_parser("calibrate", help="greedy accuracy of a model (transformers, DynamicCache) per size")
    ca.add_argument("--kind", choices=("passkey", "fact"), required=True)
    ca.add_argument("--sizes", type=int, nargs="+", required=True,
                    help="context tokens (passkey) or number of lines (fact)")
    ca.add_argument("--n", type=int, default=20)
    ca.add_argument("--seed", type=int, default=0)
    ca.add_argument("--model", default=None)
    ca.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ca.add_argument("--max-new-tokens", type=int, default=20)
    ca.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ca.add_argument("--filler", choices=sorted(FILLERS), default="simple", help="passkey haystack sentences")
    ca.add_argument("--output", default=None, help="optional json file for the rows (with misses)")
    ev = sub.add_parser("evaluate", help="greedy accuracy of a model (transformers, DynamicCache) on a jsonl")
    ev.add_argument("--input", required=True)
    ev.add_argument("--model", default=None)
    ev.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ev.add_argument("--max-new-tokens", type=int, default=20)
    ev.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args(argv)

    if args.cmd == "evaluate":
        tasks = read_jsonl(args.input)
        t0 = time.time()
        outs = generate_hf(tasks, args.model, args.dtype, args.max_new_tokens, args.threads)
        hits = sum(is_correct(t["answer"], o) for t, o in zip(tasks, outs, strict=True))
        print(f"{args.input}: {hits}/{len(tasks)} correct ({hits / len(tasks):.0%}), {args.dtype}, "
              f"{time.time() - t0:.0f} s")
        return
    if args.cmd == "calibrate":
        print("| kind | size | mean prompt tokens | n | correct | accuracy | time |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        rows = calibrate(args.kind, args.sizes, args.n, args.seed, args.model, args.dtype,
                         args.max_new_tokens, args.threads, args.filler)
        if args.output:
            Path(args.output).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        return
    tok = load_tokenizer(args.model)
    size = args.context_tokens if args.cmd == "passkey" else args.num_lines
    tasks = make_tasks(tok, args.cmd, args.n, size, args.seed, getattr(args, "filler", "simple"))
    write_jsonl(tasks, args.output)
    lens = [t["prompt_tokens"] for t in tasks]
    print(f"wrote {len(tasks)} {args.cmd} tasks to {args.output} (prompt tokens {min(lens)}..{max(lens)})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
