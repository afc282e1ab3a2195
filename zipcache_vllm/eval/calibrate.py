"""Offline calibration of the salient split per layer: where attention needs precision, under a byte budget.

    python -m zipcache_vllm.eval.calibrate --model smollm2-135m --salient-rows 128 \
        --output configs/calibration/adaptive.json

A block of 128 tokens keeps ``salient_rows`` rows at ``bits_high`` in total (keys + values; 96 + 32 = 128 in the
``vllm`` preset). A page costs the same whichever tensor the rows go to (a 4-bit key row and a 4-bit value row
are both ``head_size / 2`` bytes), so every split of one total gives pages of one size, and each layer can take
its own split without changing the bytes (vLLM needs one page size for all layers).

**Sensitivity measure.** For each layer and each split (key rows in multiples of 16, the rest to values), the
layer's window (context + continuation) goes through the harness's own block-rule layer
(:meth:`zipcache_vllm.hf.cache.CompressedLayer.attend_blocks`, what ``zipcache-paged`` / ``zipcache-vllm`` /
``zipcache-adaptive`` run): every complete block is scored by its own probe rows (``saliency.block_probe_offsets``,
``saliency.block_saliency``, the configured normalizer), compressed with its own statistics and quota, and each
query attends over the blocks before its own compressed and its own block in bf16 up to itself, as the vLLM
plugin serves it. The error is the relative squared error of the continuation's attention output against
causal attention over bf16 K/V, summed over heads and queries and averaged over the calibration windows (the
prompt's own queries, which now also see compressed blocks, are not scored; the layer's input comes from a bf16
forward, so each layer is measured alone). Each layer takes the split with the smallest error: with a fixed
total per layer, the layers' choices are independent. The per-KV-head optimum is measured too (``head_gain``:
how much lower the error would be with a split per KV head), to tell whether a per-head page format would pay.

**Calibration text** is never evaluation text: the harness evaluates the *first* windows of ``data/prose.txt``
and ``data/code.txt`` (``text_windows``; at most 38 / 49 exist); calibration takes the *last* ``--windows``
windows of each file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..hf import base as hf_base
from ..hf.cache import STORE_DTYPE, CompressedLayer
from ..method import calibration
from ..method.compressors import ZipCacheCompressor
from ..method.config import QUOTA_ROWS, Granularity, ZipCacheConfig

ATTN_IMPLEMENTATION = "zipcache_calibrate"
_captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}


def _capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA that also keeps the post-RoPE q, k, v of every layer (no cache: one forward over the window)."""
    _captured[module.layer_idx] = (query.detach(), key.detach(), value.detach(), scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


hf_base.register(ATTN_IMPLEMENTATION, _capture_attention)


def key_row_choices(block_size: int, salient_rows: int) -> list[int]:
    """Key salient rows of every split of ``salient_rows`` (multiples of 16, at most a block per tensor)."""
    lo, hi = max(0, salient_rows - block_size), min(block_size, salient_rows)
    return list(range(lo + (-lo) % QUOTA_ROWS, hi + 1, QUOTA_ROWS))


def split_config(base: ZipCacheConfig, key_rows: int) -> ZipCacheConfig:
    n = base.block_size
    return base.replace(salient_ratio=key_rows / n, value_salient_ratio=(base.salient_rows - key_rows) / n,
                        layer_salient_ratios=None, calibration=None)


def _attend(q, k, v, context_len, scaling):
    """Continuation queries ``q [1, Hq, T, D]`` over ``k, v [1, H, context_len + T, D]`` (causal for the
    continuation): output ``[1, Hq, T, D]`` fp32."""
    t, total = q.shape[2], k.shape[2]
    mask = torch.arange(total).view(1, -1) <= (context_len + torch.arange(t)).view(-1, 1)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scaling,
                                          enable_gqa=True)


def compressed_attention(base: ZipCacheConfig, layer_idx: int, query, key, value, scaling, context_len: int,
                         key_rows: int) -> torch.Tensor:  # fmt: skip
    """The continuation's attention output ``[1, Hq, T, D]`` (fp32) with the layer's K/V stored as the harness
    serves them under the block rule with ``key_rows`` key salient rows per block (the rest of the budget to
    values): ``query [1, Hq, context_len + T, D]``, ``key, value [1, H, context_len + T, D]`` (post-RoPE)."""
    layer = CompressedLayer(ZipCacheCompressor(split_config(base, key_rows)), layer_idx)
    layer.update(key, value)  # the window in bf16, as the cache stores it
    out = layer.attend_blocks(query.float(), scaling)  # [1, L, Hq, D]: complete blocks compressed, then attended
    return out[:, context_len:].transpose(1, 2)


def layer_errors(base: ZipCacheConfig, layer_idx: int, query, key, value, scaling, context_len: int,
                 choices: list[int]) -> torch.Tensor:  # fmt: skip
    """Relative squared attention-output error per (split, KV head): ``[len(choices), num_kv_heads]``, each
    entry the head group's squared error over the group's reference energy."""
    if base.granularity is not Granularity.BLOCK:
        raise ValueError(f"calibration measures the served block rule: granularity must be block, not "
                         f"{base.granularity.value}")
    h = key.shape[1]
    k = key.to(STORE_DTYPE).float()
    v = value.to(STORE_DTYPE).float()
    ref = _attend(query[:, :, context_len:], k, v, context_len, scaling)
    ref_energy = ref.pow(2).sum(dim=(0, 2, 3)).view(h, -1).sum(dim=1)
    errors = torch.empty(len(choices), h)
    for i, rows in enumerate(choices):
        out = compressed_attention(base, layer_idx, query, key, value, scaling, context_len, rows)
        err = (out - ref).pow(2).sum(dim=(0, 2, 3)).view(h, -1).sum(dim=1)
        errors[i] = err / ref_energy
    return errors


