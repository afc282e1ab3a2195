"""The prompt step's two kernels (``block_probe_scores``, then ``compress_store`` given the scores) with and without
programmatic dependent launch (PDL, sm_90+), side by side in one run, over copies of the inputs past 3x the L2 (the
prefill record's way).

    PYTHONPATH=. python -u benchmarks/spike_pdl.py [--contexts 4096,16384] [--baseline FILE] [--maxnreg 152]

Ways (each compress launch reads the same scores, writes the same pages: checked against the first way's):

* ``plain``: two plain launches (``enable_pdl=False``; the step's path before PDL);
* ``pdl start``: ``compress_store(enable_pdl=True)``, the score kernel letting it start at each program's start
  (``block_scores.PDL_TRIGGER = "start"``): its programs are placed beside the score kernel's, compute the values'
  normalizer and wait for the scores;
* ``pdl end``: the same, the score kernel letting it start at each program's end (only the launch latency hidden);
* ``pdl start, maxnreg N``: ``pdl start`` with ``compress_store`` capped at ``N`` registers a thread
  (``compress_store.PDL_MAXNREG``), so that its programs fit beside the score kernel's at once (152: two 4-warp
  score programs at 104 registers and four 2-warp compress programs fill the 64 K registers of an SM);
* with ``--baseline FILE`` (another ``compress_store.py``, e.g. ``git show REV:kernels/compress_store.py``), its
  kernel after the score kernel, plain launches.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_compress import load_kernel_file, prompt_inputs, prompt_scorer
from benchmarks.bench_kernels import graph_time, input_copies
from zipcache_vllm.engine.ops import kernel_module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--baseline", default=None, help="another compress_store.py, timed after the score kernel")
    ap.add_argument("--maxnreg", type=int, default=152)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    bs, cs = kernel_module("block_scores"), kernel_module("compress_store")
    base = load_kernel_file(a.baseline, "_compress_store_spike_base") if a.baseline else None
    ways = {  # name: (compress module, enable_pdl, score trigger, maxnreg)
        "plain": (cs, False, "start", None),
        "pdl start": (cs, True, "start", None),
        "pdl end": (cs, True, "end", None),
        f"pdl start, maxnreg {a.maxnreg}": (cs, True, "start", a.maxnreg),
    }
    if base is not None:
        ways[f"baseline {a.baseline}"] = (base, False, "start", None)
    for ctx in map(int, a.contexts.split(",")):
        layout, k, v, off, pq, ids, cache = prompt_inputs(ctx)
        sets = input_copies((k, v, pq), cache.numel())
        pages, steps = {}, {}
        for name, (mod, pdl, trigger, maxnreg) in ways.items():
            bs.PDL_TRIGGER, cs.PDL_MAXNREG = trigger, maxnreg  # read at launch: set before each way's calls
            fns = []
            for kc, vc, pqc in sets:
                scores, score = prompt_scorer(layout, kc, pqc, off)

                def step(mod=mod, kw={"enable_pdl": True} if pdl else {}, kc=kc, vc=vc, scores=scores, score=score,
                         ids=ids, cache=cache, layout=layout):  # fmt: skip
                    score()
                    mod.compress_store(kc, vc, scores, ids, cache, layout, **kw)

                fns.append(step)
            cache.zero_()
            fns[0]()
            torch.cuda.synchronize()
            pages[name] = cache.clone()
            steps[name] = fns
        first = next(iter(pages.values()))
        print(f"\n{ctx} tokens, {len(sets)} input copies: pages equal to {next(iter(pages))}'s: "
              + ", ".join(f"{n} {torch.equal(p, first)}" for n, p in pages.items()), flush=True)
        times = {name: [] for name in ways}
        for _ in range(3):  # interleaved: the run-to-run spread shows
            for name, (_, _, trigger, maxnreg) in ways.items():
                bs.PDL_TRIGGER, cs.PDL_MAXNREG = trigger, maxnreg
                times[name].append(graph_time(steps[name], a.reps))
        for name, t in times.items():
            print(f"  {name:40s} {' / '.join(f'{x:6.1f}' for x in t)} us a step (mean {sum(t) / len(t):.1f})",
                  flush=True)
    bs.PDL_TRIGGER, cs.PDL_MAXNREG = "start", None


if __name__ == "__main__":
    main()
