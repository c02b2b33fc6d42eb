"""A source checkpoint seen through one interface: an HF-style config dict, tensors by their HF names
(in HF layout, float32, loaded one at a time), and a directory of tokenizer files."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


class ImportError_(ValueError):
    """A source that cannot be imported; the message names the file and the reason."""


@dataclass
class Checkpoint:
    source: Path
    hf_config: dict
    names: list[str]
    loader: Callable[[str], torch.Tensor]
    tokenizer_dir: Path | None
    temp_dirs: list[Path] = field(default_factory=list)  # made while reading; removed by close()

    def close(self) -> None:
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def get(self, name: str) -> torch.Tensor:
        return self.loader(name)

    def has(self, name: str) -> bool:
        return name in self._name_set

    def __post_init__(self):
        self._name_set = set(self.names)
