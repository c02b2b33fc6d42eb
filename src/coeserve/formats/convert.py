"""From a source checkpoint (HF names and layout) to our model config and the tensors of an expert image.

Everything derivable is baked here, once, at import: Q/K/V and gate/up are fused into one matrix each,
and Gemma's `(1 + w)` norm scale is stored as the multiplier itself, so a forward pass does no work on
weights at load time. Matrices keep the [out, in] layout that oneDNN and cuBLAS take directly (the
layouts were compared in bench/layout.py).
"""
from __future__ import annotations

from typing import Iterator

import torch

from coeserve.config import ModelConfig
from coeserve.formats.checkpoint import Checkpoint, ImportError_

MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "smollm": "llama",
               "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}


ROPE_SCALINGS = ("llama3", "linear")


def _scaling(d: dict | None, source: str) -> dict | None:
    """A rope scaling we implement (normalised to carry `rope_type`), None for none; refuse the rest
    rather than silently run without it."""
    kind = (d.get("rope_type") or d.get("type")) if d else None
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALINGS:
        raise ImportError_(f"{source}: unsupported rope scaling {kind!r} (supported: {', '.join(ROPE_SCALINGS)})")
    return {**d, "rope_type": kind}


def _rope(hf: dict, source: str = "") -> tuple[float, float | None, dict | None]:
    """(global theta, local theta, scaling of the global layers) from the v4 or v5 transformers layout."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:  # per layer type (Gemma 3 in transformers 5)
        full, local = params["full_attention"], params.get("sliding_attention", {})
        if _scaling(local, source):
            raise ImportError_(f"{source}: rope scaling on sliding-window layers is not supported")
        return float(full["rope_theta"]), float(local.get("rope_theta", 10000.0)), _scaling(full, source)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = _scaling(params, source) or _scaling(hf.get("rope_scaling"), source)
    local = hf.get("rope_local_base_freq")
    return float(theta), (float(local) if local else None), scaling


def _layer_types(hf: dict, arch: str, n: int) -> tuple[str, ...]:
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    if arch == "gemma2":  # alternating, starting with sliding
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))
    if arch == "gemma3":
        pat = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        return tuple("full_attention" if (i + 1) % pat == 0 else "sliding_attention" for i in range(n))
    if hf.get("sliding_window") and hf.get("use_sliding_window", True) and hf.get("model_type") == "mistral":
        return ("sliding_attention",) * n
    return ()


def _eos(hf: dict) -> tuple[int, ...]:
    e = hf.get("eos_token_id")
    return tuple(e) if isinstance(e, list) else ((e,) if e is not None else ())


def model_config(hf: dict, source: str = "") -> ModelConfig:
    mt = hf.get("model_type", "")
    if mt not in MODEL_TYPES:
        raise ImportError_(f"{source}: unsupported architecture {mt!r} "
                           f"(supported: {', '.join(sorted(MODEL_TYPES))})")
    arch = MODEL_TYPES[mt]
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    theta, local_theta, scaling = _rope(hf, source)
    gemma = arch.startswith("gemma")
    layer_types = _layer_types(hf, arch, hf["num_hidden_layers"])
    return ModelConfig(
        arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=n_heads,
        num_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        max_position=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        attention_bias=bool(hf.get("attention_bias", mt == "qwen2")), rope_scaling=scaling,
        hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu"),
        sliding_window=hf.get("sliding_window") if layer_types else None, layer_types=layer_types,
        rope_local_theta=local_theta if gemma else None,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if gemma else None,
        attn_logit_softcapping=hf.get("attn_logit_softcapping"),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=_eos(hf),
    )


def layer_of(name: str, cfg: ModelConfig) -> int:
    if name.startswith("layers."):
        return int(name.split(".")[1])
    if name == "embed.weight":
        return -1
    return cfg.num_layers


def baked_tensors(ck: Checkpoint, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our name, tensor) in execution order; fused and baked as the module docstring says."""
    def get(name: str) -> torch.Tensor:
        if not ck.has(name):
            raise ImportError_(f"{ck.source}: tensor {name} is missing")
        return ck.get(name)

    def norm(name: str) -> torch.Tensor:
        w = get(name)
        return w + 1.0 if cfg.is_gemma else w

    yield "embed.weight", get("model.embed_tokens.weight")
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        yield q + "attn_norm.weight", norm(p + "input_layernorm.weight")
        proj = [p + f"self_attn.{x}_proj" for x in "qkv"]
        yield q + "qkv.weight", torch.cat([get(x + ".weight") for x in proj])
        if cfg.attention_bias:
            yield q + "qkv.bias", torch.cat([get(x + ".bias") for x in proj])
        if cfg.arch == "gemma3":
            yield q + "q_norm.weight", norm(p + "self_attn.q_norm.weight")
            yield q + "k_norm.weight", norm(p + "self_attn.k_norm.weight")
        yield q + "o.weight", get(p + "self_attn.o_proj.weight")
        if cfg.is_gemma:
            yield q + "post_attn_norm.weight", norm(p + "post_attention_layernorm.weight")
            yield q + "mlp_norm.weight", norm(p + "pre_feedforward_layernorm.weight")
        else:
            yield q + "mlp_norm.weight", get(p + "post_attention_layernorm.weight")
        yield q + "gate_up.weight", torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        yield q + "down.weight", get(p + "mlp.down_proj.weight")
        if cfg.is_gemma:
            yield q + "post_mlp_norm.weight", norm(p + "post_feedforward_layernorm.weight")
    yield "norm.weight", norm("model.norm.weight")
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", get("lm_head.weight")
