"""Kernel tests run on CUDA when present, else under the Triton interpreter (set before triton loads)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tolerance() -> dict:
    """Attention vs the twin on the dequantized cache. Interpreter: fp32 dots, so float32 rounding only.
    GPU: fp16/bf16 tensor-core operands (q * step rounded to fp16), about 1e-3 relative per logit."""
    if DEVICE.type == "cuda":
        return {"atol": 2e-2, "rtol": 2e-2}
    return {"atol": 2e-5, "rtol": 2e-5}
