"""Load an installed expert for the engine: image → buffer, model bound to views of it, tokenizer."""
from __future__ import annotations

import threading
from pathlib import Path

import torch
import xxhash

from coeserve.engine.engine import Expert
from coeserve.engine.tokenizer import Codec
from coeserve.formats.image import DTYPES, load_image, tensor_views
from coeserve.models import build_model
from coeserve.store.disk import TOKENIZER_DIR, DiskStore


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def bind_image(model, buf: torch.Tensor, index, dtype: torch.dtype) -> None:
    views = tensor_views(buf, index)
    # Same dtype: parameters are views of the image. Otherwise (an fp32 image run in bf16) one cast copy.
    model.bind({n: (t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)) for n, t in views.items()})


def load_expert(store: DiskStore, name: str, device: str = "auto", dtype: str = "auto",
                max_len: int | None = None) -> Expert:
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    cfg = store.config(name)
    index, buf = load_image(store.path(name))
    if dev.type != "cpu":
        buf = buf.to(dev)
    model = build_model(cfg, max_len=max_len)
    model.to_device(dev)
    bind_image(model, buf, index, dt)
    return Expert(name, cfg, model, load_codec(store, name, cfg), dev, dt)


_CODECS: dict[tuple, list] = {}  # (tokenizer files' hash, eos ids) → [lock, Codec or None]
_CODECS_LOCK = threading.Lock()


def load_codec(store: DiskStore, name: str, cfg) -> Codec | None:
    """The expert's tokenizer, or None for an expert without one (token ids in and out).

    Tokenizers are shared by content: the server's request threads and the engine loop get the same
    object, experts that ship the same tokenizer files share one, and only one thread builds each (a
    large vocabulary takes a second or more, which the engine loop must not spend)."""
    tok_dir = store.path(name) / TOKENIZER_DIR
    if not tok_dir.is_dir():
        return None
    key = (_files_hash(tok_dir), tuple(cfg.eos_token_ids))
    with _CODECS_LOCK:
        entry = _CODECS.setdefault(key, [threading.Lock(), None])
    with entry[0]:
        if entry[1] is None:
            entry[1] = Codec(tok_dir, cfg.eos_token_ids)
    return entry[1]


def _files_hash(folder: Path) -> str:
    h = xxhash.xxh3_128()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0")
            h.update(f.read_bytes())
    return h.hexdigest()
