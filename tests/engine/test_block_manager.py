"""BlockManager: staging slots keyed by block id, bounded, reclaimed on completion, reuse and pressure."""

import pytest

from zipcache_vllm.engine.block_manager import BlockManager, StagingError

N = 4  # block size


def test_prefill_then_decode_keeps_one_slot_until_the_block_completes():
    bm = BlockManager(num_slots=2, block_size=N)
    p = bm.plan([[10, 11]], context_lens=[0], query_lens=[5])  # block 10 full, 1 token in block 11
    assert (p.tail_slots, p.tail_lens, p.new_tail_lens) == ([0], [0], [1])
    assert bm.slot_of(11) == 0 and bm.slot_of(10) is None
    for ctx in (5, 6):
        p = bm.plan([[10, 11]], context_lens=[ctx], query_lens=[1])
        assert p.tail_slots == [0] and p.tail_lens == [ctx % N]
    p = bm.plan([[10, 11]], context_lens=[7], query_lens=[1])  # block 11 completes, no new tail
    assert (p.tail_slots, p.tail_lens, p.new_tail_lens) == ([0], [3], [0])
    assert bm.num_used == 0 and bm.slot_of(11) is None


def test_completed_block_hands_its_slot_to_the_next_tail():
    bm = BlockManager(num_slots=1, block_size=N)
    bm.plan([[3, 4, 5]], [0], [3])
    p = bm.plan([[3, 4, 5]], [3], [3])  # tail 3 + 3 new: block 3 completes mid-chunk, 2 tokens into block 4
    assert (p.tail_slots, p.tail_lens, p.new_tail_lens) == ([0], [3], [2])
    assert bm.slot_of(4) == 0 and bm.slot_of(3) is None and bm.tail_len(4) == 2


def test_slots_are_stable_across_batch_reordering():
    bm = BlockManager(num_slots=3, block_size=N)
    bm.plan([[1], [2]], [0, 0], [1, 2])
    before = {1: bm.slot_of(1), 2: bm.slot_of(2)}
    p = bm.plan([[2], [1]], [2, 1], [1, 1])  # same sequences, swapped rows
    assert p.tail_slots == [before[2], before[1]]
    assert p.tail_lens == [2, 1] and p.new_tail_lens == [3, 2]


def test_slot_freed_by_completion_is_not_reused_in_the_same_step():
    bm = BlockManager(num_slots=2, block_size=N)
    bm.plan([[1, 9]], [0], [3])  # slot 0: block 1
    p = bm.plan([[1, 9], [2]], [3, 0], [1, 2])  # block 1 completes (slot read this step); new sequence
    assert p.tail_slots[1] != p.tail_slots[0]
    p = bm.plan([[2], [5]], [2, 0], [1, 1])  # next step: the freed slot is available again
    assert sorted(p.tail_slots) == [0, 1]


def test_block_written_from_offset_zero_drops_a_stale_slot():
    # request A finished with 2 tokens in block 7 (never told); vLLM gives block 7 to request B
    bm = BlockManager(num_slots=2, block_size=N)
    bm.plan([[7]], [0], [2])
    p = bm.plan([[7]], [0], [3])  # B prefills 3 tokens into block 7
    assert p.tail_lens == [0] and p.new_tail_lens == [3] and bm.tail_len(7) == 3
    assert bm.num_used == 1


def test_preempted_request_restarts_cleanly():
    bm = BlockManager(num_slots=2, block_size=N)
    bm.plan([[4, 5]], [0], [6])
    bm.plan([[4, 5]], [6], [1])
    # preempted: blocks freed; resumed with new blocks (recompute from 0)
    p = bm.plan([[8, 5]], [0], [7])
    assert p.tail_lens == [0] and p.new_tail_lens == [3] and bm.tail_len(5) == 3


def test_pressure_evicts_the_least_recently_used_stale_slot():
    bm = BlockManager(num_slots=2, block_size=N)
    bm.plan([[1]], [0], [1])  # step 1: block 1 (this request then finishes)
    bm.plan([[2]], [0], [1])  # step 2: block 2
    p = bm.plan([[2], [3]], [1, 0], [1, 1])  # block 3 needs a slot: block 1's (oldest, not in step) goes
    assert bm.slot_of(1) is None and bm.slot_of(3) is not None and bm.evictions == 1
    assert p.tail_lens == [1, 0]


def test_pool_exhausted_by_live_sequences_raises():
    bm = BlockManager(num_slots=1, block_size=N)
    with pytest.raises(StagingError, match="staging slots"):
        bm.plan([[1], [2]], [0, 0], [1, 1])


def test_lost_tail_raises_instead_of_attending_wrong_data():
    bm = BlockManager(num_slots=1, block_size=N)
    bm.plan([[1]], [0], [2])
    bm.plan([[2]], [0], [1])  # evicts block 1's tail (its sequence was not in the step)
    with pytest.raises(StagingError, match="evicted"):
        bm.plan([[1]], [2], [1])


def test_exact_multiple_needs_no_slot():
    bm = BlockManager(num_slots=1, block_size=N)
    p = bm.plan([[1, 2]], [0], [8])
    assert p.tail_slots == [-1] and p.new_tail_lens == [0] and bm.num_used == 0


def test_idle_rows_keep_their_state():
    bm = BlockManager(num_slots=2, block_size=N)
    bm.plan([[1]], [0], [2])
    p = bm.plan([[1]], [2], [0])  # a row with no new token (padding) reads but does not change the tail
    assert p.tail_lens == [2] and p.new_tail_lens == [2] and bm.tail_len(1) == 2
