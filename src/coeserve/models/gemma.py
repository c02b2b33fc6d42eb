"""Gemma 2 and Gemma 3: sandwich norms, sliding/global attention with their own rope bases, q/k norms
(Gemma 3), embedding scaling, attention and final-logit soft-capping where the config asks.
Norm weights arrive already as `1 + w` (baked at import)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from coeserve.config import ModelConfig
from coeserve.models.common import Decoder, linear, rms_norm, rope_table


class Gemma(Decoder):
    def __init__(self, cfg: ModelConfig, max_len: int | None = None):
        super().__init__(cfg)
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.max_len = max_len or cfg.max_position
        self.rope_global = rope_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, self.max_len)
        local = cfg.rope_local_theta or cfg.rope_theta
        self.rope_local = rope_table(cfg.head_dim, local, None, self.max_len)
        self.normalizer = cfg.hidden_size ** 0.5

    def to_device(self, device) -> None:
        self.rope_global, self.rope_local = self.rope_global.to(device), self.rope_local.to(device)

    def layer_params(self) -> list[str]:
        extra = ["post_attn_norm", "post_mlp_norm"] + (["q_norm", "k_norm"] if self.cfg.arch == "gemma3" else [])
        return super().layer_params() + extra

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = super().embed_tokens(tokens)
        # HF multiplies by the normaliser rounded to the activation dtype.
        return x * torch.tensor(self.normalizer, dtype=x.dtype)

    def block(self, i, x, step):
        c, w, eps = self.cfg, self.w, self.cfg.rms_norm_eps
        h = rms_norm(x, w[f"layers.{i}.attn_norm.weight"], eps)
        q, k, v = self.qkv(i, h)
        if c.arch == "gemma3":
            q, k = rms_norm(q, w[f"layers.{i}.q_norm.weight"], eps), rms_norm(k, w[f"layers.{i}.k_norm.weight"], eps)
        sliding = c.is_sliding(i)
        rope = "rope_local" if sliding else "rope_global"
        a = self.attend(i, q, k, v, step, rope, c.sliding_window if sliding else None,
                        self.scale, c.attn_logit_softcapping)
        a = linear(a, w[f"layers.{i}.o.weight"])
        x = x + rms_norm(a, w[f"layers.{i}.post_attn_norm.weight"], eps)
        h = rms_norm(x, w[f"layers.{i}.mlp_norm.weight"], eps)
        gate, up = linear(h, w[f"layers.{i}.gate_up.weight"]).chunk(2, dim=-1)
        m = linear(F.gelu(gate, approximate="tanh") * up, w[f"layers.{i}.down.weight"])
        return x + rms_norm(m, w[f"layers.{i}.post_mlp_norm.weight"], eps)
