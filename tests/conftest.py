"""Shared fixtures: the built-in experts imported once per session (into .coe/test-home, reused by later
local runs), loaded experts, and transformers' reading of the same GGUF files as the reference."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def home() -> Path:
    return Path(os.environ.get("COE_TEST_HOME", REPO / ".coe" / "test-home"))


@pytest.fixture(scope="session")
def store(home):
    from coeserve import catalog
    from coeserve.store.disk import DiskStore

    s = DiskStore(home)
    catalog.ensure(s)
    return s


@pytest.fixture(scope="session")
def smol(store):
    from coeserve.engine.load import load_expert
    return load_expert(store, SMOL, device="cpu", dtype="fp32", max_len=1024)


@pytest.fixture(scope="session")
def gemma(store):
    from coeserve.engine.load import load_expert
    return load_expert(store, GEMMA, device="cpu", dtype="fp32", max_len=1024)


@pytest.fixture(scope="session")
def gguf_files(tmp_path_factory) -> dict[str, Path]:
    from coeserve import catalog
    d = tmp_path_factory.mktemp("gguf")
    return {n: b.locate(d) for n, b in catalog.BUILTINS.items()}


@pytest.fixture(scope="session")
def reference(gguf_files):
    """name -> (transformers model, tokenizer) read from the same GGUF file, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = {}

    def get(name):
        if name not in cache:
            f = gguf_files[name]
            tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
            model = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32)
            cache[name] = (model.eval(), tok)
        return cache[name]
    return get
