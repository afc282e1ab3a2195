"""vLLM's own KV capacity figure, stock vs zipcache, at the same KV memory (the capacity of docs/vllm-plugin.md).

    python benchmarks/capacity_serve.py --model qwen2.5-coder-1.5b --max-num-seqs 32 \
        --configs vllm,adaptive --output benchmarks/results/cpu_capacity.json

For the stock server and each ZipCache preset it starts ``zipcache-vllm serve MODEL`` with ``make serve``'s flags
(``VLLM_CPU_KVCACHE_SPACE=1`` GiB, bf16, eager) on 127.0.0.1, waits for vLLM's ``KV cache size: N tokens`` line
(the engine has allocated its KV cache by then), stops the server by its PID and records N, the plugin's layout
and staging lines, and the ratio to stock. The capacity is what vLLM grants, after the bf16 staging is taken out
of the budget; no request is served.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from zipcache_vllm.plugin.launch import stop_server

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "zipcache-vllm"
KV_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")
PLUGIN_LINES = re.compile(r"(ZipCache (?:layout|bf16 staging|salient rows per layer).*)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kv_tokens(model: str, config: str | None, max_num_seqs: int, kv_gib: int, log_path: Path,
              timeout: float = 900) -> dict:  # fmt: skip
    """Start a server (``config`` None: stock), read its KV-size line, stop it; its figures."""
    from zipcache_vllm.models import resolve_model

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}"}
    backend = ["--kv-cache-backend", "auto"] if config is None else ["--kv-cache-backend", "zipcache",
                                                                      "--zipcache-config", config]
    cmd = [str(SCRIPT), "serve", resolve_model(model), *backend, "--host", "127.0.0.1", "--port",
           str(_free_port()), "--dtype", "bfloat16", "--served-model-name", "m", "--enforce-eager",
           "--max-model-len", "2048", "--max-num-seqs", str(max_num_seqs)]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            text = log_path.read_text(errors="replace")
            found = KV_LINE.search(text)
            if found:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no KV cache size line after {timeout} s:\n{text[-3000:]}")
            time.sleep(2)
    finally:
        stop_server(proc)
    return {"config": config or "stock", "kv_cache_tokens": int(found.group(1).replace(",", "")),
            "plugin_log": [m.group(1).strip() for m in PLUGIN_LINES.finditer(text)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bundled model name or folder (default smollm2-135m)")
    ap.add_argument("--configs", default="vllm", help="comma-separated ZipCache presets or YAML files")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--kv-gib", type=int, default=1)
    ap.add_argument("--log-dir", default="out")
    ap.add_argument("--output", default=None, help="append the run to this JSON list")
    args = ap.parse_args()
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    name = args.model or "smollm2-135m"
    runs = [kv_tokens(args.model, None, args.max_num_seqs, args.kv_gib, logs / f"capacity_{name}_stock.log")]
    for cfg in args.configs.split(","):
        runs.append(kv_tokens(args.model, cfg, args.max_num_seqs, args.kv_gib, logs / f"capacity_{name}_{cfg}.log"))
    stock = runs[0]["kv_cache_tokens"]
    for r in runs:
        r["ratio_vs_stock"] = round(r["kv_cache_tokens"] / stock, 4)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    record = {"model": name, "max_num_seqs": args.max_num_seqs, "kv_gib": args.kv_gib, "commit": commit,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs}
    if args.output:
        out = Path(args.output)
        data = json.loads(out.read_text()) if out.exists() else []
        data.append(record)
        out.write_text(json.dumps(data, indent=1) + "\n")
    for r in runs:
        for line in r["plugin_log"]:
            print(f"  {line}")
    print("| model | max_num_seqs | config | KV cache tokens | vs stock |")
    print("|---|---|---|---|---|")
    for r in runs:
        print(f"| {name} | {args.max_num_seqs} | {r['config']} | {r['kv_cache_tokens']:,} | "
              f"{r['ratio_vs_stock']:.2f}x |")


if __name__ == "__main__":
    main()
