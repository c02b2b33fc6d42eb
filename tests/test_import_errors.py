"""Bad input to the import path and damaged images: each gives a clear error that names the file and
the reason, and a failed import leaves nothing half-written in the store."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coeserve.formats.checkpoint import ImportError_  # noqa: E402
from coeserve.formats.image import IMAGE_FILE, INDEX_FILE, ImageError, load_image  # noqa: E402
from coeserve.store.disk import DiskStore  # noqa: E402


def _save_tiny(cls_name: str, cfg, path: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    getattr(transformers, cls_name)(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny Llama HF directory (config.json + model.safetensors, no tokenizer)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    return _save_tiny("LlamaForCausalLM", cfg, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A valid HF directory of an architecture we do not serve (an encoder)."""
    from transformers import BertConfig

    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     vocab_size=128, max_position_embeddings=64)
    return _save_tiny("BertForMaskedLM", cfg, tmp_path_factory.mktemp("bert"))


@pytest.fixture
def store(tmp_path) -> DiskStore:
    return DiskStore(tmp_path / "home")


@pytest.fixture
def installed(store, tiny_llama) -> DiskStore:
    """A store holding one good expert, "good"."""
    store.import_source(tiny_llama, "good")
    return store


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _assert_nothing_left(store: DiskStore, names_before: list[str]) -> None:
    assert store.names() == names_before
    if store.root.exists():
        entries = sorted(p.name for p in store.root.iterdir())
        assert entries == names_before, f"leftovers in {store.root}: {entries}"


# -- bad sources -----------------------------------------------------------------------------------

def test_missing_path(store, tmp_path):
    src = tmp_path / "does-not-exist"
    with pytest.raises(ImportError_) as e:
        store.import_source(src, "x")
    assert str(src) in str(e.value) and "no such file or directory" in str(e.value)
    _assert_nothing_left(store, [])


def test_directory_without_config_json(store, tmp_path):
    src = tmp_path / "empty-model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"")
    with pytest.raises(ImportError_) as e:
        store.import_source(src, "x")
    assert str(src / "config.json") in str(e.value) and "missing" in str(e.value)
    _assert_nothing_left(store, [])


def test_directory_without_safetensors(store, tiny_llama, tmp_path):
    src = tmp_path / "no-weights"
    src.mkdir()
    shutil.copy(tiny_llama / "config.json", src / "config.json")
    with pytest.raises(ImportError_) as e:
        store.import_source(src, "x")
    assert str(src) in str(e.value) and "safetensors" in str(e.value)
    _assert_nothing_left(store, [])


def test_config_json_not_json(store, tiny_llama, tmp_path):
    src = _copy_dir(tiny_llama, tmp_path / "bad-json")
    (src / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ImportError_) as e:
        store.import_source(src, "x")
    assert str(src / "config.json") in str(e.value) and "JSON" in str(e.value)
    _assert_nothing_left(store, [])


def test_unsupported_model_type(store, tiny_bert):
    assert json.loads((tiny_bert / "config.json").read_text())["model_type"] == "bert"
    with pytest.raises(ImportError_) as e:
        store.import_source(tiny_bert, "x")
    msg = str(e.value)
    assert str(tiny_bert) in msg and "unsupported architecture 'bert'" in msg and "llama" in msg
    _assert_nothing_left(store, [])


def test_unreadable_safetensors_shard(store, tiny_llama, tmp_path):
    src = _copy_dir(tiny_llama, tmp_path / "bad-shard")
    (src / "model.safetensors").write_bytes(_random_bytes(4096))
    with pytest.raises(ImportError_) as e:
        store.import_source(src, "x")
    assert str(src / "model.safetensors") in str(e.value) and "safetensors" in str(e.value)
    _assert_nothing_left(store, [])


@pytest.mark.parametrize("content", [_random_bytes(8192), b"", b"GGUF" + _random_bytes(200, seed=1)],
                         ids=["random", "empty", "gguf-magic-then-garbage"])
def test_file_that_is_not_gguf(store, tmp_path, content):
    src = tmp_path / "model.gguf"
    src.write_bytes(content)
    with pytest.raises(ImportError_) as e:
        store.import_source(src, "x")
    assert str(src) in str(e.value) and "GGUF" in str(e.value)
    _assert_nothing_left(store, [])


# -- failures part-way through an import -----------------------------------------------------------

