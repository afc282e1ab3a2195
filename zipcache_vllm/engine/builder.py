"""Per-step metadata of the paged engine, built once per step on the host and shared by every layer.

:class:`StepBuilder` is what vLLM's metadata builder does for ZipCache, without vLLM: plan the bf16 staging of
the step (:class:`~zipcache_vllm.engine.block_manager.BlockManager`), and, when the engine's decode step is on, write
the decode rows' metadata into the persistent buffers of a :class:`~zipcache_vllm.engine.decode.DecodeBatch`.
The vLLM backend (:mod:`zipcache_vllm.plugin.backend`) and ``benchmarks/bench_serving_gpu.py`` both drive it.
"""

from __future__ import annotations

import torch

from ..method.config import ZipCacheConfig
from ..method.saliency import num_block_probes
from .block_manager import BlockManager, StepPlan
from .decode import DecodeBatch
from .step import Step, prepare_step


class StepBuilder:
    """Builds the :class:`~zipcache_vllm.engine.step.Step` of each step.

    Parameters
    ----------
    num_slots : staging slots handed out to sequences; the staging holds one more, the dummy slot of padded
        decode rows (``Staging.allocate(num_slots + 1, ...)``).
    block_size : tokens per block. max_rows : the most rows of a step (decode rows, padding included).
    device : where the kernels run. engine_decode : leading one-token rows through the engine's decode step
        (CUDA; graph-capturable); else they stay with the CPU paths of :mod:`zipcache_vllm.engine.step`.
    batched_cpu_decode : the CPU torch/numba paths batch one-token rows (they need the block table on host).
    config : places the probe rows of the decode rows (block rule).
    """

    def __init__(self, num_slots: int, block_size: int, max_rows: int, device, engine_decode: bool,
                 batched_cpu_decode: bool = False, config: ZipCacheConfig | None = None):  # fmt: skip
        self.block_manager = BlockManager(num_slots, block_size)
        self.block_size = block_size
        self.device = torch.device(device)
        self.config = config or ZipCacheConfig(block_size=block_size)
        self.decode_batch = None
        if engine_decode:
            self.decode_batch = DecodeBatch(max_rows, block_size, num_slots, self.device,
                                            num_probes=num_block_probes(self.config, block_size))
        self.batched_cpu_decode = batched_cpu_decode and not engine_decode

    def build(self, query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor, block_table_rows,
              block_table: torch.Tensor) -> Step:  # fmt: skip
        """``query_start_loc_cpu [num_reqs + 1]``, ``seq_lens_cpu [num_reqs]`` (host), ``block_table_rows`` the
        host block table (lists, or a tensor's ``tolist()``), ``block_table`` on the device. Rows with no query
        tokens (vLLM's graph padding) plan nothing. No device synchronisation."""
        qsl = query_start_loc_cpu.tolist()
        sl = seq_lens_cpu.tolist()
        n = len(sl)
        qlens = [qsl[i + 1] - qsl[i] for i in range(n)]
        ctx = [sl[i] - qlens[i] for i in range(n)]
        plan = self.block_manager.plan(block_table_rows, ctx, qlens)
        cpu_table = block_table[:n].cpu() if self.batched_cpu_decode else None
        return prepare_step(plan, query_start_loc_cpu, seq_lens_cpu, cpu_table, device=self.device,
                            decode_batch=self.decode_batch, block_table_rows=block_table_rows,
                            device_block_table=block_table, config=self.config)

    def build_for_capture(self, num_rows: int, block_table: torch.Tensor) -> Step:
        """The step a CUDA graph of ``num_rows`` decode rows is captured with: every row a dummy row (its own
        dummy slot, one token, nothing compressed), the staging plan untouched. Replays read the persistent
        buffers that :meth:`build` fills for each real step."""
        if self.decode_batch is None:
            raise RuntimeError("graph capture needs the engine's decode step (engine_decode=True)")
        self.decode_batch.fill([], [], [], [], num_rows=num_rows)
        plan = StepPlan([-1] * num_rows, [0] * num_rows, [0] * num_rows, self.block_size)
        step = Step(plan=plan, query_start=list(range(num_rows + 1)), query_lens=[1] * num_rows,
                    context_lens=[0] * num_rows, max_query_len=1, others=[])
        step.decode_rows = self.decode_batch.rows(block_table, num_rows)
        return step
