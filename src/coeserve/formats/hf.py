"""Read a Hugging Face model directory: config.json, one or many *.safetensors, tokenizer files."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from coeserve.formats.checkpoint import Checkpoint, ImportError_

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja", "chat_template.json")


def read_hf_dir(path: Path) -> Checkpoint:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ImportError_(f"{cfg_path}: missing (an HF model directory needs config.json)")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ImportError_(f"{path}: no *.safetensors files")
    try:
        hf_config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ImportError_(f"{cfg_path}: not valid JSON ({e.msg})") from None
    where: dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    where[name] = shard
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ImportError_(f"{shard}: unreadable safetensors file ({e})") from None

    def load(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as f:
            return f.get_tensor(name).to(torch.float32)

    has_tok = any((path / f).exists() for f in TOKENIZER_FILES)
    return Checkpoint(path, hf_config, list(where), load, path if has_tok else None)
