"""The KV capacity vLLM reports with zipcache vs stock bf16, computed from the page layout and the staging rule.

    python benchmarks/capacity_projection.py [--presets paged,vllm] [--params-u8] [--salient-rows 112]

Same arithmetic as the plugin: pages of ``layout.PageLayout`` (one per block and KV head), bf16 staging of
``backend.num_staging_slots`` slots taken out of the KV memory first, vLLM's whole blocks. The CPU figures are
measured by ``tests/e2e/test_openai_server.py::test_kv_capacity_vs_stock_bf16`` (which asserts this formula within
2 %); the GPU rows are projections (no GPU server has run here). CPU rows count no dummy staging slot, GPU
rows one (the CUDA builder's padded graph rows). Prints a table last.

``--params-u8`` takes the one-byte-parameter pages (``param_bits = 8``, the `compact` preset's format: key step
and zero point per channel and precision group, value normalizer per channel, value step and zero point per
token, one byte each, plus five fp16 region scales; engine/layout.py); ``--salient-rows`` moves the budget of
salient rows per block (keys + values; the `vllm` preset has 128: key rows stay at the preset's, values take the
rest).
"""

from __future__ import annotations

import argparse

from zipcache_vllm.engine.block_manager import default_num_slots
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.engine.staging import Staging
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.method.saliency import num_block_probes

# query heads (the staged probe queries)
QUERY_HEADS = {"SmolLM2-135M": 9, "Qwen2.5-Coder-1.5B": 12, "Llama-3-8B": 32, "Qwen2.5-7B": 28}
MODELS = {  # layers, KV heads, head size
    "SmolLM2-135M": (30, 3, 64),
    "Qwen2.5-Coder-1.5B": (28, 2, 128),
    "Llama-3-8B": (32, 8, 128),
    "Qwen2.5-7B": (28, 4, 128),
}


def config_for(preset: str, block_size: int, salient_rows: int | None, params_u8: bool = False) -> ZipCacheConfig:
    cfg = ZipCacheConfig.load(preset).replace(block_size=block_size, **({"param_bits": 8} if params_u8 else {}))
    if salient_rows is not None:
        k = min(round(cfg.salient_ratio * block_size), salient_rows)
        cfg = cfg.replace(salient_ratio=k / block_size, value_salient_ratio=(salient_rows - k) / block_size)
    return cfg


def tokens(model: str, kv_gib: float, max_num_seqs: int, preset: str | None, block_size: int = 128,
           cpu: bool = True, params_u8: bool = False, salient_rows: int | None = None,
           staging_slots: int | None = None) -> int:
    layers, h, d = MODELS[model]
    budget = int(kv_gib * 2**30)
    if preset is None:  # stock bf16
        per_block = layers * h * block_size * 2 * d * 2
        return budget // per_block * block_size
    cfg = config_for(preset, block_size, salient_rows, params_u8)
    lay = PageLayout.from_config(cfg, d)
    slots = (default_num_slots(max_num_seqs) if staging_slots is None else staging_slots) + (0 if cpu else 1)
    per_slot = Staging.bytes_per_slot(block_size, h, d, QUERY_HEADS[model], num_block_probes(cfg, block_size))
    budget -= slots * layers * per_slot
    per_block = layers * h * block_size * lay.state_content_bytes
    return max(budget, 0) // per_block * block_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="paged,vllm")
    ap.add_argument("--params-u8", action="store_true", help="one-byte-parameter pages (param_bits 8)")
    ap.add_argument("--salient-rows", type=int, default=None, help="salient rows per block, keys + values")
    ap.add_argument("--staging-slots", type=int, default=None,
                    help="staging slots (ZIPCACHE_STAGING_SLOTS; default max_num_seqs + max(4, max_num_seqs // 8))")
    args = ap.parse_args()
    cases = [("SmolLM2-135M", 1, 16), ("SmolLM2-135M", 1, 32), ("SmolLM2-135M", 1, 128), ("SmolLM2-135M", 2, 32),
             ("SmolLM2-135M", 4, 16),
             ("SmolLM2-135M", 4, 32), ("Qwen2.5-Coder-1.5B", 1, 32), ("Qwen2.5-Coder-1.5B", 2, 32),
             ("Qwen2.5-Coder-1.5B", 4, 32), ("Llama-3-8B", 100, 64),
             ("Llama-3-8B", 100, 256), ("Qwen2.5-7B", 100, 256)]
    presets = args.presets.split(",")
    head = "| model | KV GiB | max_num_seqs | bf16 tokens | " + " | ".join(f"`{p}` tokens (ratio)" for p in presets)
    print(head + " | layout bound |")
    print("|---" * (4 + len(presets) + 1) + "|")
    for model, gib, seqs in cases:
        b = tokens(model, gib, seqs, None)
        cells = []
        cpu = gib < 100  # the 100 GiB rows are GPU projections
        for p in presets:
            z = tokens(model, gib, seqs, p, cpu=cpu, params_u8=args.params_u8, salient_rows=args.salient_rows,
                       staging_slots=args.staging_slots)
            cells.append(f"{z:,} ({z / b:.2f}x)")
        d = MODELS[model][2]
        bound = []
        for p in presets:
            lay = PageLayout.from_config(config_for(p, 128, args.salient_rows, args.params_u8), d)
            bound.append(f"{4 * d / lay.state_content_bytes:.2f}x")
        bounds = "/".join(bound)
        print(f"| {model} | {gib} | {seqs} | {b:,} | " + " | ".join(cells) + f" | {bounds} |")


if __name__ == "__main__":
    main()
