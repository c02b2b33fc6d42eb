"""The Llama family: Llama 2/3 (with 3.1 rope scaling), Mistral, Qwen2 (QKV bias), SmolLM2."""
from __future__ import annotations

import torch.nn.functional as F

from coeserve.config import ModelConfig
from coeserve.models.common import Decoder, linear, rms_norm, rope_table


class Llama(Decoder):
    def __init__(self, cfg: ModelConfig, max_len: int | None = None):
        super().__init__(cfg)
        self.scale = cfg.head_dim ** -0.5
        self.max_len = max_len or cfg.max_position
        self.rope = rope_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, self.max_len)

    def to_device(self, device) -> None:
        self.rope = self.rope.to(device)

    def block(self, i, x, step):
        c, w = self.cfg, self.w
        h = rms_norm(x, w[f"layers.{i}.attn_norm.weight"], c.rms_norm_eps)
        q, k, v = self.qkv(i, h)
        window = c.sliding_window if c.is_sliding(i) else None
        a = self.attend(i, q, k, v, step, "rope", window, self.scale, None)
        x = x + linear(a, w[f"layers.{i}.o.weight"])
        h = rms_norm(x, w[f"layers.{i}.mlp_norm.weight"], c.rms_norm_eps)
        gate, up = linear(h, w[f"layers.{i}.gate_up.weight"]).chunk(2, dim=-1)
        return x + linear(F.silu(gate) * up, w[f"layers.{i}.down.weight"])
