"""The KV capacity vLLM reports with zipcache vs stock bf16, computed from the page layout and the staging rule.

    python benchmarks/capacity_projection.py [--check-log out/compare_serve_zipcache.log]

Same arithmetic as the plugin: pages of ``layout.PageLayout`` (one per block and KV head), bf16 staging of
``backend.num_staging_slots`` slots taken out of the KV memory first, vLLM's whole blocks. The CPU figures are
measured by ``tests/e2e/test_openai_server.py::test_kv_capacity_vs_stock_bf16`` (which asserts this formula within
2 %); the GPU rows are projections (no GPU server has run here). Prints a table last.
"""

from __future__ import annotations

import argparse

from zipcache_vllm.engine.block_manager import default_num_slots
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.engine.staging import Staging
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.method.saliency import num_block_probes

QUERY_HEADS = {"SmolLM2-135M": 9, "Llama-3-8B": 32, "Qwen2.5-7B": 28}  # the staged probe queries' heads
MODELS = {  # layers, KV heads, head size
    "SmolLM2-135M": (30, 3, 64),
    "Llama-3-8B": (32, 8, 128),
    "Qwen2.5-7B": (28, 4, 128),
}


def tokens(model: str, kv_gib: float, max_num_seqs: int, preset: str | None, block_size: int = 128) -> int:
    layers, h, d = MODELS[model]
    budget = int(kv_gib * 2**30)
    if preset is None:  # stock bf16
        per_block = layers * h * block_size * 2 * d * 2
        return budget // per_block * block_size
    cfg = ZipCacheConfig.load(preset).replace(block_size=block_size)
    lay = PageLayout.from_config(cfg, d)
    slots = default_num_slots(max_num_seqs)
    heads = QUERY_HEADS[model]
    budget -= slots * layers * Staging.bytes_per_slot(block_size, h, d, heads, num_block_probes(cfg, block_size))
    per_block = layers * h * block_size * lay.state_content_bytes
    return max(budget, 0) // per_block * block_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="paged,vllm")
    args = ap.parse_args()
    cases = [("SmolLM2-135M", 1, 16), ("SmolLM2-135M", 1, 32), ("SmolLM2-135M", 1, 128), ("SmolLM2-135M", 4, 16),
             ("SmolLM2-135M", 4, 32), ("Llama-3-8B", 100, 64), ("Llama-3-8B", 100, 256), ("Qwen2.5-7B", 100, 256)]
    presets = args.presets.split(",")
    head = "| model | KV GiB | max_num_seqs | bf16 tokens | " + " | ".join(f"`{p}` tokens (ratio)" for p in presets)
    print(head + " | layout bound |")
    print("|---" * (4 + len(presets) + 1) + "|")
    for model, gib, seqs in cases:
        b = tokens(model, gib, seqs, None)
        cells = []
        for p in presets:
            z = tokens(model, gib, seqs, p)
            cells.append(f"{z:,} ({z / b:.2f}x)")
        d = MODELS[model][2]
        bounds = "/".join(
            f"{PageLayout.from_config(ZipCacheConfig.load(p).replace(block_size=128), d).capacity_vs_bf16:.2f}x"
            for p in presets
        )
        print(f"| {model} | {gib} | {seqs} | {b:,} | " + " | ".join(cells) + f" | {bounds} |")


if __name__ == "__main__":
    main()
