"""The CPU kernels' C++ extension (csrc/): built on first use, one owner of the build.

Compiled with the machine's C++ compiler (-O3 -march=native) and cached by torch under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), so only the first process on a
machine pays the build (about a minute on 2 cores); processes that start together share
one build behind a lock that dies with its holder. `cpu_extension()` returns None where it cannot be
built (no compiler), and callers keep their PyTorch references; the reason is logged once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("bindings.cpp", "paged_attention_cpu.cpp", "block_linear_cpu.cpp",
                                      "layer_ops_cpu.cpp", "decoder_layers_cpu.cpp",
                                      "sampling_cpu.cpp", "kv_quant_cpu.cpp")]
_HEADERS = [_CSRC / "vec_math.h", _CSRC / "kernels.h"]


def build_directory_name(csrc: Path) -> str:
    """The build directory of the sources in `csrc`: one per source content and checkout
    path, so checkouts at other paths or versions never rebuild each other's copy (ninja's
    build file names the sources by path: two checkouts of the same content sharing a
    directory rebuilt it in turn, minutes each)."""
    names = [s.name for s in _SOURCES + _HEADERS]
    digest = hashlib.sha256(b"".join((csrc / name).read_bytes() for name in names)
                            + str(csrc.resolve()).encode()).hexdigest()[:16]
    return f"pdserve_cpu_kernels_{digest}"


@functools.lru_cache(maxsize=1)
def cpu_extension():
    """The compiled module, or None (with the reason logged) when it cannot be built."""
    from torch.utils import cpp_extension

    # ninja may be installed beside this interpreter without being on PATH (a venv that
    # is not activated, a Ray worker).
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    build_dir = Path(cpp_extension._get_build_directory("pdserve_cpu_kernels", verbose=False)).parent
    build_dir = build_dir / build_directory_name(_CSRC)
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        # torch guards a build with a `lock` file that a process killed mid-build leaves
        # behind, after which every later load waits forever. Builds here run under an
        # flock instead (released when its holder dies), so a `lock` file found while
        # holding it is stale and goes.
        with open(build_dir / "pdserve.flock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            return cpp_extension.load(
                name="pdserve_cpu_kernels", sources=[str(s) for s in _SOURCES], build_directory=str(build_dir),
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler or ninja
        log.warning("the CPU kernels could not be built (%s: %s); the PyTorch references run "
                    "instead", type(exc).__name__, exc)
        return None


def built_cpu_extension():
    """The compiled module; RuntimeError where it cannot be built (see `cpu_kernels_available`).
    What every kernel wrapper calls."""
    extension = cpu_extension()
    if extension is None:
        raise RuntimeError("the CPU kernels are not built on this machine")
    return extension


def cpu_kernels_available() -> bool:
    """Whether the CPU kernels (batch attention, block linear) exist on this machine;
    builds them on the first call."""
    return cpu_extension() is not None
