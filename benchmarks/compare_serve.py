"""Tokens/s of zipcache vs stock bf16 through vLLM's real server on this machine (the figures of docs/vllm-plugin.md).

    python benchmarks/compare_serve.py [--prompt-words 16,500] [--streams 1,8] [--output results/cpu_serve.json]

For each backend (stock, zipcache) it starts ``zipcache-vllm serve`` on the bundled SmolLM2-135M-Instruct with the
flags of ``make serve`` on 127.0.0.1 (a free port), waits for ``/health``, runs ``bench_serve.py``'s greedy
``ignore_eos`` batches (a warm-up at the same prompt length first, so compilation is not timed), stops the server
by its PID, and prints a table last. The two backends run back to back; the machine's load average is recorded
with each run (other jobs on a shared machine change the absolute figures, rarely the ratio much).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import one, prompt  # noqa: E402

from zipcache_vllm.plugin.launch import stop_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "zipcache-vllm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(backend: str, max_num_seqs: int, log_path: Path, extra_env: dict[str, str] | None = None):
    """``zipcache-vllm serve`` of the bundled model with ``make serve``'s flags on a free port (``extra_env``: more
    environment variables): yields (port, process) once /health answers; stops it by PID on exit."""
    from zipcache_vllm.models import resolve_model

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", **(extra_env or {})}
    cmd = [str(SCRIPT), "serve", resolve_model(None), "--kv-cache-backend", backend, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "bfloat16", "--served-model-name", "smollm2", "--enforce-eager",
           "--max-model-len", "2048", "--max-num-seqs", str(max_num_seqs)]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{backend} server did not start; see {log_path}") from None
                time.sleep(1)
        yield port, proc
    finally:
        stop_server(proc)


async def batch(port: int, streams: int, words: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=900, max_retries=0)
    await asyncio.gather(*(one(client, "smollm2", prompt(words, 1000 + i), 8) for i in range(streams)))  # warm-up
    load = os.getloadavg()[0]
    t = time.perf_counter()
    done = await asyncio.gather(*(one(client, "smollm2", prompt(words, i), max_tokens) for i in range(streams)))
    wall = time.perf_counter() - t
    await client.close()
    return {"streams": streams, "prompt_words": words, "tokens": sum(done), "seconds": round(wall, 2),
            "tok_per_s": round(sum(done) / wall, 1), "load_avg_1m": round(load, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="auto,zipcache", help="auto = stock vLLM")
    ap.add_argument("--prompt-words", default="16,500")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    logs = REPO / "out"
    logs.mkdir(exist_ok=True)
    rows = []
    for backend in args.backends.split(","):
        with server(backend, args.max_num_seqs, logs / f"compare_serve_{backend}.log") as (port, _proc):
            for words in map(int, args.prompt_words.split(",")):
                for streams in map(int, args.streams.split(",")):
                    r = {"backend": backend, **asyncio.run(batch(port, streams, words, args.max_tokens))}
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    if args.output:
        Path(args.output).write_text(json.dumps({"commit": commit.stdout.strip(), "rows": rows}, indent=1))
    print(f"\n{'prompt words':>12} {'streams':>7} {'stock tok/s':>11} {'zipcache tok/s':>14} {'ratio':>6}")
    for words in map(int, args.prompt_words.split(",")):
        for streams in map(int, args.streams.split(",")):
            got = {r["backend"]: r["tok_per_s"] for r in rows if r["prompt_words"] == words and r["streams"] == streams}
            if "auto" in got and "zipcache" in got:
                print(f"{words:>12} {streams:>7} {got['auto']:>11.1f} {got['zipcache']:>14.1f} "
                      f"{got['zipcache'] / got['auto']:>6.0%}")


if __name__ == "__main__":
    main()
