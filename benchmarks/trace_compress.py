"""Timeline of a prompt's step on the GPU: when each program of the score kernel and of ``compress_store`` reaches
each phase (``%globaltimer`` stamps, ns), to see what the 4k path waits on.

    PYTHONPATH=. python -u benchmarks/trace_compress.py [--contexts 4096,16384] [--baseline FILE]

Both kernels are instrumented copies (the pages and scores are checked equal to the plain kernels'): the score
kernel is ``block_probe_scores``' kernel (the same :func:`probe_scores` / :func:`normalize_scores`) stamping its
start and end; ``compress_store`` is ``kernels/compress_store.py`` with stamps added by text substitution (written
next to it as ``kernels/_compress_store_traced.py``, removed at exit): a program's start, ranked (page rows in the
scratch, after the barrier), first passes done (the keys' parameters / the values' normalizer stored, after the
barrier) and end (the last tile's stores issued). Stamps after a barrier mark when every warp of the program got
there. The two kernels run back to back in one CUDA graph (the engine step's path, the prompt of
``bench_compress.prompt_inputs``: LLaMA3-8B KV geometry, ``vllm`` page); the stamps of the last of a few replays
are printed as min / median / max over the programs, in us from the first score program's start. With
``--baseline FILE`` (another ``compress_store.py``, e.g. ``git show REV:kernels/compress_store.py > FILE``; may be
given more than once) the same for it, and the step's two kernels (not traced) of each timed side by side,
interleaved twice: one call in a graph (inputs in L2) and a graph of calls over copies of the inputs past 3x the L2
(HBM; the prefill record's way).
"""

from __future__ import annotations

import argparse
import atexit
import os
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks._timing import graph_time_us
from benchmarks.bench_compress import load_kernel_file, prompt_inputs, prompt_scorer
from benchmarks.bench_kernels import graph_time, input_copies
from zipcache_vllm.engine.ops import kernel_module

_ks = kernel_module("block_scores")
probe_scores, normalize_scores = _ks.probe_scores, _ks.normalize_scores
SRC = Path("kernels/compress_store.py")
NOW = '''

@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


TRACE = [None]  # int64 [programs, 4]: start, ranked, first passes done, end
'''
KEYS_PARAMS = "    tl.debug_barrier()\n    ch = _tile_channels(D, PL)\n    if has_s:\n"
VALUES_NORM = "    tl.store(red + 2 * D + d, tl.math.div_rn(1.0, c.to(tl.float32)))\n    tl.debug_barrier()\n"
RANKED = "    _store_in_place(work + row, t.to(tl.int32), tv, ASM)\n    tl.debug_barrier()\n"
RANKED_BEFORE = "    tl.store(work + row, t.to(tl.int32), mask=tv)\n    tl.debug_barrier()\n"  # kernels before 9062055
RANKED_STAMP = "    tl.store(tr, t_start)\n    tl.store(tr + 1, _now())\n"
EDITS = {
    '_RINT_MAGIC = tl.constexpr(12582912.0)': None,  # NOW goes after this line
    "    work_ptr,  # int32": "    trace_ptr, work_ptr,  # int32",
    "    head = tl.program_id(1).to(tl.int64)\n": "    head = tl.program_id(1).to(tl.int64)\n    t_start = _now()\n",
    "    work = work_ptr + sidx * N_PAD\n": "    work = work_ptr + sidx * N_PAD\n    tr = trace_ptr + sidx * 4\n",
    RANKED: RANKED + RANKED_STAMP,
    "        _compress_keys(key_ptr": "        _compress_keys(tr, key_ptr",
    "        _compress_values(value_ptr": "        _compress_values(tr, value_ptr",
    "def _compress_keys(x_ptr": "def _compress_keys(tr, x_ptr",
    "def _compress_values(x_ptr": "def _compress_values(tr, x_ptr",
    KEYS_PARAMS: KEYS_PARAMS.replace("    ch =", "    tl.store(tr + 2, _now())\n    ch ="),
    VALUES_NORM: VALUES_NORM + "    tl.store(tr + 2, _now())\n",
    "        work_ptr=work,": "        trace_ptr=TRACE[0], work_ptr=work,",
}
# the end stamp goes after each part's call, whose arguments end at its first "# fmt: skip" (found, not matched
# as text: the argument lines may wrap anywhere)
CALLS = ("        _compress_keys(tr, key_ptr", "        _compress_values(tr, value_ptr")


