"""Registers, spills and tensor-core instructions of ``kernels/prefill_attention`` without a GPU: compile for
sm_90 with Triton's bundled ptxas, for each tile configuration and kernel variant the prefill benchmark sweeps.

    PYTHONPATH=. python benchmarks/sass_prefill.py [--head-size 128] [--g 4] [--only SUBSTRING]

Per entry: ptxas's registers and spills, the wgmma count (``HGMMA``; ``async`` when some are issued without
an immediate wait, i.e. overlapped), the TMA loads (``UTMALDG``) and barrier waits (``SYNCS``) that tensor
descriptors and warp specialization bring, register reallocation (``USETMAXREG``: warp-specialized
partitions) and the instruction count.
Triton's MLIR errors go to stderr (``2>/dev/null`` for the table alone).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import re

from triton.compiler import ASTSource

from benchmarks._sass import compile_sm90
from benchmarks.bench_prefill_step import sweep_entries

TYPES = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "sk_ptr": "*bf16", "sv_ptr": "*bf16",
         "tk_ptr": "*bf16", "tv_ptr": "*bf16", "out_ptr": "*bf16", "lse_ptr": "*fp32", "qk_scale": "fp32"}  # fmt: skip
OPS = re.compile(r"/\*[0-9a-f]{4,5}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def _compile(fn, ce: dict, descs: dict, **opts) -> tuple[str, str]:
    """``(ptxas report, SASS)`` of ``fn`` with constexprs ``ce``, tensor-descriptor arguments ``descs`` (name:
    Triton type string), 16-divisible pointers and strides (as the launcher's tensors have them)."""
    sig = {n: "constexpr" if n in ce else descs.get(n) or TYPES.get(n, "*i32" if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}  # fmt: skip
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if sig[n] != "constexpr" and (n.endswith("_ptr") or n.startswith("stride"))}  # fmt: skip
    return compile_sm90(ASTSource(fn, sig, ce, attrs), **{k: v for k, v in opts.items() if v is not None})


def compile_entry(mod, cfg: dict, head_size: int, g: int) -> tuple[str, str]:
    """``(ptxas report, SASS)`` of ``_prefill_kernel`` as ``prefill_attention`` launches it for ``cfg`` (a full
    ``_config`` dict)."""
    bn = cfg["BLOCK_N"]
    ce = {"G": g, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": bn, "D": head_size, "N": 128, "DOT_FP32": False,
          "TMA": cfg["TMA"], "STAGES_A": cfg["num_stages"] if cfg["STAGES_A"] is None else cfg["STAGES_A"]}  # fmt: skip
    kv = {n: f"tensordesc<bf16[{bn}, {head_size}]>" for n in ("sk_desc", "sv_desc")}
    if not cfg["TMA"]:
        ce.update(sk_desc=None, sv_desc=None)
    return _compile(mod._prefill_kernel, ce, kv if cfg["TMA"] else {}, num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"])  # fmt: skip


def summary(info: str, sass: str) -> str:
    regs = " ".join(x.strip() for x in info.replace("\n", " ").split(",") if "registers" in x or "spill" in x)
    regs = re.sub(r"ptxas info\s*:\s*", "", regs).replace(" bytes spill stores", "B spill st").replace(
        " bytes spill loads", "B ld").replace("Used ", "")
    smem = re.search(r"triton shared memory: (\d+)", info)
    regs += f", smem {int(smem.group(1)) // 1024} KiB" if smem else ""
    lines = sass.splitlines()
    ops = collections.Counter(m.group(1) for line in lines if (m := OPS.search(line)))
    mma = sum(v for k, v in ops.items() if "GMMA" in k)
    waits = sum(v for k, v in ops.items() if k.startswith("WARPGROUP.DEPBAR") or k.startswith("WARPSYNC"))
    tma = sum(v for k, v in ops.items() if k.startswith("UTMALDG"))
    syncs = sum(v for k, v in ops.items() if k.startswith("SYNCS"))
    setmax = sum(v for k, v in ops.items() if k.startswith("USETMAXREG"))
    ldg = sum(v for k, v in ops.items() if k.startswith("LDG") or k.startswith("LDGSTS"))
    return (f"{regs} | HGMMA {mma} (depbar {waits}) | UTMALDG {tma} LDG/LDGSTS {ldg} SYNCS {syncs} "
            f"USETMAXREG {setmax} | {sum(ops.values())} instructions")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--only", default="", help="entries whose label contains this")
    a = ap.parse_args()
    mod = importlib.import_module("zipcache_vllm.kernels.prefill_attention")
    for label, c in sweep_entries():
        if a.only not in label:
            continue
        cfg = dict(mod._config(False), **c)
        try:
            info, sass = compile_entry(mod, cfg, a.head_size, a.g)
        except Exception as e:  # noqa: BLE001 (a variant Triton cannot compile: reported, not fatal)
            print(f"{label}: {type(e).__name__}: {str(e)[-400:]}", flush=True)
            continue
        print(f"{label}: {summary(info, sass)}", flush=True)


if __name__ == "__main__":
    main()
