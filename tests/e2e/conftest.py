"""Real vLLM servers for the e2e tests: ``zipcache-vllm serve`` on 127.0.0.1, a free port, stopped by PID.

One server per test module (module-scoped fixtures) keeps the directory within its CI budget: a start takes
25-60 s on a 2-core machine (more when the machine is shared).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from zipcache_vllm.plugin.launch import stop_server

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "zipcache-vllm"
START_TIMEOUT = 420  # s: a cold start under load; typical 25-60 s
SERVED_NAME = "smollm2"


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(item.fspath).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.e2e)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 600, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", timeout=timeout, max_retries=0, **kw)

    def async_client(self, timeout: float = 600, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="none", timeout=timeout, max_retries=0,
                                  **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kv_cache_tokens(self) -> int:
        m = re.search(r"KV cache size: ([\d,]+) tokens", self.log_text())
        assert m, "no 'KV cache size' line in the server log"
        return int(m.group(1).replace(",", ""))

    def get(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:
            return r.read().decode()

    def healthy(self) -> bool:
        try:
            urllib.request.urlopen(self.base_url + "/health", timeout=5).close()
            return True
        except OSError:
            return False


def model_dir() -> str:
    from zipcache_vllm.models import resolve_model

    return resolve_model(None)


@contextlib.contextmanager
def serve(tmp_dir: Path, *args: str, env: dict[str, str] | None = None, name: str = "server",
          max_model_len: int = 2048, model: str | None = None, dtype: str = "bfloat16"):
    """Start ``zipcache-vllm serve <bundled model> <args>``; yield a :class:`Server`; stop it by PID."""
    if not SCRIPT.exists():
        pytest.skip("zipcache-vllm console script not installed (pip install -e .)")
    port = _free_port()
    log = tmp_dir / f"{name}.log"
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    cmd = [
        str(SCRIPT), "serve", model or model_dir(), "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
        "--served-model-name", SERVED_NAME, "--enforce-eager", "--max-model-len", str(max_model_len), *args,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                                start_new_session=True)
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.healthy():
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} during start-up:\n{server.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT} s:\n{server.log_text()[-4000:]}")
            time.sleep(1)
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    stop_server(proc)


@pytest.fixture(scope="session")
def e2e_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


# The main servers, shared by the modules that need them (a start costs 25-60 s). Small scheduler budgets so
# that an ordinary long prompt is chunked (512 tokens per step) and 16 streams fit (16 sequences).
COMMON_ARGS = ("--max-num-seqs", "16", "--max-num-batched-tokens", "512")


@pytest.fixture(scope="session")
def zipcache_server(e2e_tmp):
    with serve(e2e_tmp, "--kv-cache-backend", "zipcache", *COMMON_ARGS, name="zipcache") as s:
        yield s


@pytest.fixture(scope="session")
def stock_server(e2e_tmp):
    with serve(e2e_tmp, *COMMON_ARGS, name="stock") as s:
        yield s


@pytest.fixture(scope="session")
def start_server():
    """The :func:`serve` context manager, for modules that need a server of their own."""
    return serve
