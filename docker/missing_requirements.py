"""The requirements of an installed distribution that the environment does not satisfy yet.

    python3 missing_requirements.py zipcache-vllm gpu > missing.txt

Used by docker/Dockerfile after ``pip install --no-deps`` of the wheel: prints, one a line, each requirement
(core + the given extras) whose distribution is not installed, so pip installs only those and never touches the
vLLM image's own vllm, torch and CUDA libraries. Exits 1 when an installed distribution has a version outside its
requirement (for instance an image whose vllm is not the one the ``gpu`` extra pins).
"""

from __future__ import annotations

import importlib.metadata as md
import sys

from packaging.requirements import Requirement


def missing_requirements(dist: str, extras: list[str]) -> tuple[list[str], list[str]]:
    """``(missing, conflicts)``: requirement strings not installed, and messages for installed mismatches."""
    missing, conflicts = [], []
    for req in map(Requirement, md.requires(dist) or []):
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
            continue
        req.marker = None
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            missing.append(str(req))
            continue
        if not req.specifier.contains(version, prereleases=True):
            conflicts.append(f"{dist} needs {req}, the environment has {req.name} {version}")
    return missing, conflicts


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    missing, conflicts = missing_requirements(argv[0], argv[1:])
    for line in conflicts:
        print(f"missing_requirements: {line}", file=sys.stderr)
    if missing:
        print("\n".join(missing))
    return 1 if conflicts else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
