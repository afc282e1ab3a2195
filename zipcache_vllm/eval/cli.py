"""``zipcache-eval``: accuracy of compressed KV caches on a real model (default: the bundled SmolLM2).

Subcommands: ``perplexity``, ``agreement``, ``retrieval``, ``sweep`` (see ``zipcache-eval CMD --help``).
Each prints a table and, with ``--output FILE``, writes JSON mapping every method spec to its figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .methods import ALL_METHODS, Method

DEFAULT_METHODS = "bf16,int8,int4,int2,kivi4,kivi2,zipcache,zipcache-accum,zipcache-quota,zipcache-paged,quanto-int4"
COLUMNS = ("perplexity", "agreement", "kl", "accuracy", "bytes_per_token", "bits_per_value", "compression_ratio",
           "paper_ratio")


def _methods(text: str) -> list[Method]:
    # Commas separate methods and options alike: an item with "=" but no ":" continues the previous method's
    # options ("zipcache:salient_ratio=0.4,bits_high=8,int4" is two methods).
    specs: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item
        else:
            specs.append(item)
    methods = []
    for s in specs:
        try:
            methods.append(Method.parse(s))
        except ValueError as e:
            raise SystemExit(f"zipcache-eval: {e}") from None
    return methods


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"zipcache-eval: no such file: {path}")
    return p.read_text(encoding="utf-8", errors="replace")


def _read_jsonl(path: str, keys: tuple[str, ...]) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"zipcache-eval: no such file: {path}")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"zipcache-eval: {path}:{i}: not JSON ({e.msg})") from None
        missing = [k for k in keys if k not in row]
        if not isinstance(row, dict) or missing:
            raise SystemExit(f"zipcache-eval: {path}:{i}: each line needs keys {list(keys)}, missing {missing}")
        rows.append(row)
    if not rows:
        raise SystemExit(f"zipcache-eval: {path} holds no rows")
    return rows


def print_table(results: dict, title: str, file=sys.stdout) -> None:
    cols = [c for c in COLUMNS if any(c in r for r in results.values())]
    width = max(12, *(len(k) for k in results))
    print(f"\n{title}", file=file)
    print(f"{'method':<{width}} " + " ".join(f"{c:>17}" for c in cols), file=file)
    for name, r in results.items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-':>17}" if v is None else f"{v:>17.4f}" if isinstance(v, float) else f"{v:>17}")
        print(f"{name:<{width}} " + " ".join(cells), file=file)


def _write(args, payload: dict) -> None:
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.output}")


def cmd_perplexity(args) -> dict:
    from . import harness as H

    methods = _methods(args.methods)
    text = _read_text(args.text_file)
    m = H.load_model(args.model, args.dtype)
    windows = H.text_windows(m, text, args.context_len, args.continuation_len, args.max_windows)
    results = {}
    for meth in methods:
        results[meth.spec] = {**H.perplexity(m, meth, windows, args.context_len), "settings": meth.describe()}
    print_table(results, f"perplexity of {args.continuation_len} tokens after {args.context_len} compressed "
                         f"({len(windows)} windows of {Path(args.text_file).name})")
    return results


def cmd_agreement(args) -> dict:
    from . import harness as H

    methods = _methods(args.methods)
    rows = _read_jsonl(args.prompts_file, ("prompt",))
    m = H.load_model(args.model, args.dtype)
    prompts = [m.tokenizer(r["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
               for r in rows]
    prompts = [p for p in prompts if len(p) >= args.min_prompt_tokens][: args.max_prompts]
    if not prompts:
        raise SystemExit(f"zipcache-eval: no prompt of {args.prompts_file} has >= {args.min_prompt_tokens} tokens")
    refs = H.references(m, prompts, args.max_new_tokens)
    results = {meth.spec: {**H.agreement(m, meth, prompts, refs), "settings": meth.describe()} for meth in methods}
    print_table(results, f"greedy agreement / KL vs bf16 over {args.max_new_tokens} generated tokens, "
                         f"{len(prompts)} prompts")
    return results


def cmd_retrieval(args) -> dict:
    from . import harness as H

    methods = _methods(args.methods)
    tasks = _read_jsonl(args.tasks_file, ("prompt", "answer"))[: args.max_tasks]
    m = H.load_model(args.model, args.dtype)
    results = {}
    for meth in methods:
        r = H.retrieval(m, meth, tasks, args.max_new_tokens)
        if not args.keep_samples:
            r.pop("samples")
        results[meth.spec] = {**r, "settings": meth.describe()}
    print_table(results, f"retrieval accuracy, {len(tasks)} tasks of {Path(args.tasks_file).name}")
    return results


def cmd_sweep(args) -> dict:
    from . import harness as H
    from .plot import plot_sweep

    text = _read_text(args.text_file)
    ratios = [float(x) for x in args.ratios.split(",")]
    specs = [f"{fam}:salient_ratio={r}" for fam in args.families.split(",") for r in ratios]
    methods = _methods(",".join(specs)) + _methods(args.baselines)
    m = H.load_model(args.model, args.dtype)
    windows = H.text_windows(m, text, args.context_len, args.continuation_len, args.max_windows)
    results = {meth.spec: {**H.perplexity(m, meth, windows, args.context_len), "settings": meth.describe()}
               for meth in methods}
    print_table(results, "sweep: perplexity vs measured compression")
    if args.plot:
        plot_sweep(results, args.plot, title=f"{Path(args.text_file).name}: {args.context_len} compressed, "
                                             f"{args.continuation_len} scored, {len(windows)} windows")
        print(f"wrote {args.plot}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zipcache-eval", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None,
                        help="a bundled model (smollm2-135m, qwen2.5-coder-1.5b) or an HF model folder "
                        "(default: smollm2-135m)")
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="model compute dtype; caches always store bf16 (default float32)")
    common.add_argument("--output", help="write the results as JSON")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = p.add_subparsers(dest="command", required=True)
    methods_help = f"comma-separated method specs, from: {', '.join(ALL_METHODS)}; options as NAME:key=v,key=v"

    s = sub.add_parser("perplexity", parents=[common], help="continuation perplexity through the compressed cache")
    s.add_argument("--text-file", required=True)
    s.add_argument("--context-len", type=int, default=1024)
    s.add_argument("--continuation-len", type=int, default=256)
    s.add_argument("--max-windows", type=int, default=6)
    s.add_argument("--methods", default=DEFAULT_METHODS, help=methods_help)
    s.set_defaults(func=cmd_perplexity)

    s = sub.add_parser("agreement", parents=[common], help="greedy top-1 agreement and KL vs bf16")
    s.add_argument("--prompts-file", required=True, help='JSONL, lines {"prompt": raw chat-formatted string}')
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--max-prompts", type=int, default=1000)
    s.add_argument("--min-prompt-tokens", type=int, default=0,
                   help="skip shorter prompts (methods with a bf16 residual keep short prompts uncompressed)")
    s.add_argument("--methods", default=DEFAULT_METHODS, help=methods_help)
    s.set_defaults(func=cmd_agreement)

    s = sub.add_parser("retrieval", parents=[common], help="answer-in-output accuracy with the prompt compressed")
    s.add_argument("--tasks-file", required=True, help='JSONL, lines {"prompt": raw string, "answer": ...}')
    s.add_argument("--max-new-tokens", type=int, default=20)
    s.add_argument("--max-tasks", type=int, default=1000)
    s.add_argument("--keep-samples", action="store_true", help="keep every generated answer in the JSON")
    s.add_argument("--methods", default=DEFAULT_METHODS, help=methods_help)
    s.set_defaults(func=cmd_retrieval)

    s = sub.add_parser("sweep", parents=[common], help="perplexity vs measured compression over salient ratios")
    s.add_argument("--text-file", required=True)
    s.add_argument("--ratios", default="0,0.2,0.4,0.6,0.8,1.0")
    s.add_argument("--families", default="zipcache,zipcache-paged")
    s.add_argument("--baselines", default="bf16,int4,int2,kivi4,kivi2,quanto-int4")
    s.add_argument("--context-len", type=int, default=1024)
    s.add_argument("--continuation-len", type=int, default=256)
    s.add_argument("--max-windows", type=int, default=3)
    s.add_argument("--plot", default="docs/sweep.png")
    s.set_defaults(func=cmd_sweep)
    return p


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    results = args.func(args)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    _write(args, {"command": args.command, "settings": settings, "seconds": round(time.time() - t0, 1),
                  "git_commit": _git_commit(), "torch": torch.__version__, "results": results})


if __name__ == "__main__":
    main()
