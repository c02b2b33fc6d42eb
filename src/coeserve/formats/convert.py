"""From a source checkpoint (HF names and layout) to our model config and the tensors of an expert image.

Everything derivable is baked here, once, at import: Q/K/V and gate/up are fused into one matrix each,
every matrix is stored transposed ([in, out], which CPU GEMV kernels stream faster: measured in
bench/layout.py), and Gemma's `(1 + w)` norm scale is stored as the multiplier itself, so a forward pass
does no work on weights at load time. A tied embedding is stored once, as the head ([hidden, vocab]);
token lookup reads its columns.
"""
from __future__ import annotations

from typing import Iterator

import torch

from coeserve.config import ModelConfig
from coeserve.formats.checkpoint import Checkpoint, ImportError_

MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "smollm": "llama",
               "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}


def _rope(hf: dict) -> tuple[float, float | None, dict | None]:
    """(global theta, local theta, llama3 scaling) from either the v4 or the v5 transformers layout."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:  # per layer type (Gemma 3 in transformers 5)
        full, local = params["full_attention"], params.get("sliding_attention", {})
        return float(full["rope_theta"]), float(local.get("rope_theta", 10000.0)), None
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params if params.get("rope_type") == "llama3" else hf.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in ("llama3",):
        if (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
            raise ImportError_(f"unsupported rope scaling {scaling.get('rope_type') or scaling.get('type')!r}")
        scaling = None
    local = hf.get("rope_local_base_freq")
    return float(theta), (float(local) if local else None), (dict(scaling) if scaling else None)


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
    theta, local_theta, scaling = _rope(hf)
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
    if name == "embed.weight" or (name == "lm_head.weight" and cfg.tie_word_embeddings):
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

    if cfg.tie_word_embeddings:
        yield "lm_head.weight", get("model.embed_tokens.weight").t()
    else:
        yield "embed.weight", get("model.embed_tokens.weight")
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        yield q + "attn_norm.weight", norm(p + "input_layernorm.weight")
        proj = [p + f"self_attn.{x}_proj" for x in "qkv"]
        yield q + "qkv.weight", torch.cat([get(x + ".weight") for x in proj]).t()
        if cfg.attention_bias:
            yield q + "qkv.bias", torch.cat([get(x + ".bias") for x in proj])
        if cfg.arch == "gemma3":
            yield q + "q_norm.weight", norm(p + "self_attn.q_norm.weight")
            yield q + "k_norm.weight", norm(p + "self_attn.k_norm.weight")
        yield q + "o.weight", get(p + "self_attn.o_proj.weight").t()
        if cfg.is_gemma:
            yield q + "post_attn_norm.weight", norm(p + "post_attention_layernorm.weight")
            yield q + "mlp_norm.weight", norm(p + "pre_feedforward_layernorm.weight")
        else:
            yield q + "mlp_norm.weight", get(p + "post_attention_layernorm.weight")
        yield q + "gate_up.weight", torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]).t()
        yield q + "down.weight", get(p + "mlp.down_proj.weight").t()
        if cfg.is_gemma:
            yield q + "post_mlp_norm.weight", norm(p + "post_feedforward_layernorm.weight")
    yield "norm.weight", norm("model.norm.weight")
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", get("lm_head.weight").t()