def traced_compress(src: Path = SRC, name: str = "traced"):
    text = src.read_text()
    edits = dict(EDITS)
    if RANKED not in text and RANKED_BEFORE in text:  # an earlier kernel (a baseline)
        del edits[RANKED]
        edits[RANKED_BEFORE] = RANKED_BEFORE + RANKED_STAMP
    for old, new in edits.items():
        if text.count(old) != 1:
            raise SystemExit(f"the kernel no longer has exactly one {old.strip()!r}: update the spike")
        text = text.replace(old, old + NOW if new is None else new)
    for call in CALLS:
        end = text.index("  # fmt: skip\n", text.index(call)) + len("  # fmt: skip\n")
        text = text[:end] + "        tl.store(tr + 3, _now())\n" + text[end:]
    path = SRC.with_name(f"_compress_store_{name}.py")
    path.write_text(text)
    atexit.register(os.remove, path)
    return load_kernel_file(str(path), path.stem)


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _traced_scores_kernel(
    k_ptr, stride_k_blk, stride_k_tok, stride_k_head, q_ptr, stride_q_blk, stride_q_probe, stride_q_head,
    off_ptr, stride_off, out_ptr, stride_o_blk, stride_o_tok, trace_ptr, qk_scale,
    N: tl.constexpr, N_PAD: tl.constexpr, P: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
    NORMALIZER: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    t_start = _now()
    acc = probe_scores(k_ptr + blk * stride_k_blk + kvh * stride_k_head, stride_k_tok, q_ptr + blk * stride_q_blk,
                       stride_q_probe, stride_q_head, off_ptr + blk * stride_off, kvh, qk_scale, N, N_PAD, P, G,
                       ROWS, D, DOT_FP32)  # fmt: skip
    j = tl.arange(0, N_PAD)
    o = out_ptr + blk * stride_o_blk + j * stride_o_tok + kvh
    # block_scores.store_scores' sequence, written out for the stamp between the sums and the normalizer
    tl.store(o, acc, mask=j < N)
    tl.debug_barrier()
    t_sums = _now()
    acc = tl.load(o, mask=j < N, other=0.0)
    tl.store(o, normalize_scores(acc, j, off_ptr + blk * stride_off, N, P, NORMALIZER), mask=j < N)
    tl.debug_barrier()
    tr = trace_ptr + (blk * tl.num_programs(1) + kvh) * 3
    tl.store(tr, t_start)
    tl.store(tr + 1, t_sums)
    tl.store(tr + 2, _now())


def _stats(x: torch.Tensor) -> str:
    v = sorted(x.tolist())
    return f"{v[0]:6.1f} {statistics.median(v):6.1f} {v[-1]:6.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--baseline", action="append", default=[],
                    help="another compress_store.py, traced and timed side by side (may be given more than once)")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    kernels = {"kernel": (kernel_module("compress_store"), traced_compress())}
    for i, path in enumerate(a.baseline):
        name = "baseline" if len(a.baseline) == 1 else f"baseline {Path(path).stem}"
        kernels[name] = (load_kernel_file(path, f"_compress_store_baseline{i}"),
                         traced_compress(Path(path), f"baseline{i}_traced"))  # fmt: skip
    for ctx in map(int, a.contexts.split(",")):
        inputs = prompt_inputs(ctx)
        for name, (plain, traced) in kernels.items():
            _case(ctx, name, plain, traced, inputs)
        if len(kernels) > 1:
            _side_by_side(ctx, kernels, inputs)


