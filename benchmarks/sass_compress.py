"""Registers, spills and instruction mix of ``kernels/compress_store`` without a GPU: compile for sm_90 with
Triton's bundled ptxas, for the ``vllm`` preset page (block 128, head size 128) at each ``--num-warps`` and
``--rows-per-tile`` (``--probes``: the blocks scored by their probes in the kernel; ``--programs``, ``--maxnreg``).

    PYTHONPATH=. python benchmarks/sass_compress.py [--head-size 128] [--num-warps 2,4] [--kernel FILE]
    PYTHONPATH=. python benchmarks/sass_compress.py --block-scores --num-warps 4 [--kernel FILE]

Per config: registers, spills, the instruction mix, the tile loops' sizes, the straight-line rest and the
instructions one warp executes (loop sizes x trip counts + the rest; a 4k prompt's compression runs about one
warp per scheduler, so this is about its length in issue slots).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import re

from triton.compiler import ASTSource
from zipcache_vllm.kernels.compress_store import reciprocal32, tile_rows

from benchmarks._sass import compile_sm90
from benchmarks.bench_compress import load_kernel_file
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.method.config import ZipCacheConfig

_OP = re.compile(r"/\*[0-9a-f]{4,5}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--num-warps", default="2,4")
    ap.add_argument("--rows-per-tile", default="16,32", help="comma-separated R values")
    ap.add_argument("--probes", action="store_true", help="the blocks scored by their probes in the kernel")
    ap.add_argument("--programs", type=int, default=1, help="per (block, KV head): 1 or 2 (keys | values)")
    ap.add_argument("--maxnreg", type=int, default=None, help="cap the registers per thread (ptxas .maxnreg)")
    ap.add_argument("--loop-ops", action="store_true", help="also each tile loop's instruction mix")
    ap.add_argument("--segments", action="store_true",
                    help="also each straight-line stretch between the tile loops: its size and instruction mix")
    ap.add_argument("--kernel", default=None, help="another compress_store.py (e.g. an earlier commit's) to compile")
    ap.add_argument("--block-scores", action="store_true",
                    help="compile block_scores._block_scores_kernel instead (the probe scores launched before)")
    a = ap.parse_args()
    lay = PageLayout.from_config(ZipCacheConfig.load("vllm", block_size=128), a.head_size)
    if a.block_scores:
        _block_scores(a.kernel, [int(w) for w in a.num_warps.split(",")])
        return
    fn = _module(a.kernel, "compress_store")._compress_store_kernel
    ce = dict(N=lay.block_size, N_PAD=lay.block_size, D=lay.head_size, BH=lay.bits_high, BL=lay.bits_low,
              SK=lay.num_salient_k, SV=lay.num_salient_v, K_HI_OFF=lay.k_hi_off, K_LO_OFF=lay.k_lo_off,
              V_HI_OFF=lay.v_hi_off, V_LO_OFF=lay.v_lo_off, K_PAR_OFF=lay.k_param_off, V_NORM_OFF=lay.v_norm_off,
              V_TOK_OFF=lay.v_tok_off, MASK_OFF=lay.mask_off, FROM_SLOTS=False, SCORES=2 if a.probes else 0,
              P=13, G=4, ROWS=64, NORMALIZER=2, DOT_FP32=False,  # 13 probes x 4 heads: LLaMA3-8B
              PROGRAMS=a.programs, ASM=True,  # the GPU's (inline PTX)
              RQ_H=reciprocal32((1 << lay.bits_high) - 1), RQ_L=reciprocal32((1 << lay.bits_low) - 1))  # fmt: skip
    types = {"key_ptr": "*bf16", "value_ptr": "*bf16", "scores_ptr": "*fp32", "count_ptr": "*fp32",
             "pq_ptr": "*bf16", "tiles_ptr": "*bf16", "red_ptr": "*fp32", "cache_u8_ptr": "*u8",
             "cache_f16_ptr": "*fp16", "qk_scale": "fp32"}  # fmt: skip
    for r, w in ((int(r), int(w)) for r in a.rows_per_tile.split(",") for w in a.num_warps.split(",")):
        sass, total = _report(f"R {r} num_warps {w}", fn, {**ce, "R": r}, types, num_warps=w, enable_fp_fusion=False,
                              **({"maxnreg": a.maxnreg} if a.maxnreg else {}))
        print("  " + _loops(sass, total, _trips(lay, r)))
        if a.loop_ops:
            for i, ops in enumerate(_loop_ops(sass)):
                print(f"  loop {i}: {sum(ops.values())} | " + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)))
        if a.segments:
            for i, ops in enumerate(_segment_ops(sass)):
                print(f"  before loop {i}: {sum(ops.values())} | "
                      + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)))  # fmt: skip
        if a.programs > 1:
            print("  (programs 2: a program runs the key loops or the value loops, not both, so it executes fewer than"
                  " the figure above; the straight-line rest counts every branch)")


def _module(path: str | None, name: str):
    """``zipcache_vllm.kernels.<name>``, or the file ``path`` (e.g. an earlier commit's) loaded as a module of
    the package, so that its relative imports resolve."""
    if not path:
        return importlib.import_module(f"zipcache_vllm.kernels.{name}")
    return load_kernel_file(path, f"_{name}_other")


def _report(label: str, fn, ce: dict, types: dict, **options) -> tuple[str, int]:
    """Compile ``fn`` for sm_90 (constexprs ``ce``, pointer and scalar ``types``; other ``*_ptr`` int32, other
    scalars i32; pointers and strides 16-divisible) and print its registers, spills and instruction mix; returns
    the SASS and its instruction count."""
    sig = {n: "constexpr" if n in ce else types.get(n, "*i32" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if sig[n] != "constexpr" and (n.endswith("_ptr") or n.startswith("stride"))}  # fmt: skip
    info, sass = compile_sm90(ASTSource(fn, sig, ce, attrs), **options)
    regs = " ".join(x.strip() for x in info.replace("\n", " ").split(",") if "registers" in x or "spill" in x)
    ops = collections.Counter(m.group(1) for line in sass.splitlines() if (m := _OP.search(line)))
    top = ", ".join(f"{k} {v}" for k, v in ops.most_common(12))
    print(f"{label}: {regs} | {sum(ops.values())} instructions | {top}")
    return sass, sum(ops.values())


def _block_scores(path: str | None, warps: list[int]) -> None:
    """Registers and instruction mix of the block-rule score kernel (``kernels/block_scores.py``, or ``path``),
    13 probes x 4 query heads per KV head (LLaMA3-8B), block 128, ``probe_nnz``."""
    fn = _module(path, "block_scores")._block_scores_kernel
    ce = dict(N=128, N_PAD=128, P=13, G=4, ROWS=64, D=128, NORMALIZER=2, DOT_FP32=False)
    types = {"k_ptr": "*bf16", "q_ptr": "*bf16", "out_ptr": "*fp32", "qk_scale": "fp32"}
    for w in warps:
        _report(f"block_scores num_warps {w}", fn, ce, types, num_warps=w)


def _trips(lay: PageLayout, r: int) -> dict[int, list[int]]:
    """Trip counts of the kernel's tile loops in program order, by the number of loops: four since 2026-12-06, the
    code passes alone (keys' codes over the salient then the regular page-row tiles, values' codes (same two); each
    first pass loads its whole block at once); seven from 2026-12-05 (keys' min/max over the salient then the
    regular page-row tiles, keys' codes (same two), values' max |x| (every tile), values' codes (salient,
    regular)). The token-order kernel before had four loops too, each over every tile: pass ``--kernel`` of one of
    those and the trips shown are not its."""
    n_pad = 1 << (lay.block_size - 1).bit_length()
    r = tile_rows(r, lay.num_salient_k, lay.num_salient_v)
    sk, sv, n = lay.num_salient_k // r, lay.num_salient_v // r, n_pad // r
    return {7: [sk, n - sk, sk, n - sk, n, sv, n - sv], 4: [sk, n - sk, sv, n - sv]}


def _loop_spans(sass: str) -> tuple[list, list]:
    """The SASS instructions as ``(address, line)`` and the loops as ``(first, last)`` addresses (a backward
    branch's target .. the branch), in program order."""
    ins = [(int(m.group(1), 16), line) for line in sass.splitlines() if (m := re.search(r"/\*([0-9a-f]{4,5})\*/", line))
           and _OP.search(line)]  # fmt: skip
    loops = [(int(t.group(1), 16), addr) for addr, line in ins
             if (t := re.search(r"BRA 0x([0-9a-f]+)", line)) and int(t.group(1), 16) < addr]  # fmt: skip
    return ins, loops


def _segment_ops(sass: str) -> list[collections.Counter]:
    """The instruction mix of each straight-line stretch: from the kernel's start (or the end of the loop before)
    to the start of each loop, then after the last loop. The first is the ranking and the keys' first pass
    (``programs=2``: the keys' program's path to its first code loop); where the code branches, a stretch holds
    every branch's instructions."""
    ins, loops = _loop_spans(sass)
    bounds = [(-1, loops[0][0] if loops else 1 << 40)]
    bounds += [(hi, loops[i + 1][0] if i + 1 < len(loops) else 1 << 40) for i, (lo, hi) in enumerate(loops)]
    return [collections.Counter(_OP.search(line).group(1).split(".")[0] for addr, line in ins if lo < addr < hi)
            for lo, hi in bounds]  # fmt: skip


def _loop_ops(sass: str) -> list[collections.Counter]:
    """Each loop's instruction mix (opcodes without their modifiers)."""
    ins, loops = _loop_spans(sass)
    return [collections.Counter(_OP.search(line).group(1).split(".")[0] for addr, line in ins if lo <= addr <= hi)
            for lo, hi in loops]  # fmt: skip


def _loops(sass: str, total: int, trips: dict[int, list[int]]) -> str:
    """The SASS loops (:func:`_loop_spans`), the straight-line rest and, when the loops are the kernel's tile
    loops (:func:`_trips`), the instructions one warp executes (sizes x trip counts + the rest)."""
    ins, loops = _loop_spans(sass)
    sizes = [sum(1 for addr, _ in ins if lo <= addr <= hi) for lo, hi in loops]
    rest = total - sum(sizes)
    out = f"loops {sizes}, straight-line {rest}"
    if len(sizes) in trips:
        tr = trips[len(sizes)]
        out += f", executed per warp ~{rest + sum(n * t for n, t in zip(sizes, tr, strict=True)):,} (trips {tr})"
    return out


if __name__ == "__main__":
    main()
