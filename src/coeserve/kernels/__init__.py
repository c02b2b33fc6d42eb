"""Our own CPU kernels, compiled on the machine that runs them for its own vector unit (-march=native).

`small_linear(x, w)`: x @ w.T for a few rows of x, fp32 (a decode batch of 4-16 rows). The general
GEMMs (MKL, oneDNN) are tuned for many rows and run a 4-16 row step at about half the speed the memory
allows; this one reads each weight once per call (`small_linear.cpp`, `bench/layout.py`).

Built by torch.utils.cpp_extension with the system's C++ compiler on first use (about 40 s, once: the
build is kept under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, and `make install` makes
it). Where it cannot be built (no compiler), `build()` logs why once and `small_linear()` returns None;
callers then use torch's matmuls, which give the same values up to rounding.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("small_linear.cpp")
_lock = threading.Lock()
_op = None
_tried = False


def _cpu_tag() -> str:
    """Which CPU the build is for: a home directory shared by machines of different CPUs keeps one
    build per kind, so none runs instructions its CPU lacks."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def build():
    """Compile (or load the kept build of) the kernels; the op, or None with the reason logged once."""
    global _op, _tried
    with _lock:
        if _tried:
            return _op
        _tried = True
        try:
            from torch.utils import cpp_extension

            try:
                import ninja  # the pip package's binary, when the machine has none on PATH

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except ImportError:
                pass
            cpp_extension.load_inline(
                f"coeserve_kernels_{_cpu_tag()}", [_SOURCE.read_text()], is_python_module=False,
                extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)
            torch.library.register_fake("coeserve_kernels::small_linear")(
                lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
            _op = torch.ops.coeserve_kernels.small_linear
        except Exception as e:  # no compiler, no headers: torch's matmuls do the work
            log.warning("coeserve kernels not built (%s); decode batches use torch's matmuls",
                        str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return _op


def small_linear():
    """The small-row linear op if it is built (None before `build()` or where it failed)."""
    return _op
