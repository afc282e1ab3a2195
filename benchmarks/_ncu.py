"""Nsight Compute helpers shared by the ``ncu_*.py`` benchmarks: run a script under ``ncu`` and print the report,
its stall reasons per issued instruction (:func:`profile`) and the SASS lines where warps stall most
(:func:`source_hotspots`)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

SECTIONS = ["SpeedOfLight", "Occupancy", "LaunchStats", "SchedulerStats", "WarpStateStats"]
STALLS = r"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"


def profile(kernel: str, argv: list[str], label: str, sections: list[str] = SECTIONS) -> str:
    """Run ``python argv`` under ncu (the third launch of kernels matching ``kernel``), print its report and the
    stall reasons per issued instruction, largest first; return the report."""
    cmd = ["ncu", "--kernel-name", f"regex:{kernel}", "--launch-skip", "2", "--launch-count", "1"]
    for s in sections:
        cmd += ["--section", s]
    cmd += ["--metrics", STALLS, sys.executable, *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    text = res.stdout + res.stderr
    print(text[-12000:] if res.returncode else text)
    stalls = sorted(
        ((float(v.replace(",", "")), k) for k, v in re.findall(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_"
                                                               r"active\.ratio\s+\S*\s+([\d.,]+)", text)),
        reverse=True,
    )
    print(f"\n## stall reasons, {label} (warps stalled per issued instruction)")
    for v, k in stalls[:12]:
        print(f"{k:28s} {v:8.3f}")
    return text


def source_hotspots(kernel: str, argv: list[str], label: str, top: int = 40) -> list[tuple[float, str, str]]:
    """Run ``python argv`` under ncu's source page (SASS, CSV; the third launch of ``kernel``) and print the
    ``top`` SASS lines with the most warp-stall samples, each with its share of all samples and its address;
    return ``(samples, address, sass)`` of every line, most first (empty, with ncu's output printed, when the page
    has no sample column)."""
    cmd = ["ncu", "--kernel-name", f"regex:{kernel}", "--launch-skip", "2", "--launch-count", "1",
           "--section", "SourceCounters", "--page", "source", "--print-source", "sass", "--csv",
           sys.executable, *argv]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    rows = list(csv.reader(line for line in res.stdout.splitlines() if line.startswith('"')))
    head = next((i for i, r in enumerate(rows) if any("Source" in c for c in r)), None)
    col = None if head is None else next(
        (j for j, c in enumerate(rows[head]) if "Sampling" in c and "All" in c), None)  # fmt: skip
    if col is None:
        print((res.stdout + res.stderr)[-6000:])
        print(f"\n## source hot spots, {label}: no warp-stall sample column in ncu's source page")
        return []
    names = rows[head]
    addr = next((j for j, c in enumerate(names) if "Address" in c), 0)
    src = next(j for j, c in enumerate(names) if "Source" in c)
    lines = []
    for r in rows[head + 1 :]:
        if len(r) > max(col, src, addr):
            try:
                lines.append((float(r[col].replace(",", "") or 0), r[addr], r[src].strip()))
            except ValueError:
                continue
    lines.sort(key=lambda x: -x[0])
    total = sum(x[0] for x in lines) or 1.0
    print(f"\n## source hot spots, {label}: {len(lines)} SASS lines, {total:.0f} warp-stall samples ({names[col]})")
    for n, a, t in lines[:top]:
        print(f"{100 * n / total:5.1f} %  {a:>8s}  {t}")
    return lines
