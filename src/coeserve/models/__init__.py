"""Our own PyTorch model code (no transformers modeling code at run time)."""
from __future__ import annotations

from coeserve.config import ModelConfig


def build_model(cfg: ModelConfig, max_len: int | None = None):
    """The model class for an architecture; weights are bound afterwards with `bind`."""
    if cfg.is_gemma:
        from coeserve.models.gemma import Gemma
        return Gemma(cfg, max_len)
    from coeserve.models.llama import Llama
    return Llama(cfg, max_len)
