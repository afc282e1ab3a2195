"""register(), the spec hook and the start-up refusals, inside this process (vLLM imported, no server)."""

from __future__ import annotations

import importlib.metadata as md
import os

import pytest
import torch

import zipcache_vllm
from zipcache_vllm.plugin import envs

vllm = pytest.importorskip("vllm")
from vllm.v1.attention.backends import registry  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402


@pytest.fixture
def clean_registry(monkeypatch):
    """Run register() against a copy of vLLM's override table; restore both afterwards."""
    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", dict(registry._ATTN_OVERRIDES))
    monkeypatch.setattr(zipcache_vllm, "_REGISTERED", False)
    monkeypatch.delenv(envs.KV_CACHE_BACKEND, raising=False)
    monkeypatch.delenv(envs.CONFIG_OVERRIDES, raising=False)
    monkeypatch.delenv(envs.CONFIG, raising=False)
    yield monkeypatch
    for var in (envs.KV_CACHE_BACKEND, envs.CONFIG, envs.CONFIG_OVERRIDES):  # set by the CLI flags' action
        os.environ.pop(var, None)


def test_entry_point_is_declared():
    eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "zipcache"]
    assert eps and eps[0].value == "zipcache_vllm:register"


def test_without_the_flag_vllm_stays_stock(clean_registry):
    stock = AttentionBackendEnum.CPU_ATTN.get_path()
    zipcache_vllm.register()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == stock
    assert not zipcache_vllm._REGISTERED


def test_register_is_idempotent_and_overrides_cpu_attn(clean_registry):
    clean_registry.setenv(envs.KV_CACHE_BACKEND, "zipcache")
    zipcache_vllm.register()
    zipcache_vllm.register()
    cls = AttentionBackendEnum.CPU_ATTN.get_class()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == zipcache_vllm.CPU_BACKEND
    assert cls.get_name() == "CPU_ATTN" and cls.forward_includes_kv_cache_update
    with pytest.raises(ValueError, match="MLA"):
        AttentionBackendEnum.CPU_MLA.get_class().get_name()


def test_customize_spec_declares_the_compressed_page(clean_registry):
    clean_registry.setenv(envs.KV_CACHE_BACKEND, "zipcache")
    from zipcache_vllm.engine.layout import PageLayout
    from zipcache_vllm.plugin.backend import ZipCacheAttentionBackend

    spec = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
    new = ZipCacheAttentionBackend.customize_spec(spec)
    from zipcache_vllm.method.config import ZipCacheConfig

    lay = PageLayout.from_config(ZipCacheConfig.load(envs.DEFAULT_CONFIG).replace(block_size=128), 64)
    assert lay.num_salient_k == 96 and lay.num_salient_v == 32  # the default preset: keys 0.8, values 0.2 (v2)
    assert new.dtype == torch.uint8 and new.state_content_bytes == lay.state_content_bytes
    assert new.page_size_bytes == 3 * lay.page_bytes  # one page per KV head
    assert spec.page_size_bytes / new.page_size_bytes == pytest.approx(lay.capacity_vs_bf16)
    assert ZipCacheAttentionBackend.customize_spec(new) is new  # already packed: unchanged


def test_config_is_fitted_to_paged_semantics(clean_registry):
    from zipcache_vllm.plugin.backend import resolve_config

    clean_registry.setenv(envs.CONFIG, "default")  # the paper's segment setting
    cfg = resolve_config(64, {"zipcache": {"salient_ratio": 0.5}})
    assert (cfg.granularity.value, cfg.selection.value, cfg.block_size, cfg.salient_ratio) == (
        "block", "quota", 64, 0.5)
    with pytest.raises(ValueError, match="cst"):
        resolve_config(64, {"zipcache": {"key_scheme": "cst"}})
    with pytest.raises(ValueError, match="unknown"):
        resolve_config(64, {"zipcache": {"bogus": 1}})


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"sliding_window": 4096}, "sliding-window"),
        ({"head_size": 80}, "head size 80"),
        ({"head_size": 32}, "head size 32"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype fp8"),
        ({"sinks": torch.zeros(3)}, "sinks"),
        ({"attn_type": "encoder_only"}, "attention type"),
    ],
)
def test_unsupported_models_are_refused_with_the_reason(kwargs, reason):
    from zipcache_vllm.plugin.backend import check_supported

    kwargs = {"head_size": 64, **kwargs}
    with pytest.raises(ValueError, match=reason):
        check_supported(**kwargs)
    check_supported(64)


