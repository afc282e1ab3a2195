"""SASS of decode v2 without a GPU: compile for sm_90 with Triton's bundled ptxas, print register use and the
instruction histogram of the page loop (the code between the first backward branch's target and the branch).

    python benchmarks/sass_decode_v2.py [--ratio 0.8 --value-ratio 0.2 --head-size 128 --g 4 --splits 4]
                                        [--maps 1|2 --ring 0|1 --maxnreg 168 --defer-sum 0|1 --subnormal-values 0|1
                                         --piece-buffers 0|1 --page-max 0|1 --subnormal-keys 0|1 --tma-pages 0|1]

Needs triton 3.6 (the H200's version; ``pip install triton==3.6.0`` in a scratch venv) and this repository's
``kernels/`` importable as ``zipcache_vllm.kernels`` (editable install or a link). Pointer arguments are
declared 16-byte aligned, as Triton specializes them at launch (otherwise loads are not vectorized).
"""

from __future__ import annotations

import argparse
import collections
import re

import torch
import triton
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type
from zipcache_vllm.kernels import decode_v2

from benchmarks._sass import compile_sm90
from zipcache_vllm.engine.layout import PageLayout

ALIGNED = ("stride_c_block", "stride_c_head", "stride_t_slot", "stride_t_tok", "stride_q_seq", "stride_o_seq")
TYPES = {"q_ptr": "*bf16", "cache_ptr": "*u8", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32",
         "tail_lens_ptr": "*i32", "tail_slots_ptr": "*i32", "tk_ptr": "*bf16", "tv_ptr": "*bf16", "out_ptr": "*bf16",
         "lse_ptr": "*fp32", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "counter_ptr": "*i32",
         "qk_scale": "fp32"}  # fmt: skip