def _without_tensor(src: Path, dst: Path, drop: str) -> Path:
    from safetensors.torch import load_file, save_file

    _copy_dir(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_failure_while_writing_leaves_no_temp_dir_and_keeps_the_old_expert(installed, tiny_llama, tmp_path):
    """A tensor missing from the last layer fails the import after the image is half written; the expert
    of the same name installed before is untouched and nothing else appears under experts/."""
    store = installed
    before = (store.path("good") / IMAGE_FILE).read_bytes()
    missing = "model.layers.1.mlp.down_proj.weight"
    src = _without_tensor(tiny_llama, tmp_path / "partial", missing)
    with pytest.raises(ImportError_) as e:
        store.import_source(src, "good")
    assert str(src) in str(e.value) and missing in str(e.value) and "missing" in str(e.value)
    _assert_nothing_left(store, ["good"])
    assert (store.path("good") / IMAGE_FILE).read_bytes() == before
    load_image(store.path("good"))  # still a whole, verified image

    with pytest.raises(ImportError_):
        store.import_source(src, "other")
    _assert_nothing_left(store, ["good"])


@pytest.mark.parametrize("make", ["missing", "not-gguf", "bert"])
def test_failed_import_leaves_store_unchanged(installed, tmp_path, tiny_bert, make):
    store = installed
    src = {"missing": tmp_path / "nope", "bert": tiny_bert}.get(make, tmp_path / "x.gguf")
    if make == "not-gguf":
        src.write_bytes(_random_bytes(1000))
    with pytest.raises(ImportError_):
        store.import_source(src, "good")
    _assert_nothing_left(store, ["good"])
    assert store.info("good").arch == "llama"


def test_leftover_temp_dir_of_an_interrupted_import_is_not_listed(installed):
    """A process killed between writing meta.json and the final rename leaves `.NAME.xxxx/` behind with
    a complete meta.json; it is not an expert and must not be listed (nor break `coe experts`)."""
    store = installed
    leftover = store.root / ".good.k1ll3d_x"
    shutil.copytree(store.path("good"), leftover)
    assert store.names() == ["good"]
    for n in store.names():
        store.info(n)


# -- expert names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", ".hidden", "x" * 129, "a b", "/abs"])
def test_invalid_expert_names(store, tiny_llama, name):
    with pytest.raises(ValueError, match="invalid expert name"):
        store.import_source(tiny_llama, name)
    with pytest.raises(ValueError, match="invalid expert name"):
        store.path(name)
    _assert_nothing_left(store, [])
    assert not (store.home.parent / "x").exists()


def test_valid_expert_names(store, tiny_llama):
    for name in ("a", "Qwen2.5-0.5B_instruct", "x" * 128):
        assert store.path(name).name == name


# -- damaged images --------------------------------------------------------------------------------

def test_truncated_image(installed):
    d = installed.path("good")
    image = d / IMAGE_FILE
    size = image.stat().st_size
    with open(image, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ImageError) as e:
        load_image(d)
    msg = str(e.value)
    assert str(image) in msg and "size" in msg and str(size // 2) in msg and str(size) in msg


def test_corrupted_image(installed):
    d = installed.path("good")
    image = d / IMAGE_FILE
    data = bytearray(image.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 16):
        data[i] ^= 0xFF
    image.write_bytes(bytes(data))
    assert image.stat().st_size == len(data)
    with pytest.raises(ImageError) as e:
        load_image(d)
    assert str(image) in str(e.value) and "checksum" in str(e.value)


def test_corrupted_image_fails_expert_load(installed):
    from coeserve.engine.load import load_expert

    d = installed.path("good")
    image = d / IMAGE_FILE
    data = bytearray(image.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit
    image.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="checksum"):
        load_expert(installed, "good", device="cpu", dtype="fp32")


def test_missing_image_and_bad_index(installed):
    d = installed.path("good")
    (d / IMAGE_FILE).unlink()
    with pytest.raises(ImageError) as e:
        load_image(d)
    assert str(d / IMAGE_FILE) in str(e.value) and "missing" in str(e.value)
    (d / INDEX_FILE).write_text("{not json")
    with pytest.raises(ImageError) as e:
        load_image(d)
    assert str(d / INDEX_FILE) in str(e.value) and "corrupted" in str(e.value)


# -- the CLI ---------------------------------------------------------------------------------------

def _coe(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "coeserve.cli", "--home", str(home), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("kind", ["missing", "no-config", "not-gguf", "bad-name"])
def test_cli_import_error_is_one_line(tmp_path, kind):
    home = tmp_path / "home"
    name, src = "x", tmp_path / "src"
    if kind == "missing":
        src = Path("/nonexistent")
    elif kind == "no-config":
        src.mkdir()
    elif kind == "not-gguf":
        src.write_bytes(_random_bytes(2048))
    else:
        src.mkdir()
        name = "../x"
    r = _coe(home, "import", str(src), "--name", name)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("coe: error:"), err
    assert (name in err) if kind == "bad-name" else (str(src) in err), err
    assert not (home / "experts").exists() or not list((home / "experts").iterdir())
