"""The soak script end to end, CI-sized: vLLM's own load generator (``zipcache-vllm bench serve``, random dataset)
against a stock and a zipcache server back to back; every request completes on both, and the report has the
figures the docs' longer run shows (benchmarks/soak.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_soak_short_run(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--duration", "10", "--request-rate", "1",
           "--input-len", "128", "--output-len", "16", "--max-concurrency", "4", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"auto", "zipcache"}
    for name, r in rows.items():
        assert r["num_prompts"] == 10 and r["completed"] == 10 and r["failed"] == 0, (name, r)
        assert r["output_throughput"] > 0 and r["p99_ttft_ms"] >= r["p50_ttft_ms"] > 0, (name, r)
        assert r["rss_mib_peak"] > 100 and len(r["rss_mib"]) >= 5, (name, r["rss_mib"])  # sampled while it ran