def _side_by_side(ctx: int, kernels: dict, inputs) -> None:
    layout, k, v, off, pq, ids, cache = inputs
    sets = input_copies((k, v, pq), cache.numel())
    steps = {}
    for name, (plain, _) in kernels.items():
        steps[name] = []
        for kc, vc, pqc in sets:
            scores, score = prompt_scorer(layout, kc, pqc, off)

            def step(plain=plain, kc=kc, vc=vc, scores=scores, score=score):
                score()
                plain.compress_store(kc, vc, scores, ids, cache, layout)

            steps[name].append(step)
    for rep in range(2):
        for name, fns in steps.items():
            print(f"{ctx} ({rep}) {name}: the step's two kernels {graph_time(fns[:1], 30):.1f} us one call, "
                  f"{graph_time(fns, 30):.1f} a step over {len(sets)} input copies", flush=True)


def _case(ctx: int, name: str, plain, mod, inputs) -> None:
    layout, k, v, off, pq, ids, cache = inputs
    n, h, d = layout.block_size, k.shape[1], k.shape[2]
    nb = k.shape[0] // n
    k4 = k.view(nb, n, h, d)
    args = _ks.probe_args(k4, pq, off, nb, "probe_nnz", "normalized", None)
    scores = torch.empty(nb, n, h, device=k.device)
    s_trace = torch.zeros(nb, h, 3, dtype=torch.int64, device=k.device)
    c_trace = torch.zeros(nb * h * 2 * 4, dtype=torch.int64, device=k.device)  # up to 2 programs per (block, head)
    mod.TRACE[0] = c_trace

    def step():
        _traced_scores_kernel[(nb, h)](
            k4, k4.stride(0), k4.stride(1), k4.stride(2), pq, pq.stride(0), pq.stride(1), pq.stride(2),
            off, off.stride(0), scores, scores.stride(0), scores.stride(1), s_trace, num_warps=4, **args,
        )  # fmt: skip
        mod.compress_store(k, v, scores.view(-1, h), ids, cache, layout)

    ref_scores, score = prompt_scorer(layout, k, pq, off)
    score()
    cache.zero_()
    kernel_module("compress_store").compress_store(k, v, ref_scores, ids, cache, layout)  # the package's pages
    ref_cache = cache.clone()
    cache.zero_()
    plain_us = graph_time_us(lambda: (score(), plain.compress_store(k, v, ref_scores, ids, cache, layout)), 30)
    traced_us = graph_time_us(step, 30)  # captures and replays: the stamps are the last replay's
    torch.cuda.synchronize()
    print(f"\n{ctx} tokens, {name}: scores equal {torch.equal(scores.view(-1, h), ref_scores)}, pages equal "
          f"{torch.equal(cache, ref_cache)}; the two kernels {plain_us:.1f} us (traced {traced_us:.1f})")
    t0 = s_trace[..., 0].min()
    us = lambda x: (x - t0).double() / 1e3  # noqa: E731
    st = s_trace.view(-1, 3)
    print("  phase (us from the first score program's start)   min    med    max")
    print(f"  score kernel: start                            {_stats(us(st[:, 0]))}")
    print(f"  score kernel: column sums stored               {_stats(us(st[:, 1]))}")
    print(f"  score kernel: end                              {_stats(us(st[:, 2]))}")
    used = c_trace.view(-1, 4)
    used = used[used[:, 0] != 0]
    progs = used.shape[0] // (nb * h)
    ct = used.view(nb * h, progs, 4)
    for part in range(progs):
        name = ("keys" if part == 0 else "values") if progs == 2 else "keys + values"
        x = ct[:, part]
        print(f"  compress ({name}): start{' ' * (26 - len(name))}{_stats(us(x[:, 0]))}")
        print(f"  compress ({name}): ranked{' ' * (25 - len(name))}{_stats(us(x[:, 1]))}")
        print(f"  compress ({name}): first passes done{' ' * (14 - len(name))}{_stats(us(x[:, 2]))}")
        print(f"  compress ({name}): end{' ' * (28 - len(name))}{_stats(us(x[:, 3]))}")
        dur = (x[:, 1:] - x[:, :-1]).double() / 1e3
        print(f"  compress ({name}) per program, median us: ranking {dur[:, 0].median():.2f}, first passes "
              f"{dur[:, 1].median():.2f}, code passes {dur[:, 2].median():.2f}")


if __name__ == "__main__":
    main()
