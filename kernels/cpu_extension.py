"""The CPU kernels' C++ extension (csrc/): built on first use, one owner of the build.

Compiled with the machine's C++ compiler (-O3 -march=native) and cached by torch under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), so only the first process on a
machine pays the build (about a minute on 2 cores); processes that start together share
one build behind torch's file lock. `cpu_extension()` returns None where it cannot be
built (no compiler), and callers keep their PyTorch references; the reason is logged once.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("bindings.cpp", "paged_attention_cpu.cpp", "block_linear_cpu.cpp")]


@functools.lru_cache(maxsize=1)
def cpu_extension():
    """The compiled module, or None (with the reason logged) when it cannot be built."""
    from torch.utils import cpp_extension

    # ninja may be installed beside this interpreter without being on PATH (a venv that
    # is not activated, a Ray worker).
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    try:
        return cpp_extension.load(
            name="pdserve_cpu_kernels", sources=[str(s) for s in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
            verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler or ninja
        log.warning("the CPU kernels could not be built (%s: %s); the PyTorch references run "
                    "instead", type(exc).__name__, exc)
        return None


def cpu_kernels_available() -> bool:
    """Whether the CPU kernels (batch attention, block linear) exist on this machine;
    builds them on the first call."""
    return cpu_extension() is not None
