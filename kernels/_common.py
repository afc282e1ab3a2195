"""Shared pieces of the paged kernels: input checks, launch arguments and the ``@triton.jit`` operand helpers
(code unpacking, dot operands); the attention state machine is in ``_attend.py``.

Page layout: see ``zipcache_vllm/engine/layout.py`` (kernels only read the attributes of the layout object they are
given, they never import it). Quantization conventions: ``zipcache_vllm/method/quant.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)
LOG2E_C = tl.constexpr(LOG2E)  # the same, readable inside @triton.jit
LN2_C = tl.constexpr(0.6931471805599453)


def _unpack_asm(shift: int, mask: int) -> str:
    """PTX turning 4 packed bytes into 4 fp16 codes ``(byte >> shift) & mask`` (two f16x2 registers):
    PRMT places each byte under an 0x64 high byte (fp16 1024 + x), AND keeps the code, SUB removes 1024."""
    return (
        "{ .reg .b32 t, h, k; "
        f"shr.b32 t, $2, {shift}; mov.b32 h, 0x64646464; mov.b32 k, 0x64006400; "
        "prmt.b32 $0, t, h, 0x5140; prmt.b32 $1, t, h, 0x7362; "
        f"and.b32 $0, $0, {0xFF00FF00 | mask | (mask << 16)}; and.b32 $1, $1, {0xFF00FF00 | mask | (mask << 16)}; "
        "sub.f16x2 $0, $0, k; sub.f16x2 $1, $1, k; }"
    )


# (bits, shift) -> asm; a global tl.constexpr so that @triton.jit code may read it
_ASM_2_0 = tl.constexpr(_unpack_asm(0, 0x03))
_ASM_2_2 = tl.constexpr(_unpack_asm(2, 0x03))
_ASM_2_4 = tl.constexpr(_unpack_asm(4, 0x03))
_ASM_2_6 = tl.constexpr(_unpack_asm(6, 0x03))
_ASM_4_0 = tl.constexpr(_unpack_asm(0, 0x0F))
_ASM_4_4 = tl.constexpr(_unpack_asm(4, 0x0F))
_ASM_8_0 = tl.constexpr(_unpack_asm(0, 0xFF))


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1): dots then run on fp32 operands, because the
    interpreter multiplies bf16 bit patterns as integers (triton issue #11584)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(
    x: torch.Tensor, name: str, ndim: int, dtypes: tuple[torch.dtype, ...], device=None, last_contiguous=True
) -> None:
    # every launcher runs ~20 of these per call in an eager prefill: messages are built only on failure
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {dtypes}, got {x.dtype}")
    if last_contiguous and x.stride(-1) != 1 and x.numel():
        raise ValueError(f"{name} must be contiguous in its last dim")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")


def check_cache(kv_cache: torch.Tensor, layout, num_kv_heads: int, device) -> None:
    check_tensor(kv_cache, "kv_cache", 3, (torch.uint8,), device)
    if kv_cache.shape[1] != num_kv_heads:
        raise ValueError(f"kv_cache has {kv_cache.shape[1]} heads, expected {num_kv_heads}")
    if kv_cache.shape[2] < layout.page_bytes:
        raise ValueError(f"kv_cache pages hold {kv_cache.shape[2]} bytes < {layout.page_bytes}")
    check(kv_cache.stride(0) % 16 == 0 and kv_cache.stride(1) % 16 == 0,
          "kv_cache page strides must be multiples of 16 bytes")  # fmt: skip
    check(kv_cache.data_ptr() % 16 == 0, "kv_cache must be 16-byte aligned")


FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def check_out(out: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    """``out`` (default: a new tensor like ``query``), checked to have the shape of ``query``."""
    if out is None:
        out = torch.empty_like(query)
    check_tensor(out, "out", 3, FLOATS, query.device)
    check(out.shape == query.shape, "out must have the shape of query")
    return out


def check_tail(tail_key, tail_value, dtypes, block_size: int, num_kv_heads: int | None, head_size: int, device):
    """``[num_slots, block_size, num_kv_heads, head_size]`` keys and values alike (``num_kv_heads`` None: any)."""
    check_tensor(tail_key, "tail_key", 4, dtypes, device)
    check_tensor(tail_value, "tail_value", 4, (tail_key.dtype,), device)
    check(
        tail_key.shape == tail_value.shape and tail_key.stride() == tail_value.stride(),
        "tail_key and tail_value must match in shape and strides",
    )
    h = tail_key.shape[2] if num_kv_heads is None else num_kv_heads
    want = (block_size, h, head_size)
    if tuple(tail_key.shape[1:]) != want:
        raise ValueError(f"tail_key must be [num_slots, {', '.join(map(str, want))}]")


def check_decode_inputs(query, kv_cache, layout, block_table, seq_lens, tail_key, tail_value, tail_slots,
                        tail_lens, out, tail_dtypes=FLOATS) -> tuple[torch.Tensor, int]:
    """The shared argument checks of the decode launchers (v1 and v2): returns ``(out, num_kv_heads)``, ``out``
    allocated like ``query`` when None."""
    dev = query.device
    check_tensor(query, "query", 3, FLOATS, dev)
    num_seqs, num_heads, d = query.shape
    check(d == layout.head_size, f"head_size {d} != layout.head_size {layout.head_size}")
    check_tail(tail_key, tail_value, tail_dtypes, layout.block_size, None, d, dev)
    h = tail_key.shape[2]
    check(num_heads % h == 0, f"num_heads={num_heads} is not a multiple of num_kv_heads={h}")
    check_cache(kv_cache, layout, h, dev)
    check_tensor(block_table, "block_table", 2, (torch.int32,), dev)
    check_seq_meta(num_seqs, dev, seq_lens=seq_lens, tail_slots=tail_slots, tail_lens=tail_lens)
    check(block_table.shape[0] == num_seqs, f"block_table must have {num_seqs} rows")
    return check_out(out, query), h


def check_seq_meta(num_seqs: int, device, **tensors: torch.Tensor) -> None:
    """Per-sequence metadata: int32 ``[num_seqs]`` each."""
    for name, x in tensors.items():
        check_tensor(x, name, 1, (torch.int32,), device)
        if x.numel() != num_seqs:
            raise ValueError(f"{name} must have {num_seqs} entries")


def cache_args(kv_cache: torch.Tensor) -> dict:
    """Launch arguments of the pages: the same memory as uint8 and as fp16, strides in bytes."""
    return {
        "cache_u8_ptr": kv_cache,
        "cache_f16_ptr": kv_cache.view(torch.float16),
        "stride_c_block": kv_cache.stride(0),
        "stride_c_head": kv_cache.stride(1),
    }


def tail_args(tail_key, tail_value, tail_slots, tail_lens) -> dict:
    """Launch arguments of the bf16 tail ``[num_slots, block_size, num_kv_heads, head_size]`` (one set of
    strides for keys and values; ``tail_value`` None: keys only) and its int32 ``[num_seqs]`` slots and lengths."""
    args = {
        "tk_ptr": tail_key,
        "stride_t_slot": tail_key.stride(0),
        "stride_t_tok": tail_key.stride(1),
        "stride_t_head": tail_key.stride(2),
        "tail_slots_ptr": tail_slots,
        "tail_lens_ptr": tail_lens,
    }
    if tail_value is not None:
        args["tv_ptr"] = tail_value
    return args


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: keep grids small


# --------------------------------------------------------------------------------------------- jit helpers
# Attention state is kept in four channel quarters (acc0..acc3, each [M, D/4]): a page row unpacks into
# quarters with shifts and masks only (paged.pack_row), so no interleaving shuffle is ever needed. A first
# version that interleaved nibbles with tl.join/reshape was wrong on the H200 with Triton 3.6 in the M=16
# (mma.sync) decode kernel and 3x slower than needed (2026-11-29, commit d8301b6).
# fmt: off
@triton.jit
def dot_operand(x, DOT_FP32: tl.constexpr):
    """fp32 under the interpreter, fp16 on the GPU (tensor cores; the folded q*step and p*step operands
    have 11 mantissa bits in fp16 against 8 in bf16)."""
    if DOT_FP32:
        return x.to(tl.float32)
    else:
        return x.to(tl.float16)


@triton.jit
def code_operand(c, DOT_FP32: tl.constexpr):
    """Integer codes -> dot operand. On the GPU the fp16 value is built from its bits (``0x6400 | code`` is
    1024 + code, exact), so no integer-to-float conversion instruction runs."""
    if DOT_FP32:
        return c.to(tl.float32)
    else:
        return (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _asm(b, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def load_quarters(row_ptr, rmask, BITS: tl.constexpr, D: tl.constexpr, DOT_FP32: tl.constexpr,
                  ASM: tl.constexpr):
    """Codes of a tile of page rows as four ``[ROWS, D/4]`` channel quarters (row packing: paged.pack_row;
    ``row_ptr [ROWS]`` points at each row's first byte). ``ASM`` (GPU only): unpack 4 bytes per PTX sequence
    (1.5 instructions per code) instead of per-element shifts, masks and conversions."""
    Q: tl.constexpr = D // 4
    ptr = row_ptr[:, None] + tl.arange(0, Q)[None, :]
    m = rmask[:, None]
    if BITS == 2:  # byte i: channels i, i + Q, i + 2Q, i + 3Q at bits 0, 2, 4, 6
        b = tl.load(ptr, mask=m, other=0)
        if ASM:
            return _asm(b, _ASM_2_0), _asm(b, _ASM_2_2), _asm(b, _ASM_2_4), _asm(b, _ASM_2_6)
        c0, c1, c2, c3 = b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6
    elif BITS == 4:  # byte i < 2Q: channels i (low nibble) and i + 2Q (high)
        b0 = tl.load(ptr, mask=m, other=0)
        b1 = tl.load(ptr + Q, mask=m, other=0)
        if ASM:
            return _asm(b0, _ASM_4_0), _asm(b1, _ASM_4_0), _asm(b0, _ASM_4_4), _asm(b1, _ASM_4_4)
        c0, c1, c2, c3 = b0 & 15, b1 & 15, b0 >> 4, b1 >> 4
    else:
        c0 = tl.load(ptr, mask=m, other=0)
        c1 = tl.load(ptr + Q, mask=m, other=0)
        c2 = tl.load(ptr + 2 * Q, mask=m, other=0)
        c3 = tl.load(ptr + 3 * Q, mask=m, other=0)
        if ASM:
            return _asm(c0, _ASM_8_0), _asm(c1, _ASM_8_0), _asm(c2, _ASM_8_0), _asm(c3, _ASM_8_0)
    return (code_operand(c0, DOT_FP32), code_operand(c1, DOT_FP32), code_operand(c2, DOT_FP32),
            code_operand(c3, DOT_FP32))


@triton.jit
def load_q(q_ptr, row_off, rmask, D: tl.constexpr):
    """Query rows as four quarters ``[M, D/4]`` in their own dtype (converted where used)."""
    Q: tl.constexpr = D // 4
    ptr = q_ptr + row_off[:, None] + tl.arange(0, Q)[None, :]
    m = rmask[:, None]
    return (tl.load(ptr, mask=m, other=0.0), tl.load(ptr + Q, mask=m, other=0.0),
            tl.load(ptr + 2 * Q, mask=m, other=0.0), tl.load(ptr + 3 * Q, mask=m, other=0.0))


@triton.jit
def store_quarters(ptr, row_off, rmask, a0, a1, a2, a3, D: tl.constexpr):
    Q: tl.constexpr = D // 4
    p = ptr + row_off[:, None] + tl.arange(0, Q)[None, :]
    m = rmask[:, None]
    ty = ptr.dtype.element_ty
    tl.store(p, a0.to(ty), mask=m)
    tl.store(p + Q, a1.to(ty), mask=m)
    tl.store(p + 2 * Q, a2.to(ty), mask=m)
    tl.store(p + 3 * Q, a3.to(ty), mask=m)
