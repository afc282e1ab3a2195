"""Attention traces of a served model, for finding where greedy answers start to depend on the load.

With ``ZIPCACHE_TRACE_DIR`` set, the ZipCache backend saves every layer call of every step (the rows' positions
and their query, key, value and attention output, as given to and returned by the engine step) to a file of
that folder (:func:`write`; slow, for debugging only: every call copies to the host, so on CUDA run eagerly,
``--enforce-eager``, as a captured graph cannot copy). :func:`first_divergence` compares two traces of the same
prompt served under different loads (alone, then among copies of itself) position by position in token order
and layer by layer: the first row whose inputs or output differ tells where the runs part. Attention inputs
that differ while every earlier layer's attention output agreed mean the divergence entered outside the
attention (vLLM's own layers: projections, norms, MLP); equal inputs and a different output mean it entered
in the ZipCache attention. ``benchmarks/trace_load_divergence.py`` runs both servers and prints the verdict.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch

_counter = itertools.count()


def write(folder: str, layer_idx: int, step, query, key, value, out) -> None:
    """Save one layer call: ``step`` (the engine's :class:`~zipcache_vllm.engine.step.Step`) gives each row's
    sequence and position; the tensors' real rows are copied to the CPU."""
    n = step.query_start[-1]
    rec = {"layer": layer_idx, "query_start": list(step.query_start), "query_lens": list(step.query_lens),
           "context_lens": list(step.context_lens),
           **{name: x[:n].detach().to("cpu", copy=True) for name, x in
              (("query", query), ("key", key), ("value", value), ("out", out))}}  # fmt: skip
    torch.save(rec, Path(folder) / f"{os.getpid()}-{next(_counter):08d}.pt")


def read(folder: str | Path) -> dict:
    """``{(layer, position): [row, ...]}`` with ``row = (query, key, value, out, (query_lens, context_lens))``
    for every row of every call (several rows share a key when copies of one prompt run together)."""
    rows: dict = {}
    for f in sorted(Path(folder).glob("*.pt")):
        r = torch.load(f)
        batch = (tuple(r["query_lens"]), tuple(r["context_lens"]))
        for a, ql, ctx in zip(r["query_start"], r["query_lens"], r["context_lens"], strict=False):
            for j in range(ql):
                rows.setdefault((r["layer"], ctx + j), []).append(
                    (r["query"][a + j], r["key"][a + j], r["value"][a + j], r["out"][a + j], batch))
    return rows


def first_divergence(reference: dict, other: dict) -> dict | None:
    """The first (position, layer), in token order then layer order, where a row of ``other`` differs from
    ``reference``'s row of that position (bit for bit), or None. Returns the position, the layer, which of
    ``query``/``key``/``value``/``out`` differ (with their largest absolute difference), both rows' batches,
    and ``where``: ``outside attention`` when an input differs, ``attention`` when only the output does."""
    layers = sorted({layer for layer, _ in reference})
    positions = sorted({p for _, p in reference})
    for p in positions:
        for layer in layers:
            ref = reference[(layer, p)][0]
            for row in other.get((layer, p), []):
                diff = {name: float((a.float() - b.float()).abs().max())
                        for name, a, b in zip(("query", "key", "value", "out"), ref[:4], row[:4], strict=True)
                        if not torch.equal(a, b)}  # fmt: skip
                if diff:
                    inputs = any(name != "out" for name in diff)
                    return {"position": p, "layer": layer, "differ": diff,
                            "where": "outside attention" if inputs else "attention",
                            "batch": {"query_lens": row[4][0], "context_lens": row[4][1]},
                            "reference_batch": {"query_lens": ref[4][0], "context_lens": ref[4][1]}}  # fmt: skip
    return None
