"""Byte math of the page layout: regions, alignment, sizes and capacity."""

import pytest

from zipcache_vllm.engine.layout import ALIGN, PageLayout, capacity_table, format_capacity_table
from zipcache_vllm.method.config import ZipCacheConfig


def _regions(lay: PageLayout):
    n, d, bh, bl = lay.block_size, lay.head_size, lay.bits_high, lay.bits_low
    sk, sv = lay.num_salient_k, lay.num_salient_v
    w = lay.param_bits // 8  # bytes per parameter
    return [
        (lay.k_hi_off, sk * d * bh // 8),
        (lay.k_lo_off, (n - sk) * d * bl // 8),
        (lay.v_hi_off, sv * d * bh // 8),
        (lay.v_lo_off, (n - sv) * d * bl // 8),
        (lay.k_param_off, 4 * w * d),
        (lay.v_norm_off, w * d),
        (lay.v_tok_off, 2 * w * n),
        (lay.mask_off, n // 4),
    ] + ([(lay.scale_off, 10)] if w == 1 else [])  # five fp16 scales right after the bitmaps


@pytest.mark.parametrize("n", [16, 32, 48, 64, 128, 256])
@pytest.mark.parametrize("d", [64, 128, 96])
@pytest.mark.parametrize("r, rv", [(0.6, None), (0.8, 0.2), (0.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("param_bits", [16, 8])
def test_regions_disjoint_aligned_and_inside(n, d, r, rv, param_bits):
    lay = PageLayout(n, d, salient_ratio=r, value_salient_ratio=rv, param_bits=param_bits)
    regions = _regions(lay)
    end = 0
    for off, size in regions:
        assert off >= end and (off % ALIGN == 0 or off == lay.scale_off)
        end = off + size
    assert end <= lay.used_bytes <= lay.page_bytes
    assert lay.page_bytes == n * lay.state_content_bytes and lay.page_bytes % ALIGN == 0
    bd = lay.breakdown()
    assert sum(bd.values()) == lay.page_bytes and bd["padding"] >= 0


def test_default_numbers():
    """r = 0.6, 4/2 bits, head size 128, block 128 (layout v2): 80 salient rows (v1: 77), 15,232-byte page,
    119 B/token, 4.30x."""
    lay = PageLayout(128, 128)
    assert (lay.num_salient_k, lay.num_salient_v) == (80, 80)
    assert lay.breakdown() == {"codes": 13312, "params": 1792, "masks": 32, "padding": 96}
    assert lay.page_bytes == 15232 and lay.bytes_per_token == 119.0
    assert lay.capacity_vs_bf16 == pytest.approx(512 / 119)


def test_vllm_preset_numbers():
    """Keys 0.8 / values 0.2 (preset ``vllm``), block 128 (layout v2): 96/32 salient rows (v1: 103/26), fewer code
    bytes than 103/26 and the same page: 14,208 bytes at head size 128 (4.61x), 7,424 at 64 (4.41x)."""
    lay = PageLayout(128, 128, salient_ratio=0.8, value_salient_ratio=0.2)
    assert (lay.num_salient_k, lay.num_salient_v) == (96, 32)
    assert lay.breakdown() == {"codes": 12288, "params": 1792, "masks": 32, "padding": 96}
    assert lay.breakdown()["codes"] <= (103 + 26) * 128 * 4 // 8 + (256 - 103 - 26) * 128 * 2 // 8  # v1: 12,320
    assert lay.page_bytes == 14208 and lay.bytes_per_token == 111.0
    assert lay.capacity_vs_bf16 == pytest.approx(512 / 111) and lay.capacity_vs_bf16 >= 4.61
    lay64 = PageLayout(128, 64, salient_ratio=0.8, value_salient_ratio=0.2)
    assert (lay64.num_salient_k, lay64.num_salient_v, lay64.page_bytes) == (96, 32, 7424)
    assert lay64.capacity_vs_bf16 == pytest.approx(256 / 58)


def test_one_byte_parameter_numbers():
    """The ``vllm`` preset with one-byte parameters: 4 D + D + 2 N bytes plus five fp16 scales instead of
    8 D + 2 D + 4 N: 53 B/token at head size 64 (58 with fp16), 104 at 128 (111)."""
    lay64 = PageLayout(128, 64, salient_ratio=0.8, value_salient_ratio=0.2, param_bits=8)
    assert lay64.breakdown()["params"] == 4 * 64 + 64 + 2 * 128 + 10 and lay64.state_content_bytes == 53
    assert lay64.capacity_vs_bf16 == pytest.approx(256 / 53)
    lay = PageLayout(128, 128, salient_ratio=0.8, value_salient_ratio=0.2, param_bits=8)
    assert lay.state_content_bytes == 104 and lay.capacity_vs_bf16 == pytest.approx(512 / 104)


@pytest.mark.parametrize("n", [16, 32, 48, 64, 128, 256])
@pytest.mark.parametrize("r, rv", [(0.6, None), (0.8, 0.2), (0.7, 0.3), (0.55, 0.45), (0.0, 1.0), (1.0, 0.0)])
def test_v2_quotas_give_16_row_tiles_of_one_format(n, r, rv):
    """Layout v2: quotas are multiples of 16, so every 16-row tile lies in one (key bits, value bits) region."""
    lay = PageLayout(n, 64, salient_ratio=r, value_salient_ratio=rv)
    assert lay.num_salient_k % 16 == 0 and lay.num_salient_v % 16 == 0
    assert all(a % 16 == 0 and b % 16 == 0 for a, b, *_ in lay.row_regions())
    tiles = lay.attention_tiles(max_rows=16)  # the 16-row tiles of a v2 decode kernel: whole, none padded
    assert len(tiles) == n // 16 and all(valid == rows == 16 for valid, rows, *_ in tiles)


def test_separate_ratios_reach_the_target():
    """Keys 0.8 / values 0.2 (method doc §13a) store fewer bytes than r = 0.6 and pass 4.5x at block 128."""
    assert PageLayout(128, 128, salient_ratio=0.8, value_salient_ratio=0.2).capacity_vs_bf16 > 4.5


def test_tiles_cover_rows_once():
    for lay in (PageLayout(128, 128), PageLayout(64, 64, salient_ratio=0.8, value_salient_ratio=0.2)):
        for max_rows in (16, 32, 128):
            tiles = lay.attention_tiles(max_rows=max_rows)
            assert sum(t[0] for t in tiles) == lay.block_size
            assert all(16 <= t[1] <= max_rows and t[1] & (t[1] - 1) == 0 and t[0] <= t[1] for t in tiles)
            tok = [t[7] for t in tiles]
            assert tok == sorted(tok) and tok[0] == lay.v_tok_off


def test_from_config_and_table():
    cfg = ZipCacheConfig(block_size=64, salient_ratio=0.7, value_salient_ratio=0.3)
    lay = PageLayout.from_config(cfg, 128)
    assert (lay.block_size, lay.num_salient_k, lay.num_salient_v) == (64, 48, 16)  # 44.8 -> 48, 19.2 -> 16
    rows = capacity_table()
    assert [(r["head_size"], r["block_size"]) for r in rows] == [(d, n) for d in (64, 128) for n in (16, 32, 64, 128)]
    assert "4.30x" in format_capacity_table(rows)  # head size 128, block 128, r = 0.6 (layout v2)


@pytest.mark.parametrize("kw", [dict(block_size=12), dict(head_size=40), dict(bits_low=3), dict(salient_ratio=1.5),
                                dict(param_bits=4)])
def test_rejects_bad_layouts(kw):
    args = dict(block_size=16, head_size=64) | kw
    with pytest.raises(ValueError):
        PageLayout(**args)
