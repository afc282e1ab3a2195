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


@pytest.fixture(autouse=True)
def _seed_everything():
    # Tests that need randomness should still pass their own torch.Generator; this only makes any
    # accidental use of the global RNG reproducible.
    random.seed(0)
    torch.manual_seed(0)