@torch.inference_mode()
def calibrate(model_name: str | None, base: ZipCacheConfig, text_files: list[str], windows: int,
              context_len: int, continuation_len: int, dtype: str) -> dict:  # fmt: skip
    from .harness import load_model

    m = load_model(model_name, dtype)
    m.model.set_attn_implementation(ATTN_IMPLEMENTATION)
    cfg = m.config
    num_layers, h = cfg.num_hidden_layers, cfg.num_key_value_heads
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if context_len % base.block_size:
        raise ValueError(f"context_len {context_len} must be a multiple of block_size {base.block_size}")
    choices = key_row_choices(base.block_size, base.salient_rows)
    size = context_len + continuation_len
    total = torch.zeros(num_layers, len(choices), h)
    used = []
    for path in text_files:
        ids = m.tokenizer(Path(path).read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        count = len(ids) // size
        if count < windows:
            raise ValueError(f"{path} has {count} windows of {size} tokens, fewer than {windows}")
        for w in range(count - windows, count):
            _captured.clear()
            m.model(input_ids=ids[w * size : (w + 1) * size].view(1, -1), use_cache=False)
            for layer in range(num_layers):
                q, k, v, scaling = _captured[layer]
                total[layer] += layer_errors(base, layer, q, k, v, scaling, context_len, choices)
            used.append({"file": Path(path).name, "window": w, "of": count})
    err = total / len(used)  # [layers, splits, heads]
    by_layer = err.sum(dim=2)  # [layers, splits]: the sum over a layer's heads
    best = by_layer.argmin(dim=1)
    fixed = choices.index(_key_rows(base))  # the base preset's split, in every layer
    per_head = err.min(dim=1).values.sum(dim=1)  # [layers]: each head its own split
    chosen = by_layer.gather(1, best.view(-1, 1)).view(-1)
    return {
        "model": model_name or "smollm2-135m",
        "shape": calibration.shape_key(num_layers, h, head),
        "salient_rows": base.salient_rows,
        "key_row_choices": choices,
        "key_rows": [choices[i] for i in best.tolist()],
        "error_by_split": [[round(x, 6) for x in row] for row in by_layer.tolist()],
        "error_fixed": round(by_layer[:, fixed].sum().item(), 6),
        "fixed_key_rows": choices[fixed],
        "error_adaptive": round(chosen.sum().item(), 6),
        "error_per_head": round(per_head.sum().item(), 6),
        "head_gain": round(1 - per_head.sum().item() / max(chosen.sum().item(), 1e-30), 4),
        "windows": used,
        "context_len": context_len,
        "continuation_len": continuation_len,
        "dtype": dtype,
        "base": {k: v for k, v in base.to_dict().items() if k not in ("layer_salient_ratios", "calibration")},
    }


def _key_rows(base: ZipCacheConfig) -> int:
    from ..method.config import quota_count

    return quota_count(base.block_size, base.salient_ratio)


def merge(path: Path, result: dict, block_size: int) -> dict:
    """Add ``result`` under its shape and budget to the calibration file at ``path`` (created if missing)."""
    data = json.loads(path.read_text()) if path.exists() else {"format": calibration.FORMAT,
                                                                "block_size": block_size, "models": {}}
    if data.get("block_size") != block_size:
        raise ValueError(f"{path} holds blocks of {data.get('block_size')}, not {block_size}")
    model = data["models"].setdefault(result["shape"], {"model": result["model"], "budgets": {}})
    model["model"] = result["model"]
    model["budgets"][str(result["salient_rows"])] = result
    return data


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bundled model name or HF folder (default: smollm2-135m)")
    ap.add_argument("--preset", default="vllm", help="base preset: its quotas give the budget of salient rows")
    ap.add_argument("--salient-rows", type=int, default=None,
                    help="salient rows per block, keys + values (default: the preset's, 128 for vllm)")
    ap.add_argument("--text-files", default="data/prose.txt,data/code.txt")
    ap.add_argument("--windows", type=int, default=2, help="calibration windows per file, from the file's end")
    ap.add_argument("--context-len", type=int, default=1024)
    ap.add_argument("--continuation-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--output", default="configs/calibration/adaptive.json")
    args = ap.parse_args(argv)
    base = ZipCacheConfig.load(args.preset)
    if args.salient_rows is not None:
        n = base.block_size
        k = min(_key_rows(base), args.salient_rows)
        base = base.replace(salient_ratio=k / n, value_salient_ratio=(args.salient_rows - k) / n)
        if base.salient_rows != args.salient_rows:
            raise ValueError(f"--salient-rows {args.salient_rows} is not a split into multiples of 16 rows")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = calibrate(args.model, base, args.text_files.split(","), args.windows, args.context_len,
                       args.continuation_len, args.dtype)
    result["commit"] = _git_commit()
    out = Path(args.output)
    data = merge(out, result, base.block_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"layer: key rows (of {result['salient_rows']}); error at each split {result['key_row_choices']}")
    for i, (rows, errs) in enumerate(zip(result["key_rows"], result["error_by_split"], strict=True)):
        print(f"{i:3d}: {rows:3d}  " + " ".join(f"{e:.4f}" for e in errs))
    print(f"summed error: fixed split ({result['fixed_key_rows']} key rows) {result['error_fixed']:.4f}, "
          f"per layer {result['error_adaptive']:.4f}, per KV head {result['error_per_head']:.4f} "
          f"(per-head gain {result['head_gain']:.1%})")
    print(out)


if __name__ == "__main__":
    main()
