"""Shared test setup: every test starts from the same global RNG state."""

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    # Tests that need randomness should still pass their own torch.Generator; this only makes any
    # accidental use of the global RNG reproducible.
    random.seed(0)
    torch.manual_seed(0)
