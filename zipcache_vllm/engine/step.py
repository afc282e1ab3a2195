"""One attention step over the paged ZipCache, on plain tensors: the part of the vLLM backend that does work.

For every sequence of a batch (lengths as in :mod:`zipcache_vllm.engine.block_manager`)::

    |<-- compressed pages -->|<- t0 tail (bf16 staging) ->|<-- new tokens (query_len) -->|

1. **compress**: every block that becomes complete in this step is scored by the block rule (its own probe rows
   at fixed positions, :mod:`zipcache_vllm.method.saliency`: their queries come from the staging slot or from
   this step) and quantized once into its page, never re-quantized. This needs no attention, so it comes first:
   a sequence of the same step that shares the block (a prefix-cache hit) reads the page;
2. **attend**: a query at position ``p`` sees the blocks before its own through their pages and its own block
   (``p // block_size``) in bf16, up to ``p``, whatever the chunk it came in (``prefill_attention``'s
   contract, in one launch for all chunks of the step on CUDA). So the
   output of a token, and with it the next layer's K/V and every page, is a function of the token prefix alone,
   not of the chunking, the batch or the load;
3. **stage**: the remaining ``seq_len % block_size`` tokens and the queries of their probe rows go to the
   sequence's slot.

CPU: the chunks through a paged attention kernel the caller hands over (the vLLM backend: vLLM's own CPU
kernel, every group of ``REQUEST_ROWS`` block-aligned rows one request over a bf16 scratch of the pages and raw
rows, :func:`block_requests`), else block by block in masked SDPA calls over the dequantized pages whose shape
depends on the block alone (so a prompt row's output is bit-identical whatever the chunking; the numba decode
is per row, so a decode row's does not depend on the batch), the one-token rows batched by
:mod:`zipcache_vllm.engine.cpu_decode` (dequantized pages with ``kernels="torch"``, the codes read in place by
:mod:`zipcache_vllm.engine.cpu_kernels` with ``kernels="numba"``); CUDA: the Triton kernels of
``zipcache_vllm.kernels`` (same contracts). No vLLM import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..method import rotation
from ..method.config import Saliency, ZipCacheConfig
from ..method.saliency import num_block_probes
from . import cpu_decode, cpu_kernels
from .block_manager import StepPlan
from .decode import DecodeBatch, DecodeRows, decode_rows_of_plan, decode_step, fixed_scores, probe_ranks
from .layout import PageLayout
from .ops import KernelOps, check_layout, kernel_module, kernel_ops
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
    config: ZipCacheConfig | None = None,
) -> Step:
    """Build the :class:`Step` of a plan (``query_start_loc``, ``seq_lens`` on any device). With
    ``block_table``, also the :class:`DecodeIndex` of the batched torch path.

    With ``decode_batch`` (and the host ``block_table_rows`` and ``device_block_table``), the leading one-token
    rows (vLLM puts decodes first) go to the engine's decode step: their metadata is written into the batch's
    persistent buffers. A batch of decodes only keeps vLLM's padding rows (query length 0) as dummy rows, so
    that a captured graph of that size replays it (``config`` places their probe rows)."""
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
        decode_batch.fill(**decode_rows_of_plan(plan, range(lead), sl, block_table_rows, config), num_rows=padded)
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


@dataclass
class ChunkPlan:
    """Layer-independent work of the rows a step does not hand to the engine's decode step (built once per
    step, :func:`chunk_plan`). Token indices are into the step's ``query`` rows; ``flat`` staging indices are
    ``slot * block_size + row`` (K/V) and ``slot * num_probes + rank`` (probe queries)."""

    seqs: list[int]  # the chunk sequences attended here (the rest are one-token rows of the CPU decode)
    num_blocks: int  # blocks completed in this step
    kv_stage_src: torch.Tensor  # compress: staged rows of those blocks ...
    kv_stage_dst: torch.Tensor  # ... and their rows in the [num_blocks * block_size] gather
    kv_new_tok: torch.Tensor  # tokens of this step in those blocks ...
    kv_new_range: tuple[int, int] | None  # ... as the token range a .. b when the blocks are exactly those rows
    kv_new_dst: torch.Tensor
    pq_stage_src: torch.Tensor  # probe queries staged earlier ...
    pq_stage_dst: torch.Tensor  # ... and their rows in the [num_blocks * num_probes] gather
    pq_new_tok: torch.Tensor
    pq_new_dst: torch.Tensor
    pq_new_only: bool  # every probe query is of this step, in gather order (a prompt): one gather, no scatter
    offsets: torch.Tensor  # int32 [num_blocks, num_probes]
    last_tok: torch.Tensor  # int64 [num_blocks]: the token holding each block's last position (its page id)
    block_slots: torch.Tensor  # int64 [num_blocks]: the staging slot of each block's sequence
    block_index: torch.Tensor  # int64 [num_blocks]: 0 .. num_blocks - 1 (the score kernel's work list)
    put_kv_tok: torch.Tensor  # stage: tokens of the new tails ...
    put_kv_flat: torch.Tensor  # ... and where they go
    put_pq_tok: torch.Tensor  # queries of the new tails' probe rows ...
    put_pq_flat: torch.Tensor


def chunk_plan(step: Step, config: ZipCacheConfig, engine_rows: int, kernel_rows: bool, device) -> ChunkPlan:
    """The :class:`ChunkPlan` of ``step`` (cached on it: the same for every layer). ``engine_rows``: leading
    rows done by the engine's decode step; ``kernel_rows``: one-token rows are attended as chunks too (else
    by the CPU decode)."""
    cached = step.__dict__.get("_chunk_plan")
    if cached is not None:
        return cached
    n, plan = step.plan.block_size, step.plan
    p = num_block_probes(config, n)
    seqs = []
    kv = ([], [], [], [])  # stage_src, stage_dst, new_tok, new_dst
    pq = ([], [], [], [])
    offsets, last_tok, block_slots, put_kv, put_kv_flat, put_pq, put_pq_flat = [], [], [], [], [], [], []
    for s in range(plan.num_seqs):
        ql = step.query_lens[s]
        if ql == 0 or s < engine_rows:
            continue
        q0, ctx, t0, slot = step.query_start[s], step.context_lens[s], plan.tail_lens[s], plan.tail_slots[s]
        sl = ctx + ql
        if ql > 1 or kernel_rows:
            seqs.append(s)
        for bi in range((ctx - t0) // n, sl // n):  # blocks completed in this step
            base = len(last_tok)
            mid = min(max(ctx - bi * n, 0), n)  # block offsets [0, mid) are staged, [mid, n) new in this step
            kv[0].extend(range(slot * n, slot * n + mid))
            kv[1].extend(range(base * n, base * n + mid))
            kv[2].extend(range(q0 + bi * n + mid - ctx, q0 + bi * n + n - ctx))
            kv[3].extend(range(base * n + mid, base * n + n))
            offs, _ = probe_ranks(config, n, bi)
            for rank, o in enumerate(offs):
                if bi * n + o < ctx:
                    pq[0].append(slot * p + rank)
                    pq[1].append(base * p + rank)
                else:
                    pq[2].append(q0 + bi * n + o - ctx)
                    pq[3].append(base * p + rank)
            offsets.append(offs)
            last_tok.append(q0 + bi * n + n - 1 - ctx)
            block_slots.append(max(slot, 0))
        if plan.new_tail_lens[s]:  # the new tail: its tokens from this step, and their probe rows
            bt = sl // n
            a = max(ctx, bt * n)
            put_kv.extend(range(q0 + a - ctx, q0 + sl - ctx))
            put_kv_flat.extend(range(slot * n + a - bt * n, slot * n + sl - bt * n))
            _, rank = probe_ranks(config, n, bt)
            for o, r in sorted(rank.items()):  # the probe rows among those tokens, in token order
                if a <= bt * n + o < sl:
                    put_pq.append(q0 + bt * n + o - ctx)
                    put_pq_flat.append(slot * p + r)
    dev = device
    long = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
    cp = ChunkPlan(
        seqs=seqs, num_blocks=len(last_tok),
        kv_stage_src=long(kv[0]), kv_stage_dst=long(kv[1]), kv_new_tok=long(kv[2]), kv_new_dst=long(kv[3]),
        kv_new_range=_as_range(kv[2]) if not kv[0] and kv[3] == list(range(len(kv[3]))) else None,
        pq_stage_src=long(pq[0]), pq_stage_dst=long(pq[1]), pq_new_tok=long(pq[2]), pq_new_dst=long(pq[3]),
        pq_new_only=not pq[0] and pq[3] == list(range(len(pq[3]))),
        offsets=torch.tensor(offsets, dtype=torch.int32, device=dev).view(len(last_tok), p),
        last_tok=long(last_tok), block_slots=long(block_slots), block_index=long(range(len(last_tok))),
        put_kv_tok=long(put_kv),
        put_kv_flat=long(put_kv_flat), put_pq_tok=long(put_pq),
        put_pq_flat=long(put_pq_flat),
    )  # fmt: skip
    step.__dict__["_chunk_plan"] = cp
    return cp


def _as_range(rows: list[int]) -> tuple[int, int] | None:
    """``(a, b)`` when ``rows`` is ``a, a + 1, .., b - 1`` (a slice replaces a gather), else None."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return rows[0], rows[0] + len(rows)
    return None


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
    random_scores: torch.Tensor | None = None,
    paged_attention: PagedAttention | None = None,
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
    layout, config : the page layout and the ZipCache settings (block granularity, the block probe rule;
        ``value_rotation``: values stored in the Hadamard basis of :mod:`~zipcache_vllm.method.rotation`, the
        outputs rotated back).
    layer_idx : unused by the block rule (its probes are the same in every layer). scale : softmax scale
        (default ``D ** -0.5``).
    out : optional ``[num_tokens, num_heads, head_size]`` output. kernels : ``torch``, ``numba`` or ``triton``
        (or a :class:`~zipcache_vllm.engine.ops.KernelOps`). On CUDA the chunks are attended by
        ``kernels/prefill_attention`` (the block rule: dequantized pages of the earlier blocks, then the own
        block's bf16 tail and tokens, in one flash-attention launch).
    random_scores : the random-saliency ablation's block scores ``[1 or num_slots, block_size,
        num_kv_heads]`` by staging slot (default: :func:`~zipcache_vllm.engine.decode.fixed_scores`, one
        draw for every block); unused by probe saliency.
    paged_attention : on CPU, a paged attention kernel over a bf16 scratch cache (:data:`PagedAttention`; the
        vLLM backend hands vLLM's own CPU kernel) for the chunks, their rows in block-aligned groups of
        ``REQUEST_ROWS``, one request each (:func:`block_requests`); default: masked SDPA calls per block.

    Returns
    -------
    ``out [num_tokens, num_heads, head_size]`` (dtype of ``out``, else of ``query``).
    """
    if config.value_rotation:  # values live in the Hadamard basis (method/rotation.py): stored rotated, and the
        value = rotation.rotate(value)  # outputs rotated back (_rotate_back) at each return
    num_tokens = step.query_start[-1]
    ops = kernels if isinstance(kernels, KernelOps) else kernel_ops(kernels)
    check_layout(ops, layout)
    is_kernel = ops.name == "triton"
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if out is None:
        out = torch.empty_like(query)
    engine_rows = 0
    if random_scores is None:
        random_scores = fixed_scores(config, layout.block_size, key.shape[1], query.device)
    if step.decode_rows is not None:  # the leading one-token rows: the engine's decode step (graph-capturable)
        decode_step(query, key, value, kv_cache, staging, step.decode_rows, layout, ops, config, scale, out,
                    random_scores)
        if not step.others:
            return _rotate_back(out, step, config)
        engine_rows = step.num_decode_rows
    # new tokens are bf16 from the start, as the reference cache's window (identity for bf16 models)
    dt = staging.key.dtype
    q, k, v = query[:num_tokens], key[:num_tokens].to(dt), value[:num_tokens].to(dt)
    cp = chunk_plan(step, config, engine_rows, is_kernel or step.decode is None, query.device)
    if cp.num_blocks:
        _compress(q, k, v, kv_cache, slot_mapping, staging, cp, layout, config, ops, scale, random_scores)
    if cp.seqs:
        if is_kernel or q.device.type != "cpu":  # (the twins on a GPU: kernels="torch" there)
            _attend_blocks(q, k, v, kv_cache, block_table, staging, step, cp, layout, ops, scale, out)
        elif paged_attention is not None:
            _attend_paged_cpu(q, k, v, kv_cache, block_table, staging, step, cp, layout, scale, out, paged_attention,
                              kernels == "numba")
        else:
            _attend_chunks_cpu(q, k, v, kv_cache, block_table, staging, step, cp, layout, scale, out)
    if not is_kernel and step.decode is not None:
        decode = cpu_decode.decode_attend_codes if kernels == "numba" else cpu_decode.decode_attend
        decode(q, k, v, kv_cache, staging, step.decode, layout, scale, out)
    # stage the new tails last: attention read the old ones
    h, d = k.shape[1], k.shape[2]
    if cp.put_kv_tok.numel():
        staging.key.view(-1, h, d).index_copy_(0, cp.put_kv_flat, k.index_select(0, cp.put_kv_tok))
        staging.value.view(-1, h, d).index_copy_(0, cp.put_kv_flat, v.index_select(0, cp.put_kv_tok))
    if cp.put_pq_tok.numel():
        staging.probe_query.view(-1, q.shape[1], d).index_copy_(0, cp.put_pq_flat,
                                                                q.index_select(0, cp.put_pq_tok).to(dt))
    return _rotate_back(out, step, config)


def _rotate_back(out: torch.Tensor, step: Step, config: ZipCacheConfig) -> torch.Tensor:
    """The step's output rows back from the values' Hadamard basis (``config.value_rotation``)."""
    if config.value_rotation:
        n = step.query_start[-1]
        out[:n] = rotation.rotate(out[:n])
    return out


def _compress(q, k, v, kv_cache, slot_mapping, staging, cp: ChunkPlan, layout, config, ops, scale, random) -> None:
    """Score (block rule) and compress the blocks completed in this step: their tokens and probe queries come
    from the staging slot (earlier steps) and from this step."""
    n, b = layout.block_size, cp.num_blocks
    h, d, hq = k.shape[1], k.shape[2], q.shape[1]
    p = cp.offsets.shape[1]
    dt = staging.key.dtype
    if cp.kv_new_range is not None:  # the blocks are consecutive rows of this step (a prompt): no copy
        bk, bv = k[cp.kv_new_range[0] : cp.kv_new_range[1]], v[cp.kv_new_range[0] : cp.kv_new_range[1]]
    else:
        bk = torch.empty(b * n, h, d, dtype=dt, device=k.device)
        bv = torch.empty_like(bk)
        for dst, src, flat in ((bk, k, staging.key), (bv, v, staging.value)):
            if cp.kv_stage_src.numel():
                dst.index_copy_(0, cp.kv_stage_dst, flat.view(-1, h, d).index_select(0, cp.kv_stage_src))
            dst.index_copy_(0, cp.kv_new_dst, src.index_select(0, cp.kv_new_tok))
    if config.saliency is Saliency.RANDOM:  # ablation: the draw of each block's staging slot
        scores = random.expand(staging.key.shape[0], -1, -1).index_select(0, cp.block_slots).reshape(b * n, h)
    else:
        if cp.pq_new_only:
            pq = q.index_select(0, cp.pq_new_tok).to(dt)
        else:
            pq = torch.empty(b * p, hq, d, dtype=dt, device=q.device)
            if cp.pq_stage_src.numel():
                pq.index_copy_(0, cp.pq_stage_dst,
                               staging.probe_query.view(-1, hq, d).index_select(0, cp.pq_stage_src))  # fmt: skip
            pq.index_copy_(0, cp.pq_new_dst, q.index_select(0, cp.pq_new_tok).to(dt))
        # two launches on CUDA too, as the decode step's: the same scores (block_probe_scores at its 4 warps), so a
        # block's page does not depend on whether a prompt or decode rows completed it; and faster where a step's
        # blocks are one wave (H100: a 4k prompt 26.3 us against 28.4 scored inside compress_store, 16k 105.4
        # against 96.0: docs/performance.md)
        scores = torch.empty(b, n, h, dtype=torch.float32, device=k.device)
        ops.block_scores(bk.view(b, n, h, d), pq.view(b, p, hq, d), cp.offsets, cp.block_index, scores,
                         config.normalizer, config.saliency, scale)
        scores = scores.view(b * n, h)
    ops.compress_store(bk, bv, scores, _block_ids(cp, slot_mapping, n), kv_cache, layout)


def _block_ids(cp: ChunkPlan, slot_mapping: torch.Tensor, n: int) -> torch.Tensor:
    """The page of each block completed in the step, from the slot of its last token: computed by the first
    layer and kept on the plan for the others, which get the same ``slot_mapping`` (vLLM's metadata of the
    step; another tensor, e.g. a caller's own per layer, is computed anew)."""
    cached = cp.__dict__.get("_block_ids")
    if cached is not None and cached[0] is slot_mapping:
        return cached[1]
    ids = torch.div(slot_mapping[cp.last_tok], n, rounding_mode="floor")
    cp.__dict__["_block_ids"] = (slot_mapping, ids)
    return ids


def _attend_blocks(q, k, v, kv_cache, block_table, staging, step, cp: ChunkPlan, layout, ops, scale, out) -> None:
    """Kernel path: the chunks in one ``prefill_attention`` launch (the block rule is the kernel's contract:
    pages before each query's own block, its bf16 tail and tokens)."""
    sub = _chunk_subset(step, cp, block_table, q.device, ops.name == "triton")
    tok, span = sub.pop("tokens"), sub.pop("span")
    if span is not None:  # the chunks are consecutive rows of the step (vLLM puts decodes first): views
        a, b = span
        ops.prefill_attention(q[a:b], k[a:b], v[a:b], sub.pop("max_query_len"), kv_cache=kv_cache, layout=layout,
                              tail_key=staging.key, tail_value=staging.value, scale=scale, out=out[a:b], **sub)
        return
    o = ops.prefill_attention(q[tok], k[tok], v[tok], sub.pop("max_query_len"), kv_cache=kv_cache, layout=layout,
                              tail_key=staging.key, tail_value=staging.value, scale=scale, **sub)
    out[tok] = o.to(out.dtype)


def _chunk_subset(step: Step, cp: ChunkPlan, block_table, device, kernel: bool) -> dict:
    """Metadata of the chunk sequences ``cp.seqs`` as ``prefill_attention`` takes it (cached on the step: the
    same for every layer); ``tokens``: their rows in the step. ``kernel``: with the kernel's scratch plan,
    built here from host values, so that a layer's call does not wait for the GPU."""
    cached = step.__dict__.get("_chunk_subset")
    if cached is not None:
        return dict(cached)
    plan, seqs = step.plan, cp.seqs
    starts, tokens = [0], []
    for s in seqs:
        tokens.append(torch.arange(step.query_start[s], step.query_start[s + 1]))
        starts.append(starts[-1] + step.query_lens[s])
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    rows = torch.tensor(seqs, dtype=torch.long, device=device)
    rows_ = torch.cat(tokens)
    seq_lens = [step.context_lens[s] + step.query_lens[s] for s in seqs]
    sub = {
        "tokens": rows_.to(device),
        "span": _as_range(rows_.tolist()),
        "block_table": block_table.index_select(0, rows),
        "query_start_loc": i32(starts),
        "seq_lens": i32(seq_lens),
        "tail_slots": i32([max(plan.tail_slots[s], 0) for s in seqs]),
        "tail_lens": i32([plan.tail_lens[s] for s in seqs]),
        "max_query_len": max(step.query_lens[s] for s in seqs),
    }
    if kernel:
        sub["plan"] = kernel_module("prefill_attention").prefill_plan(seq_lens, plan.block_size, device)
    step.__dict__["_chunk_subset"] = sub
    return dict(sub)


_QUERY_GROUP = 32
_MAX_QUERY_ROWS = 128  # query rows per SDPA call: torch's CPU flash attention tiles by 32 rows below 192


@functools.lru_cache(maxsize=16)
def _causal_triangle(n: int) -> torch.Tensor:
    """``[n, n]`` bool: row ``i`` sees columns ``<= i``."""
    return torch.arange(n)[None, :] <= torch.arange(n)[:, None]


def _block_mask(j: int, n: int, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0 .. r1`` of the ``[n, (j + 1) n]`` bool mask of block ``j``: row ``i`` (position ``j n + i``)
    sees the keys at positions ``<= j n + i`` (every earlier block, and its own block causally)."""
    return torch.cat([torch.ones(r1 - r0, j * n, dtype=torch.bool), _causal_triangle(n)[r0:r1]], dim=1)


def _attend_chunks_cpu(q, k, v, kv_cache, block_table, staging, step, cp: ChunkPlan, layout, scale, out) -> None:
    """CPU path: a chunk block by block (the semantics of ``prefill_attention``, fp32, with the faster CPU
    dequantization). One fp32 buffer per sequence holds its dequantized pages by position; for block ``j`` the
    bf16 rows of the block (tail, then chunk) are written over its positions, and the block's queries attend
    the buffer up to the block's end ``(j + 1) n`` (zeros past the sequence) under ``_block_mask``: query ``p``
    sees the pages of the blocks before its own and its own block up to ``p``; no copy of the prefix per block
    (a masked SDPA over the whole chunk was 2-4x slower). Query rows go in aligned groups of ``_QUERY_GROUP``,
    at most ``_MAX_QUERY_ROWS`` per call, so that a row's arithmetic never depends on the chunking."""
    n, plan = layout.block_size, step.plan
    h, d = k.shape[1], k.shape[2]
    for s in cp.seqs:
        q0, ql, ctx = step.query_start[s], step.query_lens[s], step.context_lens[s]
        t0, sl = plan.tail_lens[s], ctx + ql
        last = (sl - 1) // n  # the last query's block
        num_pages = last  # every block before it is compressed by now
        base = ctx - t0  # position of the first bf16 row (block-aligned)
        # up to the end of the last block, zeros past the sequence: every block's queries attend a key extent
        # that depends on the block alone, never on where the chunk ends (load independence, issue 13)
        kb = torch.zeros(1, h, (last + 1) * n, d)
        vb = torch.zeros(1, h, (last + 1) * n, d)
        if num_pages:
            pk, pv = cpu_decode.dequantize_pages_cpu(kv_cache, block_table[s, :num_pages].long(), layout)
            pk, pv = (x.reshape(-1, h, d).transpose(0, 1) for x in (pk, pv))  # [h, num_pages * n, d]
            kb[0, :, : num_pages * n] = pk
            vb[0, :, : num_pages * n] = pv
        slot = plan.tail_slots[s]
        rk = torch.cat([staging.key[slot, :t0].float(), k[q0 : q0 + ql].float()]).transpose(0, 1)
        rv = torch.cat([staging.value[slot, :t0].float(), v[q0 : q0 + ql].float()]).transpose(0, 1)
        qh = q[q0 : q0 + ql].float().transpose(0, 1).unsqueeze(0)
        for j in range(ctx // n, last + 1):
            a, b, e = j * n, min(sl, (j + 1) * n), (j + 1) * n
            kb[0, :, a:b], vb[0, :, a:b] = rk[:, a - base : b - base], rv[:, a - base : b - base]
            qa = max(ctx, a)  # the block's first query in this chunk
            # Every query row gets the same arithmetic whatever the chunking (load independence, issue 13): the
            # block's whole key extent [0, e) (query p sees keys <= p; a call ending at the chunk's end rounds
            # differently), and query rows in whole groups of _QUERY_GROUP aligned to the block (rows of other
            # chunks zero, their outputs dropped; 32 is torch's CPU flash-attention row tile below 192 queries,
            # hence at most _MAX_QUERY_ROWS rows per call whatever the block size, and rows passed as the chunk
            # gives them round differently: tests/engine/test_step.py).
            r0, r1 = (qa - a) // _QUERY_GROUP * _QUERY_GROUP, min(n, -(-(b - a) // _QUERY_GROUP) * _QUERY_GROUP)
            for c0 in range(r0, r1, _MAX_QUERY_ROWS):
                c1 = min(r1, c0 + _MAX_QUERY_ROWS)
                lo, hi = max(qa - a, c0), min(b - a, c1)  # the rows of this chunk inside the call
                qs = qh.new_zeros(1, qh.shape[1], c1 - c0, d)
                qs[:, :, lo - c0 : hi - c0] = qh[:, :, a + lo - ctx : a + hi - ctx]
                o = F.scaled_dot_product_attention(qs, kb[:, :, :e], vb[:, :, :e], scale=scale, enable_gqa=True,
                                                   attn_mask=_block_mask(j, n, c0, c1))
                out[q0 + a + lo - ctx : q0 + a + hi - ctx] = o[0, :, lo - c0 : hi - c0].transpose(0, 1).to(out.dtype)
            if j < last:  # later blocks of the chunk see this block through its page
                kb[0, :, a:b], vb[0, :, a:b] = pk[:, a:b], pv[:, a:b]


REQUEST_ROWS = 32  # query rows per request of the paged attention kernel (block-aligned groups)


def request_rows(block_size: int) -> int:
    """Query rows per request of :func:`block_requests` at ``block_size``: ``REQUEST_ROWS``, or the whole block
    where that does not divide it."""
    return REQUEST_ROWS if block_size % REQUEST_ROWS == 0 else block_size

PagedAttention = Callable[..., torch.Tensor]
"""A paged attention kernel over a bf16 scratch cache it owns (vLLM's CPU kernel, handed by the backend), called as
``paged_attention(query, key, value, slot_mapping, num_blocks, query_start_loc, seq_lens, block_table, scale)
-> out``: write the rows ``key, value [M, num_kv_heads, head_size]`` at the scratch slots ``slot_mapping``
(``block * block_size + offset``, ``num_blocks`` scratch blocks in all), then attend causally, request ``r``'s
query rows ``query_start_loc[r] ..`` being its last positions of ``seq_lens[r]`` over the scratch blocks of
``block_table[r]``; ``out`` like ``query`` (bf16). A row's arithmetic must not depend on the other rows and
requests of the call (the backend checks this of vLLM's kernel at start-up: ``plugin/cpu_attention.py``)."""


@dataclass
class BlockRequests:
    """The chunks of a step as requests of a :data:`PagedAttention` kernel, each a group of ``REQUEST_ROWS``
    block-aligned query rows (built once per step, :func:`block_requests`). The scratch holds, per sequence, its
    pages dequantized (one scratch block each, page row order: the blocks before a query's own are seen whole)
    and then its raw blocks (the bf16 tail and chunk rows in token order); the request of rows ``g .. g +
    REQUEST_ROWS`` of block ``j`` has those query rows (the chunk's at their offsets, zeros elsewhere, their
    outputs dropped), ``seq_len`` ``j * block_size + g + REQUEST_ROWS`` and the table ``[pages 0 .. j - 1, raw
    block j]``. Every request of a group has that shape whatever the chunking (vLLM's kernel tiles a request by
    its row count and start: requests of the chunk's rows only gave other bits from ~16 blocks of context on),
    so a query row sees what ``prefill_attention``'s contract says, in arithmetic that depends on its group
    alone. Smaller groups pad less (32 rows: 8 x 520-token prefill 1.09 s against 1.24 with whole blocks)."""

    query_rows: tuple[int, int] | torch.Tensor  # the chunk rows of the step in request order (a range if they can)
    query_slots: torch.Tensor  # long: their rows in the [num_requests * block_size] query buffer
    page_ids: torch.Tensor  # long: the pages to dequantize, every sequence's, in scratch order
    tail_src: torch.Tensor  # long: flat staging rows ``slot * block_size + i`` of the tails
    slot_mapping: torch.Tensor  # long: scratch slots of the rows [pages, tails, chunk rows]
    num_blocks: int
    query_start_loc: torch.Tensor  # int32 [num_requests + 1]: multiples of the rows per request
    seq_lens: torch.Tensor  # int32 [num_requests]: the ends of the requests' row groups
    block_table: torch.Tensor  # int32 [num_requests, max_blocks] (scratch blocks)


def block_requests(step: Step, cp: ChunkPlan, block_table: torch.Tensor, block_size: int,
                   rows_per_request: int | None = None) -> BlockRequests:
    """The :class:`BlockRequests` of the chunk sequences ``cp.seqs`` (cached on the step: the same for every
    layer). ``rows_per_request``: query rows per request (a divisor of ``block_size``; default the block)."""
    cached = step.__dict__.get("_block_requests")
    if cached is not None:
        return cached
    n, plan = block_size, step.plan
    rows_per_request = rows_per_request or n
    if n % rows_per_request:
        raise ValueError(f"rows_per_request={rows_per_request} does not divide block_size={n}")
    nxt = 0  # the next free scratch block
    pages, page_slots, tail_src, tail_slots, tok_slots, rows, qslots = [], [], [], [], [], [], []
    lens, tables = [], []
    for s in cp.seqs:
        q0, ql, ctx = step.query_start[s], step.query_lens[s], step.context_lens[s]
        t0, slot, sl = plan.tail_lens[s], plan.tail_slots[s], ctx + ql
        first, last = ctx // n, (sl - 1) // n  # the blocks of the chunk's rows; pages before `last` by now
        pages.append(block_table[s, :last].long())
        page_slots.extend(range(nxt * n, (nxt + last) * n))
        raw = nxt + last  # scratch block of the raw block `first` (its rows from position first * n on)
        tail_src.extend(range(slot * n, slot * n + t0))
        tail_slots.extend(range(raw * n, raw * n + t0))
        tok_slots.extend(range(raw * n + t0, raw * n + t0 + ql))
        rows.extend(range(q0, q0 + ql))
        # requests of `rows_per_request` rows aligned in their block, from the group holding position ctx to the
        # one holding sl - 1: request r's query row i is position g0 + (r - r0) * G + i (g0: that first group's)
        g0 = ctx // rows_per_request * rows_per_request
        r0 = len(lens)
        qslots.extend(range(r0 * rows_per_request + ctx - g0, r0 * rows_per_request + sl - g0))
        for e in range(g0 + rows_per_request, sl + rows_per_request, rows_per_request):  # each request's end
            j = (e - 1) // n
            lens.append(e)
            tables.append([*range(nxt, nxt + j), raw + j - first])
        nxt = raw + last - first + 1
    table = torch.zeros(len(tables), max(map(len, tables)), dtype=torch.int32)
    for r, t in enumerate(tables):
        table[r, : len(t)] = torch.tensor(t, dtype=torch.int32)
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    br = BlockRequests(
        query_rows=_as_range(rows) or long(rows),
        query_slots=long(qslots),
        page_ids=torch.cat(pages),
        tail_src=long(tail_src),
        slot_mapping=long(page_slots + tail_slots + tok_slots),
        num_blocks=nxt,
        query_start_loc=torch.arange(0, (len(lens) + 1) * rows_per_request, rows_per_request, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_table=table,
    )
    step.__dict__["_block_requests"] = br
    return br


def _attend_paged_cpu(q, k, v, kv_cache, block_table, staging, step, cp, layout, scale, out, paged_attention,
                      numba: bool) -> None:
    """CPU path with a paged attention kernel: the scratch rows of :class:`BlockRequests` (pages dequantized and
    rounded to bf16, by numba straight from the codes when ``numba``, the tails, the chunk rows), then the
    requests, each a block-aligned group of ``REQUEST_ROWS`` query rows (whole blocks where that does not divide
    the block size)."""
    n = layout.block_size
    br = block_requests(step, cp, block_table, n, request_rows(n))
    h, d = k.shape[1], k.shape[2]
    dt = torch.bfloat16
    rows = slice(*br.query_rows) if isinstance(br.query_rows, tuple) else br.query_rows
    keys, values = [], []
    if br.page_ids.numel():
        if numba:  # bf16 straight from the codes, the same values (tests/engine/test_cpu_kernels.py)
            pk, pv = cpu_kernels.dequantize_pages_bf16(kv_cache, br.page_ids, layout)
        else:
            pk, pv = cpu_decode.dequantize_pages_cpu(kv_cache, br.page_ids, layout)
        keys.append(pk.reshape(-1, h, d).to(dt))
        values.append(pv.reshape(-1, h, d).to(dt))
    if br.tail_src.numel():
        keys.append(staging.key.view(-1, h, d).index_select(0, br.tail_src).to(dt))
        values.append(staging.value.view(-1, h, d).index_select(0, br.tail_src).to(dt))
    keys.append(k[rows].to(dt))
    values.append(v[rows].to(dt))
    query = q.new_zeros(int(br.query_start_loc[-1]), q.shape[1], d, dtype=dt)
    query[br.query_slots] = q[rows].to(dt)
    o = paged_attention(query, torch.cat(keys), torch.cat(values), br.slot_mapping, br.num_blocks,
                        br.query_start_loc, br.seq_lens, br.block_table, scale)
    out[rows] = o[br.query_slots].to(out.dtype)
