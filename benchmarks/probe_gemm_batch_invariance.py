"""Does a row of vLLM's CPU linear layer depend on the other rows of the batch? (the source of the load-dependent
greedy answers that ``benchmarks/trace_load_divergence.py`` locates outside the attention)

    python benchmarks/probe_gemm_batch_invariance.py [--trials 20] [--threads N]

For SmolLM2-135M's projection shapes (hidden 576, MLP 1536: q/k/v 960 x 576, o 576 x 576, gate/up 3072 x 576,
down 576 x 1536), random bf16 weights and inputs: row 0 of ``x [M, K]`` computed with ``M`` = 1 (a request
alone) and with ``M`` = 2, 8, 16 (other requests' rows below it), through vLLM's CPU GEMM (the layer's
``cpu_linear`` after ``dispatch_cpu_unquantized_gemm``, what vLLM's CPU model runner calls) and through
``torch.nn.functional.linear``. Counts the trials where row 0 is not bit-identical, per shape and M. No server,
no ZipCache code: stock vLLM runs these layers too.
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
BATCHES = (2, 8, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    gen = torch.Generator().manual_seed(0)
    counts = {(name, m, op): 0 for name in SHAPES for m in BATCHES for op in ("vllm", "torch")}
    for _ in range(a.trials):
        for name, (n, k) in SHAPES.items():
            layer = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            layer.weight.data = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
            x1 = torch.randn(1, k, generator=gen).bfloat16()
            alone = {"vllm": layer.cpu_linear(x1, layer.weight, None)[0],
                     "torch": torch.nn.functional.linear(x1, layer.weight)[0]}  # fmt: skip
            for m in BATCHES:
                x = torch.cat([x1, torch.randn(m - 1, k, generator=gen).bfloat16()])
                batched = {"vllm": layer.cpu_linear(x, layer.weight, None)[0],
                           "torch": torch.nn.functional.linear(x, layer.weight)[0]}  # fmt: skip
                for op in alone:
                    counts[(name, m, op)] += not torch.equal(alone[op], batched[op])
    print(f"torch threads {torch.get_num_threads()}, {a.trials} trials per cell: trials where row 0 with M other "
          "rows differs from row 0 alone (M = 1)\n")
    print("| layer (N x K) | " + " | ".join(f"vLLM M={m}" for m in BATCHES) + " | "
          + " | ".join(f"torch M={m}" for m in BATCHES) + " |")
    print("|---|" + "---|" * (2 * len(BATCHES)))
    for name, (n, k) in SHAPES.items():
        cells = [counts[(name, m, "vllm")] for m in BATCHES] + [counts[(name, m, "torch")] for m in BATCHES]
        print(f"| {name} ({n} x {k}) | " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
