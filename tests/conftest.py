"""Shared test setup: every test starts from the same global RNG state.

Triton decides at ``@triton.jit`` decoration time whether kernels run in the interpreter, so the variable is
set here, before any test module (some import ``zipcache_vllm.kernels`` at collection) loads triton.
"""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers share the machine's cores: one torch pool each of the full width oversubscribes it
# (16 workers x 16 threads on the H200 host made the CPU-bound engine tests several times slower)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _seed_everything():
    # Tests that need randomness should still pass their own torch.Generator; this only makes any
    # accidental use of the global RNG reproducible.
    random.seed(0)
    torch.manual_seed(0)
