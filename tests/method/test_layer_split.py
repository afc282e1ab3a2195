"""Per-layer salient splits (preset ``adaptive``): the config keeps one total of salient rows per block, the
calibration file fills the split for a model shape, every layer's page has the same size."""

from __future__ import annotations

import json

import pytest

from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.eval.calibrate import key_row_choices, merge
from zipcache_vllm.method import calibration
from zipcache_vllm.method.config import ZipCacheConfig


def _file(tmp_path, rows, shape="3x2x64", budget=128, block_size=128):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"format": calibration.FORMAT, "block_size": block_size,
                                "models": {shape: {"model": "toy", "budgets": {str(budget): {"key_rows": rows}}}}}))
    return str(path)


def test_layer_ratios_keep_the_base_total_and_the_page_size():
    base = ZipCacheConfig.load("vllm")
    assert base.salient_rows == 128  # 96 keys + 32 values
    cfg = base.replace(layer_salient_ratios=[[0.75, 0.25], [1.0, 0.0], [0.25, 0.75]])
    layers = [cfg.for_layer(i) for i in range(3)]
    assert [(c.salient_ratio, c.value_salient_ratio) for c in layers] == [(0.75, 0.25), (1.0, 0.0), (0.25, 0.75)]
    pages = {PageLayout.from_config(c, d).page_bytes for c in layers for d in (64,)}
    assert pages == {PageLayout.from_config(base, 64).page_bytes}
    assert base.for_layer(7) is base  # no split: every layer runs the base config


@pytest.mark.parametrize("bad", [[[0.5, 0.25]], [[1.0, 0.25]], [[0.75]], [], [[0.75, 1.5]]])
def test_a_split_that_changes_the_bytes_is_refused(bad):
    with pytest.raises(ValueError, match="layer_salient_ratios"):
        ZipCacheConfig.load("vllm", layer_salient_ratios=bad)


def test_calibration_fills_the_split_for_the_model_shape(tmp_path):
    path = _file(tmp_path, [96, 128, 64])
    cfg = ZipCacheConfig.load("vllm", calibration=path).for_model(3, 2, 64)
    assert cfg.layer_salient_ratios == ((0.75, 0.25), (1.0, 0.0), (0.5, 0.5))
    assert cfg.for_layer(2).salient_ratio == 0.5
    assert cfg.to_dict()["layer_salient_ratios"][1] == [1.0, 0.0]  # JSON-friendly


def test_calibration_errors_name_what_is_missing(tmp_path):
    path = _file(tmp_path, [96, 128, 64])
    with pytest.raises(ValueError, match="no calibration for a model of shape 4x2x64"):
        ZipCacheConfig.load("vllm", calibration=path).for_model(4, 2, 64)
    with pytest.raises(ValueError, match="no split of 112 salient rows"):
        ZipCacheConfig.load("vllm", calibration=path, value_salient_ratio=0.125).for_model(3, 2, 64)
    with pytest.raises(ValueError, match="no salient-split calibration"):
        ZipCacheConfig.load("vllm", calibration=str(tmp_path / "missing.json")).for_model(3, 2, 64)
    bad = _file(tmp_path, [96, 112, 64])  # 112 key rows + 16 value rows: fine; 112 + 32 would not be
    assert ZipCacheConfig.load("vllm", calibration=bad).for_model(3, 2, 64).salient_rows == 128


def test_key_row_choices_cover_every_split_of_the_budget():
    assert key_row_choices(128, 128) == [0, 16, 32, 48, 64, 80, 96, 112, 128]
    assert key_row_choices(128, 112) == [0, 16, 32, 48, 64, 80, 96, 112]
    assert key_row_choices(128, 192) == [64, 80, 96, 112, 128]


def test_merge_keeps_other_shapes_and_budgets(tmp_path):
    out = tmp_path / "c.json"
    a = {"shape": "3x2x64", "model": "a", "salient_rows": 128, "key_rows": [96, 96, 96]}
    b = {"shape": "3x2x64", "model": "a", "salient_rows": 112, "key_rows": [96, 80, 96]}
    c = {"shape": "2x1x128", "model": "c", "salient_rows": 128, "key_rows": [128, 0]}
    for r in (a, b, c):
        out.write_text(json.dumps(merge(out, r, 128)))
    data = json.loads(out.read_text())
    assert sorted(data["models"]["3x2x64"]["budgets"]) == ["112", "128"]
    assert calibration.key_rows(str(out), 2, 1, 128, 128, 128) == [128, 0]


def test_the_adaptive_preset_resolves_for_the_bundled_models():
    """configs/calibration/adaptive.json holds both bundled models' splits of the vllm preset's 128 rows."""
    cfg = ZipCacheConfig.load("adaptive")
    for shape in ((30, 3, 64), (28, 2, 128)):
        try:
            full = cfg.for_model(*shape)
        except ValueError as e:
            pytest.fail(str(e))
        assert len(full.layer_salient_ratios) == shape[0]
        sizes = {PageLayout.from_config(full.for_layer(i), shape[2]).page_bytes for i in range(shape[0])}
        assert sizes == {PageLayout.from_config(cfg, shape[2]).page_bytes}
