"""Read a GGUF file: tensors dequantised with the `gguf` package and renamed to their HF names (with
llama.cpp's export-time transforms undone), config and tokenizer parsed by transformers' GGUF support."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from coeserve.formats.checkpoint import Checkpoint, ImportError_

# Quantisations we read; the `gguf` package dequantises each of them.
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3": "gemma3"}

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm"}
# The norm around the MLP has a different HF name in the two families.
_FFN_NORM = {"llama": "post_attention_layernorm", "qwen2": "post_attention_layernorm",
             "gemma2": "pre_feedforward_layernorm", "gemma3": "pre_feedforward_layernorm"}
_BLK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, arch: str) -> str | None:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLK_RE.match(gguf_name)
    if not m:
        return None  # e.g. rope_freqs: derived from the config instead
    layer, part, kind = m.groups()
    if part == "ffn_norm":
        target = _FFN_NORM[arch]
    elif part == "post_attention_norm":
        target = "post_attention_layernorm"
    else:
        target = _BLOCK.get(part)
    return f"model.layers.{layer}.{target}.{kind}" if target else None


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (it stores rotary pairs interleaved)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> Checkpoint:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
        arch_field = reader.fields["general.architecture"].contents()
    except Exception as e:  # GGUFReader raises ValueError/KeyError/struct errors on bad files
        raise ImportError_(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    if arch_field not in GGUF_ARCHS:
        raise ImportError_(f"{path}: unsupported architecture {arch_field!r} "
                           f"(supported: {', '.join(sorted(GGUF_ARCHS))})")
    arch = GGUF_ARCHS[arch_field]
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ImportError_(f"{path}: tensor {t.name} has unsupported quantisation {t.tensor_type.name}")
    hf_config, tok_dir = _config_and_tokenizer(path)  # tok_dir: a temp dir, removed by Checkpoint.close
    by_name = {n: t for t in reader.tensors if (n := hf_name(t.name, arch))}
    n_head, n_kv = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]

    def load(name: str) -> torch.Tensor:
        t = by_name[name]
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # owned, writable
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if arch == "llama" and ".q_proj." in name:
            w = reverse_permute(w, n_head)
        elif arch == "llama" and ".k_proj." in name:
            w = reverse_permute(w, n_kv)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w) norm weights; HF layout keeps w
        return torch.from_numpy(np.ascontiguousarray(w))

    return Checkpoint(path, hf_config, list(by_name), load, tok_dir, temp_dirs=[tok_dir])


def _config_and_tokenizer(path: Path) -> tuple[dict, Path]:
    """transformers parses GGUF metadata into an HF config and tokenizer; we save the tokenizer files."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ImportError_(f"{path}: cannot read GGUF metadata ({type(e).__name__}: {e})") from None
    tok_dir = Path(tempfile.mkdtemp(prefix="coe-tok-"))
    tok.save_pretrained(str(tok_dir))
    d = cfg.to_dict()
    d.setdefault("model_type", cfg.model_type)
    return d, tok_dir