def _descriptor_types(layout, max_chunk: int) -> tuple:
    """Signature types of the TMA descriptors (as the launcher specializes them; made on a CPU tensor)."""
    return tuple(mangle_type(TensorDescriptor.from_tensor(torch.zeros(256, w, dtype=torch.int32), [r, w],
                                                          decode_v2.TMA_LAYOUT.value))
                 for r, w in decode_v2.tma_plan(layout, max_chunk)[4])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--value-ratio", type=float, default=0.2)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--splits", type=int, default=4)
    ap.add_argument("--max-chunk", type=int, default=decode_v2.MAX_CHUNK)
    ap.add_argument("--stage", type=int, default=1, help="1: pages staged in shared memory (cp.async), 0: not")
    ap.add_argument("--maps", type=int, default=decode_v2.MAPS, help="channel maps of the page loop (1 or 2)")
    ap.add_argument("--maxnreg", type=int, default=0, help="register cap per thread (0: none)")
    ap.add_argument("--ring", type=int, default=int(decode_v2.RING), help="1: one staged page refilled piece by piece")
    ap.add_argument("--defer-sum", type=int, default=int(decode_v2.DEFER_SUM),
                    help="1: the softmax denominator as per-lane partial sums (one cross-lane sum per program)")
    ap.add_argument("--subnormal-values", type=int, default=int(decode_v2.SUBNORMAL_VALUES),
                    help="1: value codes as fp16 subnormals, scaled once per value group (no code-offset sums)")
    ap.add_argument("--piece-buffers", type=int, default=int(decode_v2.PIECE_BUFFERS),
                    help="1: every staged piece in its own shared allocation")
    ap.add_argument("--subnormal-keys", type=int, default=int(decode_v2.SUBNORMAL_KEYS),
                    help="1: key codes as fp16 subnormals (no offset half of the page bias)")
    ap.add_argument("--page-max", type=int, default=int(decode_v2.PAGE_MAX),
                    help="1: one softmax rescale check per page")
    ap.add_argument("--tma-pages", type=int, default=0,
                    help="1: staged pages copied by TMA (one copy per piece, an mbarrier per stage; the default "
                    "'auto' takes it for long page splits)")
    a = ap.parse_args()
    layout = PageLayout(128, a.head_size, salient_ratio=a.ratio, value_salient_ratio=a.value_ratio)
    fn = decode_v2._decode_v2_kernel
    ce = dict(decode_v2._constexprs(layout, a.max_chunk, bool(a.stage), a.maps, bool(a.ring),
                                           bool(a.subnormal_values), bool(a.piece_buffers), bool(a.subnormal_keys),
                                           bool(a.tma_pages)))
    ce.update(NUM_SPLITS=a.splits, G=a.g, NP=max(8, triton.next_power_of_2(a.g)), TAIL=decode_v2.TAIL_CHUNK,
              WRITE_LSE=True, RESCALE=decode_v2.RESCALE_LOG2, GP=triton.next_power_of_2(a.g),
              PREFETCH=decode_v2.PREFETCH_PAGES, TAIL_FIRST=decode_v2.TAIL_FIRST, DEFER=bool(a.defer_sum),
              FOLD_TAIL=decode_v2.FOLD_TAIL, PAGE_MAX=bool(a.page_max))  # fmt: skip
    sig = {n: "constexpr" if n in ce else TYPES.get(n, "i32") for n in fn.arg_names}
    types = _descriptor_types(layout, a.max_chunk) if ce["TMA"] else ()
    for i in range(decode_v2.TMA_DESCRIPTORS):
        if i < len(types):
            sig[f"desc{i}"] = types[i]
        else:
            sig[f"desc{i}"] = "constexpr"
            ce[f"desc{i}"] = None
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if sig[n] != "constexpr" and (n.endswith("_ptr") or n in ALIGNED)}  # fmt: skip
    cap = {"maxnreg": a.maxnreg} if a.maxnreg else {}
    info, sass = compile_sm90(GluonASTSource(fn, sig, ce, attrs), num_warps=1, **cap)
    print(f"layout {layout.num_salient_k}/{layout.num_salient_v} rows, chunks {ce['CHUNKS']}")
    print("\n".join(line for line in info.splitlines() if "registers" in line))
    ins = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines()
           if (m := re.search(r"/\*([0-9a-f]{4,5})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line))]
    loops = [(int(t.group(1), 16), addr) for addr, op, line in ins  # predicated: an mbarrier wait's retry block
             if op == "BRA" and re.search(r"@!?U?P\w+\s+BRA", line)  # jumps back into the loop unconditionally
             and (t := re.search(r"BRA 0x([0-9a-f]+)", line)) and int(t.group(1), 16) < addr]
    lo, hi = max(loops, key=lambda r: r[1] - r[0])  # the page loop: the longest backward branch
    ops = collections.Counter(op for addr, op, _ in ins if lo <= addr <= hi)
    print(f"page loop {lo:#x}..{hi:#x}: {sum(ops.values())} instructions per (page, KV head) per warp")
    print(", ".join(f"{k} {v}" for k, v in ops.most_common(40)))
    skips = [(addr + 16, int(t.group(1), 16)) for addr, op, line in ins  # predicated forward branches in the loop
             if lo <= addr <= hi and op == "BRA" and re.search(r"@!?U?P\w+\s+BRA", line)
             and (t := re.search(r"BRA 0x([0-9a-f]+)", line)) and int(t.group(1), 16) > addr]
    outside = sum(1 for addr, _, _ in ins if lo <= addr <= hi and not any(a <= addr < b for a, b in skips))
    print(f"outside the loop's conditional regions (the rarely taken rescale; the next page's copy where it is "
          f"branched around): {outside} instructions")
    after = [op for addr, op, _ in ins if addr > hi]
    print(f"after the page loop (tail, partial rows, merge): {len(after)} instructions, "
          f"{sum(op.startswith('LDG') for op in after)} global loads")


if __name__ == "__main__":
    main()
