"""Which causal-attention kernel with a row log-sum-exp is fastest here (one prompt, LLaMA3-8B heads)?

    python benchmarks/probe_causal_kernels.py

Times, for a 4k and a 16k bf16 prompt (32 query / 8 KV heads, head size 128), SDPA under each of its backends
and the private ops that also return the log-sum-exp: FlashAttention-2 dense and varlen, cuDNN. CUDA-graph
replays, median of 20. Prints one line per (context, kernel) with microseconds, or the error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from _timing import graph_time_us  # noqa: E402


def main():
    for n in (4096, 16384):
        run(n)


def run(n: int) -> None:
    q = torch.randn(1, 32, n, 128, device="cuda").bfloat16()
    k = torch.randn(1, 8, n, 128, device="cuda").bfloat16()
    v = torch.randn_like(k)
    ke, ve = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    qt, kt, vt = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))
    cands = {}
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def f(be=be):
            with sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        cands[f"sdpa[{be.name}] gqa"] = f

        def fe(be=be):
            with sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        cands[f"sdpa[{be.name}] expanded"] = fe
    cands["sdpa default gqa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                       enable_gqa=True)
    cands["aten flash dense +lse"] = lambda: torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False)
    cands["aten flash varlen +lse"] = lambda: torch.ops.aten._flash_attention_forward(
        qt, kt, vt, cu, cu, n, n, 0.0, True, False)
    cands["aten cudnn expanded +lse"] = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, ke, ve, None, True, 0.0, True, False)
    cands["aten cudnn gqa +lse"] = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False)
    for name, fn in cands.items():
        try:
            t = graph_time_us(fn)
            res = fn()
            shape = [tuple(r.shape) for r in res[:2]] if isinstance(res, tuple) else tuple(res.shape)
            print(f"{n} {name}: {t:.0f} us {shape}")
        except Exception as e:  # noqa: BLE001
            print(f"{n} {name}: ERROR {type(e).__name__}: {str(e)[:120]}")


if __name__ == "__main__":
    main()
