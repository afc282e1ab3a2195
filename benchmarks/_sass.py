"""Compile a Triton or Gluon kernel for sm_90 without a GPU: ptxas's resource report and the SASS.

Shared by ``sass_decode_v2.py`` and ``sass_prefill.py``; uses the ptxas and cuobjdump bundled with triton.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget


def compile_sm90(src, **options) -> tuple[str, str]:
    """``(ptxas -v report, SASS listing)`` of ``src`` (an ``ASTSource`` or ``GluonASTSource``) compiled for
    sm_90 with Triton ``options`` (``num_warps``, ``num_stages``, ...). The report ends with a line
    ``triton shared memory: <bytes>`` (the dynamic shared memory the launch asks for; 232448 at most on sm_90)."""
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(c.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(c.asm["cubin"])
        info = subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin + "2"],
                              capture_output=True, text=True).stderr  # fmt: skip
        sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "--dump-sass", cubin], capture_output=True,
                              text=True).stdout  # fmt: skip
    return info + f"triton shared memory: {c.metadata.shared}\n", sass