def test_stat_logger_publishes_the_compression_figures(clean_registry):
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from zipcache_vllm.plugin.metrics import ZipCacheStatLogger

    clean_registry.setenv(envs.KV_CACHE_BACKEND, "zipcache")
    clean_registry.setenv(envs.CONFIG, "paged")  # r = 0.6 for keys and values: 80 rows, 7936-byte pages (v2)
    cfg = SimpleNamespace(
        cache_config=SimpleNamespace(block_size=128, num_gpu_blocks=100),
        model_config=SimpleNamespace(get_head_size=lambda: 64),
        scheduler_config=SimpleNamespace(max_num_seqs=16),
        additional_config={},
    )
    stat = ZipCacheStatLogger(cfg)
    stat.log_engine_initialized()
    value = REGISTRY.get_sample_value
    assert value("zipcache:capacity_ratio_vs_bf16") == pytest.approx(4.129, abs=1e-3)  # 256 / 62
    assert value("zipcache:bits_per_value") == pytest.approx(7936 * 8 / (128 * 128))
    assert (value("zipcache:bits_high"), value("zipcache:bits_low"), value("zipcache:param_bits")) == (4, 2, 16)
    assert value("zipcache:salient_ratio") == pytest.approx(80 / 128)
    assert value("zipcache:kv_cache_tokens") == 12800 and value("zipcache:staging_slots") == 20


def test_stat_logger_publishes_the_per_layer_split(clean_registry):
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from zipcache_vllm.plugin.metrics import ZipCacheStatLogger

    clean_registry.setenv(envs.KV_CACHE_BACKEND, "zipcache")
    clean_registry.setenv(envs.CONFIG, "vllm")
    cfg = SimpleNamespace(
        cache_config=SimpleNamespace(block_size=128, num_gpu_blocks=100),
        model_config=SimpleNamespace(get_head_size=lambda: 64, get_num_layers=lambda p: 2,
                                     get_num_kv_heads=lambda p: 3),
        parallel_config=None,
        scheduler_config=SimpleNamespace(max_num_seqs=16),
        additional_config={"zipcache": {"layer_salient_ratios": [[1.0, 0.0], [0.5, 0.5]]}},
    )
    ZipCacheStatLogger(cfg)
    value = REGISTRY.get_sample_value
    assert [value("zipcache:layer_key_salient_rows", {"layer": i}) for i in "01"] == [128, 64]
    assert [value("zipcache:layer_value_salient_rows", {"layer": i}) for i in "01"] == [0, 64]


def _serve_parser():
    """vLLM's own `vllm serve` parser, built as its CLI builds it (general plugins load inside)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    root = FlexibleArgumentParser(prog="vllm")
    return ServeSubcommand().subparser_init(root.add_subparsers())


def test_vllm_serve_takes_the_kv_cache_backend_flag(clean_registry):
    """`vllm serve MODEL --kv-cache-backend zipcache`: the flag parses on vLLM's parser, exports the choice to the
    engine processes' environment and registers the backend here; prefix caching stays vLLM's choice."""
    zipcache_vllm.register()  # stock: installs only the flags
    parser = _serve_parser()
    stock = parser.parse_args(["some/model"])
    assert not hasattr(stock, "kv_cache_backend") and stock.enable_prefix_caching is None
    assert envs.KV_CACHE_BACKEND not in os.environ

    args = parser.parse_args(["some/model", "--kv-cache-backend", "zipcache", "--zipcache-config", "kv4"])
    assert os.environ[envs.KV_CACHE_BACKEND] == "zipcache" and os.environ[envs.CONFIG] == "kv4"
    assert args.enable_prefix_caching is None  # vLLM's default (on): cached compressed blocks are exact
    assert AttentionBackendEnum.CPU_ATTN.get_path() == zipcache_vllm.CPU_BACKEND
    args = parser.parse_args(["some/model", "--kv-cache-backend=zipcache", "--no-enable-prefix-caching"])
    assert args.enable_prefix_caching is False  # an explicit flag is kept, in either order
    args = parser.parse_args(["some/model", "--no-enable-prefix-caching", "--kv-cache-backend", "zipcache"])
    assert args.enable_prefix_caching is False


def test_vllm_serve_rejects_bad_zipcache_values(clean_registry, capsys):
    zipcache_vllm.register()
    parser = _serve_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--kv-cache-backend", "zip"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--zipcache-config", "no-such-preset", "--kv-cache-backend", "zipcache"])
    assert "no-such-preset" in capsys.readouterr().err
