"""The vLLM seam of the CPU prefill: vLLM's CPU attention kernel as the engine's paged attention, and the start-up
guard that keeps it only where a row's bits do not depend on the rest of its call (chunk and batch invariance
through the engine: tests/engine/test_step.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm._C", reason="needs vLLM's CPU build")
from zipcache_vllm.plugin import backend  # noqa: E402
from zipcache_vllm.plugin.cpu_attention import CpuPagedAttention, rows_are_request_local  # noqa: E402


@pytest.mark.parametrize("block_size, head_size, num_heads, num_kv_heads", [(128, 64, 9, 3), (128, 128, 12, 2),
                                                                            (32, 32, 6, 2)])
def test_the_guard_holds_for_vllms_kernel_here(block_size, head_size, num_heads, num_kv_heads):
    assert rows_are_request_local(CpuPagedAttention(block_size, head_size), num_heads, num_kv_heads)


class _RowsMixed(CpuPagedAttention):
    """A kernel whose rows see their neighbours (a tile-wide shift, as a kernel sharing a maximum across the rows
    of a tile would): what the guard exists to catch."""

    def __call__(self, query, *args):
        out = super().__call__(query, *args)
        return out + 1e-2 * query.float().mean(dim=0, keepdim=True).to(out.dtype)


def test_the_guard_catches_a_kernel_whose_rows_depend_on_each_other():
    assert not rows_are_request_local(_RowsMixed(128, 64), 9, 3)


def test_the_backend_falls_back_to_sdpa_where_the_guard_fails(monkeypatch, caplog):
    kernel = backend.cpu_prefill_kernel(128, 64, 9, 3)
    assert isinstance(kernel, CpuPagedAttention) and kernel.isa
    monkeypatch.setattr(backend, "rows_are_request_local", lambda *a: False)
    with caplog.at_level("WARNING", logger="vllm.zipcache"):
        assert backend.cpu_prefill_kernel(128, 64, 9, 3) is None
    assert "masked SDPA instead" in caplog.text


def test_the_kernel_matches_sdpa_on_one_block_request():
    """One request of a whole block over two earlier blocks: vLLM's kernel against fp32 SDPA with the block
    rule's mask, within bf16 rounding; rows of one call do not change each other (a request alone or with
    another)."""
    n, d, hq, h = 32, 64, 6, 2
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(3 * n, h, d, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(n, hq, d, generator=g).bfloat16()
    kernel = CpuPagedAttention(n, d)
    out = kernel(q, k, v, torch.arange(3 * n), 3, torch.tensor([0, n], dtype=torch.int32),
                 torch.tensor([3 * n], dtype=torch.int32), torch.tensor([[0, 1, 2]], dtype=torch.int32), d**-0.5)
    mask = torch.arange(3 * n)[None, :] <= torch.arange(2 * n, 3 * n)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1), attn_mask=mask,
        scale=d**-0.5, enable_gqa=True).transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=1e-2)
