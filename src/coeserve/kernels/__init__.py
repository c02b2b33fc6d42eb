"""Our own CPU kernels, compiled on the machine that runs them for its own vector unit (-march=native).

- `small_linear(x, w)`: x @ w.T for 1-16 rows of x, fp32 (a decode step). The general GEMMs (MKL,
  oneDNN) are tuned for many rows, and one sequential stream of weights per core leaves the memory
  idle between prefetches; this one reads each weight once, from several streams at once
  (`small_linear.cpp`, `bench/layout.py`).
- `decode_attention(q, k_cache, v_cache, slots, positions, window, scale, softcap)`: one query token
  per sequence over its keys in the cache, in place (`decode_attention.cpp`).
- `rms_norm(x, w, eps)`: RMSNorm of fp32 rows in one pass, for eager steps (`rms_norm.cpp`).
- `rope(x, cos, sin)`: rotary embedding of fp32 q or k in one pass, for eager steps (`rope.cpp`).

Built by torch.utils.cpp_extension with the system's C++ compiler on first use (about 40 s, once: the
build is kept under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, and `make install` makes
it). Where they cannot be built (no compiler), `build()` logs why once and the accessors return None;
callers then use torch's ops, which give the same values up to rounding. The ops have shape functions,
so compiled (torch.compile) steps can call them too. `COE_CPU_KERNELS=0` skips the build (a GPU machine
whose CPU steps are only references in tests).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
# One translation unit, in this order: vec.h (what the kernels share), then each kernel.
_SOURCES = [Path(__file__).with_name(n)
            for n in ("vec.h", "small_linear.cpp", "decode_attention.cpp", "rms_norm.cpp", "rope.cpp")]
_lock = threading.Lock()
# Each op's shape function (for torch.compile), which is also the list of ops the library defines.
_FAKES = {
    "small_linear": lambda x, w: x.new_empty(x.shape[0], w.shape[0]),
    "decode_attention": lambda q, k, v, slots, positions, window, scale, softcap:
        q.new_empty(q.shape[0], q.shape[1] * q.shape[2]),
    "rms_norm": lambda x, w, eps: torch.empty_like(x),
    "rope": lambda x, cos, sin: x.new_empty(x.shape),
}
_ops: dict = {}  # name → op, once built
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
    """Compile (or load the kept build of) the kernels; the small_linear op, or None with the reason logged
    once."""
    global _tried
    with _lock:
        if _tried:
            return small_linear()
        _tried = True
        if os.environ.get("COE_CPU_KERNELS", "1") == "0":
            log.info("coeserve kernels not built (COE_CPU_KERNELS=0)")
            return None
        try:
            from torch.utils import cpp_extension

            try:
                import ninja  # the pip package's binary, when the machine has none on PATH

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except ImportError:
                pass
            cpp_extension.load_inline(
                f"coeserve_kernels_{_cpu_tag()}", [p.read_text() for p in _SOURCES], is_python_module=False,
                extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)
            for name, fake in _FAKES.items():
                torch.library.register_fake(f"coeserve_kernels::{name}")(fake)
            _ops.update({name: getattr(torch.ops.coeserve_kernels, name) for name in _FAKES})
        except Exception as e:  # no compiler, no headers: torch's matmuls do the work
            log.warning("coeserve kernels not built (%s); decode steps use torch's matmuls and SDPA",
                        str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return small_linear()


# Each op if it is built (None before `build()` or where it failed).
def small_linear():
    return _ops.get("small_linear")


def decode_attention():
    return _ops.get("decode_attention")


def rms_norm():
    return _ops.get("rms_norm")


def rope():
    return _ops.get("rope")
