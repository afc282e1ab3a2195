"""Per-block bookkeeping of the paged ZipCache: which bf16 staging slot holds the tail of each incomplete block.

vLLM owns the blocks (allocation, freeing, preemption); this module owns what vLLM does not know about: the
tokens of a sequence's incomplete last block, which wait in bf16 until the block is complete and compressed
(method doc §10, block granularity). Lengths of one sequence in one step (``N = block_size``)::

    |<------------------------ seq_len ------------------------>|
    |<------------- context_len ------------->|<-- query_len -->|
    | complete blocks: compressed pages  | t0 |   new tokens    |
                                         ^ tail: t0 = context_len % N tokens in the staging slot

After the step, the ``(t0 + query_len) // N`` blocks that became complete are compressed and their slot is
free again; the last ``seq_len % N`` tokens stay in a slot as the new tail.

Slots are keyed by the **id of the block** whose tail they hold, which is stable across batch reordering and
unique among live sequences (only complete blocks are ever shared). A slot is released when

* its block completes (compressed this step),
* its block id is written from offset 0 again (vLLM freed it — finish, abort or preemption — and gave it to a
  new request, or the preempted request restarts), or
* the pool is full and the slot is the least recently used one not in the current step: a request that finished
  or was preempted leaves a stale slot behind, and at most ``max_num_seqs`` slots are live at once.

A sequence whose tail was lost (evicted while live, which needs more live sequences than slots) raises
:class:`StagingError` instead of attending over wrong data. The pool is a fixed size, so staging memory is
bounded: ``num_slots * block_size * num_kv_heads * head_size * 2 * 2`` bytes per layer (bf16 K and V).
No vLLM import: this module is driven by plain block tables and lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def default_num_slots(max_num_seqs: int) -> int:
    """Staging slots for ``max_num_seqs`` running sequences: one each, plus room for stale slots."""
    return max_num_seqs + max(4, max_num_seqs // 8)


class StagingError(RuntimeError):
    """The staging state cannot serve a step (pool exhausted by live sequences, or a tail was lost)."""


@dataclass(frozen=True)
class StepPlan:
    """Staging decisions of one step, shared by every layer.

    ``tail_slots[s]``: the slot that holds sequence ``s``'s tail before the step and receives its new tail
    (-1: none needed); ``tail_lens[s]``: tail tokens before the step (t0); ``new_tail_lens[s]``: after it.
    """

    tail_slots: list[int]
    tail_lens: list[int]
    new_tail_lens: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.tail_slots)


class BlockManager:
    """Staging-slot table for the incomplete blocks of all live sequences (see the module docstring).

    Example
    -------
    >>> bm = BlockManager(num_slots=2, block_size=4)
    >>> p = bm.plan(block_table=[[7, 9]], context_lens=[0], query_lens=[6])   # 6 tokens: block 7 full, 2 left
    >>> p.tail_slots, p.tail_lens, p.new_tail_lens, bm.slot_of(9)
    ([0], [0], [2], 0)
    >>> p = bm.plan(block_table=[[7, 9]], context_lens=[6], query_lens=[1])   # decode: tail 2 -> 3
    >>> p.tail_slots, p.tail_lens, p.new_tail_lens
    ([0], [2], [3])
    """

    def __init__(self, num_slots: int, block_size: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_slots = num_slots
        self.block_size = block_size
        self.reset()

    def reset(self) -> None:
        self._slot_of: dict[int, int] = {}
        self._block = [-1] * self.num_slots  # block id held by each slot
        self._len = [0] * self.num_slots  # tail tokens held
        self._used_at = [0] * self.num_slots  # step of last use (LRU eviction)
        self._free = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._evicted: set[int] = set()
        self.step = 0
        self.evictions = 0

    # -- queries -------------------------------------------------------------------------------------------
    def slot_of(self, block_id: int) -> int | None:
        return self._slot_of.get(block_id)

    def tail_len(self, block_id: int) -> int:
        slot = self._slot_of.get(block_id)
        return 0 if slot is None else self._len[slot]

    @property
    def num_used(self) -> int:
        return len(self._slot_of)

    # -- updates -------------------------------------------------------------------------------------------
    def release(self, block_id: int) -> None:
        """Forget the tail held for ``block_id`` (no-op when none)."""
        slot = self._slot_of.pop(block_id, None)
        if slot is not None:
            self._block[slot] = -1
            self._len[slot] = 0
            self._free.append(slot)

    def _take(self, block_id: int, busy: set[int]) -> int:
        if not self._free:
            candidates = [s for s in range(self.num_slots) if s not in busy]
            if not candidates:
                raise StagingError(
                    f"all {self.num_slots} bf16 staging slots hold tails of sequences in this step; raise "
                    "ZIPCACHE_STAGING_SLOTS or lower --max-num-seqs"
                )
            victim = min(candidates, key=lambda s: self._used_at[s])
            if self._len[victim]:
                self._evicted.add(self._block[victim])
            self.evictions += 1
            self.release(self._block[victim])
        slot = self._free.pop()
        self._slot_of[block_id] = slot
        self._block[slot] = block_id
        self._len[slot] = 0
        return slot

    def plan(
        self,
        block_table: Sequence[Sequence[int]],
        context_lens: Sequence[int],
        query_lens: Sequence[int],
    ) -> StepPlan:
        """Assign slots for one step and record the state after it.

        ``block_table[s]`` lists at least the blocks up to position ``context_lens[s] + query_lens[s] - 1``
        (one more when that length is a multiple of ``block_size`` is not needed).
        """
        n = self.block_size
        self.step += 1
        num_seqs = len(context_lens)
        slots = [-1] * num_seqs
        t0s = [0] * num_seqs
        t1s = [0] * num_seqs
        busy: set[int] = set()
        pending: list[tuple[int, int, int]] = []  # (seq, block id of the new tail, old slot or -1)

        # pass 1: sequences continuing a tail keep their slot; fresh blocks drop stale slots
        for s in range(num_seqs):
            ctx, ql = int(context_lens[s]), int(query_lens[s])
            sl = ctx + ql
            t0, t1 = ctx % n, sl % n
            t0s[s], t1s[s] = t0, t1
            row = block_table[s]
            first = ctx // n
            last = (sl - 1) // n if ql else first - 1
            old = -1
            if t0:
                b = int(row[first])
                slot = self._slot_of.get(b)
                if slot is None or self._len[slot] != t0:
                    why = "was evicted (more live sequences than slots)" if b in self._evicted else "is missing"
                    held = 0 if slot is None else self._len[slot]
                    raise StagingError(
                        f"the bf16 tail of block {b} {why}: expected {t0} tokens, staging holds {held}"
                    )
                if slot in busy:
                    raise StagingError(f"block {b} is the incomplete block of two sequences in one step")
                busy.add(slot)
                old = slot
            # blocks written from offset 0 in this step were (re)allocated by vLLM: any slot on them is stale
            for j in range(first + (1 if t0 else 0), last + 1):
                b = int(row[j])
                self._evicted.discard(b)
                stale = self._slot_of.get(b)
                if stale is not None and stale not in busy:
                    self.release(b)
            tail_block = int(row[sl // n]) if t1 else -1
            pending.append((s, tail_block, old))

        # pass 2: completed tails hand their slot to the new tail; slots left empty are freed after the step
        # (the step still reads them), so no other sequence can be given them now
        to_free: list[int] = []
        for s, tail_block, old in pending:
            if old >= 0:
                old_block = self._block[old]
                if t1s[s] and tail_block == old_block:
                    slots[s] = old  # still the same incomplete block
                else:
                    # the old block completes this step; its slot carries the new tail (if any)
                    del self._slot_of[old_block]
                    if t1s[s]:
                        self._slot_of[tail_block] = old
                        self._block[old] = tail_block
                        slots[s] = old
                    else:
                        self._block[old] = -1
                        self._len[old] = 0
                        to_free.append(old)
                        slots[s] = old  # read the old tail this step; nothing written back
        for s, tail_block, old in pending:
            if old < 0 and t1s[s]:
                slot = self._take(tail_block, busy)
                busy.add(slot)
                slots[s] = slot
        for s in range(num_seqs):
            slot = slots[s]
            if slot >= 0 and self._block[slot] >= 0:
                self._len[slot] = t1s[s]
                self._used_at[slot] = self.step
        self._free.extend(to_free)
        return StepPlan(tail_slots=slots, tail_lens=t0s, new_tail_lens=t1s, block_size=n)
