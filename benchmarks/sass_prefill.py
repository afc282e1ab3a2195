"""Registers, spills and tensor-core instructions of ``kernels/prefill_attention`` without a GPU: compile for
sm_90 with Triton's bundled ptxas, for each tile configuration the prefill benchmark sweeps.

    PYTHONPATH=. python benchmarks/sass_prefill.py [--head-size 128] [--g 4]
"""

from __future__ import annotations

import argparse
import collections
import importlib
import re

from triton.compiler import ASTSource

from benchmarks._sass import compile_sm90
from benchmarks.bench_prefill_step import SWEEP

TYPES = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "sk_ptr": "*bf16", "sv_ptr": "*bf16",
         "tk_ptr": "*bf16", "tv_ptr": "*bf16", "out_ptr": "*bf16", "lse_ptr": "*fp32", "qk_scale": "fp32"}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--g", type=int, default=4)
    a = ap.parse_args()
    mod = importlib.import_module("zipcache_vllm.kernels.prefill_attention")
    fn = mod._prefill_kernel
    for bm, bn, w, st in SWEEP:
        ce = {"G": a.g, "BLOCK_M": bm, "BLOCK_N": bn, "D": a.head_size, "N": 128, "DOT_FP32": False}
        sig = {n: "constexpr" if n in ce else TYPES.get(n, "*i32" if n.endswith("_ptr") else "i32")
               for n in fn.arg_names}  # fmt: skip
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
                 if sig[n] != "constexpr" and (n.endswith("_ptr") or n.startswith("stride"))}  # fmt: skip
        try:
            info, sass = compile_sm90(ASTSource(fn, sig, ce, attrs), num_warps=w, num_stages=st)
        except Exception as e:  # noqa: BLE001
            print(f"{bm}x{bn} w{w} s{st}: {type(e).__name__}: {str(e)[-300:]}")
            continue
        regs = " ".join(x for x in info.replace("\n", " ").split(",") if "registers" in x or "spill" in x)
        pat = re.compile(r"/\*[0-9a-f]{4,5}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")
        ops = collections.Counter(m.group(1) for line in sass.splitlines() if (m := pat.search(line)))
        mma = {k: v for k, v in ops.items() if "GMMA" in k or "MMA" in k}
        print(f"{bm}x{bn} w{w} s{st}: {regs.strip()} | {mma} | {sum(ops.values())} instructions")


if __name__ == "__main__":
    main()
