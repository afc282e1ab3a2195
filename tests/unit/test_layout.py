"""Byte math of the page layout: regions, alignment, sizes and capacity."""

import pytest

from zipcache_vllm.config import ZipCacheConfig
from zipcache_vllm.layout import ALIGN, PageLayout, capacity_table, format_capacity_table


def _regions(lay: PageLayout):
    n, d, bh, bl = lay.block_size, lay.head_size, lay.bits_high, lay.bits_low
    sk, sv = lay.num_salient_k, lay.num_salient_v
    return [
        (lay.k_hi_off, sk * d * bh // 8),
        (lay.k_lo_off, (n - sk) * d * bl // 8),
        (lay.v_hi_off, sv * d * bh // 8),
        (lay.v_lo_off, (n - sv) * d * bl // 8),
        (lay.k_param_off, 8 * d),
        (lay.v_norm_off, 2 * d),
        (lay.v_tok_off, 4 * n),
        (lay.mask_off, n // 4),
    ]


@pytest.mark.parametrize("n", [16, 32, 48, 64, 128, 256])
@pytest.mark.parametrize("d", [64, 128, 96])
@pytest.mark.parametrize("r, rv", [(0.6, None), (0.8, 0.2), (0.0, 1.0), (1.0, 0.0)])
def test_regions_disjoint_aligned_and_inside(n, d, r, rv):
    lay = PageLayout(n, d, salient_ratio=r, value_salient_ratio=rv)
    regions = _regions(lay)
    end = 0
    for off, size in regions:
        assert off % ALIGN == 0 and off >= end
        end = off + size
    assert end <= lay.used_bytes <= lay.page_bytes
    assert lay.page_bytes == n * lay.state_content_bytes and lay.page_bytes % ALIGN == 0
    bd = lay.breakdown()
    assert sum(bd.values()) == lay.page_bytes and bd["padding"] >= 0


def test_default_numbers():
    """r = 0.6, 4/2 bits, head size 128, block 128: 77 salient rows, 14,976-byte page, 117 B/token, 4.38x."""
    lay = PageLayout(128, 128)
    assert (lay.num_salient_k, lay.num_salient_v) == (77, 77)
    assert lay.breakdown() == {"codes": 13120, "params": 1792, "masks": 32, "padding": 32}
    assert lay.page_bytes == 14976 and lay.bytes_per_token == 117.0
    assert lay.capacity_vs_bf16 == pytest.approx(512 / 117)


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
    assert (lay.block_size, lay.num_salient_k, lay.num_salient_v) == (64, 45, 20)
    rows = capacity_table()
    assert [(r["head_size"], r["block_size"]) for r in rows] == [(d, n) for d in (64, 128) for n in (16, 32, 64, 128)]
    assert "4.38x" in format_capacity_table(rows)


@pytest.mark.parametrize("kw", [dict(block_size=12), dict(head_size=40), dict(bits_low=3), dict(salient_ratio=1.5)])
def test_rejects_bad_layouts(kw):
    args = dict(block_size=16, head_size=64) | kw
    with pytest.raises(ValueError):
        PageLayout(**args)
