"""One attention step over the paged ZipCache, on plain tensors: the part of the vLLM backend that does work.

For every sequence of a batch (lengths as in :mod:`zipcache_vllm.engine.block_manager`)::

    |<-- compressed pages -->|<- t0 tail (bf16 staging) ->|<-- new tokens (query_len) -->|

1. **attend**: every new query over the pages, the tail and the new tokens (causal), and collect probe saliency
   (ZC-7/8): a prefill chunk (``query_len > 1``) uses the probe rows of the chunk (the recent and random shares
   of ``ZipCacheConfig``, drawn by ``saliency.layer_probes`` as the transformers
   reference cache does); a decode step uses its one query. Each bf16 token keeps a running ``score_sum``
   (probability mass it received) and ``score_count`` (queries that could see it: ``causal_count``) or probes
   at or after it (``probe_nnz``), as the reference cache does;
2. **compress**: every block that became complete is quantized once into its page with the scores
   ``score_sum / score_count`` (ZC-6/8; ``accumulated`` saliency: the sums), never re-quantized;
3. **stage**: the remaining ``seq_len % block_size`` tokens (and their score state) go to the sequence's slot.

CPU: the plain-torch twins of :mod:`zipcache_vllm.engine.paged` for prefill chunks, the one-token rows batched by
:mod:`zipcache_vllm.engine.cpu_decode` (dequantized pages with ``kernels="torch"``, the codes read in place by
:mod:`zipcache_vllm.engine.cpu_kernels` with ``kernels="numba"``); CUDA: the Triton kernels of ``zipcache_vllm.kernels``
(same contracts). No vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method.config import Saliency, ZipCacheConfig
from ..method.saliency import chunk_counts, layer_probes, random_scores
from . import cpu_decode
from .block_manager import StepPlan
from .decode import DecodeBatch, DecodeRows, decode_rows_of_plan, decode_step, fixed_scores
from .layout import PageLayout
from .ops import KernelOps, kernel_ops
from .staging import Staging


@dataclass
class Step:
    """Per-step metadata derived once from the plan and shared by all layers (vLLM's ``build``)."""

    plan: StepPlan
    query_start: list[int]
    query_lens: list[int]
    context_lens: list[int]
    max_query_len: int
    tail_slots: torch.Tensor | None = None  # int32 [num_seqs], -1 replaced by 0 (kernels index it; tail_lens 0)
    tail_lens: torch.Tensor | None = None  # int32 [num_seqs] (both None when every row is an engine decode row)
    decode: cpu_decode.DecodeIndex | None = None  # one-token rows (torch path), None when there are none
    others: list[int] | None = None  # sequences not in `decode` / `decode_rows`
    decode_rows: DecodeRows | None = None  # the leading one-token rows, for the engine's decode step
    num_decode_rows: int = 0  # real rows among them (the rest are vLLM's graph padding)


def prepare_step(
    plan: StepPlan,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    device=None,
    decode_batch: DecodeBatch | None = None,
    block_table_rows=None,
    device_block_table: torch.Tensor | None = None,
) -> Step:
    """Build the :class:`Step` of a plan (``query_start_loc``, ``seq_lens`` on any device). With
    ``block_table``, also the :class:`DecodeIndex` of the batched torch path.

    With ``decode_batch`` (and the host ``block_table_rows`` and ``device_block_table``), the leading one-token
    rows (vLLM puts decodes first) go to the engine's decode step: their metadata is written into the batch's
    persistent buffers. A batch of decodes only keeps vLLM's padding rows (query length 0) as dummy rows, so
    that a captured graph of that size replays it."""
    qsl = [int(x) for x in query_start_loc.tolist()]
    sl = [int(x) for x in seq_lens.tolist()]
    num_seqs = plan.num_seqs
    qlens = [qsl[s + 1] - qsl[s] for s in range(num_seqs)]
    ctx = [sl[s] - qlens[s] for s in range(num_seqs)]
    device = query_start_loc.device if device is None else device
    step = Step(
        plan=plan,
        query_start=qsl,
        query_lens=qlens,
        context_lens=ctx,
        max_query_len=max(qlens, default=0),
    )
    if decode_batch is not None:
        lead = 0
        while lead < num_seqs and qlens[lead] == 1:
            lead += 1
        step.others = [s for s in range(lead, num_seqs) if qlens[s] > 0]
        padded = lead if step.others else num_seqs
        decode_batch.fill(*decode_rows_of_plan(plan, range(lead), sl, block_table_rows), num_rows=padded)
        step.decode_rows = decode_batch.rows(device_block_table, padded)
        step.num_decode_rows = lead
    if step.decode_rows is None or step.others:  # metadata of the rows attended as chunks
        step.tail_slots = torch.tensor([max(x, 0) for x in plan.tail_slots], dtype=torch.int32, device=device)
        step.tail_lens = torch.tensor(plan.tail_lens, dtype=torch.int32, device=device)
    if decode_batch is None and block_table is not None:
        rows = [s for s in range(num_seqs) if qlens[s] == 1]
        step.others = [s for s in range(num_seqs) if qlens[s] != 1]
        if rows:
            step.decode = cpu_decode.build_index(plan, rows, qsl, ctx, block_table)
    return step


def probe_rows(
    step: Step, config: ZipCacheConfig, layer_idx: int, seqs: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``probe_idx`` (offsets in each sequence's chunk, ascending) and ``probe_start_loc [len(seqs) + 1]``
    for the sequences ``seqs`` (default: all)."""
    parts, starts = [], [0]
    for s in range(len(step.query_lens)) if seqs is None else seqs:
        ql = step.query_lens[s]
        if ql == 1:
            idx = torch.zeros(1, dtype=torch.long)
        elif ql == 0:
            idx = torch.zeros(0, dtype=torch.long)
        else:
            # compat mode draws with replacement; a row counts once per chunk here
            idx = torch.unique(layer_probes(config, ql, layer_idx))
        parts.append(idx)
        starts.append(starts[-1] + idx.numel())
    return torch.cat(parts).int(), torch.tensor(starts, dtype=torch.int32)


def zipcache_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    slot_mapping: torch.Tensor,
    staging: Staging,
    step: Step,
    layout: PageLayout,
    config: ZipCacheConfig,
    layer_idx: int = 0,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    kernels: str = "torch",
) -> torch.Tensor:
    """Store the new tokens and attend, for one layer and one step (module docstring).

    Parameters
    ----------
    query : ``[num_tokens, num_heads, head_size]``; key, value : ``[num_tokens, num_kv_heads, head_size]``
        (post-RoPE, rows of sequence ``s`` at ``query_start_loc[s] .. query_start_loc[s + 1] - 1``).
    kv_cache : ``uint8 [num_blocks, num_kv_heads, >= layout.page_bytes]`` (vLLM's ``[num_blocks,
        num_kv_heads, block_size, state_content_bytes]`` view flattened over its last two dims).
    block_table : int32 ``[num_seqs, max_blocks]``; seq_lens : int32 ``[num_seqs]`` (new tokens included);
        query_start_loc : int32 ``[num_seqs + 1]``; slot_mapping : int ``[num_tokens]``, ``block_id *
        block_size + offset`` of each new token (the page of a completed block is read from it).
    staging : this layer's :class:`Staging`; step : :func:`prepare_step` of this step's
        :meth:`BlockManager.plan`, shared by all layers.
    layout, config : the page layout and the ZipCache settings (block granularity).
    layer_idx : seeds the probe draw (as the reference cache). scale : softmax scale (default ``D ** -0.5``).
    out : optional ``[num_tokens, num_heads, head_size]`` output. kernels : ``torch``, ``numba`` or ``triton``
        (or a :class:`~zipcache_vllm.engine.ops.KernelOps`). On CUDA a chunk with nothing before it (a prompt's
        first chunk) is attended by cuDNN's causal attention with its log-sum-exp (``ops.causal_with_lse``), its
        probe scores by
        ``kernels/probe_scores``; later chunks by ``kernels/prefill_attention`` over pages + tail + chunk.

    Returns
    -------
    ``out [num_tokens, num_heads, head_size]`` (dtype of ``out``, else of ``query``).
    """
    num_tokens = step.query_start[-1]
    ops = kernels if isinstance(kernels, KernelOps) else kernel_ops(kernels)
    is_kernel = ops.name == "triton"
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if out is None:
        out = torch.empty_like(query)
    if step.decode_rows is not None:  # the leading one-token rows: the engine's decode step (graph-capturable)
        random = fixed_scores(config, layout.block_size, key.shape[1], query.device)
        decode_step(query, key, value, kv_cache, staging, step.decode_rows, layout, ops,
                    config.saliency, scale, out, random)
        if not step.others:
            return out
    # new tokens are bf16 from the start, as the reference cache's window (identity for bf16 models)
    q, k, v = query[:num_tokens], key[:num_tokens].to(staging.key.dtype), value[:num_tokens].to(staging.value.dtype)
    # the torch path batches one-token rows separately; the kernels take every sequence as a chunk
    if step.decode_rows is not None or (not is_kernel and step.others is not None):
        seqs = step.others
    else:
        seqs = list(range(step.plan.num_seqs))
    h, n = key.shape[1], layout.block_size
    sums = torch.zeros(num_tokens, h, dtype=torch.float32, device=query.device)
    tail_sums = torch.zeros(step.plan.num_seqs, n, h, dtype=torch.float32, device=query.device)
    probes = {}
    first = []  # chunks with nothing before them: plain causal attention on the fastest kernel + probe scores
    if seqs and ops.first_chunk_attention is not None:
        first = [s for s in seqs if step.context_lens[s] == 0]
    later = [s for s in seqs if step.context_lens[s] != 0] if first else seqs
    for group in (first, later):
        if not group:
            continue
        probe_idx, probe_start = probe_rows(step, config, layer_idx, group)
        probes.update({s: probe_idx[probe_start[i] : probe_start[i + 1]] for i, s in enumerate(group)})
        sub = _subset(step, group, block_table, seq_lens, query_start_loc, query.device)
        tok = sub["tokens"]
        qs, ks, vs = (q, k, v) if tok is None else (q[tok], k[tok], v[tok])
        probe_idx, probe_start = probe_idx.to(query.device), probe_start.to(query.device)
        flash = None
        if group is first:
            flash = ops.first_chunk_attention(qs, ks, vs, sub["starts"], scale)
        if flash is not None:
            o, lse = flash
            sc, tsc = ops.probe_scores(qs, lse, ks, staging.key, sub["query_start_loc"], sub["seq_lens"],
                                       sub["tail_slots"], sub["tail_lens"], probe_idx, probe_start,
                                       sub["max_query_len"], normalizer=None, scale=scale)
        else:
            o, sc, tsc = ops.prefill_attention(
                qs, ks, vs, sub["max_query_len"], kv_cache=kv_cache, layout=layout, block_table=sub["block_table"],
                query_start_loc=sub["query_start_loc"], seq_lens=sub["seq_lens"], tail_key=staging.key,
                tail_value=staging.value, tail_slots=sub["tail_slots"], tail_lens=sub["tail_lens"],
                probe_idx=probe_idx, probe_start_loc=probe_start,
                normalizer=None,  # raw probability sums; counts are kept here, across steps
                scale=scale,
            )
        if tok is None:
            out[:num_tokens], sums, tail_sums = o.to(out.dtype), sc, tsc
        else:
            out[tok], sums[tok], tail_sums[sub["seqs"]] = o.to(out.dtype), sc, tsc
    dec_tail = None
    if not is_kernel and step.decode is not None:
        decode = cpu_decode.decode_attend_codes if kernels == "numba" else cpu_decode.decode_attend
        dec_tail = decode(q, k, kv_cache, staging, step.decode, layout, scale, out, sums, v)
        d = step.decode
        if d.other_tail.numel():  # rows whose block completes read their tail scores in _store
            j = d.other_tail
            tail_sums[d.tail_seq[j], d.tail_row[j]] = dec_tail[j]
    _store(k, v, sums, tail_sums, dec_tail, kv_cache, slot_mapping, staging, step, probes, layout, config,
           ops.compress_store, vectorized=not is_kernel)
    return out


def _subset(step: Step, seqs: list[int], block_table, seq_lens, query_start_loc, device) -> dict:
    """Metadata of a sub-batch of sequences (cached on the step: it is the same for every layer)."""
    cache = step.__dict__.setdefault("_subsets", {})
    key = tuple(seqs)
    if key in cache:
        return cache[key]
    everything = len(seqs) == step.plan.num_seqs
    idx = torch.tensor(seqs, dtype=torch.long, device=device)
    qlens = [step.query_lens[s] for s in seqs]
    starts = [0]
    for ql in qlens:
        starts.append(starts[-1] + ql)
    tokens = None
    if not everything:
        tokens = torch.cat(
            [torch.arange(step.query_start[s], step.query_start[s] + step.query_lens[s]) for s in seqs]
        ).to(device)
    sub = {
        "seqs": idx,
        "tokens": tokens,
        "block_table": block_table if everything else block_table[idx],
        "query_start_loc": query_start_loc if everything else torch.tensor(starts, dtype=torch.int32, device=device),
        "seq_lens": seq_lens if everything else seq_lens[idx],
        "tail_slots": step.tail_slots if everything else step.tail_slots[idx],
        "tail_lens": step.tail_lens if everything else step.tail_lens[idx],
        "max_query_len": max(qlens, default=0),
        "starts": starts,  # host copy of query_start_loc
    }
    cache[key] = sub
    return sub


def _store(k, v, sums, tail_sums, dec_tail, kv_cache, slot_mapping, staging, step, probes, layout, config,
           compress, vectorized):
    """Compress the blocks completed in this step, then stage the new tails (reads before writes: a slot may
    carry a completed block's tail and, after it, the new tail of the same sequence)."""
    n = layout.block_size
    plan = step.plan
    d = step.decode if vectorized else None
    skip = d.simple_seqs if d is not None else frozenset()
    done = range(step.num_decode_rows) if step.decode_rows is not None else range(0)  # stored by decode_step
    blk_k, blk_v, blk_s, blk_ids = [], [], [], []
    writes = []
    one = torch.zeros(1, dtype=torch.int32)
    for s in range(plan.num_seqs):
        ql = step.query_lens[s]
        if ql == 0 or s in skip or s in done:
            continue
        q0, ctx = step.query_start[s], step.context_lens[s]
        t0, t1, slot = plan.tail_lens[s], plan.new_tail_lens[s], plan.tail_slots[s]
        count = chunk_counts(config.normalizer, ctx, ql, t0, probes.get(s, one)).to(k.device)
        ssum = tail_sums[s, :t0] if t0 else None
        if t0:
            ssum = staging.score_sum[slot, :t0] + ssum
            count[:t0] += staging.score_count[slot, :t0]
        total = t0 + ql
        nc = total // n
        if nc:
            pk, pv, ps = k[q0 : q0 + nc * n - t0], v[q0 : q0 + nc * n - t0], sums[q0 : q0 + nc * n - t0]
            if t0:
                pk = torch.cat([staging.key[slot, :t0], pk.to(staging.key.dtype)])
                pv = torch.cat([staging.value[slot, :t0], pv.to(staging.value.dtype)])
                ps = torch.cat([ssum, ps])
            cnt = count[: nc * n]
            scores = ps if config.saliency is Saliency.ACCUMULATED else ps / cnt.clamp(min=1.0).unsqueeze(-1)
            blk_k.append(pk.to(staging.key.dtype))
            blk_v.append(pv.to(staging.value.dtype))
            blk_s.append(scores)
            last_tok = q0 + torch.arange(1, nc + 1, device=slot_mapping.device) * n - t0 - 1
            blk_ids.append(torch.div(slot_mapping[last_tok], n, rounding_mode="floor"))
        if t1:
            writes.append((q0, ql, t0, t1, slot, nc, ssum, count))
    if blk_ids:
        scores = torch.cat(blk_s)
        if config.saliency is Saliency.RANDOM:  # ablation, drawn as ZipCacheCompressor does for each segment
            draw = random_scores(config, 1, scores.shape[1], n)[0].T  # [n, h], the same for every block
            scores = draw.repeat(scores.shape[0] // n, 1).to(scores.device)
        compress(torch.cat(blk_k), torch.cat(blk_v), scores, torch.cat(blk_ids), kv_cache, layout)
    for q0, ql, t0, t1, slot, nc, ssum, count in writes:
        if nc == 0:
            # the tail grows: old rows keep their place (scores updated), new rows follow
            if t0:
                staging.score_sum[slot, :t0] = ssum
                staging.score_count[slot, :t0] = count[:t0]
            staging.key[slot, t0:t1] = k[q0 : q0 + ql].to(staging.key.dtype)
            staging.value[slot, t0:t1] = v[q0 : q0 + ql].to(staging.value.dtype)
            staging.score_sum[slot, t0:t1] = sums[q0 : q0 + ql]
            staging.score_count[slot, t0:t1] = count[t0:]
        else:
            # a fresh tail: the last t1 new tokens
            a = q0 + ql - t1
            staging.key[slot, :t1] = k[a : q0 + ql].to(staging.key.dtype)
            staging.value[slot, :t1] = v[a : q0 + ql].to(staging.value.dtype)
            staging.score_sum[slot, :t1] = sums[a : q0 + ql]
            staging.score_count[slot, :t1] = count[t0 + ql - t1 :]
    if skip:
        # one-token rows whose block stays incomplete: append the token, add this query's mass to the tail
        h, dim = k.shape[1], k.shape[2]
        tok, flat = d.tokens.index_select(0, d.simple), d.new_flat
        staging.key.view(-1, h, dim).index_copy_(0, flat, k.index_select(0, tok).to(staging.key.dtype))
        staging.value.view(-1, h, dim).index_copy_(0, flat, v.index_select(0, tok).to(staging.value.dtype))
        staging.score_sum.view(-1, h).index_copy_(0, flat, sums.index_select(0, tok))
        staging.score_count.view(-1).index_fill_(0, flat, 1.0)
        j = d.simple_tail
        if j.numel():
            tflat = d.tail_flat.index_select(0, j)
            staging.score_sum.view(-1, h).index_add_(0, tflat, dec_tail.index_select(0, j))
            staging.score_count.view(-1).index_add_(0, tflat, torch.ones(j.numel()))
