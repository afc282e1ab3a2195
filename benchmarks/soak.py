"""Soak: vLLM's own load generator against a stock and a zipcache server, back to back, for a fixed duration.

    python benchmarks/soak.py --duration 600 --output benchmarks/results/cpu_soak.json      # the docs' run
    python benchmarks/soak.py --duration 20 --request-rate 2 --output /tmp/soak.json        # CI-sized

For each backend (``auto`` = stock, ``zipcache``) it starts ``zipcache-vllm serve`` on the bundled model with
``make serve``'s flags on 127.0.0.1 (``benchmarks/compare_serve.py``'s server helper), then runs
``zipcache-vllm bench serve`` (vLLM's ``vllm bench serve``; on the CPU build ``vllm bench`` fails on the
package's broken metadata lookup, which ``zipcache-vllm`` fixes) with the random dataset: ``duration x
request-rate`` requests of ``--input-len`` random tokens, ``--output-len`` generated (``ignore_eos``), Poisson
arrivals at ``--request-rate`` per second, at most ``--max-concurrency`` in flight. While it runs, the server's
resident memory (the process tree's RSS) is sampled every second. Reports per backend: completed / failed
requests, request and output-token throughput, TTFT / TPOT / ITL percentiles (ms), peak and final RSS; the
server is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_serve import REPO, SCRIPT, server  # noqa: E402


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants (vLLM's engine core runs in a child process)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            todo.extend(int(c) for c in children)
        except (OSError, StopIteration):
            continue
    return total / 1024


def run_bench(port: int, args, result_dir: Path, name: str) -> dict:
    from zipcache_vllm.models import resolve_model

    num_prompts = max(1, round(args.duration * args.request_rate))
    cmd = [str(SCRIPT), "bench", "serve", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(port),
           "--model", "smollm2", "--tokenizer", resolve_model(None), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(num_prompts), "--request-rate", str(args.request_rate),
           "--max-concurrency", str(args.max_concurrency), "--ignore-eos", "--seed", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--save-result", "--result-dir", str(result_dir), "--result-filename", f"{name}.json", "--disable-tqdm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.duration * 20 + 600)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads((result_dir / f"{name}.json").read_text())


KEYS = ("completed", "failed", "request_throughput", "output_throughput", "total_token_throughput",
        "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms", "p99_e2el_ms")


def soak(backend: str, args, result_dir: Path) -> dict:
    log = REPO / "out" / f"soak_{backend}.log"
    log.parent.mkdir(exist_ok=True)
    with server(backend, args.max_num_seqs, log) as (port, proc):
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def sample():
            while not stop.is_set():
                samples.append((round(time.monotonic() - t0, 1), round(tree_rss_mib(proc.pid), 1)))
                stop.wait(1.0)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            res = run_bench(port, args, result_dir, backend)
        finally:
            stop.set()
            th.join()
    failed = res.get("failed", res.get("num_prompts", 0) - res.get("completed", 0))
    row = {"backend": backend, **{k: res.get(k) for k in KEYS}, "failed": failed,
           "num_prompts": res.get("num_prompts"), "duration_s": res.get("duration"),
           "rss_mib_peak": max(m for _, m in samples) if samples else None,
           "rss_mib_final": samples[-1][1] if samples else None, "rss_mib": samples}
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="auto,zipcache", help="auto = stock vLLM")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per backend")
    ap.add_argument("--request-rate", type=float, default=1.0, help="requests per second (Poisson)")
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            row = soak(backend, args, Path(tmp))
            print(json.dumps({k: v for k, v in row.items() if k != "rss_mib"}), flush=True)
            rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    if args.output:
        Path(args.output).write_text(json.dumps({"commit": commit.stdout.strip(), "args": vars(args),
                                                 "rows": rows}, indent=1))
    print(f"\n{'backend':>9} {'done':>5} {'failed':>6} {'req/s':>6} {'out tok/s':>9} {'TTFT p50/p99 ms':>17} "
          f"{'TPOT p50/p99 ms':>16} {'RSS peak MiB':>12}")
    for r in rows:
        print(f"{r['backend']:>9} {r['completed']:>5} {r['failed']:>6} {r['request_throughput']:>6.2f} "
              f"{r['output_throughput']:>9.1f} {r['p50_ttft_ms']:>8.0f}/{r['p99_ttft_ms']:<8.0f} "
              f"{r['p50_tpot_ms']:>7.0f}/{r['p99_tpot_ms']:<8.0f} {r['rss_mib_peak']:>12.0f}")


if __name__ == "__main__":
    main()
