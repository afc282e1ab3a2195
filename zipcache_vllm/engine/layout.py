"""The mixed-precision page: one fixed-size byte page per (block, KV head) holding ``block_size`` tokens.

A page is written once, when its block is complete (block granularity, method doc §10): keys are quantized
channelwise per precision group within the block (ZC-3), values with CST (ZC-2: one normalizer ``c`` over the
block's tokens, then per-token ``(step, mn)``). The tokens of a page are stored in *page order*, not in token
order: attention after RoPE does not depend on the order of complete, fully visible blocks, so the salient
rows of keys and values can each sit in one contiguous region.

Page layout v2: quotas in multiples of 16 rows so every 16-row tile has one key and one value bit width;
rows are still packed with ``paged.pack_row``. The per-block quotas are ``sk = quota_count(block_size,
salient_ratio)`` and ``sv = quota_count(block_size, value_salient_ratio)`` (config.py): the multiple of 16
nearest to ``r * block_size`` (ties upward) when ``block_size`` is a multiple of 16, else ``ceil(r *
block_size)``. At block 128: r = 0.6 -> 80 rows (v1: 77), keys 0.8 -> 96 (103), values 0.2 -> 32 (26).

Page order. Both salient sets are the top tokens of the same scores (ties to the earlier token),
so one contains the other. Tokens are sorted into three tiers, each in ascending token position:

* tier A: salient for keys and values (the top ``min(sk, sv)``),
* tier B: salient for one of them only (ranks ``min(sk, sv) .. max(sk, sv) - 1``),
* tier C: regular for both.

Page rows ``0 .. sk-1`` are then the key-salient tokens and rows ``0 .. sv-1`` the value-salient ones, so
keys and values share one row order (attention weights of row ``i`` apply to value row ``i``). The two
bitmaps in the mask region (token order, bit ``t % 8`` of byte ``t // 8``) give back the token positions.

Layout of one page (N = block_size, D = head_size, H/L = bits_high/bits_low, every region starts at a
multiple of 16 bytes; fp16 = quantization parameters, rounded before the codes were computed)::

    offset
    k_hi_off    +-------------------------------------------+
                | key codes, salient rows 0..sk-1, H bits   |  sk * D*H/8      (row r: D codes, 8/H per
    k_lo_off    +-------------------------------------------+                  byte; byte i holds channels
                | key codes, rows sk..N-1, L bits           |  (N-sk) * D*L/8   i + j*D*H/8 at bit j*H)
    v_hi_off    +-------------------------------------------+
                | value codes, rows 0..sv-1, H bits         |  sv * D*H/8
    v_lo_off    +-------------------------------------------+
                | value codes, rows sv..N-1, L bits         |  (N-sv) * D*L/8
    k_param_off +-------------------------------------------+
                | key step_hi[D] mn_hi[D] step_lo[D] mn_lo[D]|  8 * D   (fp16, per channel and group)
    v_norm_off  +-------------------------------------------+
                | value normalizer c[D]                     |  2 * D   (fp16)
    v_tok_off   +-------------------------------------------+
                | value step[N] then mn[N], page row order  |  4 * N   (fp16)
    mask_off    +-------------------------------------------+
                | key-salient bitmap, value-salient bitmap  |  2 * N/8 (token order)
    used_bytes  +-------------------------------------------+
                | padding up to N * state_content_bytes     |
    page_bytes  +-------------------------------------------+

One-byte parameters (``param_bits = 8``, :mod:`zipcache_vllm.method.params8`): the same regions, each
parameter a byte under fp16 region scales (``S * STEP_TABLE[e]`` for steps and ``c``, ``-z * step`` for
minimums); the five scales follow the bitmaps::

    k_param_off : step_hi code[D] (u8), zero_hi[D] (i8), step_lo code[D], zero_lo[D]  4 * D
    v_norm_off  : c code[D] (u8)                                                      D
    v_tok_off   : step code[N] (u8), then zero[N] (i8), page row order                2 * N
    mask_off    : the two bitmaps, then at scale_off S_k_hi, S_k_lo, S_c, S_v_hi, S_v_lo (fp16)
                                                                                      2 * N/8 + 10
                  (value rows 0..sv-1 use S_v_hi, the others S_v_lo)

At head size 64, block 128 and the ``vllm`` preset that is 53 bytes per token and head instead of 58.

Codes are packed per row with ``quant.pack_bits`` over a channel permutation (``paged.pack_row``): byte ``i``
holds channels ``i, i + D/m, ...`` (``m`` codes per byte), the released ZipCache code's half/quarter packing,
so every byte column block unpacks to a contiguous channel block. Dequantization:
``k[t, c] = code * step_g[c] + mn_g[c]`` (g = the row's group), ``v[t, c] = c[c] *
(code * step[t] + mn[t])``. ``page_bytes = block_size * state_content_bytes`` is what a vLLM KV cache
view ``[num_blocks, num_kv_heads, block_size, state_content_bytes]`` (uint8) allocates per (block, head), and
what every capacity figure here counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..method.config import ZipCacheConfig, quota_count

NUM_SCALES = 5  # fp16 region scales of a one-byte-parameter page: key hi/lo steps, c, value hi/lo steps
ALIGN = 16  # bytes: every region starts 16-byte aligned so kernels issue 16-byte vector loads


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _split_rows(n: int, min_rows: int, max_rows: int, split: bool = True) -> list[tuple[int, int]]:
    """Split ``n`` rows into (valid, padded) tiles, powers of two in [min_rows, max_rows], padding little.

    77 rows -> [(64, 64), (13, 16)] (80 padded instead of 128); 51 -> [(51, 64)].
    """
    tiles: list[tuple[int, int]] = []
    while n > max_rows:
        tiles.append((max_rows, max_rows))
        n -= max_rows
    first = len(tiles)
    while n > 0:
        whole = max(min_rows, _pow2_at_least(n))
        lower = 1 << (n.bit_length() - 1)
        rest = n - lower
        pad_rest = max(min_rows, _pow2_at_least(rest)) if rest else 0
        if split and lower >= min_rows and rest and lower + pad_rest < whole and len(tiles) < first + 2:
            tiles.append((lower, lower))
            n = rest
        else:
            tiles.append((n, whole))
            n = 0
    return tiles


@dataclass(frozen=True)
class PageLayout:
    """Byte layout of one page (one block of ``block_size`` tokens of one KV head); see the module docstring.

    Parameters
    ----------
    block_size, head_size : tokens per page, channels per head (``block_size`` a multiple of 8,
        ``head_size`` a multiple of 16).
    bits_high, bits_low : code widths of salient and regular rows (2, 4 or 8).
    param_bits : 16 (fp16 parameters) or 8 (one-byte parameters, see the module docstring).
    salient_ratio : share of salient key rows; ``value_salient_ratio`` the same for values (None: same); the
        rows per page are ``config.quota_count(block_size, ratio)``.

    Page layout v2: quotas in multiples of 16 rows so every 16-row tile has one key and one value bit width;
    rows are still packed with ``paged.pack_row``.

    Example
    -------
    >>> lay = PageLayout(block_size=128, head_size=128)
    >>> lay.num_salient_k, lay.page_bytes, round(lay.capacity_vs_bf16, 2)
    (80, 15232, 4.3)
    >>> lay = PageLayout(block_size=128, head_size=128, salient_ratio=0.8, value_salient_ratio=0.2)
    >>> lay.num_salient_k, lay.num_salient_v, lay.page_bytes, round(lay.capacity_vs_bf16, 2)
    (96, 32, 14208, 4.61)
    """

    block_size: int
    head_size: int
    bits_high: int = 4
    bits_low: int = 2
    salient_ratio: float = 0.6
    value_salient_ratio: float | None = None
    param_bits: int = 16
    num_salient_k: int = field(init=False)
    num_salient_v: int = field(init=False)
    k_hi_off: int = field(init=False)
    k_lo_off: int = field(init=False)
    v_hi_off: int = field(init=False)
    v_lo_off: int = field(init=False)
    k_param_off: int = field(init=False)
    v_norm_off: int = field(init=False)
    v_tok_off: int = field(init=False)
    mask_off: int = field(init=False)
    scale_off: int = field(init=False)
    used_bytes: int = field(init=False)
    state_content_bytes: int = field(init=False)
    page_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        n, d, bh, bl = self.block_size, self.head_size, self.bits_high, self.bits_low
        if n < 8 or n % 8:
            raise ValueError(f"block_size must be a positive multiple of 8, got {n}")
        if d < 16 or d % 16:
            raise ValueError(f"head_size must be a positive multiple of 16, got {d}")
        for name, b in (("bits_high", bh), ("bits_low", bl)):
            if b not in (2, 4, 8):
                raise ValueError(f"{name} must be 2, 4 or 8, got {b}")
        rv = self.salient_ratio if self.value_salient_ratio is None else self.value_salient_ratio
        for name, r in (("salient_ratio", self.salient_ratio), ("value_salient_ratio", rv)):
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {r}")
        if self.param_bits not in (8, 16):
            raise ValueError(f"param_bits must be 16 or 8, got {self.param_bits!r}")
        sk, sv = quota_count(n, self.salient_ratio), quota_count(n, rv)
        k_par, v_norm, v_tok = self._param_sizes()
        sizes = [
            ("k_hi_off", sk * d * bh // 8),
            ("k_lo_off", (n - sk) * d * bl // 8),
            ("v_hi_off", sv * d * bh // 8),
            ("v_lo_off", (n - sv) * d * bl // 8),
            ("k_param_off", k_par),
            ("v_norm_off", v_norm),
            ("v_tok_off", v_tok),
            ("mask_off", 2 * (n // 8) + (0 if self.param_bits == 16 else 2 * NUM_SCALES)),
        ]
        off = 0
        for name, size in sizes:
            object.__setattr__(self, name, off)
            off = _align(off + size)
        object.__setattr__(self, "scale_off", self.mask_off + 2 * (n // 8))
        object.__setattr__(self, "num_salient_k", sk)
        object.__setattr__(self, "num_salient_v", sv)
        object.__setattr__(self, "used_bytes", off)
        scb = -(-off // n)
        object.__setattr__(self, "state_content_bytes", scb)
        object.__setattr__(self, "page_bytes", scb * n)

    def _param_sizes(self) -> tuple[int, int, int]:
        """Bytes of the key parameters, the value normalizers and the value token parameters."""
        n, d = self.block_size, self.head_size
        if self.param_bits == 16:
            return 8 * d, 2 * d, 4 * n
        return 4 * d, d, 2 * n  # one-byte codes (method/params8.py); their fp16 scales follow the bitmaps

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ZipCacheConfig, head_size: int) -> PageLayout:
        return cls(
            block_size=config.block_size,
            head_size=head_size,
            bits_high=config.bits_high,
            bits_low=config.bits_low,
            salient_ratio=config.salient_ratio,
            value_salient_ratio=config.value_salient_ratio,
            param_bits=config.param_bits,
        )

    # -- sizes ---------------------------------------------------------------------------------------------
    @property
    def v_salient_ratio(self) -> float:
        return self.salient_ratio if self.value_salient_ratio is None else self.value_salient_ratio

    @property
    def bytes_per_token(self) -> float:
        """Bytes per token per KV head, K and V together, padding included."""
        return self.page_bytes / self.block_size

    @property
    def capacity_vs_bf16(self) -> float:
        """Tokens this layout stores per byte, relative to bf16 K+V (4 * head_size bytes per token-head)."""
        return 4 * self.head_size / self.bytes_per_token

    def breakdown(self) -> dict[str, int]:
        """Bytes per page by content: codes, fp16 parameters, bitmaps, alignment and padding."""
        n, d, bh, bl = self.block_size, self.head_size, self.bits_high, self.bits_low
        sk, sv = self.num_salient_k, self.num_salient_v
        codes = (sk + sv) * d * bh // 8 + (2 * n - sk - sv) * d * bl // 8
        params = sum(self._param_sizes()) + (0 if self.param_bits == 16 else 2 * NUM_SCALES)
        masks = 2 * (n // 8)
        return {
            "codes": codes,
            "params": params,
            "masks": masks,
            "padding": self.page_bytes - codes - params - masks,
        }

    # -- what the kernels need -----------------------------------------------------------------------------
    def row_regions(self) -> list[tuple[int, int, int, int, int, int, int, int]]:
        """Row ranges with one key format and one value format: (start, stop, k_bits, k_row_off, k_param_off,
        v_bits, v_row_off, v_tok_row) where ``*_row_off`` is the byte offset of row ``start``."""
        n, d, bh, bl = self.block_size, self.head_size, self.bits_high, self.bits_low
        sk, sv = self.num_salient_k, self.num_salient_v
        cuts = sorted({0, sk, sv, n})
        regions = []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            if a >= b:
                continue
            k_hi, v_hi = a < sk, a < sv
            kb = bh if k_hi else bl
            vb = bh if v_hi else bl
            k_off = self.k_hi_off + a * d * bh // 8 if k_hi else self.k_lo_off + (a - sk) * d * bl // 8
            v_off = self.v_hi_off + a * d * bh // 8 if v_hi else self.v_lo_off + (a - sv) * d * bl // 8
            k_par = self.k_param_off + (0 if k_hi else (4 if self.param_bits == 16 else 2) * d)
            regions.append((a, b, kb, k_off, k_par, vb, v_off, a))
        return regions

    def attention_tiles(
        self, min_rows: int = 16, max_rows: int = 128, split: bool = True
    ) -> tuple[tuple[int, ...], ...]:
        """Tiles of page rows for the attention kernels, a compile-time constant.

        Each tile is ``(valid, rows, k_bits, k_off, k_param_off, v_bits, v_off, v_tok_off)``: ``rows`` (a
        power of two in ``[min_rows, max_rows]``) rows of which the first ``valid`` exist, key codes at byte
        ``k_off`` (row
        stride ``head_size * k_bits / 8``), key (step, mn) at ``k_param_off`` (mn ``2 * head_size`` bytes
        later), value codes at ``v_off``, value step of the first row at byte ``v_tok_off`` (mn
        ``2 * block_size`` bytes later).
        """
        d = self.head_size
        tiles = []
        for a, b, kb, k_off, k_par, vb, v_off, _ in self.row_regions():
            start = a
            for valid, rows in _split_rows(b - a, min_rows, max_rows, split):
                tiles.append(
                    (
                        valid,
                        rows,
                        kb,
                        k_off + (start - a) * d * kb // 8,
                        k_par,
                        vb,
                        v_off + (start - a) * d * vb // 8,
                        self.v_tok_off + 2 * start,
                    )
                )
                start += valid
        return tuple(tiles)


def capacity_table(
    head_sizes: tuple[int, ...] = (64, 128),
    block_sizes: tuple[int, ...] = (16, 32, 64, 128),
    **kwargs,
) -> list[dict[str, float | int]]:
    """Rows of (head_size, block_size, page bytes, bytes per token-head, capacity vs bf16) for a setting.

    ``kwargs`` go to :class:`PageLayout` (bits, ratios). Example: ``capacity_table(salient_ratio=0.6)``.
    """
    rows = []
    for d in head_sizes:
        for n in block_sizes:
            lay = PageLayout(block_size=n, head_size=d, **kwargs)
            rows.append(
                {
                    "head_size": d,
                    "block_size": n,
                    "page_bytes": lay.page_bytes,
                    "bytes_per_token": round(lay.bytes_per_token, 3),
                    "bf16_bytes_per_token": 4 * d,
                    "capacity_vs_bf16": round(lay.capacity_vs_bf16, 3),
                    **{f"{k}_bytes": v for k, v in lay.breakdown().items()},
                }
            )
    return rows


def format_capacity_table(rows: list[dict[str, float | int]]) -> str:
    """Markdown table of :func:`capacity_table` rows."""
    head = "| head size | block size | page bytes | codes | params | masks | padding | bytes/token | capacity |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['head_size']} | {r['block_size']} | {r['page_bytes']} | {r['codes_bytes']} | "
            f"{r['params_bytes']} | {r['masks_bytes']} | {r['padding_bytes']} | {r['bytes_per_token']:.2f} | "
            f"{r['capacity_vs_bf16']:.2f}x |"
        )
    return "\n".join(lines)
