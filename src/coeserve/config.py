"""Frozen configuration dataclasses, one per part; each validates itself in `__post_init__`.

`ModelConfig` is our own normalised description of a decoder model, derived once at import from the
source's config (HF config.json or GGUF metadata) and stored beside the expert image.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

ARCHS = ("llama", "gemma2", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    rope_scaling: dict | None = None  # Llama 3.1 style: factor, low/high_freq_factor, original_max
    hidden_act: str = "silu"
    # Gemma only.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # "sliding_attention" / "full_attention" per layer
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("model config: num_heads must be a multiple of num_kv_heads")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError("model config: layer_types must have one entry per layer")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def is_gemma(self) -> bool:
        return self.arch.startswith("gemma")

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


def default_home() -> Path:
    """Where experts live: $COE_HOME, else the user's cache directory."""
    env = os.environ.get("COE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "coeserve"


COMPUTE_DTYPES = ("auto", "fp32", "bf16", "fp16")  # auto: fp32 on CPU, bf16 on CUDA


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16
    max_seq_len: int = 2048  # KV cache length per sequence; capped by the model's context
    fused: bool = False  # torch.compile the decode step (and CUDA graphs on CUDA)
    device: str = "auto"
    dtype: str = "auto"  # fp32 on CPU, bf16 on CUDA
    prefill_chunk: int = 512
    batch_buckets: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 64))
    static_shapes: bool | None = None  # fused steps padded to fixed shapes; None = on CUDA only
    prefix_cache: bool = True  # a prompt reuses a free KV slot that holds its first tokens (kv_cache.py)
    decode_ahead: int | None = None  # decode passes queued per step (Engine._ahead); None: 8 on CUDA, else 1
    device_sampling: bool | None = None  # sample all rows at once on the device (sampler.sample_batch); None: on CUDA
    speculate: int = 0  # draft tokens by prompt lookup checked per step for greedy sequences (engine/speculate.py)

    def __post_init__(self):
        if self.max_batch < 1 or self.max_seq_len < 2 or self.prefill_chunk < 1:
            raise ValueError("engine config: max_batch, max_seq_len and prefill_chunk must be positive")
        if self.decode_ahead is not None and self.decode_ahead < 1:
            raise ValueError("engine config: decode_ahead must be at least 1")
        if self.speculate < 0:
            raise ValueError("engine config: speculate must be 0 (off) or more")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"engine config: unknown dtype {self.dtype!r}")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """'12GiB', '512MiB', '2G', '1e9' or an int → bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        if unit not in _UNITS:
            raise ValueError
        return int(float(num) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"invalid size {text!r}: use a number with an optional unit such as 512MiB or 12GiB") from None


@dataclass(frozen=True)
class StoreConfig:
    """Budgets of the host and device tiers. None = sized from the machine at start (store/budget.py)."""
    host_bytes: int | None = None
    device_slots: int | None = None
    slot_bytes: int | None = None  # default: the largest installed expert
    policy: str = "lru"
    loaders: int = 4  # threads reading images from disk
    chunk_bytes: int = 256 << 20  # host → device copy chunk (split at layer ends while a request streams)
    read_block: int = 8 << 20  # disk read size
    direct_io: bool = True  # O_DIRECT reads where the filesystem allows them

    def __post_init__(self):
        for name in ("host_bytes", "device_slots", "slot_bytes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"store config: {name} must be positive")
        if self.loaders < 1 or self.chunk_bytes < 4096 or self.read_block < 4096 or self.read_block % 4096:
            raise ValueError("store config: loaders ≥ 1, chunk_bytes ≥ 4 KiB, read_block a multiple of 4 KiB")
