"""Salient-split calibrations: per-layer (key, value) salient rows under a fixed total per block.

A calibration file (``configs/calibration/NAME.json``, written by ``python -m zipcache_vllm.eval.calibrate``)
holds, per model shape and per byte budget, how many of a block's salient rows go to keys in each layer; the
rest of the budget's rows go to values. Every layer keeps the same total, so pages keep one size (vLLM needs one
page size for all layers) and the bytes of the fixed preset with that total::

    {"format": 1, "block_size": 128,
     "models": {"30x3x64": {"model": "smollm2-135m",
                            "budgets": {"128": {"key_rows": [96, 112, ...], ...}}}}}

The shape key is ``{num_layers}x{num_kv_heads}x{head_size}``; the budget key the total salient rows per block
(keys + values, ``ZipCacheConfig.salient_rows``: 128 for the ``vllm`` preset's 96 + 32).
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import CONFIG_DIR

FORMAT = 1


def shape_key(num_layers: int, num_kv_heads: int, head_size: int) -> str:
    return f"{num_layers}x{num_kv_heads}x{head_size}"


def calibration_path(name: str) -> Path:
    """``NAME`` -> ``configs/calibration/NAME.json``; a path (with a suffix, or existing) as given."""
    p = Path(name)
    if p.suffix or p.exists():
        return p
    return CONFIG_DIR / "calibration" / f"{name}.json"


def load(name: str) -> dict:
    path = calibration_path(name)
    if not path.exists():
        raise ValueError(f"no salient-split calibration {name!r} ({path})")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: calibration format {data.get('format')!r}, expected {FORMAT}")
    return data


def key_rows(name: str, num_layers: int, num_kv_heads: int, head_size: int, block_size: int,
             salient_rows: int) -> list[int]:  # fmt: skip
    """Key salient rows per layer for a model shape and a budget of ``salient_rows`` rows per block."""
    data = load(name)
    path = calibration_path(name)
    if data.get("block_size") != block_size:
        raise ValueError(f"{path}: calibrated for blocks of {data.get('block_size')} tokens, not {block_size}")
    shape = shape_key(num_layers, num_kv_heads, head_size)
    model = data.get("models", {}).get(shape)
    if model is None:
        raise ValueError(
            f"{path} has no calibration for a model of shape {shape} (layers x KV heads x head size; it has "
            f"{', '.join(sorted(data.get('models', {}))) or 'none'}): run python -m zipcache_vllm.eval.calibrate"
        )
    budget = model.get("budgets", {}).get(str(salient_rows))
    if budget is None:
        raise ValueError(
            f"{path}: no split of {salient_rows} salient rows per block for shape {shape} (budgets: "
            f"{', '.join(sorted(model.get('budgets', {}), key=int))}): run python -m zipcache_vllm.eval.calibrate"
        )
    rows = [int(r) for r in budget["key_rows"]]
    if len(rows) != num_layers:
        raise ValueError(f"{path}: {len(rows)} layers for shape {shape}")
    return rows


def layer_ratios(name: str, num_layers: int, num_kv_heads: int, head_size: int, block_size: int,
                 salient_rows: int) -> tuple[tuple[float, float], ...]:  # fmt: skip
    """``layer_salient_ratios`` of a calibration: (key rows, value rows) / block_size per layer."""
    rows = key_rows(name, num_layers, num_kv_heads, head_size, block_size, salient_rows)
    return tuple((k / block_size, (salient_rows - k) / block_size) for k in rows)
