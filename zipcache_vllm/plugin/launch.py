"""Stopping a server this process started (tests, benchmarks): no vLLM import."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the API server (its EngineCore and worker follow), then SIGKILL what is left of its own process
    group (started with ``start_new_session=True``), so only processes this caller started are ended."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
