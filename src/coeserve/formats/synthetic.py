"""Random-weight experts of a given shape, laid out exactly as an imported image (same names, order,
alignment), for benchmarks at shapes we have no real weights for (a 7B Llama) and for store tests."""
from __future__ import annotations

import torch

from coeserve.config import ModelConfig
from coeserve.formats.image import ALIGN, DTYPES, FILE_ALIGN, ImageIndex, TensorEntry, _align

SHAPES = {
    # Llama-2-7B: the expert size of the SN40L paper's Samba-CoE.
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
               num_kv_heads=32, head_dim=128),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
               num_kv_heads=4, head_dim=64),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16),
}


def synthetic_config(shape: str, **over) -> ModelConfig:
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r} (choose from {', '.join(SHAPES)})")
    d = dict(arch="llama", rms_norm_eps=1e-5, rope_theta=10000.0, max_position=4096, tie_word_embeddings=False,
             eos_token_ids=(2,), bos_token_id=1)
    d.update(SHAPES[shape], **over)
    return ModelConfig(**d)


def param_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in image order, matching formats.convert.baked_tensors for the Llama family."""
    h, qkv = cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    out = [("embed.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_layers):
        q = f"layers.{i}."
        out += [(q + "attn_norm.weight", (h,)), (q + "qkv.weight", (qkv, h))]
        if cfg.attention_bias:
            out.append((q + "qkv.bias", (qkv,)))
        out += [(q + "o.weight", (h, cfg.num_heads * cfg.head_dim)), (q + "mlp_norm.weight", (h,)),
                (q + "gate_up.weight", (2 * cfg.intermediate_size, h)),
                (q + "down.weight", (h, cfg.intermediate_size))]
    out.append(("norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", (cfg.vocab_size, h)))
    return out


def random_image(cfg: ModelConfig, dtype: str = "fp32", seed: int = 0,
                 device: str | torch.device = "cpu") -> tuple[ImageIndex, torch.Tensor]:
    """An image buffer with N(0, 1/fan_in) matrices and norms near 1; no checksums (chunk_crcs empty)."""
    from coeserve.formats.convert import layer_of

    entries, ends, off, last = [], [], 0, -1
    esize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    for name, shape in param_shapes(cfg):
        layer = layer_of(name, cfg)
        while last < layer:
            ends.append(off)
            last += 1
        n = esize
        for d in shape:
            n *= d
        entries.append(TensorEntry(name, dtype, shape, off, n))
        off = _align(off + n, ALIGN)
    total = _align(off, FILE_ALIGN)
    buf = torch.zeros(total, dtype=torch.uint8, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for e in entries:
        view = buf[e.offset:e.offset + e.nbytes].view(DTYPES[dtype]).view(e.shape)
        if len(e.shape) == 1:
            view.copy_(1.0 + 0.1 * torch.randn(e.shape, generator=gen, device=device))
        else:
            view.copy_(torch.randn(e.shape, generator=gen, device=device) * e.shape[-1] ** -0.5)
    return ImageIndex(tuple(entries), total, tuple(ends), 64 << 20, ()), buf


def random_tensors(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu"):
    """(name, tensor) in image order, the same distribution as random_image, for writing to disk."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in param_shapes(cfg):
        if len(shape) == 1:
            yield name, 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
        else:
            yield name, torch.randn(shape, generator=gen, device=device) * shape[-1] ** -0.5


def install(store, name: str, cfg: ModelConfig, seed: int = 0, dtype: str = "fp32",
            device: str | torch.device = "cpu"):
    """Write a random-weight expert into a DiskStore (no tokenizer: token ids in and out). The numbers
    are drawn on `device` (a GPU draws a 7B expert's in a moment, a CPU core in about a minute), so the
    same seed gives other weights on another kind of device."""
    tensors = ((n, t.to(DTYPES[dtype]).cpu()) for n, t in random_tensors(cfg, seed, device))
    return store.add(name, cfg, tensors, dtype, f"synthetic (seed {seed})")
