"""Run a benchmark with decode v2's page-loop schedule set to a variant of ``spike_decode_v2.VARIANTS``.

    PYTHONPATH=. python benchmarks/v2_options.py --variant one-map-ring-r168 -- benchmarks/bench_kernels.py --quick
    PYTHONPATH=. python benchmarks/v2_options.py --best-of spike.log --case 16x32768 -- benchmarks/bench_kernels.py

The schedule is the module's defaults (``kernels/decode_v2.py``, ``SCHEDULE``, read at each call), so everything
the target runs (the kernel records, the engine's decode step) uses it. ``--best-of``: the
variant with the lowest time at ``--case`` in the table a ``spike_decode_v2.py --variants`` run printed (so one
device call can measure the variants and then record the fastest). Prints the variant first.
"""

from __future__ import annotations

import argparse
import runpy
import sys

from zipcache_vllm.kernels import decode_v2

from benchmarks.spike_decode_v2 import VARIANTS, variant_options


def best_of(log: str, case: str) -> str:
    """The variant of the fastest row of ``case`` (``BATCHxCONTEXT``) in a spike log's markdown table."""
    batch, ctx = case.split("x")
    rows = []
    with open(log) as f:
        lines = f.read().splitlines()
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[1] == batch and cells[2] == ctx and cells[3] in VARIANTS:
            rows.append((float(cells[6]), cells[3]))
    if not rows:
        raise SystemExit(f"no {case} rows in {log}")
    return min(rows)[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=sorted(VARIANTS))
    ap.add_argument("--best-of", help="a spike_decode_v2.py --variants log")
    ap.add_argument("--case", default="16x32768")
    ap.add_argument("target", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]")
    a = ap.parse_args()
    name = a.variant or best_of(a.best_of, a.case)
    kw = variant_options(name)
    decode_v2.set_schedule_defaults(**kw)
    print(f"decode v2 schedule: {name} {kw}", flush=True)
    target = a.target[1:] if a.target[:1] == ["--"] else a.target
    sys.argv = target
    runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main()
