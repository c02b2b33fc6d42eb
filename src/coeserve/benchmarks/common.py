"""Small helpers shared by the benchmarks."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def drop_cache(path: Path) -> None:
    """Make a file cold: ask the kernel to drop its cached pages (clean pages go at once)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def copy_bandwidth(dev: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes moved per second by a large device-to-device copy: each byte is read once and written once,
    and both count (STREAM's convention), so a pure read stream is bounded by the same number."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(dev)
        t = time.perf_counter()
        b.copy_(a)
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def device_name(dev: torch.device) -> str:
    """The GPU's name, or the CPU's with its core count and its widest matrix/vector units: CPUs that
    report the same model name (a virtual "Intel Xeon Processor") differ in them, and so do the numbers."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        model = next(l.split(":", 1)[1].strip() for l in lines if l.startswith("model name"))
        flags = set(next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), []))
    except (OSError, StopIteration):
        model, flags = platform.processor() or platform.machine(), set()
    units = [u for f, u in (("amx_tile", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                            ("avx2", "AVX2")) if f in flags][:1]
    return f"{model} ({', '.join([f'{os.cpu_count()} cpus'] + units)})"


def write_result(result: dict, out: str | Path | None) -> None:
    """A benchmark's ending: its result as one JSON line on stdout and, with `--out`, as a JSON file."""
    print(json.dumps(result))
    save_json(result, out)


def save_json(result: dict, out: str | Path | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")


def synthetic_expert(shape: str, dev: torch.device, dtype: str = "auto"):
    """A random-weight expert of a synthetic shape (formats/synthetic.py) bound on `dev`, token ids only:
    bf16 on CUDA and fp32 on CPU unless `dtype` says."""
    from coeserve.engine.engine import Expert
    from coeserve.engine.load import bind_image, pick_dtype
    from coeserve.formats.synthetic import random_image, synthetic_config
    from coeserve.models import build_model

    cfg = synthetic_config(shape)
    index, buf = random_image(cfg, "bf16" if dtype == "auto" and dev.type == "cuda" else
                              ("fp32" if dtype == "auto" else dtype), device=dev)
    model = build_model(cfg, max_len=4096)
    model.to_device(dev)
    dt = pick_dtype(dtype, dev)
    bind_image(model, buf, index, dt)
    return Expert(f"synthetic-{shape}", cfg, model, None, dev, dt)
