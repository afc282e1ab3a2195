"""The decode step of the paged engine: one query token per row, for one layer, as kernel launches only.

Per layer (``R`` rows, every tensor shape fixed by ``R``; nothing reads the device from the host)::

    stage     the new token's K/V into its slot at row t0 (index_copy at slot * N + t0), and its query into
              the slot's probe rows when its position is a probe of its block (block rule; other rows write
              to the dummy slot)
    compress  every row whose block completes (t0 + 1 == N) scores the block by its own probes
              (kernels/block_scores) and writes its page from the slot; a fixed-size work list, entries of
              other rows are -1 and do nothing
    attend    pages + tail (t0 + 1 rows) -> out

Blocks are compressed before anything attends, so that a sequence of the same step that shares a block with
this one (a prefix-cache hit on a block that completes now) reads its page.

All per-step metadata lives in :class:`DecodeBatch`: persistent device buffers filled once per step on the host
(:meth:`DecodeBatch.fill`, one copy) and read by every layer, so a captured CUDA graph replays with the new
step's values. Rows past the real ones (vLLM pads a graph's batch) point at a reserved dummy slot, attend one
token and compress nothing. The vLLM backend and the transformers paged cache both call :func:`decode_step`.
No vLLM import.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..method.config import Saliency, ZipCacheConfig
from ..method.saliency import block_probe_offsets, random_scores
from .layout import PageLayout
from .ops import KernelOps
from .staging import Staging

FIELDS = ("slots", "tail_lens", "tail_lens_after", "seq_lens", "block_ids", "new_flat", "probe_flat")


@dataclass
class DecodeRows:
    """The first ``R`` rows of a :class:`DecodeBatch` (views) and the block table of those rows."""

    slots: torch.Tensor  # int32 [R]: staging slot
    tail_lens: torch.Tensor  # int32 [R]: tail tokens before the step (t0)
    tail_lens_after: torch.Tensor  # int32 [R]: t0 + 1 (the decode kernels read the new token from the tail)
    seq_lens: torch.Tensor  # int32 [R]
    block_ids: torch.Tensor  # int32 [R]: page of the block that completes this step, else -1
    new_flat: torch.Tensor  # int32 [R]: slot * block_size + t0, where the new token is staged
    probe_flat: torch.Tensor  # int32 [R]: slot * num_probes + rank where the query is staged (dummy slot: no probe)
    probe_offsets: torch.Tensor  # int32 [R, num_probes]: the probe offsets of each row's block
    query_start_loc: torch.Tensor  # int32 [R + 1] = arange: one query per row
    block_table: torch.Tensor  # int32 [R, max_blocks]

    @property
    def num_rows(self) -> int:
        return self.slots.numel()


class DecodeBatch:
    """Persistent metadata of the decode rows of a step (module docstring).

    Parameters
    ----------
    max_rows : the most decode rows a step may have (vLLM's ``max_num_seqs``, or a captured batch size).
    block_size : tokens per block. dummy_slot : a staging slot no sequence uses (padded rows write there, and
    rows whose token is not a probe write their query there). num_probes : probe rows per block (block rule).
    device : where the kernels run.
    """

    def __init__(self, max_rows: int, block_size: int, dummy_slot: int, device, num_probes: int = 1):
        self.max_rows, self.block_size, self.dummy_slot = max_rows, block_size, dummy_slot
        self.num_probes = num_probes
        self.device = torch.device(device)
        # one buffer: the fields [len(FIELDS), max_rows], then the probe offsets [max_rows, num_probes]
        size = (len(FIELDS) + num_probes) * max_rows
        self._dev = torch.zeros(size, dtype=torch.int32, device=self.device)
        pin = self.device.type == "cuda"
        # two host buffers used in turn: the copy of step i may still be in flight while step i + 1 is filled
        self._host = [torch.zeros(size, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._events = [None, None]
        self._turn = 0
        self.query_start_loc = torch.arange(max_rows + 1, dtype=torch.int32, device=self.device)
        self.num_rows = 0
        self.num_real = 0
        self.fill([], [], [], [], max_rows)  # every row a padded row: a graph captured before any step is safe

    def _views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nf = len(FIELDS) * self.max_rows
        return buf[:nf].view(len(FIELDS), self.max_rows), buf[nf:].view(self.max_rows, self.num_probes)

    def field(self, name: str) -> torch.Tensor:
        return self._views(self._dev)[0][FIELDS.index(name)]

    def fill(self, slots, tail_lens, seq_lens, block_ids, num_rows: int | None = None, probe_ranks=None,
             probe_offsets=None) -> None:  # fmt: skip
        """Host lists of the real rows (slot, t0, seq_len and the completing block id or -1 of each; the rank of
        the row's token among its block's probes or -1, and that block's probe offsets), padded with dummy rows
        up to ``num_rows`` (default: the real rows). One host-to-device copy."""
        real = len(slots)
        num_rows = real if num_rows is None else num_rows
        if not real <= num_rows <= self.max_rows:
            raise ValueError(f"{real} decode rows padded to {num_rows} do not fit DecodeBatch({self.max_rows})")
        n = self.block_size
        host = self._host[self._turn]
        if self._events[self._turn] is not None:
            self._events[self._turn].synchronize()  # the copy that last read this buffer (two steps ago)
        pad = num_rows - real
        cols = {
            "slots": list(slots) + [self.dummy_slot] * pad,
            "tail_lens": list(tail_lens) + [0] * pad,
            "tail_lens_after": [t + 1 for t in tail_lens] + [1] * pad,
            "seq_lens": list(seq_lens) + [1] * pad,
            "block_ids": list(block_ids) + [-1] * pad,
            "new_flat": [s * n + t for s, t in zip(slots, tail_lens, strict=True)] + [self.dummy_slot * n] * pad,
        }
        p = self.num_probes
        ranks = probe_ranks if probe_ranks is not None else [-1] * real
        cols["probe_flat"] = [s * p + r if r >= 0 else self.dummy_slot * p
                              for s, r in zip(slots, ranks, strict=True)] + [self.dummy_slot * p] * pad
        if num_rows:
            fields, offsets = self._views(host)
            for i, name in enumerate(FIELDS):
                fields[i, :num_rows] = torch.tensor(cols[name], dtype=torch.int32)
            offs = list(probe_offsets) if probe_offsets is not None else [[0] * p] * real
            offsets[:num_rows] = torch.tensor(offs + [[0] * p] * pad, dtype=torch.int32).view(num_rows, p)
            self._dev.copy_(host, non_blocking=True)
        if self.device.type == "cuda":
            ev = self._events[self._turn] = torch.cuda.Event()
            ev.record()
        self._turn ^= 1
        self.num_rows, self.num_real = num_rows, real

    def rows(self, block_table: torch.Tensor, num_rows: int | None = None) -> DecodeRows:
        """Views of the first ``num_rows`` rows (default: this step's), with ``block_table[:num_rows]``."""
        r = self.num_rows if num_rows is None else num_rows
        fields, offsets = self._views(self._dev)
        f = {name: fields[i, :r] for i, name in enumerate(FIELDS)}
        return DecodeRows(**f, probe_offsets=offsets[:r], query_start_loc=self.query_start_loc[: r + 1],
                          block_table=block_table[:r])


@functools.lru_cache(maxsize=65536)
def probe_ranks(config: ZipCacheConfig, block_size: int, block_index: int) -> tuple[tuple[int, ...], dict]:
    """Host view of :func:`~zipcache_vllm.method.saliency.block_probe_offsets`: the offsets of block
    ``block_index`` and ``{offset: rank}``."""
    offs = tuple(block_probe_offsets(config, block_size, block_index).tolist())
    return offs, {o: i for i, o in enumerate(offs)}


def decode_rows_of_plan(plan, rows, seq_lens, block_table, config: ZipCacheConfig) -> dict:
    """Keyword arguments of :meth:`DecodeBatch.fill` from a :class:`~zipcache_vllm.engine.block_manager.StepPlan`:
    the rows ``rows`` (batch indices of one-token queries), their ``seq_lens`` (host ints, the new token
    included) and ``block_table`` rows (host lists); ``config`` places the probes (block rule)."""
    n = plan.block_size
    slots, t0s, sls, blocks, ranks, offsets = [], [], [], [], [], []
    for s in rows:
        t0, sl = plan.tail_lens[s], int(seq_lens[s])
        slots.append(plan.tail_slots[s])
        t0s.append(t0)
        sls.append(sl)
        blocks.append(int(block_table[s][(sl - 1) // n]) if t0 + 1 == n else -1)
        offs, rank = probe_ranks(config, n, (sl - 1) // n)
        ranks.append(rank.get((sl - 1) % n, -1))
        offsets.append(offs)
    return dict(slots=slots, tail_lens=t0s, seq_lens=sls, block_ids=blocks, probe_ranks=ranks, probe_offsets=offsets)


@functools.lru_cache(maxsize=16)
def fixed_scores(config, block_size: int, num_kv_heads: int, device):
    """The scores of the random-saliency ablation for every block, ``[1, block_size, num_kv_heads]``
    (:func:`~zipcache_vllm.method.saliency.random_scores`); None for probe saliency."""
    if config.saliency is not Saliency.RANDOM:
        return None
    return random_scores(config, 1, num_kv_heads, block_size).transpose(1, 2).contiguous().to(device)


def decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    staging: Staging,
    rows: DecodeRows,
    layout: PageLayout,
    ops: KernelOps,
    config: ZipCacheConfig,
    scale: float,
    out: torch.Tensor,
    random_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's decode step for ``rows.num_rows`` rows (query row ``i`` = decode row ``i``).

    Parameters
    ----------
    query : ``[>= R, num_heads, head_size]``; key, value : ``[>= R, num_kv_heads, head_size]`` (post-RoPE).
    kv_cache : ``uint8 [num_blocks, num_kv_heads, >= page_bytes]``; staging : this layer's :class:`Staging`.
    rows : :meth:`DecodeBatch.rows` of this step. ops : :func:`~zipcache_vllm.engine.ops.kernel_ops`.
    config : how completed blocks are scored (the block rule: ``normalizer``, ``saliency``; the random
        ablation with ``random_scores`` from :func:`fixed_scores`).
    out : ``[>= R, num_heads, head_size]``, rows ``:R`` written.
    """
    r = rows.num_rows
    if r == 0:
        return out
    h, d = key.shape[1], key.shape[2]
    q, k, v = query[:r], key[:r].to(staging.key.dtype), value[:r].to(staging.value.dtype)
    flat = rows.new_flat.long()
    staging.key.view(-1, h, d).index_copy_(0, flat, k)
    staging.value.view(-1, h, d).index_copy_(0, flat, v)
    staging.probe_query.view(-1, q.shape[1], d).index_copy_(0, rows.probe_flat.long(), q.to(staging.key.dtype))
    if config.saliency is Saliency.RANDOM:
        scores = random_scores.expand(staging.key.shape[0], -1, -1)
    else:
        scores = torch.empty(staging.key.shape[:3], dtype=torch.float32, device=query.device)
        src = torch.where(rows.block_ids >= 0, rows.slots, -1)
        ops.block_scores(staging.key, staging.probe_query, rows.probe_offsets, src, scores, config.normalizer,
                         config.saliency, scale)
    ops.compress_slots(staging.key, staging.value, scores, None, rows.slots, rows.block_ids, kv_cache, layout)
    ops.attend(q, k, kv_cache, layout, rows, staging, scale, out[:r])
    return out
